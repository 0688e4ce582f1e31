"""slamjax.surgery against torchjd on ResNet-18-sized per-task gradients.

The same per-task gradients go to both libraries: for slamjax as a pytree
with ResNet-18's parameter shapes (the convolutional backbone with its
BatchNorm scales and biases, 11.2M parameters, HWIO kernels), for torchjd as
the flattened ``(T, P)`` matrix its aggregators take (a zero-copy view of the
same memory; flattening is not timed). slamjax runs one jitted ``tx.update``
(the whole optax transform: Gram matrix, weights, combination, state);
torchjd runs ``aggregator(matrix)``. Both run in this one process, one call
each in turn (alternating, so a load change on the machine hits both), and
the table gives the medians and their ratio slamjax / torchjd.

Methods and their torchjd counterparts:

=================  ==========================================================
slamjax            torchjd
=================  ==========================================================
sum                ``Sum()``
pcgrad             ``PCGrad()``
adaptive_pcgrad    ``PCGrad()``, then rescaled to the norm of ``matrix.sum(0)``
                   (torchjd has no adaptive PCGrad; this is what a user would
                   write: one more pass for the sum, two norms)
upgrad             ``UPGrad()`` (quadprog on the host)
mgda               ``MGDA()`` (Frank-Wolfe, torchjd defaults)
cagrad             ``CAGrad(c=0.5)`` (cvxpy + Clarabel on the host)
=================  ==========================================================

torchjd and torch live in their own virtual environment (this repository
never imports torch)::

  python3.11 -m venv /work/benchvenv
  /work/benchvenv/bin/pip install torch==2.13.0 "torchjd[cagrad]" qpsolvers \\
      quadprog jax optax numpy scipy
  PYTHONPATH=. /work/benchvenv/bin/python benchmarks/surgery_vs_torchjd.py

Options: ``--tasks 2,5,10 --methods sum,mgda --repeats 15``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import time

import jax
import numpy as np

from slamjax import surgery

METHODS = ["sum", "pcgrad", "adaptive_pcgrad", "upgrad", "mgda", "cagrad"]


def resnet18_shapes() -> dict[str, tuple[int, ...]]:
  """ResNet-18 backbone parameter shapes (HWIO convs, BN scale/bias)."""
  shapes = {"conv1/kernel": (7, 7, 3, 64), "bn1/scale": (64,),
            "bn1/bias": (64,)}
  cin = 64
  for stage, cout in enumerate((64, 128, 256, 512), start=1):
    for block in range(2):
      p = f"layer{stage}/block{block}"
      stride2 = stage > 1 and block == 0
      shapes[f"{p}/conv1/kernel"] = (3, 3, cin, cout)
      shapes[f"{p}/bn1/scale"] = shapes[f"{p}/bn1/bias"] = (cout,)
      shapes[f"{p}/conv2/kernel"] = (3, 3, cout, cout)
      shapes[f"{p}/bn2/scale"] = shapes[f"{p}/bn2/bias"] = (cout,)
      if stride2:
        shapes[f"{p}/down/kernel"] = (1, 1, cin, cout)
        shapes[f"{p}/down/bn/scale"] = shapes[f"{p}/down/bn/bias"] = (cout,)
      cin = cout
  return shapes


def make_inputs(t: int, seed: int = 0):
  """(pytree of (T, *shape) jax arrays, (T, P) float32 numpy matrix)."""
  shapes = resnet18_shapes()
  sizes = [int(np.prod(s)) for s in shapes.values()]
  rng = np.random.default_rng(seed)
  mat = rng.standard_normal((t, sum(sizes)), dtype=np.float32)
  mat *= np.geomspace(1.0, 20.0, t, dtype=np.float32)[:, None]  # unequal norms
  mat[-1] -= 0.8 * mat[0]  # a conflicting pair, so the projections run
  tree, start = {}, 0
  for (name, shape), size in zip(shapes.items(), sizes):
    tree[name] = jax.device_put(mat[:, start:start + size].reshape(t, *shape))
    start += size
  return jax.block_until_ready(tree), mat


def slamjax_fn(name: str, t: int, tree):
  kwargs = {"key": 0} if name in ("pcgrad", "adaptive_pcgrad") else {}
  tx = surgery.get(name, num_tasks=t, **kwargs)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                        tree)
  state = jax.jit(tx.init)(params)
  update = jax.jit(lambda g, s: tx.update(g, s))

  def run():
    jax.block_until_ready(update(tree, state))
  return run


def torchjd_fn(name: str, matrix):
  import torch  # only here: the repository never imports torch
  import torchjd.aggregation as agg

  if name == "sum":
    aggregator = agg.Sum()
  elif name in ("pcgrad", "adaptive_pcgrad"):
    aggregator = agg.PCGrad()
  elif name == "upgrad":
    aggregator = agg.UPGrad()
  elif name == "mgda":
    aggregator = agg.MGDA()
  elif name == "cagrad":
    aggregator = agg.CAGrad(c=0.5)
  else:
    raise ValueError(name)

  def run():
    with torch.no_grad():
      out = aggregator(matrix)
      if name == "adaptive_pcgrad":
        out = out * (matrix.sum(0).norm() / out.norm())
    return out
  return run


def time_pair(f, g, repeats: int) -> tuple[float, float]:
  f(), g(), f(), g()  # compile / warm caches
  tf, tg = [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f()
    t1 = time.perf_counter()
    g()
    t2 = time.perf_counter()
    tf.append(t1 - t0)
    tg.append(t2 - t1)
  return statistics.median(tf), statistics.median(tg)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", default="2,5,10")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args()
  import torch

  tasks = [int(x) for x in args.tasks.split(",")]
  methods = args.methods.split(",")
  p = sum(int(np.prod(s)) for s in resnet18_shapes().values())
  print(f"# {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; jax {jax.__version__}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), torchjd "
        f"{importlib.metadata.version('torchjd')}; P = {p:,} parameters "
        f"({len(resnet18_shapes())} leaves), float32, median of "
        f"{args.repeats} alternating calls")
  print("| T | method | slamjax ms | torchjd ms | ratio |")
  print("|---|---|---|---|---|")
  for t in tasks:
    tree, mat = make_inputs(t)
    matrix = torch.from_numpy(mat)
    for name in methods:
      ts, tt = time_pair(slamjax_fn(name, t, tree), torchjd_fn(name, matrix),
                         args.repeats)
      print(f"| {t} | {name} | {ts * 1e3:.1f} | {tt * 1e3:.1f} | "
            f"{ts / tt:.2f} |", flush=True)
    del tree, matrix, mat


if __name__ == "__main__":
  main()
