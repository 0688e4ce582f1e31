"""The witness-rate study: pretraining methods x witness rates x seeds.

A study config (``configs/witness_study.py``) is an ordinary pipeline config
plus a ``study`` section listing witness rates, pretraining methods and seeds.
Every combination is one run of :func:`slamjax.train.train_and_evaluate` in
``workdir/<run id>``; when a run finishes, a compact record (metrics of every
MIL head, linear probe, embedding spread, pretraining history) is written to
``study.results_dir/runs/<run id>.json`` and the tables and plots are rebuilt
(:mod:`slamjax.study_report`). Rerunning the command skips recorded runs and
resumes an interrupted one from its checkpoints, so a study longer than a
session is finished by running the same command again.

Example (what ``python -m slamjax.main --config configs/witness_study.py``
runs)::

  from configs import witness_study
  cfg = witness_study.get_config("quick")
  [rid for rid, _ in run_configs(cfg)][:2]
  # ['seed0/wr0.1/random_init', 'seed0/wr0.1/slam_ags']
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Iterator

import ml_collections

# Each method is a set of config overrides on the study's base config.
METHODS: dict[str, tuple[str, dict]] = {
    "random_init": ("no pretraining (randomly initialised encoder)",
                    {"pretrain": {"epochs": 0}}),
    "simclr": ("SimCLR only, on positive-bag cells",
               {"pretrain": {"task_weights": (1.0, 0.0), "surgery": "sum"}}),
    "similarity": ("similarity loss only, on negative-bag cells",
                   {"pretrain": {"task_weights": (0.0, 1.0), "surgery": "sum"}}),
    "weaksupcon": ("SimCLR + similarity, gradients summed (WeakSupCon)",
                   {"pretrain": {"task_weights": (1.0, 1.0), "surgery": "sum"}}),
    "pcgrad": ("SimCLR + similarity with PCGrad",
               {"pretrain": {"task_weights": (1.0, 1.0), "surgery": "pcgrad"}}),
    "slam_ags": ("SimCLR + similarity with adaptive gradient surgery (SLAM-AGS)",
                 {"pretrain": {"task_weights": (1.0, 1.0), "surgery": "adaptive_pcgrad"}}),
    "bag_label": ("weakly supervised: cells trained on their bag's label",
                  {"pretrain": {"objective": "bag_label", "surgery": "sum"},
                   "model": {"proj_dims": (512, 1)}, "embed": {"output": "backbone"}}),
    # Ablations of SLAM-AGS (why it collapses here; not methods of the paper).
    "slam_ags_lowsim": ("SLAM-AGS with the similarity loss weighted 0.1",
                        {"pretrain": {"task_weights": (1.0, 0.1),
                                      "surgery": "adaptive_pcgrad"}}),
    "slam_ags_backbone": ("SLAM-AGS, MIL on backbone features (not projection)",
                          {"pretrain": {"task_weights": (1.0, 1.0),
                                        "surgery": "adaptive_pcgrad"},
                           "embed": {"output": "backbone"}}),
}


def _apply(cfg: ml_collections.ConfigDict, overrides: dict) -> None:
  for section, values in overrides.items():
    for key, value in values.items():
      if key not in cfg[section]:
        raise KeyError(f"method override config.{section}.{key} is not a config key")
      cfg[section][key] = value


def run_id(method: str, witness_rate: float, seed: int) -> str:
  return f"seed{seed}/wr{witness_rate:g}/{method}"


def run_configs(cfg) -> Iterator[tuple[str, ml_collections.ConfigDict]]:
  """(run id, pipeline config) of every run, in execution order.

  Seed-major order: after each seed the table has every cell once, so a
  study stopped early still gives a complete (if thinner) comparison.
  """
  s = cfg.study
  for name in s.methods:
    if name not in METHODS:
      raise ValueError(f"config.study.methods: unknown method {name!r}; "
                       f"valid: {sorted(METHODS)}")
  base = copy.deepcopy(cfg)
  with base.unlocked():
    del base["study"]
  for seed in s.seeds:
    for wr in s.witness_rates:
      for name in s.methods:
        c = copy.deepcopy(base)
        _apply(c, METHODS[name][1])
        c.seed = int(seed)
        c.bags.witness_rate = float(wr)
        yield run_id(name, wr, seed), c


def _history(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "pretrain_metrics.jsonl")
  if not os.path.exists(path):
    return []
  keep = ("step", "loss_simclr", "loss_sim", "grad_cos", "embed_std", "lr")
  with open(path) as f:
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, f) if r]


def make_record(rid: str, cfg, results: dict, workdir: str, seconds: float) -> dict:
  """The compact, JSON-serialisable result of one run."""
  method = rid.rsplit("/", 1)[1]
  heads = {}
  for name, h in results["heads"].items():
    heads[name] = {"bag": h["bag"], "retrieval": {
        k: v for k, v in h["retrieval"].items()}}
  return {"id": rid, "method": method, "witness_rate": cfg.bags.witness_rate,
          "seed": cfg.seed, "bag_size": cfg.bags.bag_size,
          "witnesses_per_positive_bag": results.get("witnesses_per_positive_bag"),
          "heads": heads, "linear_probe": results.get("linear_probe"),
          "embedding": results.get("embedding"), "timing_s": results.get("timing_s"),
          "seconds": round(seconds, 1), "pretrain_history": _history(workdir)}


def run_study(cfg, workdir: str) -> list[dict]:
  """Runs every missing run of the study, then writes the report."""
  from slamjax import study_report
  from slamjax import train

  out_dir = cfg.study.results_dir or os.path.join(workdir, "results")
  os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
  with open(os.path.join(out_dir, "study_config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2))
  runs = list(run_configs(cfg))
  todo = [(rid, c) for rid, c in runs if not os.path.exists(_record_path(out_dir, rid))]
  print(f"study: {len(runs)} runs, {len(runs) - len(todo)} already recorded in "
        f"{out_dir}/runs, {len(todo)} to go", flush=True)
  t_start = time.perf_counter()
  for i, (rid, c) in enumerate(todo):
    t0 = time.perf_counter()
    run_dir = os.path.join(workdir, rid)
    print(f"study: run {i + 1}/{len(todo)} {rid}", flush=True)
    results = train.train_and_evaluate(c, run_dir)
    record = make_record(rid, c, results, run_dir, time.perf_counter() - t0)
    path = _record_path(out_dir, rid)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:  # atomic: a killed run leaves no record
      json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    study_report.write_report(out_dir, cfg)
    done = i + 1
    rate = (time.perf_counter() - t_start) / done
    print(f"study: recorded {rid} in {record['seconds']:.0f}s; {done}/{len(todo)} "
          f"done, ETA {rate * (len(todo) - done) / 60:.0f} min", flush=True)
  return study_report.write_report(out_dir, cfg)


def _record_path(out_dir: str, rid: str) -> str:
  return os.path.join(out_dir, "runs", rid.replace("/", "_") + ".json")
