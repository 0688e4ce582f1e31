"""Diagnose new patients with a model trained by the ``slides`` runner.

:func:`predict` (command line: ``python -m slamjax.predict``) takes a run of
``configs/slides.py`` with ``eval.final_model`` (its ``final/`` folder) and a
folder with one sub-folder of cell images per slide (a slide CSV in it is
optional: no labels are needed) or a slide CSV whose folder holds the
slides. Writes under ``out``:

* ``predictions.csv``: per slide and head, the probability, the threshold
  (chosen by inner cross-validation on the training slides) and the
  predicted label of every task;
* ``attention/<slide_id>.csv``: every cell's path, attention and rank;
* ``galleries/<slide_id>.png``: the slide's top-K cells by attention;
* ``report.md``: a short summary table, and what the model knows about
  these slides: those it was trained on (same slide id, or identical cell
  images), and whether its pretraining ended collapsed;
* ``metrics.json`` when the slide CSV has labels: AUC, balanced accuracy and
  the confusion matrix per head and task (also in ``report.md``).

The final model is checked first (:func:`slamjax.workdir.check_final`): a
``final/`` whose config or fingerprint does not match its run is refused.

``ensemble="folds"`` (the default) averages the final model with the
cross-validation fold models of the same run: probabilities, attention and
thresholds are averaged over the members; every fold must have finished and
match the final model's fingerprint. On 400 new patients of a generated
composition cohort it ranked better than the final model alone in two
trained runs (AUC +0.025 and +0.028, each interval above 0;
docs/results/slides/composition.md). ``"final"`` uses the final model
alone.

Example::

  from slamjax.slides import predict
  probs = predict.predict("/tmp/my_cohort", "/path/to/new_slides", "/tmp/pred")
"""

from __future__ import annotations

import csv
import json
import os

import ml_collections
import numpy as np

