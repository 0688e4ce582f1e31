r"""MIL training throughput (bags/s): slamjax batched ABMIL vs a per-bag PyTorch loop.

Both sides train the same gated-attention ABMIL head (``Linear(D, 128) +
ReLU``; ``tanh(V h) * sigmoid(U h)`` with 64 attention units; softmax over the
bag; ``Linear(128, 1)``; sigmoid BCE; Adam with L2 weight decay 1e-4 added to
the gradient, as torch ``Adam(weight_decay=...)``) on the same bags in the same
shuffled order:

* PyTorch, as the references do: one bag per optimizer step
  (``for bag in loader: forward; loss.backward(); optimizer.step()``).
* slamjax: ``slamjax.mil.train.run_epoch``, the loop of ``fit``, with
  batches of ``--batch_size`` bags (filler bags weight 0). As in ``fit``,
  bags of similar lengths are padded once and kept on the device, and an
  epoch is one jitted ``lax.scan`` over its batches (``slamjax_b*``;
  :mod:`slamjax.mil.resident`); ``slamjax_b*_per_step`` is the other path of
  ``fit``, taken for bags of very different lengths: every batch padded on
  the host into its length bucket (4 sizes per power of two) and one jitted
  step per batch. Compilation happens before timing. With
  ``--batch_size=1`` the optimisation is the reference's; larger batches
  average the gradient over bags (the design notes ``shared/docs/mil-heads.md`` (outside this repository) section 0).

PyTorch runs the lean loop with 1 thread and with its default thread count
(on a shared or small machine one thread is often faster), and the
references' ``DataLoader(batch_size=1)`` loop with 1 thread. Rounds
alternate between all variants; the best round of each is reported, and the
ratio of each slamjax batch size to the fastest lean PyTorch loop and to the
DataLoader loop. Times cover host batching, every step and the final
device sync of an epoch, not compilation.

  python benchmarks/mil_throughput.py                       # 512 bags of 40-60 cells, D=512
  python benchmarks/mil_throughput.py --batch_size=1,8,32   # several slamjax batch sizes
  python benchmarks/mil_throughput.py --xla_threads=1       # XLA on one thread (busy machines)

torch is a benchmark-only dependency (``pip install torch==2.13.0``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __name__ == "__main__" and "--xla_threads=1" in sys.argv:
  # XLA reads its thread settings when JAX starts: this cannot wait for argparse.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                             "=false intra_op_parallelism_threads=1").strip()

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slamjax.mil import heads, options, padding  # noqa: E402
from slamjax.mil import train as mil_train  # noqa: E402


def make_bags(n, lo, hi, dim, seed=0):
  rng = np.random.default_rng(seed)
  bags, labels = [], []
  for i in range(n):
    x = rng.normal(size=(int(rng.integers(lo, hi + 1)), dim)).astype(np.float32)
    if i % 2:
      x[: max(1, len(x) // 10), :8] += 2.0
    bags.append(x)
    labels.append(i % 2)
  return bags, np.asarray(labels, np.float32)


# ------------------------------------------------------------------ torch side
def torch_epoch_fn(dim, hidden, att, lr, wd):
  import torch
  import torch.nn as nn
  torch.manual_seed(0)

  class ABMIL(nn.Module):
    def __init__(self):
      super().__init__()
      self.reduce = nn.Linear(dim, hidden)
      self.v, self.u, self.w = nn.Linear(hidden, att), nn.Linear(hidden, att), nn.Linear(att, 1)
      self.classifier = nn.Linear(hidden, 1)

    def forward(self, x):
      h = torch.relu(self.reduce(x))
      a = torch.softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h)))[:, 0], 0)
      return self.classifier(a @ h)

  model = ABMIL()
  opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
  loss_fn = nn.BCEWithLogitsLoss()

  def step(x, y):
    loss = loss_fn(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())

  def epoch(bags, labels, order, threads):
    """The lean loop: tensors straight from memory, one bag per step."""
    torch.set_num_threads(threads)
    total = 0.0
    for i in order:
      total += step(torch.from_numpy(bags[i]), torch.tensor([labels[i]]))
    return total / len(order)

  class Bags(torch.utils.data.Dataset):
    def __init__(self, bags, labels, order):
      self.bags, self.labels, self.order = bags, labels, order

    def __len__(self):
      return len(self.order)

    def __getitem__(self, j):
      i = self.order[j]
      return torch.from_numpy(self.bags[i]), torch.tensor(self.labels[i])

  def loader_epoch(bags, labels, order, threads):
    """The references' loop: a DataLoader with batch_size=1 (the bag order is
    given; the references shuffle, and SLAM-AGS also np.load()s every bag
    from disk each epoch, which is not timed here)."""
    torch.set_num_threads(threads)
    total = 0.0
    for x, y in torch.utils.data.DataLoader(Bags(bags, labels, order), batch_size=1):
      total += step(x[0], y.reshape(1))
    return total / len(order)

  epoch.loader = loader_epoch

  return epoch, f"torch {torch.__version__}", torch.get_num_threads()


# ---------------------------------------------------------------- slamjax side
def jax_epoch_fn(dim, hidden, att, lr, wd, batch_size, bags, labels, resident=True):
  cfg = options.resolve(ml_collections.ConfigDict(dict(
      head="abmil", hidden_dim=hidden, attention_dim=att, lr=lr, weight_decay=wd,
      batch_size=batch_size, epochs=1, stability_bags=0)))
  spec = heads.get_spec(cfg)
  model = spec.build(cfg, 1, None)
  params = mil_train._init_params(cfg, model, bags, 0)
  tx, train_step, _, train_epoch = mil_train._steps(cfg, spec, model, np.ones(1, bool), 1,
                                                    None)
  data = mil_train.resident_bags(cfg, bags, labels[:, None]) if resident else None
  state = mil_train.MilState(epoch=jax.numpy.zeros((), jax.numpy.int32), params=params,
                             opt_state=jax.jit(tx.init)(params),
                             step=jax.numpy.zeros((), jax.numpy.int32))
  box = {"state": state}
  key = jax.random.PRNGKey(7)

  def epoch(bags, labels, order):
    state, logs = mil_train.run_epoch(cfg, (train_step, train_epoch), box["state"], bags,
                                      labels[:, None], order, key, 0, data=data)
    jax.block_until_ready(state)
    box["state"] = state
    return float(np.mean(logs["loss"]))

  def warm(bags, labels):
    """Compiles the epoch scan, or the step for every bucket a batch can fall into."""
    if data is not None:
      epoch(bags, labels, np.arange(len(bags)))
      return
    by_bucket = {}
    for i, b in enumerate(bags):
      by_bucket.setdefault(padding.bucket_length(len(b), cfg.min_len,
                                                 cfg.buckets_per_octave), []).append(i)
    for idx in by_bucket.values():  # an epoch's worth of batches of this bucket
      epoch(bags, labels, np.resize(np.asarray(idx), len(bags)))

  epoch.warm = warm
  return epoch


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--bags", type=int, default=512)
  ap.add_argument("--min_size", type=int, default=40)
  ap.add_argument("--max_size", type=int, default=60)
  ap.add_argument("--dim", type=int, default=512)
  ap.add_argument("--hidden", type=int, default=128)
  ap.add_argument("--att", type=int, default=64)
  ap.add_argument("--batch_size", default="8", help="slamjax bags per step; comma list")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--torch_threads", default="",
                  help="comma list of torch thread counts; default: 1 and torch's default")
  ap.add_argument("--json", default="", help="also write the results here")
  ap.add_argument("--xla_threads", default="auto", choices=["auto", "1"],
                  help="1: XLA on one thread (give it as --xla_threads=1); auto: XLA's default")
  args = ap.parse_args()
  lr, wd = 5e-4, 1e-4
  bags, labels = make_bags(args.bags, args.min_size, args.max_size, args.dim)
  t_epoch, t_desc, t_default = torch_epoch_fn(args.dim, args.hidden, args.att, lr, wd)
  threads = ([int(t) for t in args.torch_threads.split(",")] if args.torch_threads
             else sorted({1, t_default}))
  sizes = [int(b) for b in args.batch_size.split(",")]
  j_epochs = {}
  for b in sizes:
    j_epochs[f"slamjax_b{b}"] = jax_epoch_fn(args.dim, args.hidden, args.att, lr, wd, b, bags,
                                             labels)
    j_epochs[f"slamjax_b{b}_per_step"] = jax_epoch_fn(args.dim, args.hidden, args.att, lr, wd,
                                                      b, bags, labels, resident=False)
  rng = np.random.default_rng(0)
  # warm-up: compiles every bucket, first torch allocations
  warm = rng.permutation(len(bags))
  t_variants = {f"torch_{t}thr": (t_epoch, t) for t in threads}
  t_variants["torch_dataloader_1thr"] = (t_epoch.loader, 1)
  for fn, t in t_variants.values():
    fn(bags, labels, warm[:32], t)
  for fn in j_epochs.values():
    fn.warm(bags, labels)
    fn(bags, labels, warm)
  best = {**{k: 0.0 for k in t_variants}, **{k: 0.0 for k in j_epochs}}
  for r in range(args.rounds):
    order = np.random.default_rng([1, r]).permutation(len(bags))
    for name, (fn, t) in t_variants.items():
      t0 = time.perf_counter()
      fn(bags, labels, order, t)
      best[name] = max(best[name], len(bags) / (time.perf_counter() - t0))
    for name, fn in j_epochs.items():
      t0 = time.perf_counter()
      fn(bags, labels, order)
      best[name] = max(best[name], len(bags) / (time.perf_counter() - t0))
    print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v:.0f} bags/s"
                                                    for k, v in best.items()), flush=True)
  torch_best = max(v for k, v in best.items() if k.startswith("torch_") and "loader" not in k)
  loader = best["torch_dataloader_1thr"]
  res = {"bags": args.bags, "cells_per_bag": [args.min_size, args.max_size], "dim": args.dim,
         "hidden": args.hidden, "attention": args.att, "torch": t_desc,
         "jax": f"jax {jax.__version__} on {jax.devices()[0].platform}, "
                f"{os.cpu_count()} CPUs, xla_threads={args.xla_threads}",
         "load_average": [round(v, 2) for v in os.getloadavg()], "bags_per_s": {k: round(v, 1) for k, v in best.items()},
         "ratio_vs_best_torch_loop": {k: round(v / torch_best, 2) for k, v in best.items()
                                      if k.startswith("slamjax")},
         "ratio_vs_torch_dataloader_loop": {k: round(v / loader, 2) for k, v in best.items()
                                            if k.startswith("slamjax")}}
  print(json.dumps(res, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
