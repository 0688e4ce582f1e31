"""Cost of the gradient-surgery transforms themselves (issue 3, part (b)).

Times one jitted ``tx.update`` (per-task gradients in, combined update out)
for every method in ``slamjax.surgery`` against the number of tasks ``T`` and
the number of parameters ``P``, all in one run, and prints two tables: the
median time per update and its ratio to the cheapest possible reduction of
the task axis (``reduce_tasks('sum')``: one pass over the ``T x P`` input, no
Gram matrix, no diagnostics).

The gradient tree mimics a conv net: ~20 leaves of mixed sizes summing to
``P``. The update includes the Gram matrix (one pass over the input), the
``T x T`` weighting (solvers for MGDA/UPGrad/CAGrad/Nash-MTL) and the final
combination (another pass). Part (a) of the issue (a whole SLAM-AGS training
step vs a summed-loss step) is benchmarked elsewhere.

Usage::

  python benchmarks/surgery_cost.py                    # P in {1e5, 1e6}
  python benchmarks/surgery_cost.py --params 1e6,1e7 --tasks 2,16
  python benchmarks/surgery_cost.py --methods sum,ags,mgda --repeats 50
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from slamjax import surgery

DEFAULT_METHODS = ["sum", "pcgrad", "ags", "gradvac", "cagrad", "mgda",
                   "imtl_g", "aligned_mtl", "upgrad", "nash_mtl"]


def leaf_sizes(p: int, n_leaves: int = 20) -> list[int]:
  """Leaf sizes growing geometrically (like conv layers), summing to p."""
  raw = np.geomspace(1.0, 64.0, n_leaves)
  sizes = np.maximum(1, np.floor(raw / raw.sum() * p)).astype(int)
  sizes[-1] += p - sizes.sum()
  return [int(s) for s in sizes]


def make_grads(p: int, t: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  grads = {}
  for i, s in enumerate(leaf_sizes(p)):
    g = rng.standard_normal((t, s), dtype=np.float32)
    g[-1] -= 1.2 * g[0]  # a conflicting pair, so projections actually run
    grads[f"layer{i:02d}"] = g
  return jax.block_until_ready(jax.device_put(grads))


def build(name: str, t: int):
  if name == "reduce":
    return surgery.reduce_tasks("sum")
  return surgery.get(name, key=0, num_tasks=t)


def time_method(name, grads, params, t, repeats, stat="median"):
  tx = build(name, t)
  update = jax.jit(tx.update)
  state = tx.init(params)
  t0 = time.perf_counter()
  out, state = update(grads, state, params)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out, state = update(grads, state, params)
    jax.block_until_ready((out, state))
    times.append(time.perf_counter() - t0)
  agg = statistics.median if stat == "median" else min
  return agg(times), compile_s


def fmt_params(p: int) -> str:
  return f"{p / 1e6:g}M" if p >= 1e6 else f"{p / 1e3:g}k"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--params", default="1e5,1e6",
                  help="comma-separated parameter counts")
  ap.add_argument("--tasks", default="2,4,8,16",
                  help="comma-separated task counts")
  ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--stat", choices=("median", "min"), default="median",
                  help="statistic over repeats (min is robust on busy hosts)")
  args = ap.parse_args()
  ps = [int(float(x)) for x in args.params.split(",")]
  ts = [int(x) for x in args.tasks.split(",")]
  methods = ["reduce"] + [m for m in args.methods.split(",") if m != "reduce"]

  dev = jax.devices()[0]
  print(f"# surgery transform cost: jax {jax.__version__}, "
        f"{dev.platform} ({dev.device_kind}), {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, load avg "
        f"{os.getloadavg()[0]:.1f} at start")
  print(f"# {args.stat} of {args.repeats} jitted updates after 1 warm-up call; "
        "ratio = time / reduce_tasks('sum') time at the same (P, T)\n")

  results = {}  # (method, p, t) -> (median s, compile s)
  for p in ps:
    for t in ts:
      grads = make_grads(p, t)
      params = {k: jnp.zeros(v.shape[1:]) for k, v in grads.items()}
      for m in methods:
        results[(m, p, t)] = time_method(m, grads, params, t, args.repeats,
                                         args.stat)
      del grads

  cols = [(p, t) for p in ps for t in ts]
  head = "| method | " + " | ".join(
      f"P={fmt_params(p)} T={t}" for p, t in cols) + " |"
  sep = "|---|" + "---:|" * len(cols)
  print("## time per update (ms)\n")
  print(head)
  print(sep)
  for m in methods:
    print(f"| {m} | " + " | ".join(
        f"{results[(m, p, t)][0] * 1e3:.3f}" for p, t in cols) + " |")
  print("\n## ratio to reduce_tasks('sum')\n")
  print(head)
  print(sep)
  for m in methods:
    print(f"| {m} | " + " | ".join(
        f"{results[(m, p, t)][0] / results[('reduce', p, t)][0]:.2f}"
        for p, t in cols) + " |")
  print("\n## first call incl. compilation (s)\n")
  print(head)
  print(sep)
  for m in methods:
    print(f"| {m} | " + " | ".join(
        f"{results[(m, p, t)][1]:.2f}" for p, t in cols) + " |")
  print(f"\n# load avg {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
  main()
