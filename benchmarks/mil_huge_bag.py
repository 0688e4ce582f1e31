r"""One bag of 100,000 cells x 512 dims, forward + backward through ABMIL, PAMIL
and ASMIL on CPU, without any N x N array; reports peak memory.

For each head, in a fresh subprocess (so that peak RSS is the head's own):

1. builds the full training loss of ``slamjax.mil.train`` for one padded
   bag (the head's own terms included: PAMIL ER + clustering, ASMIL anchor KD
   against an EMA anchor), at the default config dims (ABMIL 128/64, PAMIL
   the references' 512/256 with 10 prototypes, ASMIL D_i 128 with 16 FEAT
   tokens x 8 heads);
2. checks on the jaxpr of value_and_grad that no value has two axes of size
   >= N (no N x N array, nor N x N x anything);
3. compiles it (XLA's own estimate of temporary memory is reported), runs it
   once to warm up and ``--repeats`` more times, timing each;
4. reports the process's peak resident memory (``ru_maxrss``), the input
   size for scale, and XLA's memory analysis.

  python benchmarks/mil_huge_bag.py                  # all three heads
  python benchmarks/mil_huge_bag.py --heads=asmil --n=200000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HEAD_CFG = {
    "abmil": dict(head="abmil", hidden_dim=128, attention_dim=64),
    "pamil": dict(head="pamil", hidden_dim=512, attention_dim=256),
    "asmil": dict(head="asmil", hidden_dim=128),
}


def _avals(jaxpr):
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield getattr(v.aval, "shape", ())
    for p in eqn.params.values():
      for q in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(q, "jaxpr", q)
        if hasattr(inner, "eqns"):
          yield from _avals(inner)


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def run_child(head: str, n: int, dim: int, repeats: int) -> dict:
  import jax
  import numpy as np
  from slamjax.mil import heads, options
  from slamjax.mil import train as mil_train

  jax.numpy.zeros(1).block_until_ready()
  baseline = _rss_mb()  # interpreter + JAX runtime, before any bag data

  cfg = options.resolve(HEAD_CFG[head])
  spec = heads.get_spec(cfg)
  model = spec.build(cfg, 1, None)
  length = n  # one bag, no padding needed; the mask is still applied
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, length, dim)).astype(np.float32)
  x[0, : n // 100, :16] += 2.0
  mask = np.ones((1, length), bool)
  batch = dict(x=x, mask=mask, label=np.ones((1, 1), np.float32),
               weight=np.ones((1,), np.float32))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:, :16], mask[:, :16])
  anchor = jax.tree.map(lambda p: p * 0.99, params) if spec.anchor else None
  loss_fn = mil_train.make_loss_fn(cfg, spec, model, np.ones(1, bool), 100)

  def step(params, anchor, batch):
    ctx = {"anchor_params": anchor, "teacher_params": None, "kd_scale": 1.0}
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, jax.random.PRNGKey(1), ctx, 0)
    return loss, terms, grads

  jaxpr = jax.make_jaxpr(step)(params, anchor, batch)
  square = max(sum(d >= n for d in s) for s in _avals(jaxpr.jaxpr))
  if square > 1:
    raise AssertionError(f"{head}: a value with {square} axes of size >= N")
  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(params, anchor, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  out = compiled(params, anchor, batch)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, anchor, batch))
    times.append(time.perf_counter() - t0)
  loss, terms, grads = jax.device_get(out)
  finite = all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  return {
      "head": head, "n": n, "dim": dim,
      "terms": {k: float(v) for k, v in terms.items()},
      "grads_finite": bool(finite),
      "max_axes_of_size_n": int(square),
      "compile_s": round(compile_s, 2),
      "step_s": round(min(times), 3) if times else None,
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "baseline_rss_mb": round(baseline, 1),
      "input_mb": round(x.nbytes / 2**20, 1),
      "xla_temp_mb": round(getattr(mem, "temp_size_in_bytes", 0) / 2**20, 1) if mem else None,
      "xla_args_mb": round(getattr(mem, "argument_size_in_bytes", 0) / 2**20, 1) if mem else None,
      "n_by_n_fp32_mb_avoided": round(n * n * 4 / 2**20),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--heads", default="abmil,pamil,asmil")
  ap.add_argument("--n", type=int, default=100_000)
  ap.add_argument("--dim", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--child", default="", help=argparse.SUPPRESS)
  ap.add_argument("--json", default="", help="also write the results here")
  args = ap.parse_args()
  if args.child:
    print("RESULT " + json.dumps(run_child(args.child, args.n, args.dim, args.repeats)))
    return
  results = []
  for head in args.heads.split(","):
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--child={head}", f"--n={args.n}",
         f"--dim={args.dim}", f"--repeats={args.repeats}"],
        capture_output=True, text=True, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
      raise SystemExit(f"{head} failed (exit {proc.returncode})")
    res = json.loads(lines[-1][len("RESULT "):])
    results.append(res)
    print(f"{head:6s} N={res['n']} D={res['dim']}: fwd+bwd {res['step_s']} s "
          f"(compile {res['compile_s']} s), peak RSS {res['peak_rss_mb']} MB "
          f"(runtime before data {res['baseline_rss_mb']} MB), "
          f"XLA temp {res['xla_temp_mb']} MB, input {res['input_mb']} MB, "
          f"max axes of size N: {res['max_axes_of_size_n']} "
          f"(an N x N fp32 array would be {res['n_by_n_fp32_mb_avoided']} MB)", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
