r"""Features mode: train and evaluate a MIL head on a folder of feature files.

What ``python -m slamjax.main`` runs for ``config.runner == "features"``
(see ``configs/features_folder.py``): load and check the folder
(:mod:`slamjax.features.dataset`), split the labelled slides (the CSV's
``split`` column, else a stratified random split that keeps a patient's
slides together), standardise with training-slide statistics, train every
head of ``config.mil.heads`` (:mod:`slamjax.mil.multihead`), predict every
split and the unlabeled slides, and write under ``workdir``:

* ``metrics.json`` / ``results.md``: one row per head with the bag metrics of
  the test split (and val if any), per label column when there are several;
  attention retrieval of witnesses only when the feature files carry
  instance labels (``witness``);
* per head, in ``mil_<head>/`` (also its checkpoints): ``predictions.csv``
  (slide_id, split, label and probability per column; unlabeled slides with
  split ``unlabeled`` and empty labels) and
  ``attention/<slide_id>.csv`` for every slide (``eval.export_attention``).

Rerunning with the same workdir resumes every head from its checkpoint, when
its ``fingerprint.json`` (config and feature files, :mod:`slamjax.workdir`)
matches; otherwise the run stops before any work and names what differs.

Example::

  from configs import features_folder
  cfg = features_folder.get_config("quick")
  cfg.data.root = "/path/to/features"
  results = train_and_evaluate_features(cfg, "/tmp/slamjax_features")
  results["heads"]["abmil"]["bag"]["auc"]
"""

from __future__ import annotations

import csv
import os
import time

import numpy as np

from slamjax import distributed
from slamjax import evaluate
from slamjax import launch
from slamjax import report
from slamjax import workdir as workdir_lib
from slamjax.features import dataset as dataset_lib
from slamjax.features import export
from slamjax.mil import multihead
from slamjax.mil import standardize

def _instances_first(a, n: int) -> np.ndarray:
  """A bag's attention as [N] or [N, H] (heads giving [H, N] are transposed)."""
  a = np.asarray(a)
  if a.ndim == 2 and a.shape[0] != n and a.shape[1] == n:
    a = a.T
  if a.shape[0] != n:
    raise ValueError(f"attention of shape {a.shape} for a bag of {n} instances")
  return a


def _task_scores(a: np.ndarray, num_tasks: int) -> np.ndarray:
  """Per-instance scores of the first task from [N] or [N, H] attention."""
  if a.ndim == 1:
    return a
  return a[:, 0] if a.shape[1] == num_tasks else a.mean(1)


def _split_metrics(ds, idx, out, k) -> dict:
  """``bag`` (first label column), ``retrieval`` (first column's positive
  slides with instance labels, if any) and, with several label columns,
  ``tasks`` = {column: {"bag"}} (the first also with ``retrieval``)."""
  cols = ds.label_columns
  labels, probs = ds.labels[idx], out["prob"]
  tasks = {c: {"bag": evaluate.bag_metrics(labels[:, j], probs[:, j])}
           for j, c in enumerate(cols)}
  res = {"bag": tasks[cols[0]]["bag"]}
  pos = [j for j, i in enumerate(idx) if labels[j, 0] == 1 and ds.witness[i] is not None]
  if pos:
    res["retrieval"] = tasks[cols[0]]["retrieval"] = evaluate.retrieval_metrics(
        [_task_scores(out["attention"][j], len(cols)) for j in pos],
        [ds.witness[idx[j]] for j in pos], k)
  if len(cols) > 1:
    res["tasks"] = tasks
  return res


def _write_predictions(path, ds, split_idx, outs):
  """One row per slide; an unlabeled slide's label cells are empty."""
  cols = ds.label_columns
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["slide_id", "split", *cols, *[f"prob_{c}" for c in cols]])
    for split, idx in split_idx.items():
      for j, i in enumerate(idx):
        w.writerow([ds.slide_ids[i], split,
                    *["" if np.isnan(v) else int(v) for v in ds.labels[i]],
                    *[repr(float(p)) for p in outs[split]["prob"][j]]])


