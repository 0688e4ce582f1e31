"""Runs the study: every missing (method, witness rate, seed), one record each.

Every run is :func:`slamjax.pipeline.train_and_evaluate` in ``workdir/<run id>``
(pretrain -> embed -> MIL heads on the method's ``embed.output`` features),
then :func:`slamjax.study.encoder_eval.evaluate_encoder` (the final encoder
embeds probe and bag cells once, backbone and projection together: linear
and kNN probes on held-out cells, and the MIL heads again on the other
features). A compact JSON record (MIL metrics and per-bag probabilities of
both feature types, probe AUCs and test-cell scores, embedding spread,
pretraining history, collapse summary) goes to
``study.results_dir/runs/<run id>.json``, written atomically, and the tables
and plots are rebuilt (:mod:`slamjax.study.report`). Rerunning the command
skips recorded runs and resumes an interrupted one from its checkpoints, when
the results folder's ``fingerprint.json`` (config and data files,
:mod:`slamjax.workdir`) matches; adding methods, witness rates or seeds
keeps it. Otherwise the study stops before any work and names what differs.

Example::

  from slamjax import config as config_lib
  from slamjax.study import run
  cfg = config_lib.load("witness_study", "quick")
  records = run.run_study(cfg, "/tmp/study_quick")
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from slamjax import workdir as workdir_lib
from slamjax.study import methods as methods_lib

_HISTORY_KEYS = ("step", "loss_simclr", "loss_sim", "grad_cos", "embed_std", "lr",
                 "grad_norm_simclr", "grad_norm_sim", "ntxent_uniform", "embed_std_neg")


def _compact(history: list[dict]) -> list[dict]:
  keep = lambda k: k in _HISTORY_KEYS or k.startswith(("loss_", "spread", "variance"))
  return [{k: round(float(v), 6) for k, v in r.items() if keep(k)} for r in history]


def collapse_summary(history: list[dict], batch_pos: int) -> dict:
  """:func:`slamjax.collapse.summarize` of a run's history, JSON-ready."""
  from slamjax import collapse
  out = dict(collapse.summarize(history, batch_pos), source="slamjax.collapse")
  return {k: (v.item() if isinstance(v, (np.floating, np.integer, np.bool_)) else v)
          for k, v in out.items()}


_POOLS: dict = {}


def _pool_and_bags(cfg):
  """The run's cell pool (cached across runs) and bags, as the pipeline made them."""
  from slamjax import pipeline
  from slamjax.data import bags as bags_lib
  from slamjax.data import sources
  key = (cfg.data.to_json_best_effort(sort_keys=True), cfg.seed)
  if key not in _POOLS:
    _POOLS.clear()  # one pool at a time (seeds run one after the other)
    _POOLS[key] = sources.load_pool(cfg.data, cfg.seed)
  pool = _POOLS[key]
  plan = pipeline.make_bag_plan(cfg, pool)
  return pool, bags_lib.make_bags(pool.labels, plan, cfg.seed)


def _mil_summary(heads: dict) -> dict:
  """Per head: bag metrics, retrieval, and per-bag (label, prob) for the CIs."""
  out = {}
  for name, h in heads.items():
    out[name] = {"bag": h["bag"], "retrieval": h["retrieval"],
                 "labels": [r["label"] for r in h["per_bag"]],
                 "probs": [round(r["prob"], 5) for r in h["per_bag"]]}
  return out


def make_record(rid: str, cfg, results: dict, enc: dict | None, other_mil: dict | None,
                history: list[dict], batch_pos: int | None, seconds: float) -> dict:
  """The compact, JSON-serialisable result of one run."""
  from slamjax.mil import multihead
  _, _, method = methods_lib.parse_run_id(rid)
  read = cfg.embed.output
  mil = {read: _mil_summary(results["heads"])}
  if other_mil:
    mil.update({f: _mil_summary(h) for f, h in other_mil.items()})
  rec = {"id": rid, "method": method, "witness_rate": cfg.bags.witness_rate,
         "seed": cfg.seed, "bag_size": cfg.bags.bag_size,
         "bags_per_split": {k: list(v) for k, v in cfg.bags.bags_per_split.items()},
         "mil_features": read, "mil": mil, "head": multihead.head_names(cfg.mil)[0],
         "encoder": enc["features"] if enc else None,
         "probe": enc["probe"] if enc else None,
         "embedding_test_bags": results.get("embedding"),
         "timing_s": results.get("timing_s"), "seconds": round(seconds, 1),
         "batch_pos": batch_pos, "pretrain_history": _compact(history)}
  if history and batch_pos:
    rec["collapse"] = collapse_summary(history, batch_pos)
  return rec


