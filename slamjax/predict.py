r"""Diagnose new patients with a model trained by the ``slides`` runner.

  python -m slamjax.predict --workdir /tmp/my_cohort --slides /path/to/new_slides \
      --out /tmp/my_cohort_predictions

``--workdir`` is a run of ``configs/slides.py`` with ``eval.final_model``
(its ``final/`` folder); ``--slides`` is a folder with one sub-folder of cell
images per slide (a slide CSV in it is optional: no labels are needed) or a
slide CSV whose folder holds the slides. Writes under ``--out``:

* ``predictions.csv``: per slide and head, the probability, the threshold
  (chosen by inner cross-validation on the training slides) and the
  predicted label of every task;
* ``attention/<slide_id>.csv``: every cell's path, attention and rank;
* ``galleries/<slide_id>.png``: the slide's top-K cells by attention;
* ``report.md``: a short summary table.
"""

from __future__ import annotations

import csv
import json
import os

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained slides run (holding final/).")
flags.DEFINE_string("slides", None, "Folder of slide folders, or a slide CSV.")
flags.DEFINE_string("out", None, "Output folder.")
flags.DEFINE_integer("top_k", None, "Cells per gallery (default: the run's eval.top_k).")


def load_final(workdir: str):
  """(config, model.json) of ``workdir/final``, with a clear error if absent."""
  final = os.path.join(workdir, "final")
  if not os.path.exists(os.path.join(final, "complete.json")):
    raise FileNotFoundError(
        f"{workdir} has no final model ({final}/complete.json is missing). Train one with "
        "`python -m slamjax.main --config configs/slides.py --workdir "
        f"{workdir}` (config.eval.final_model=True, the default); a run that was "
        "stopped before the final model resumes from where it stopped.")
  with open(os.path.join(final, "config.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(final, "model.json")) as f:
    model_info = json.load(f)
  return cfg, model_info


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


def predict(workdir: str, slides: str, out: str, top_k: int | None = None) -> dict:
  """Predicts every slide of ``slides``; returns {head: prob [S, T]} and writes files."""
  from slamjax import report
  from slamjax import sharding
  from slamjax.data import slides as slides_lib
  from slamjax.mil import standardize
  from slamjax.slides import fold_run
  from slamjax.slides import model_selection
  from slamjax.slides import report as slides_report
  cfg, info = load_final(workdir)
  final = os.path.join(workdir, "final")
  cohort = slides_lib.load_cohort(slides_config(cfg, slides), require_labels=False)
  print(f"predict: {cohort.summary()}", flush=True)
  os.makedirs(out, exist_ok=True)
  mesh = sharding.make_mesh(cfg.mesh.data)
  model, state = fold_run.load_encoder(cfg, final, mesh)
  idx = np.arange(len(cohort.slide_ids))
  stats = np.load(os.path.join(final, "standardize.npz"), allow_pickle=False)
  emb = standardize.apply(fold_run.embed_slides(cfg, model, state, cohort, idx, mesh),
                         stats["mean"], stats["std"])
  tasks = info["task_names"]
  feats = fold_run.slide_feature_sets(cfg, cohort, {"new": idx}).get("new")
  probs, attention = {}, {}
  for name, head_cfg, st, fusion in model_selection.load_fitted(cfg, final, info, emb):
    o = model_selection.predict_head(head_cfg, st, emb, feats, fusion)
    probs[name], attention[name] = o["prob"], o["attention"]
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
        [np.zeros(len(a), bool)],
        [f"{sid}\n" + ", ".join(f"{t} p={p[i]:.2f}" for i, t in enumerate(tasks))],
        top=min(k, len(a)))
    rows.append({"slide": sid, "cells": len(a),
                 **{f"p({t})": f"{p[i]:.3f}" for i, t in enumerate(tasks)},
                 **{f"predicted {t}": "positive" if p[i] >= thr[i] else "negative"
                    for i, t in enumerate(tasks)}})
  md = ["# slamjax predictions", "",
        f"Model: `{final}` ({info['num_training_slides']} training slides; head `{head}`; "
        "thresholds " + ", ".join(f"{t} {thr:.3f}" for t, thr in zip(tasks, info["thresholds"][head]))
        + ", chosen by inner cross-validation on the training slides).", f"Slides: `{slides}`: {cohort.summary()}", "",
        report.markdown_table(rows, list(rows[0])), "",
        "Per-cell attention: `attention/<slide>.csv`; top cells: `galleries/<slide>.png`.", ""]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(md))
  print("\n".join(md), flush=True)
  return probs


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from slamjax import runtime
  runtime.setup()
  predict(FLAGS.workdir, FLAGS.slides, FLAGS.out, FLAGS.top_k)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "slides", "out"])
  app.run(main)