def load_final(workdir: str):
  """(config, model.json, complete.json) of ``workdir/final``, with a clear
  error if absent or if it does not match its own records."""
  from slamjax import workdir as workdir_lib
  final = os.path.join(workdir, "final")
  if not os.path.exists(os.path.join(final, workdir_lib.COMPLETE)):
    raise workdir_lib.WorkdirError(
        f"{workdir} has no final model ({final}/complete.json is missing). Train one with "
        "`python -m slamjax.main --config configs/slides.py --workdir "
        f"{workdir}` (config.eval.final_model=True, the default); a run that was "
        "stopped before the final model resumes from where it stopped.")
  workdir_lib.check_final(workdir)
  with open(os.path.join(final, "config.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(final, workdir_lib.MODEL)) as f:
    model_info = json.load(f)
  return cfg, model_info, workdir_lib.read_json(os.path.join(final, workdir_lib.COMPLETE))


def known_slides(cohort, digests: np.ndarray, final: str, complete: dict) -> dict:
  """What the model saw of these slides: ``same_id`` (slide ids it was
  trained on, or saw unlabeled in pretraining) and ``shared_cells`` ({slide:
  (cells with the pixels of a training cell, cells)})."""
  from slamjax import workdir as workdir_lib
  seen = set(complete.get("training_slides", ())) | set(
      complete.get("pretraining_only_slides", ()))
  train_cells = np.load(os.path.join(final, workdir_lib.TRAINING_CELLS))
  shared = {}
  for sid, cells in zip(cohort.slide_ids, cohort.cells):
    n = int(np.isin(digests[cells], train_cells).sum())
    if n:
      shared[sid] = (n, len(cells))
  return {"same_id": [s for s in cohort.slide_ids if s in seen], "shared_cells": shared}


def known_lines(known: dict, num_slides: int) -> list[str]:
  """report.md lines (empty when the model saw none of the slides)."""
  lines = []
  same, shared = known["same_id"], known["shared_cells"]
  if same:
    identical = sum(1 for s in same if s in shared and shared[s][0] == shared[s][1])
    lines.append(f"**Warning: {len(same)} of {num_slides} slides were training slides of "
                 f"this model** (same slide id; {identical} of them with identical cell "
                 "images): their predictions do not test it. "
                 + ", ".join(f"`{s}`" for s in same))
  others = {s: v for s, v in shared.items() if s not in same}
  if others:
    lines.append(f"**Warning: {len(others)}{' other' if same else ''} of {num_slides} slides "
                 "share cell images with the model's training slides** (identical decoded "
                 "pixels): " + ", ".join(f"`{s}` ({n} of {m} cells)"
                                         for s, (n, m) in others.items()))
  return lines


def known_warning(known: dict, num_slides: int, report_path: str) -> str:
  """The console line for :func:`known_lines`."""
  same = known["same_id"]
  others = [s for s in known["shared_cells"] if s not in same]
  parts = ([f"{len(same)} of {num_slides} slides were training slides of this model (same "
            "slide id)"] if same else []) + (
               [f"{len(others)}{' other' if same else ''} of {num_slides} slides share cell "
                "images with its training slides"] if others else [])
  return f"predict: WARNING: {'; '.join(parts)}; their ids are in {report_path}"


def label_metrics(cohort, tasks, probs: dict, thresholds: dict, exclude=()) -> list[dict]:
  """Per head and task: AUC, balanced accuracy and the confusion matrix on
  the labelled slides (also without ``exclude``, the training slides)."""
  from sklearn.metrics import confusion_matrix
  from slamjax.slides import report as slides_report
  rows = []
  labelled = cohort.labelled()
  sets = [("all labelled", labelled)]
  held = labelled & ~np.isin(np.asarray(cohort.slide_ids), list(exclude))
  if held.sum() < labelled.sum() and held.any():
    sets.append(("not trained on", held))
  for name, keep in sets:
    for head, p in probs.items():
      for t, task in enumerate(tasks):
        if task not in cohort.task_names:
          continue
        y = cohort.labels[keep, cohort.task_names.index(task)][:, None]
        pt = np.asarray(p)[keep, t][:, None]
        m = slides_report.task_metrics(y, pt, [thresholds[head][t]], (task,))[task]
        called = (pt[:, 0] >= thresholds[head][t]).astype(int)
        tn, fp, fn, tp = confusion_matrix(y[:, 0].astype(int), called, labels=[0, 1]).ravel()
        rows.append({"slides": name, "n": int(keep.sum()), "head": head, "task": task,
                     "AUC": round(m["auc"], 3), "balanced accuracy":
                     round(m["balanced_accuracy"], 3), "TN": int(tn), "FP": int(fp),
                     "FN": int(fn), "TP": int(tp)})
  return rows


def slides_config(cfg, slides: str):
  """The trained run's data config, pointed at ``slides`` (folder or CSV)."""
  d = ml_collections.ConfigDict(cfg.data.to_dict())
  if os.path.isfile(slides):
    d.root, d.csv = os.path.dirname(os.path.abspath(slides)), os.path.basename(slides)
  else:
    d.root = slides
    d.csv = d.csv if os.path.exists(os.path.join(slides, d.csv)) else ""
  d.cells_csv = ""
  return d


ENSEMBLES = ("final", "folds")


def members(workdir: str, ensemble: str, fingerprint_id: str) -> list[tuple[str, str]]:
  """``(name, folder)`` of the models ``ensemble`` averages: the final model,
  and with ``"folds"`` first every finished cross-validation fold model of
  SLAM-AGS in ``workdir`` (each checked against ``fingerprint_id``)."""
  from slamjax import runtime
  from slamjax import workdir as workdir_lib
  final = [("final", os.path.join(workdir, "final"))]
  if ensemble not in ENSEMBLES:
    raise runtime.InputError(f"--ensemble={ensemble!r}; valid: {', '.join(ENSEMBLES)}")
  if ensemble == "final":
    return final
  root = os.path.join(workdir, "folds", "slam_ags")
  names = sorted(os.listdir(root)) if os.path.isdir(root) else []
  if not names:
    raise workdir_lib.WorkdirError(f"--ensemble=folds: {root} holds no fold models; the "
                                   "run has no cross-validation to average")
  out = []
  for name in names:
    d = os.path.join(root, name)
    record = os.path.join(d, workdir_lib.RECORD)
    if not os.path.exists(record):
      raise workdir_lib.WorkdirError(
          f"--ensemble=folds: {d} did not finish ({workdir_lib.RECORD} is missing); rerun "
          "the slides command to complete it, or use --ensemble=final")
    fp = workdir_lib.read_json(record).get("fingerprint")
    if fp != fingerprint_id:
      raise workdir_lib.WorkdirError(
          f"--ensemble=folds: {d} was trained on another run (fingerprint {fp}, the final "
          f"model's {fingerprint_id}); rerun the slides command, or use --ensemble=final")
    out.append((name, d))
  return out + final


def predict_member(cfg, folder: str, cohort, feats, mesh) -> tuple[dict, dict, dict]:
  """``(model.json, {head: prob [S, T]}, {head: [attention per slide]})`` of the
  model trained in ``folder`` (a fold's or ``final/``) on every slide."""
  from slamjax import encoder
  from slamjax import workdir as workdir_lib
  from slamjax.mil import standardize
  from slamjax.slides import fold_run
  from slamjax.slides import model_selection
  info = workdir_lib.read_json(os.path.join(folder, workdir_lib.MODEL))
  model, state = encoder.load(cfg, folder, mesh)
  idx = np.arange(len(cohort.slide_ids))
  stats = np.load(os.path.join(folder, workdir_lib.STANDARDIZE), allow_pickle=False)
  emb = standardize.apply(fold_run.embed_slides(cfg, model, state, cohort, idx, mesh),
                         stats["mean"], stats["std"])
  probs, attention = {}, {}
  for name, head_cfg, st, fusion in model_selection.load_fitted(cfg, folder, info, emb):
    o = model_selection.predict_head(head_cfg, st, emb, feats, fusion)
    probs[name], attention[name] = np.asarray(o["prob"]), o["attention"]
  return info, probs, attention


def average_members(outputs: list[tuple[dict, dict, dict]]) -> tuple[dict, dict, dict]:
  """``(thresholds, probs, attention)``: each head's mean over the members.

  >>> a = ({"thresholds": {"h": [0.4]}}, {"h": np.array([[0.2]])}, {"h": [np.array([1., 0.])]})
  >>> b = ({"thresholds": {"h": [0.6]}}, {"h": np.array([[0.8]])}, {"h": [np.array([0., 1.])]})
  >>> thr, p, att = average_members([a, b])
  >>> thr["h"], p["h"].tolist(), att["h"][0].tolist()
  ([0.5], [[0.5]], [0.5, 0.5])
  """
  heads = list(outputs[-1][1])
  thresholds = {h: np.mean([o[0]["thresholds"][h] for o in outputs], 0).tolist()
                for h in heads}
  probs = {h: np.mean([o[1][h] for o in outputs], 0) for h in heads}
  attention = {h: [np.mean([o[2][h][j] for o in outputs], 0)
                   for j in range(len(outputs[-1][2][h]))] for h in heads}
  return thresholds, probs, attention


def predict(workdir: str, slides: str, out: str, top_k: int | None = None,
            ensemble: str = "folds") -> dict:
  """Predicts every slide of ``slides``; returns {head: prob [S, T]} and writes files.

  ``ensemble``: ``"folds"`` (the final model and the fold models, averaged;
  see the module docstring) or ``"final"`` (the final model alone).
  """
  from slamjax import report
  from slamjax import sharding
  from slamjax.data import slides as slides_lib
  from slamjax.slides import fold_run
  from slamjax.slides import report as slides_report
  from slamjax import workdir as workdir_lib
  cfg, info, complete = load_final(workdir)
  final = os.path.join(workdir, "final")
  used = members(workdir, ensemble, complete["fingerprint"])
  cohort = slides_lib.load_cohort(slides_config(cfg, slides), require_labels=False)
  print(f"predict: {cohort.summary()}", flush=True)
  known = known_slides(cohort, workdir_lib.cell_digests(cohort.images), final, complete)
  known_md = known_lines(known, len(cohort.slide_ids))
  if known_md:
    print(known_warning(known, len(cohort.slide_ids), os.path.join(out, "report.md")),
          flush=True)
  collapsed = slides_report.final_collapse_line(cfg, final)
  if collapsed:
    print("predict: " + collapsed.replace("**", ""), flush=True)
  os.makedirs(out, exist_ok=True)
  mesh = sharding.make_mesh(cfg.mesh.data)
  tasks = info["task_names"]
  feats = fold_run.slide_feature_sets(
      cfg, cohort, {"new": np.arange(len(cohort.slide_ids))}).get("new")
  outputs = []
  for i, (name, folder) in enumerate(used):
    if len(used) > 1:
      print(f"predict: model {i + 1} of {len(used)} ({name})", flush=True)
    outputs.append(predict_member(cfg, folder, cohort, feats, mesh))
  thresholds, probs, attention = average_members(outputs)
  info = dict(info, thresholds=thresholds)
  slides_report.write_predictions(os.path.join(out, "predictions.csv"),
                                  list(cohort.slide_ids), tasks, probs, info["thresholds"])
  head = info["heads"][0]
  k = top_k or cfg.eval.top_k
  os.makedirs(os.path.join(out, "attention"), exist_ok=True)
  os.makedirs(os.path.join(out, "galleries"), exist_ok=True)
  rows = []
  for j, sid in enumerate(cohort.slide_ids):
    a = np.asarray(attention[head][j])
    rank = np.empty(len(a), np.int64)
    rank[np.argsort(-a, kind="stable")] = np.arange(1, len(a) + 1)
    with open(os.path.join(out, "attention", f"{sid}.csv"), "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["cell_path", "attention", "rank"])
      for c, att, r in zip(cohort.cells[j], a, rank):
        w.writerow([cohort.cell_paths[c], f"{att:.6g}", int(r)])
    p = probs[head][j]
    thr = info["thresholds"][head]
    report.plot_attention(
        os.path.join(out, "galleries", f"{sid}.png"), [cohort.images[cohort.cells[j]]], [a],
        None, [report.slide_call(sid, p, thr, tasks, cohort.labels[j])], top=min(k, len(a)),
        title=f"Top-attention cells of {sid} ({head})")
    rows.append({"slide": sid, "cells": len(a),
                 **{f"p({t})": f"{p[i]:.3f}" for i, t in enumerate(tasks)},
                 **{f"predicted {t}": "positive" if p[i] >= thr[i] else "negative"
                    for i, t in enumerate(tasks)}})
  thr_text = ", ".join(f"{t} {v:.3f}" for t, v in zip(tasks, info["thresholds"][head]))
  model_line = (
      f"Model: `{final}` ({info['num_training_slides']} training slides; head `{head}`; "
      f"thresholds {thr_text}, chosen by inner cross-validation on the training slides)."
      if len(used) == 1 else
      f"Model: the mean of {len(used)} models of `{workdir}` ({', '.join(n for n, _ in used)}; "
      f"head `{head}`): probabilities, attention and thresholds averaged (thresholds "
      f"{thr_text}; each chosen by inner cross-validation on its training slides).")
  md = ["# slamjax predictions", "", model_line, f"Slides: `{slides}`: {cohort.summary()}", "",
        report.markdown_table(rows, list(rows[0])), ""]
  if collapsed:
    md += [collapsed, ""]
  if known_md:
    md += ["## Slides the model has seen", "", *[l + "\n" for l in known_md]]
  if cohort.labelled().any():
    scores = label_metrics(cohort, tasks, probs, info["thresholds"],
                           exclude=set(known["same_id"]) | set(known["shared_cells"]))
    with open(os.path.join(out, "metrics.json"), "w") as f:
      json.dump(scores, f, indent=2)
    md += ["## Against the slide table's labels", "",
           f"{int(cohort.labelled().sum())} labelled slides; predicted positive at the "
           "model's thresholds. TN/FP/FN/TP: the confusion matrix (label 0/1 x "
           "predicted 0/1)." + (" 'not trained on' leaves out the slides the model has "
                               "seen (above)." if len({r['slides'] for r in scores}) > 1
                               else ""), "",
           report.markdown_table(scores, list(scores[0])) if scores else
           "No label column of the table names a task of the model "
           f"({', '.join(tasks)}).", ""]
  md += ["Per-cell attention: `attention/<slide>.csv`; top cells: `galleries/<slide>.png`.", ""]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(md))
  print("\n".join(md), flush=True)
  return probs