def _record_path(out_dir: str, rid: str) -> str:
  return os.path.join(out_dir, "runs", rid.replace("/", "_") + ".json")


def _write_text(path: str, text: str) -> None:
  from slamjax import workdir as workdir_lib
  workdir_lib.write_text(path, text)  # atomic: a killed run leaves no record


def _write_json(path: str, obj) -> None:
  _write_text(path, json.dumps(obj, separators=(",", ":")))


def _claim(cfg, workdir: str, out_dir: str, write: bool) -> None:
  """The study's fingerprint, in its results folder beside the records it
  protects; on resume=overwrite the records and the run folders go. Only
  shard 0 writes (as for study_config.json); other shards check."""
  from slamjax import workdir as workdir_lib
  outputs = workdir_lib.OUTPUTS["study"] + (os.path.join(os.path.abspath(workdir), "seed*"),)
  claim = workdir_lib.Run(out_dir, cfg, outputs)
  data = (workdir_lib.files_data(cfg.data.root)
          if cfg.data.source != "synthetic" and cfg.data.root else None)
  claim.commit(data, write=write)


def run_one(rid: str, c, workdir: str, study_cfg, mesh) -> dict:
  """Runs (or resumes) one run in ``workdir``; returns its record.

  ``c`` is the run's pipeline config (already checked), ``study_cfg`` the
  study section (probe size, kNN k, whether to train MIL on the other
  features), ``mesh`` the study's device mesh.
  """
  from slamjax import progress
  from slamjax import pipeline
  from slamjax.data import batching
  from slamjax.study import encoder_eval
  t0 = time.perf_counter()
  pool, bagsets = _pool_and_bags(c)
  results = pipeline.train_and_evaluate(c, workdir, pool=pool, mesh=mesh)
  history = progress.read_jsonl(os.path.join(workdir, workdir_lib.PRETRAIN_METRICS))
  enc = other = None
  batch_pos = None
  if c.pretrain.epochs > 0:
    tr = bagsets["train"]
    batch_pos = batching.split_batch(c.pretrain.batch_size, len(tr.all_cells(1)),
                                     len(tr.all_cells(0)), mesh.size)[0]
  if study_cfg.encoder_eval:
    t1 = time.perf_counter()
    enc = encoder_eval.evaluate_encoder(
        c, workdir, pool, bagsets, mesh,
        cells_per_class=int(study_cfg.probe_cells_per_class),
        knn_k=int(study_cfg.knn_k))
    if study_cfg.other_features:
      other_feat = "backbone" if c.embed.output == "projection" else "projection"
      other = {other_feat: encoder_eval.mil_on_features(
          c, enc["bag_embeddings"][other_feat], bagsets,
          os.path.join(workdir, f"other_{other_feat}"))}
    results.setdefault("timing_s", {})["encoder_eval"] = round(time.perf_counter() - t1, 1)
  rec = make_record(rid, c, results, enc, other, history, batch_pos,
                    time.perf_counter() - t0)
  col = rec.get("collapse") or {}
  if col.get("collapsed"):
    print(f"study: WARNING {rid} COLLAPSED during pretraining (spread "
          f"{col.get('final_spread', float('nan')):.3f} from step {col.get('first_step')}, "
          f"NT-Xent {col.get('final_ntxent', float('nan')):.3f} vs log(2B-1) "
          f"{col.get('ntxent_uniform', float('nan')):.3f})", flush=True)
  return rec


def shard_runs(runs: list, shard: str) -> list:
  """The runs of ``study.shard`` "i/n": run k if k % n == i. By position in
  the whole study, so shards started at different times never overlap."""
  from slamjax import config as config_lib
  i, n = config_lib.parse_shard(shard)
  return [r for k, r in enumerate(runs) if k % n == i]


