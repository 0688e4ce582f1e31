"""One model on one set of training slides: pretrain, embed, MIL heads, thresholds.

Used for every cross-validation fold, for the baselines and for the final
model. Nothing from a held-out slide reaches pretraining, the standardisation
statistics or the thresholds: all three come from the training slides only.

Files under ``workdir``: ``pretrain_ckpt/`` and ``pretrain_metrics.jsonl``
(the encoder), ``standardize.npz`` (embedding mean/std of the training
cells), ``mil_<head>/`` (each head's checkpoints) and ``model.json`` (task
names, heads, thresholds), which :mod:`slamjax.predict` reads back.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from slamjax import embed
from slamjax import pretrain as pretrain_lib
from slamjax.checkpoint import Checkpointer
from slamjax.data import bags as bags_lib
from slamjax.data import pool as pool_lib
from slamjax.mil import multihead
from slamjax.mil import standardize
from slamjax.slides import folds as folds_lib


def cell_pool(cohort) -> pool_lib.CellPool:
  """The cohort's cells as a pool (no cell classes: slides have slide labels only)."""
  return pool_lib.CellPool(cohort.images, np.zeros(len(cohort.images), np.int32),
                           ("cell",), cohort.cell_paths)


def pretraining_bags(cfg, cohort, train_idx: np.ndarray) -> bags_lib.BagSet:
  """Training slides as bags: label 1 = positive for some task (NT-Xent cells),
  0 = negative for every task (similarity cells). With
  ``eval.unlabeled_in_pretraining``, unlabeled slides join the NT-Xent cells."""
  idx = list(train_idx)
  labels = (folds_lib.slide_classes(cohort.labels[train_idx]) > 0).astype(np.int32)
  if cfg.eval.unlabeled_in_pretraining:
    extra = np.flatnonzero(~cohort.labelled())
    idx += list(extra)
    labels = np.concatenate([labels, np.ones(len(extra), np.int32)])
  cells = [cohort.cells[i] for i in idx]
  zeros = [np.zeros(len(c), bool) for c in cells]
  return bags_lib.BagSet(cells=cells, bag_labels=labels, witness=zeros,
                         classes=[np.zeros(len(c), np.int32) for c in cells])


def load_encoder(cfg, workdir: str, mesh):
  """(model, state) of the encoder in ``workdir`` (random init if it has none
  because ``pretrain.epochs == 0``)."""
  model, tx, _ = pretrain_lib.build(cfg, steps_per_epoch=1)
  state = pretrain_lib.init_state(cfg, model, tx, mesh)
  path = os.path.join(workdir, "pretrain_ckpt")
  if cfg.pretrain.epochs > 0:
    ckpt = Checkpointer(path)
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"No encoder checkpoint in {path}")
    state = ckpt.restore(state)
    ckpt.close()
  return model, state


def embed_slides(cfg, model, state, cohort, idx, mesh) -> list[np.ndarray]:
  """One [n_cells, D] float32 array per slide of ``idx`` (cells embedded once)."""
  return embed.embed_groups(cfg, model, state, cohort.images,
                            [cohort.cells[i] for i in idx], mesh)


def choose_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
  """The probability cut that maximises Youden's J (sensitivity + specificity
  - 1) on these slides; 0.5 when they hold a single class.

  >>> choose_threshold(np.array([0, 0, 1, 1]), np.array([.1, .3, .35, .9]))
  0.35
  """
  from sklearn.metrics import roc_curve
  labels = np.asarray(labels)
  if len(np.unique(labels)) < 2:
    return 0.5
  fpr, tpr, thr = roc_curve(labels, probs)
  best = int(np.argmax(tpr - fpr))
  return float(min(thr[best], 1.0))


def labels_for_mil(labels: np.ndarray) -> np.ndarray:
  """[n] for one task (as the heads' single-task path), [n, T] otherwise."""
  return labels[:, 0] if labels.shape[1] == 1 else labels


def train_model(cfg, cohort, train_idx: np.ndarray, predict: dict, workdir: str,
                mesh, verbose: bool = True) -> dict:
  """Trains (or resumes) the encoder and every MIL head on ``train_idx``
  and predicts every slide set of ``predict`` (name -> slide indices).

  Returns ``{"outputs": {head: {name: out}}, "thresholds": {head: [T]},
  "train_outputs": {head: out}, "timing_s": {...}}``; ``out`` as
  :func:`slamjax.mil.train.predict` returns it.
  """
  os.makedirs(workdir, exist_ok=True)
  timing = {}
  t0 = time.perf_counter()
  pool = cell_pool(cohort)
  if cfg.pretrain.epochs > 0:
    state = pretrain_lib.pretrain(cfg, pool, {"train": pretraining_bags(cfg, cohort, train_idx)},
                                  workdir, mesh)
    model = pretrain_lib.build_model(cfg)
  else:  # the random-init baseline
    model, state = load_encoder(cfg, workdir, mesh)
  timing["pretrain"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  names = ["train", *predict]
  sets = {"train": np.asarray(train_idx), **{k: np.asarray(v) for k, v in predict.items()}}
  emb = {k: embed_slides(cfg, model, state, cohort, v, mesh) for k, v in sets.items()}
  mu, sd = standardize.fit(emb["train"])
  np.savez(os.path.join(workdir, "standardize.npz"), mean=mu, std=sd)
  emb = {k: standardize.apply(v, mu, sd) for k, v in emb.items()}
  timing["embed"] = time.perf_counter() - t0
  if verbose:
    print(f"embed: {sum(len(e) for v in emb.values() for e in v)} cells of "
          f"{sum(len(v) for v in sets.values())} slides in {timing['embed']:.1f}s", flush=True)

  t0 = time.perf_counter()
  y = cohort.labels[sets["train"]]
  runs = multihead.fit_predict(cfg.mil, emb["train"], labels_for_mil(y),
                               {k: emb[k] for k in names}, workdir, cfg.seed, verbose)
  timing["mil"] = time.perf_counter() - t0
  out = {"outputs": {}, "thresholds": {}, "train_outputs": {}, "timing_s": timing}
  for r in runs:
    train_prob = r.outputs["train"]["prob"]
    out["thresholds"][r.name] = [choose_threshold(y[:, t], train_prob[:, t])
                                 for t in range(y.shape[1])]
    out["train_outputs"][r.name] = r.outputs["train"]
    out["outputs"][r.name] = {k: r.outputs[k] for k in predict}
  with open(os.path.join(workdir, "model.json"), "w") as f:
    json.dump({"task_names": list(cohort.task_names), "heads": list(out["thresholds"]),
               "thresholds": out["thresholds"],
               "num_training_slides": int(len(sets["train"]))}, f, indent=2)
  return out
