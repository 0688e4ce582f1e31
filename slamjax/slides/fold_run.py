"""One model on one set of training slides: pretrain, embed, MIL heads, thresholds.

Used for every cross-validation fold, for the baselines and for the final
model. Nothing from a held-out slide reaches pretraining, the standardisation
statistics or the thresholds: all three come from the training slides only,
and thresholds from inner cross-validation on them.

Files under ``workdir``: ``pretrain_ckpt/`` and ``pretrain_metrics.jsonl``
(the encoder), ``standardize.npz`` (embedding mean/std of the training
cells), ``mil_<head>/`` (each head's checkpoints), ``inner/`` (the inner-CV runs
that chose epochs and thresholds) and ``model.json`` (task names, heads,
epochs, thresholds, fusion weights), which :mod:`slamjax.slides.predict` reads back.
"""

from __future__ import annotations

import os
import time

import numpy as np

from slamjax import embed
from slamjax import encoder
from slamjax import workdir as workdir_lib
from slamjax.data import bags as bags_lib
from slamjax.data import pool as pool_lib
from slamjax.config.values import names as config_names
from slamjax.mil import standardize
from slamjax.slides import baselines
from slamjax.slides import folds as folds_lib
from slamjax.slides import model_selection
from slamjax.slides import slide_features


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


def embed_slides(cfg, model, state, cohort, idx, mesh) -> list[np.ndarray]:
  """One [n_cells, D] float32 array per slide of ``idx`` (cells embedded once)."""
  return embed.embed_groups(cfg, model, state, cohort.images,
                            [cohort.cells[i] for i in idx], mesh)


def labels_for_mil(labels: np.ndarray) -> np.ndarray:
  """[n] for one task (as the heads' single-task path), [n, T] otherwise."""
  return labels[:, 0] if labels.shape[1] == 1 else labels


def train_model(cfg, cohort, train_idx: np.ndarray, predict: dict, workdir: str,
                mesh, verbose: bool = True) -> dict:
  """Trains (or resumes) the encoder and every MIL head on ``train_idx``
  and predicts every slide set of ``predict`` (name -> slide indices).

  Epoch counts, fusion with ``mil.slide_features`` and thresholds come from
  inner cross-validation on the training slides
  (:mod:`slamjax.slides.model_selection`). Returns ``{"outputs": {head:
  {name: out}}, "thresholds": {head: [T]}, "train_outputs": {head:
  {"oof_prob"}}, "selection": {head: {"epochs", "inner_bce"}}, "timing_s"}``;
  ``out`` as :func:`slamjax.mil.train.predict` returns it.
  """
  os.makedirs(workdir, exist_ok=True)
  timing = {}
  model, state = encoder.train_or_init(
      cfg, cell_pool(cohort), {"train": pretraining_bags(cfg, cohort, train_idx)},
      workdir, mesh, timing)

  t0 = time.perf_counter()
  names = ["train", *predict]
  sets = {"train": np.asarray(train_idx), **{k: np.asarray(v) for k, v in predict.items()}}
  emb = {k: embed_slides(cfg, model, state, cohort, v, mesh) for k, v in sets.items()}
  mu, sd = standardize.fit(emb["train"])
  np.savez(os.path.join(workdir, workdir_lib.STANDARDIZE), mean=mu, std=sd)
  emb = {k: standardize.apply(v, mu, sd) for k, v in emb.items()}
  # What the mean_pool baseline reads: the mean embedding of every slide.
  slides_all = np.concatenate([sets[k] for k in names])
  np.savez(os.path.join(workdir, baselines.MEAN_EMBEDDINGS), slides=slides_all,
           mean=np.stack([e.mean(0) for k in names for e in emb[k]]))
  timing["embed"] = time.perf_counter() - t0
  if verbose:
    print(f"embed: {sum(len(e) for v in emb.values() for e in v)} cells of "
          f"{sum(len(v) for v in sets.values())} slides in {timing['embed']:.1f}s", flush=True)

  t0 = time.perf_counter()
  y = cohort.labels[sets["train"]]
  feats = slide_feature_sets(cfg, cohort, sets)
  fits = model_selection.fit_heads(
      cfg, emb["train"], y, [cohort.patient_ids[i] for i in sets["train"]], workdir,
      feats.get("train"), where=f"{os.path.basename(os.path.normpath(workdir))}'s training "
      "slides", verbose=verbose)
  timing["mil"] = time.perf_counter() - t0
  out = {"outputs": {}, "thresholds": {}, "train_outputs": {}, "timing_s": timing,
         "selection": {}}
  for f in fits:
    out["thresholds"][f.name] = f.thresholds
    out["train_outputs"][f.name] = {"oof_prob": f.final_oof}
    out["selection"][f.name] = {"epochs": f.epochs, "inner_bce": f.inner_bce}
    out["outputs"][f.name] = {
        k: model_selection.predict_head(f.cfg, f.state, emb[k], feats.get(k), f.fusion)
        for k in predict}
  workdir_lib.write_json(os.path.join(workdir, workdir_lib.MODEL), {
      "task_names": list(cohort.task_names), "heads": [f.name for f in fits],
      "thresholds": out["thresholds"], "epochs": {f.name: f.epochs for f in fits},
      "slide_features": list(config_names(cfg.mil.slide_features)),
      "fusion": {f.name: [lr.to_json() for lr in f.fusion] for f in fits if f.fusion},
      "num_training_slides": int(len(sets["train"]))})
  return out


def slide_feature_sets(cfg, cohort, sets: dict) -> dict:
  """Per slide set, the ``mil.slide_features`` matrix (empty without them)."""
  names = config_names(cfg.mil.slide_features)
  if not names:
    return {}
  return {k: slide_features.slide_matrix(cohort.images, [cohort.cells[i] for i in v], names)
          for k, v in sets.items()}
