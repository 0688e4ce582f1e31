r"""The ``slides`` runner: cross-validate SLAM-AGS on your own slides, then train
the final model that :mod:`slamjax.slides.predict` uses on new patients.

  python -m slamjax.main --config configs/slides.py \
      --config.data.root=/path/to/cohort --workdir /tmp/my_cohort

For every fold (patient-grouped, stratified; :mod:`slamjax.slides.folds`):
pretrain on the fold's training slides, embed, train the MIL heads, choose
epochs and thresholds by inner cross-validation on the training slides and
score the held-out slides. A finished
fold is recorded atomically in ``folds/<method>/<fold>/record.json``; a killed
run resumes at the fold (and, inside it, at the checkpoint) where it stopped.
A rerun resumes only a workdir whose ``fingerprint.json`` (config and data,
:mod:`slamjax.workdir`) matches; any other stops before any work and names
what differs.
``eval.baselines`` repeats the folds with other encoders and runs
slide-feature baselines on them (:mod:`slamjax.slides.baselines`);
``eval.final_model`` then trains on every labelled slide
(``final/``). Results: ``results.md``, ``metrics.json``,
``oof_predictions.csv``, ``roc.png`` and attention galleries
(``galleries/``), see :mod:`slamjax.slides.report`.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from slamjax import config as config_lib
from slamjax import distributed
from slamjax import launch
from slamjax import progress as progress_lib
from slamjax import workdir as workdir_lib
from slamjax.data import slides as slides_lib
from slamjax.slides import baselines
from slamjax.slides import fold_run
from slamjax.slides import folds as folds_lib
from slamjax.slides import report
from slamjax.slides import slide_features

def _read_record(path: str, fp_id: str) -> dict:
  with open(path) as f:
    rec = json.load(f)
  workdir_lib.check_record(path, rec, fp_id)
  return rec


def fold_record(cohort, fold: dict, result: dict, method: str) -> dict:
  """Held-out predictions and metrics of one fold, as stored on disk."""
  test = fold["test"]
  rec = {"fold": fold["name"], "method": method, "timing_s": result["timing_s"],
         "train_slides": [cohort.slide_ids[i] for i in fold["train"]],
         "test_slides": [cohort.slide_ids[i] for i in test], "heads": {}}
  for head, outs in result["outputs"].items():
    out, thr = outs["test"], result["thresholds"][head]
    rec["heads"][head] = {
        "thresholds": thr,
        "prob": out["prob"].tolist(),
        "attention": [a.tolist() for a in out.get("attention", [])],
        "metrics": report.task_metrics(cohort.labels[test], out["prob"], thr,
                                       cohort.task_names)}
    if head in result.get("train_outputs", {}):
      oof = result["train_outputs"][head]["oof_prob"]
      rec["heads"][head]["train_oof_prob"] = np.asarray(oof).tolist()
    if head in result.get("selection", {}):
      rec["heads"][head]["selection"] = result["selection"][head]
    if "unlabeled" in outs:
      rec["heads"][head]["unlabeled_prob"] = outs["unlabeled"]["prob"].tolist()
  if "collapse" in result:
    rec["collapse"] = result["collapse"]
  return rec


def run_method(cfg, cohort, folds, method: str, workdir: str, mesh,
               fp_id: str | None = None, overall=None) -> list[dict]:
  """Every fold of one encoder method; finished folds are read back, not rerun
  (``fp_id``: the run's fingerprint, stored in and checked against records)."""
  c = baselines.method_config(cfg, method)
  unlabeled = np.flatnonzero(~cohort.labelled())
  records = []
  for fold in folds:
    fold_dir = os.path.join(workdir, method, fold["name"])
    path = os.path.join(fold_dir, workdir_lib.RECORD)
    if os.path.exists(path):
      records.append(_read_record(path, fp_id))
      print(f"slides: {method} {fold['name']}: recorded, skipped", flush=True)
      if overall:
        overall.skip()
      continue
    detail = (f"{method} {fold['name']}: {len(fold['train'])} training, "
              f"{len(fold['test'])} held-out slides")
    if overall:
      overall.start(detail)
    else:
      print(f"slides: {detail}", flush=True)
    predict = {"test": fold["test"]}
    if len(unlabeled):
      predict["unlabeled"] = unlabeled
    result = fold_run.train_model(c, cohort, fold["train"], predict, fold_dir, mesh)
    result["collapse"] = report.collapse_summary(c, fold_dir)
    rec = fold_record(cohort, fold, result, method)
    rec["fingerprint"] = fp_id
    if distributed.is_main_process():
      workdir_lib.write_json(path, rec)
    records.append(rec)
  return records


def run_slide_baseline(cfg, cohort, folds, method: str, workdir: str, stats,
                       fp_id: str | None = None) -> list[dict]:
  """Every fold of a slide-feature baseline (a logistic regression; seconds)."""
  records = []
  for fold in folds:
    path = os.path.join(workdir, method, fold["name"], workdir_lib.RECORD)
    if os.path.exists(path):
      records.append(_read_record(path, fp_id))
      continue
    x = baselines.features(cohort, method, os.path.join(workdir, "slam_ags", fold["name"]),
                           stats)
    out = baselines.run_fold(cohort, fold, method, x, cfg.seed, cfg.eval.inner_folds)
    result = {"outputs": {"logreg": {"test": {"prob": out["prob"]}}},
              "thresholds": {"logreg": out["thresholds"]}, "timing_s": out["timing_s"]}
    rec = fold_record(cohort, fold, result, method)
    rec["fingerprint"] = fp_id
    if distributed.is_main_process():
      workdir_lib.write_json(path, rec)
    records.append(rec)
  print(f"slides: {method}: {len(folds)} fold(s) done", flush=True)
  return records


def write_final_records(cfg, cohort, train_all, final_dir: str, fp: dict, digests) -> None:
  """What predict checks and reports beside the model: the config, the run's
  fingerprint, the pixel hashes of every cell the model saw, and (last, as
  the mark of a finished model) ``complete.json``."""
  seen = list(train_all)
  unlabeled = np.flatnonzero(~cohort.labelled())
  if cfg.eval.unlabeled_in_pretraining:
    seen += list(unlabeled)
  cells = np.concatenate([cohort.cells[i] for i in seen])
  np.save(os.path.join(final_dir, workdir_lib.TRAINING_CELLS), np.unique(digests[cells]))
  workdir_lib.write_config(final_dir, cfg)
  workdir_lib.write_json(os.path.join(final_dir, workdir_lib.FINGERPRINT), fp)
  workdir_lib.write_json(os.path.join(final_dir, workdir_lib.COMPLETE), {
      "num_training_slides": int(len(train_all)), "task_names": list(cohort.task_names),
      "fingerprint": fp["id"],
      "training_slides": [cohort.slide_ids[i] for i in train_all],
      "pretraining_only_slides": [cohort.slide_ids[i] for i in seen[len(train_all):]]})


def run_slides(cfg, workdir: str, mesh=None) -> dict:
  """Runs or resumes cross-validation (+ baselines, + final model).

  ``mesh``: from :func:`slamjax.launch.prepare` (which checked ``cfg``);
  None when called as a library: prepared here.
  """
  if mesh is None:
    mesh = launch.prepare(cfg, workdir)
  t_start = time.perf_counter()
  # A workdir holding another run's results: config differences stop here,
  # before any data is decoded; data differences once the cohort is loaded.
  claim = workdir_lib.Run(workdir, cfg, workdir_lib.OUTPUTS["slides"])
  timing = {}
  t0 = time.perf_counter()
  cohort = slides_lib.load_cohort(cfg.data)
  digests = workdir_lib.cell_digests(cohort.images)
  fp = claim.commit(workdir_lib.slides_data(cohort, digests),
                    write=distributed.is_main_process())
  folds = folds_lib.cohort_folds(cohort, cfg.eval.folds, cfg.seed)
  timing["data"] = time.perf_counter() - t0
  print(f"slides: {cohort.summary()}", flush=True)
  print(f"slides: {len(folds)} fold(s): " + "; ".join(
      f"{f['name']} {len(f['train'])}/{len(f['test'])}" for f in folds), flush=True)

  records = {}
  requested = config_lib.names(cfg.eval.baselines)
  methods = ("slam_ags", *[b for b in requested if b in baselines.ENCODERS])
  overall = progress_lib.RunProgress(len(methods) * len(folds),
                                     final=bool(cfg.eval.final_model))
  for method in methods:
    t0 = time.perf_counter()
    records[method] = run_method(cfg, cohort, folds, method,
                                 os.path.join(workdir, "folds"), mesh, fp["id"], overall)
    timing[f"cv_{method}"] = time.perf_counter() - t0
  stats = None
  for method in [b for b in requested if b in baselines.SLIDE_FEATURES]:
    t0 = time.perf_counter()
    if method == "pixel_stats" and stats is None:
      stats = slide_features.cell_stats(cohort.images)
    records[method] = run_slide_baseline(cfg, cohort, folds, method,
                                         os.path.join(workdir, "folds"), stats, fp["id"])
    timing[f"cv_{method}"] = time.perf_counter() - t0

  if cfg.eval.final_model:
    t0 = time.perf_counter()
    train_all = np.flatnonzero(cohort.labelled())
    folds_lib.check_training_slides(cohort, train_all, "the final model")
    final_dir = os.path.join(workdir, "final")
    unlabeled = np.flatnonzero(~cohort.labelled())
    overall.start_final(f"training on all {len(train_all)} labelled slides")
    result = fold_run.train_model(cfg, cohort, train_all,
                                  {"unlabeled": unlabeled} if len(unlabeled) else {},
                                  final_dir, mesh)
    overall.done()
    if distributed.is_main_process():
      write_final_records(cfg, cohort, train_all, final_dir, fp, digests)
      if len(unlabeled):
        report.write_predictions(
            os.path.join(workdir, "unlabeled_predictions.csv"),
            [cohort.slide_ids[i] for i in unlabeled], cohort.task_names,
            {h: o["unlabeled"]["prob"] for h, o in result["outputs"].items()},
            result["thresholds"])
    timing["final_model"] = time.perf_counter() - t0
  timing["total"] = time.perf_counter() - t_start
  if not distributed.is_main_process():
    return {}
  return report.write_cv_report(cfg, cohort, folds, records, workdir, timing,
                                skipped=cohort.report.get("skipped_files", []))