def train_and_evaluate_features(cfg, workdir: str, mesh=None) -> dict:
  """Runs or resumes features mode; writes results under ``workdir``.

  ``mesh``: unused (the heads train on one device); None when called as a
  library, which checks ``cfg`` here as ``python -m slamjax.main`` does.
  """
  if mesh is None:
    launch.prepare(cfg, workdir)
  if not distributed.is_main_process():
    return {}  # single-host work, done by process 0
  claim = workdir_lib.Run(workdir, cfg, workdir_lib.OUTPUTS["features"])
  timing = {}
  t0 = time.perf_counter()
  d = cfg.data
  ds = dataset_lib.load_feature_folder(
      d.root, d.manifest, d.label_columns or None, d.unlisted,
      label_column=d.get("label_column", ""), negative_label=d.get("negative_label", ""))
  claim.commit(workdir_lib.features_data(ds))  # before standardising in place
  split_idx = ds.split_indices(d.test_fraction, cfg.seed)
  timing["data"] = time.perf_counter() - t0
  print(f"features: {ds.num_slides} slides, dim {ds.dim}, labels {list(ds.label_columns)}; "
        + "; ".join(f"{s}: {len(i)} slides ("
                    + ("predicted only" if s == "unlabeled"
                       else f"{int(ds.labels[i, 0].sum())} positive")
                    + f"), {sum(len(ds.features[j]) for j in i)} instances"
                    for s, i in split_idx.items()), flush=True)
  if ds.folds is not None and ds.splits is None:
    print("features: the CSV's fold column is not used (the features runner has one "
          "train/test split; give a split column to choose it)", flush=True)

  feats = ds.features
  if d.standardize:  # as the image pipeline: training-slide statistics
    mu, sd = standardize.fit([feats[i] for i in split_idx["train"]])
    standardize.apply(feats, mu, sd, in_place=True)  # the dataset is ours: no copy
  labels = ds.labels if len(ds.label_columns) > 1 else ds.labels[:, 0]

  t0 = time.perf_counter()
  tr = split_idx["train"]
  runs = multihead.fit_predict(cfg.mil, [feats[i] for i in tr], labels[tr],
                               {s: [feats[i] for i in idx] for s, idx in split_idx.items()},
                               workdir, cfg.seed)
  timing["mil"] = time.perf_counter() - t0

  test_idx = split_idx["test"]
  results = {
      "source": "features", "root": os.path.abspath(d.root), "dim": ds.dim,
      "num_slides": {s: int(len(i)) for s, i in split_idx.items()},
      "label_columns": list(ds.label_columns), "standardize": bool(d.standardize),
      "heads": {}}
  for run in runs:
    outs = run.outputs
    for s, idx in split_idx.items():
      outs[s]["attention"] = [_instances_first(a, len(feats[i]))
                              for a, i in zip(outs[s]["attention"], idx)]
      if outs[s].get("task_attention") is not None:  # per-task attention: [T, N]
        outs[s]["task_attention"] = [None if t is None else np.asarray(t).T
                                     for t in outs[s]["task_attention"]]
    res = results["heads"][run.name] = {
        **_split_metrics(ds, test_idx, outs["test"], cfg.eval.top_k),
        "per_bag": [{"slide_id": ds.slide_ids[i], "label": ds.labels[i].tolist(),
                     "prob": outs["test"]["prob"][j].tolist()}
                    for j, i in enumerate(test_idx)],
        "seconds": round(run.seconds, 1)}
    if "val" in split_idx:
      res["val"] = _split_metrics(ds, split_idx["val"], outs["val"], cfg.eval.top_k)
    _write_predictions(os.path.join(run.workdir, "predictions.csv"), ds, split_idx, outs)
    if cfg.eval.export_attention:
      for s, idx in split_idx.items():
        export.export_attention(
            os.path.join(run.workdir, "attention"), [ds.slide_ids[i] for i in idx],
            outs[s]["attention"], class_attention=outs[s].get("task_attention"),
            coords=[ds.coords[i] for i in idx],
            cell_ids=[ds.cell_ids[i] for i in idx], witness=[ds.witness[i] for i in idx],
            names=ds.label_columns)
  timing["total"] = sum(timing.values())
  results["timing_s"] = {k: round(v, 1) for k, v in timing.items()}
  intro = [f"{sum(results['num_slides'].values())} slides ("
           + ", ".join(f"{s}: {n}" for s, n in results["num_slides"].items())
           + f") of dimension {results['dim']} from `{results['root']}`; label column(s) "
           f"{', '.join(results['label_columns'])}. Bag metrics and attention retrieval are "
           "for the first label column; with several columns, the per-column rows follow."]
  if "unlabeled" in split_idx:
    intro.append(f"{len(split_idx['unlabeled'])} unlabeled slide(s) are predicted "
                 "(split `unlabeled` in `predictions.csv`), not trained on or scored.")
  if not any("retrieval" in r for r in results["heads"].values()):
    intro.append("No instance labels (`witness`) in the feature files: attention "
                 "retrieval is not scored.")
  splits = {"test": results["heads"]}
  if all("val" in r for r in results["heads"].values()):
    splits["val"] = {h: r["val"] for h, r in results["heads"].items()}
  print(report.write_results(workdir, results, intro, "slamjax results (feature folder)",
                             splits), flush=True)
  return results
