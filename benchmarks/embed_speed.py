r"""Benchmark: embedding extraction (frozen encoder), slamjax vs PyTorch.

Times ``slamjax.embed.embed_images`` (centre crop + normalisation + ResNet-18
+ projection head in eval mode, batches of ``--batch`` images) against the
same loop in PyTorch (``benchmarks/torch_reference.py`` encoder,
``model.eval()`` under ``torch.inference_mode()``), alternating in one
process with the same threads; prints images/s and the time ratio (slamjax /
PyTorch, below 1 means slamjax is faster), plus the peak RSS of each from a
child process.

  python benchmarks/embed_speed.py
  python benchmarks/embed_speed.py --sizes 64 --images 512 --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import pretrain_step  # noqa: E402  (helpers: config, RSS)


def _images(n: int, size: int):
  import numpy as np
  return np.random.RandomState(0).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


def make_jax_embed(size: int, n: int, batch: int, width: int, proj: int, impl: str):
  from slamjax import embed, pretrain, sharding
  cfg = pretrain_step.jax_config(size, batch, width, proj, impl, "sum")
  cfg.embed.batch_size = batch
  mesh = sharding.make_mesh(-1)
  model, tx, _ = pretrain.build(cfg, steps_per_epoch=1)
  state = pretrain.init_state(cfg, model, tx, mesh)
  fn = embed.make_embed_fn(cfg, model, mesh)
  images = _images(n, size)
  return lambda: embed.embed_images(cfg, model, state, images, mesh, fn=fn)


def make_torch_embed(size: int, n: int, batch: int, width: int, proj: int, threads: int):
  import numpy as np
  import torch
  import torch_reference
  torch.set_num_threads(threads)
  model = torch_reference.Encoder(width, (proj, proj)).eval()
  images = torch.from_numpy(_images(n, size))

  def run():
    out = []
    with torch.inference_mode():
      for s in range(0, n, batch):
        x = torch_reference.center_view(images[s:s + batch], size)
        out.append(model(x)[1].numpy())
    return np.concatenate(out)
  return run


def worker(args) -> None:
  if args.allocator:
    from slamjax.models import layers
    layers.tune_cpu_allocator()
  if args.worker == "jax":
    run = make_jax_embed(args.size, args.images, args.batch, args.width, args.proj, args.impl)
  else:
    run = make_torch_embed(args.size, args.images, args.batch, args.width, args.proj,
                           args.threads)
  run()
  pretrain_step._reset_peak_rss()
  run()
  print("RESULT " + json.dumps({"peak_rss_mib": pretrain_step._rss_kib("VmHWM") / 1024}))


def measure_memory(args, which: str, size: int) -> float:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", which, "--size", str(size),
         "--images", str(args.images), "--batch", str(args.batch), "--width", str(args.width),
         "--proj", str(args.proj), "--impl", args.impl, "--threads", str(args.threads)]
  if not args.allocator:
    cmd.append("--no-allocator")
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[7:])["peak_rss_mib"]
  raise RuntimeError(f"{which} memory worker failed:\n{out.stderr[-4000:]}")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
  p.add_argument("--images", type=int, default=1024)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--proj", type=int, default=512)
  p.add_argument("--impl", default="auto", choices=["auto", "native", "cpu"])
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--no-allocator", dest="allocator", action="store_false")
  p.add_argument("--no-memory", dest="memory", action="store_false")
  p.add_argument("--markdown", help="append a results table to this file")
  p.add_argument("--worker", choices=["jax", "torch"])
  p.add_argument("--size", type=int)
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
    jrun = make_jax_embed(size, args.images, args.batch, args.width, args.proj, args.impl)
    trun = make_torch_embed(size, args.images, args.batch, args.width, args.proj, args.threads)
    jrun()
    trun()
    jt, tt = [], []
    for _ in range(args.reps):
      t = time.perf_counter(); jrun(); jt.append(time.perf_counter() - t)
      t = time.perf_counter(); trun(); tt.append(time.perf_counter() - t)
    row = dict(size=size, images=args.images, batch=args.batch, threads=args.threads,
               jax_img_s=args.images / statistics.median(jt),
               torch_img_s=args.images / statistics.median(tt),
               ratio_median=statistics.median(jt) / statistics.median(tt),
               ratio_min=min(jt) / min(tt),
               ratio_paired=statistics.median(a / b for a, b in zip(jt, tt)))
    print(json.dumps(row), flush=True)
    if args.memory:
      del jrun, trun
      row["jax_peak_rss_mib"] = measure_memory(args, "jax", size)
      row["torch_peak_rss_mib"] = measure_memory(args, "torch", size)
      print(json.dumps({k: row[k] for k in row if "rss" in k}), flush=True)
    rows.append(row)
  load = os.getloadavg()
  lines = [f"Embedding extraction, ResNet-18 width {args.width} + {args.proj}-{args.proj} head, "
           f"{args.images} images in batches of {args.batch}, {args.threads} threads, "
           f"jax {jax.__version__} (impl={args.impl}), torch {torch.__version__}, "
           f"{args.reps} alternating reps, load average {load[0]:.1f}", "",
           "| image | slamjax img/s | PyTorch img/s | time ratio (median; paired) "
           "| peak RSS slamjax / PyTorch (MiB) |", "|---|---|---|---|---|"]
  for r in rows:
    mem = (f"{r['jax_peak_rss_mib']:.0f} / {r['torch_peak_rss_mib']:.0f}"
           if "jax_peak_rss_mib" in r else "n/a")
    lines.append(f"| {r['size']}x{r['size']} | {r['jax_img_s']:.0f} | {r['torch_img_s']:.0f} "
                 f"| {r['ratio_median']:.2f}; {r['ratio_paired']:.2f} | {mem} |")
  table = "\n".join(lines)
  print(table)
  if args.markdown:
    with open(args.markdown, "a") as f:
      f.write(table + "\n\n")


if __name__ == "__main__":
  main()
