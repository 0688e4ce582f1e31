r"""Benchmark: one SLAM-AGS pretraining step, slamjax vs PyTorch, same machine.

Times ``slamjax.pretrain.make_train_step`` (augmentations of both tasks' views,
two ResNet-18 + 512-512 head forwards, both per-task gradients, adaptive
PCGrad, weight decay and SGD-momentum update) against the same step written
in PyTorch (``benchmarks/torch_reference.py``), with the same batch, image
size and thread count. The two are run alternately in one process, so both
see the same machine load; the ratio is slamjax time / PyTorch time (below 1
means slamjax is faster). Peak memory (peak RSS while stepping, after
warm-up, and its growth over the RSS before stepping) is measured for each
in a separate child process.

  python benchmarks/pretrain_step.py                      # 64 and 128 px
  python benchmarks/pretrain_step.py --sizes 64 --reps 5 --markdown out.md

torch is an optional dependency: ``pip install torch==2.13.0``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _rss_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return -1


def _reset_peak_rss() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def jax_config(size: int, batch: int, width: int, proj: int, impl: str, surgery: str):
  from configs import default
  cfg = default.get_config()
  cfg.model.width = width
  cfg.model.proj_dims = (proj, proj)
  cfg.model.impl = impl
  cfg.augment.crop_size = size
  cfg.pretrain.batch_size = batch
  cfg.pretrain.surgery = surgery
  return cfg


def make_jax_step(size: int, batch: int, width: int, proj: int, impl: str,
                  surgery: str = "adaptive_pcgrad"):
  """Returns (run_one_step, describe) for the slamjax train step."""
  import jax
  import numpy as np
  from slamjax import pretrain, sharding

  cfg = jax_config(size, batch, width, proj, impl, surgery)
  mesh = sharding.make_mesh(-1)
  model, tx, _ = pretrain.build(cfg, steps_per_epoch=1000)
  state = pretrain.init_state(cfg, model, tx, mesh)
  step_fn = pretrain.make_train_step(cfg, model, tx, mesh)
  rng = np.random.RandomState(0)
  half = batch // 2
  imgs = rng.randint(0, 256, (2 * half, size, size, 3)).astype(np.uint8)
  batch_arrays = sharding.shard_batch(mesh, {"pos": imgs[:half], "neg": imgs[half:]})
  holder = {"state": state}

  def run():
    holder["state"], m = step_fn(holder["state"], batch_arrays)
    jax.block_until_ready((holder["state"], m))
    return m

  return run


def make_torch_step(size: int, batch: int, width: int, proj: int, threads: int,
                    layout: str, channels_last: bool):
  import torch
  import torch_reference
  torch.set_num_threads(threads)
  step = torch_reference.make_step(size, batch, width, (proj, proj), layout=layout,
                                   channels_last=channels_last)
  pos, neg = torch_reference.random_batch(batch, size)
  return lambda: step(pos, neg)


def _timed(run, times: list, faults: list) -> None:
  """Runs one step; appends its wall time and its minor page faults."""
  f0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
  run()
  times.append(time.perf_counter() - t)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)


def worker(args) -> None:
  """Child process: warm up, then report time and peak RSS of a few steps."""
  if args.allocator:
    from slamjax.models import layers
    layers.tune_cpu_allocator()
  if args.worker == "jax":
    run = make_jax_step(args.size, args.batch, args.width, args.proj, args.impl)
  else:
    run = make_torch_step(args.size, args.batch, args.width, args.proj, args.threads,
                          args.torch_layout, args.channels_last)
  for _ in range(args.warmup):
    run()
  base = _rss_kib("VmRSS")
  _reset_peak_rss()
  times, faults = [], []
  for _ in range(args.steps):
    _timed(run, times, faults)
  print("RESULT " + json.dumps({"peak_rss_mib": _rss_kib("VmHWM") / 1024,
                                "rss_before_mib": base / 1024, "times": times,
                                "page_faults": faults}))


def measure_memory(args, which: str, size: int) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", which, "--size", str(size),
         "--batch", str(args.batch), "--width", str(args.width), "--proj", str(args.proj),
         "--impl", args.impl, "--threads", str(args.threads), "--steps", "2",
         "--torch-layout", args.torch_layout, "--warmup", str(args.warmup)]
  if args.channels_last:
    cmd.append("--channels-last")
  if not args.allocator:
    cmd.append("--no-allocator")
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[7:])
  raise RuntimeError(f"{which} memory worker failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
  p.add_argument("--batch", type=int, default=128, help="cells per step (half positive)")
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--proj", type=int, default=512)
  p.add_argument("--impl", default="auto", choices=["auto", "native", "cpu"])
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--reps", type=int, default=5, help="timed steps of each, alternating")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps of each first")
  p.add_argument("--torch-layout", default="per_task", choices=["per_task", "reference"])
  p.add_argument("--channels-last", action="store_true", help="torch channels_last")
  p.add_argument("--no-allocator", dest="allocator", action="store_false",
                 help="leave glibc malloc at its defaults (both frameworks)")
  p.add_argument("--no-memory", dest="memory", action="store_false")
  p.add_argument("--markdown", help="append a results table to this file")
  # Internal: child-process worker for the memory measurement.
  p.add_argument("--worker", choices=["jax", "torch"])
  p.add_argument("--size", type=int)
  p.add_argument("--steps", type=int, default=2)
  args = p.parse_args(argv)
  if args.worker:
    return worker(args)

  if args.allocator:
    from slamjax.models import layers
    layers.tune_cpu_allocator()
  import jax
  import torch
  rows = []
  for size in args.sizes:
    t0 = time.perf_counter()
    jrun = make_jax_step(size, args.batch, args.width, args.proj, args.impl)
    jrun()
    compile_s = time.perf_counter() - t0
    trun = make_torch_step(size, args.batch, args.width, args.proj, args.threads,
                           args.torch_layout, args.channels_last)
    # Warm-up: until the heap holds both frameworks' step buffers, steps
    # page-fault fresh memory (see slamjax.models.layers.tune_cpu_allocator).
    for _ in range(args.warmup):
      jrun(); trun()
    jt, tt, jf, tf = [], [], [], []
    for _ in range(args.reps):  # alternate, so both see the same load
      _timed(jrun, jt, jf)
      _timed(trun, tt, tf)
    paired = statistics.median(a / b for a, b in zip(jt, tt))
    row = dict(size=size, batch=args.batch, threads=args.threads,
               jax_ms_median=1e3 * statistics.median(jt), jax_ms_min=1e3 * min(jt),
               torch_ms_median=1e3 * statistics.median(tt), torch_ms_min=1e3 * min(tt),
               ratio_median=statistics.median(jt) / statistics.median(tt),
               ratio_min=min(jt) / min(tt), ratio_paired=paired,
               jax_first_step_s=compile_s, jax_ms=[round(1e3 * x) for x in jt],
               torch_ms=[round(1e3 * x) for x in tt], jax_page_faults=jf,
               torch_page_faults=tf)
    print(json.dumps(row), flush=True)
    if args.memory:
      del jrun, trun
      for which in ("jax", "torch"):
        m = measure_memory(args, which, size)
        row[f"{which}_peak_rss_mib"] = m["peak_rss_mib"]
        row[f"{which}_step_rss_mib"] = m["peak_rss_mib"] - m["rss_before_mib"]
      print(json.dumps({k: row[k] for k in row if "rss" in k}), flush=True)
    rows.append(row)

  load = os.getloadavg()
  header = (f"SLAM-AGS step, ResNet-18 width {args.width} + {args.proj}-{args.proj} head, "
            f"batch {args.batch} cells ({args.batch // 2}+{args.batch // 2}, 2 views each), "
            f"{args.threads} threads, jax {jax.__version__} (impl={args.impl}), "
            f"torch {torch.__version__} (layout={args.torch_layout}"
            f"{', channels_last' if args.channels_last else ''}), "
            f"{args.warmup} warm-up and {args.reps} alternating timed steps, "
            f"load average {load[0]:.1f}")
  lines = [header, "",
           "| image | slamjax ms/step (median, min) | PyTorch ms/step (median, min) "
           "| ratio (median; paired) | peak RSS slamjax / PyTorch, MiB (growth while stepping) "
           "| page faults per step slamjax / PyTorch (median) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    mem = (f"{r['jax_peak_rss_mib']:.0f} ({r['jax_step_rss_mib']:.0f}) / "
           f"{r['torch_peak_rss_mib']:.0f} ({r['torch_step_rss_mib']:.0f})"
           if "jax_peak_rss_mib" in r else "n/a")
    lines.append(f"| {r['size']}x{r['size']} | {r['jax_ms_median']:.0f}, {r['jax_ms_min']:.0f} "
                 f"| {r['torch_ms_median']:.0f}, {r['torch_ms_min']:.0f} "
                 f"| {r['ratio_median']:.2f}; {r['ratio_paired']:.2f} | {mem} "
                 f"| {statistics.median(r['jax_page_faults']):.0f} / "
                 f"{statistics.median(r['torch_page_faults']):.0f} |")
  table = "\n".join(lines)
  print(table)
  if args.markdown:
    with open(args.markdown, "a") as f:
      f.write(table + "\n\n")


if __name__ == "__main__":
  main()