def reuse_mismatch(cfg, other: dict) -> list[str]:
  """Result-deciding config keys (outside ``study``) where another study's
  config differs, as :func:`slamjax.workdir.config_differences` names them
  (a key the other study lacks compares as its default), plus where its data
  lives (``data.root``, which a run's fingerprint leaves to its data summary).
  """
  outside = lambda c: {k: v for k, v in workdir_lib.fingerprint(c)["config"].items()
                       if not k.startswith("study.")}
  diffs = workdir_lib.config_differences(outside(other), outside(cfg))
  theirs = other.get("data", {}).get("root", "")
  if theirs != cfg.data.root:
    diffs.append(f"data.root: {theirs!r} -> {cfg.data.root!r}")
  return diffs


def reuse_records(cfg, out_dir: str, runs: list) -> int:
  """Copies ``study.reuse_from``'s records of this study's runs into
  ``out_dir/runs``; returns how many. Refuses a study of another config."""
  src = cfg.study.reuse_from
  if not src:
    return 0
  path = os.path.join(src, "study_config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.study.reuse_from={src!r} has no study_config.json")
  with open(path) as f:
    bad = reuse_mismatch(cfg, json.load(f))
  if bad:
    raise ValueError(f"config.study.reuse_from={src!r}: that study ran another "
                     f"configuration ({'; '.join(bad[:5])}); its runs cannot be reused")
  copied = 0
  for rid, _ in runs:
    mine, theirs = _record_path(out_dir, rid), _record_path(src, rid)
    if not os.path.exists(mine) and os.path.exists(theirs):
      with open(theirs) as f:
        _write_text(mine, f.read())
      copied += 1
  return copied


def run_study(cfg, workdir: str, mesh=None) -> list[dict]:
  """Runs every missing run of the study, then writes the report.

  ``mesh``: from :func:`slamjax.launch.prepare` (which checked ``cfg``);
  None when called as a library: prepared here. Every run's own config is
  checked before the first run starts.
  """
  from slamjax import config as config_lib
  from slamjax import launch
  from slamjax import validation
  from slamjax.study import report
  if mesh is None:
    mesh = launch.prepare(cfg, workdir)
  out_dir = cfg.study.results_dir or os.path.join(workdir, "results")
  shard, num_shards = config_lib.parse_shard(cfg.study.shard)
  _claim(cfg, workdir, out_dir, write=shard == 0)
  os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
  if shard == 0:  # the study's config, the same for every shard
    whole = cfg.to_dict()
    whole["study"]["shard"] = ""
    _write_text(os.path.join(out_dir, "study_config.json"), json.dumps(whole, indent=2))
  runs = list(methods_lib.run_configs(cfg))
  for rid, c in runs:  # a bad method table fails now, not hours in
    try:
      validation.validate(c)
    except ValueError as e:
      raise ValueError(f"study run {rid}: {e}") from e
  if shard == 0:
    n = reuse_records(cfg, out_dir, runs)
    if n:
      print(f"study: {n} runs reused from {cfg.study.reuse_from}", flush=True)
  mine = shard_runs(runs, cfg.study.shard)
  todo = [(rid, c) for rid, c in mine if not os.path.exists(_record_path(out_dir, rid))]
  part = f" (shard {shard}/{num_shards}: {len(mine)} of them)" if num_shards > 1 else ""
  print(f"study: {len(runs)} runs{part}, {len(mine) - len(todo)} already recorded in "
        f"{out_dir}/runs, {len(todo)} to go", flush=True)
  t_start = time.perf_counter()
  for i, (rid, c) in enumerate(todo):
    print(f"study: run {i + 1}/{len(todo)} {rid}", flush=True)
    c.resume = "auto"  # an overwrite was done above, for the whole study
    rec = run_one(rid, c, os.path.join(workdir, rid), cfg.study, mesh)
    _write_json(_record_path(out_dir, rid), rec)
    report.write_report(out_dir, cfg)
    done = i + 1
    rate = (time.perf_counter() - t_start) / done
    print(f"study: recorded {rid} in {rec['seconds']:.0f}s; {done}/{len(todo)} "
          f"done, ETA {rate * (len(todo) - done) / 60:.0f} min", flush=True)
  return report.write_report(out_dir, cfg)
