r"""Benchmark (a) of the surgery issue: SLAM-AGS step / plain summed-loss step.

Both steps run the same model (ResNet-18 + 512-512 head), the same batch and
the same augmentations. The SLAM-AGS step differentiates the summed loss with
respect to one parameter copy per task (so both per-task gradients come out
of a single backward pass, since the tasks use disjoint cells), then applies
adaptive PCGrad; the baseline differentiates the summed loss once and skips
surgery. The two are timed alternately in one process; the printed ratio is
AGS time / summed time (target <= 1.05).

  python benchmarks/surgery_overhead.py --size 64 --batch 128 --reps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--width", type=int, default=64)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--impl", default="auto")
  args = ap.parse_args()

  import jax
  import numpy as np
  import optax
  from configs import default
  from slamjax import pretrain, sharding

  cfg = default.get_config()
  cfg.model.width = args.width
  cfg.model.proj_dims = (512, 512)
  cfg.model.impl = args.impl
  cfg.augment.crop_size = args.size
  mesh = sharding.make_mesh(-1)
  model, tx_ags, sched = pretrain.build(cfg, steps_per_epoch=100)
  tx_sum = optax.chain(optax.add_decayed_weights(cfg.pretrain.weight_decay),
                       optax.sgd(sched, momentum=cfg.pretrain.momentum))
  rng = np.random.default_rng(0)
  half = args.batch // 2
  img = lambda: rng.integers(0, 255, (half, args.size + 8, args.size + 8, 3), np.uint8)
  batch = sharding.shard_batch(mesh, {"pos": img(), "neg": img()})
  runs = {}
  for name, tx, per_task in (("ags", tx_ags, True), ("sum", tx_sum, False)):
    state = pretrain.init_state(cfg, model, tx, mesh, args.size + 8)
    step = pretrain.make_train_step(cfg, model, tx, mesh, per_task=per_task)
    state, m = step(state, batch)  # compile
    jax.block_until_ready(m)
    runs[name] = [step, state, []]
  for _ in range(args.reps):
    for name in ("ags", "sum"):
      step, state, times = runs[name]
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
      runs[name][1] = state
  med = {k: statistics.median(v[2]) for k, v in runs.items()}
  print(f"ResNet-18 (width {args.width}) + 512-512 head, {args.size}x{args.size}, "
        f"batch {args.batch} ({half} positive + {half} negative cells, 2 views each), "
        f"{jax.default_backend()}, median of {args.reps}")
  print("| step | ms/step |\n|---|---|")
  print(f"| plain summed loss | {1e3 * med['sum']:.0f} |")
  print(f"| SLAM-AGS (per-task grads + adaptive PCGrad) | {1e3 * med['ags']:.0f} |")
  print(f"ratio AGS / summed = {med['ags'] / med['sum']:.3f}")


if __name__ == "__main__":
  main()
