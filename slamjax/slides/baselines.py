"""Baselines on the same folds as SLAM-AGS (``eval.baselines``).

Encoder baselines rerun the whole fold (pretraining, embedding, MIL heads)
with another encoder: ``simclr`` (SimCLR alone), ``random_init`` (no
pretraining), ``pretrained`` (the frozen ``model.init_from`` weights) and
``pseudo_label`` (the run's encoder fine-tuned by 3 pseudo-label rounds,
:mod:`slamjax.pseudo_label`).
Slide-feature baselines need no deep model: a regularised logistic
regression (C and threshold chosen by inner cross-validation on the
training slides, :func:`slamjax.slides.model_selection.fit_logreg`) on

* ``pixel_stats``: per-cell colour/intensity/dark-stain statistics pooled
  per slide (:mod:`slamjax.slides.slide_features`);
* ``cell_count``: the log number of cells of the slide (when crops come
  from a detector, how many cells a smear yields can reflect the disease);
* ``mean_pool``: the SLAM-AGS encoder's embeddings of the fold, mean-pooled
  per slide (does attention help over pooling?).

Example:
  >>> sorted(ENCODERS), sorted(SLIDE_FEATURES)
  (['pretrained', 'pseudo_label', 'random_init', 'simclr'], ['cell_count', 'mean_pool', 'pixel_stats'])
"""

from __future__ import annotations

import copy
import os
import time

import numpy as np

from slamjax import workdir as workdir_lib
from slamjax.slides import model_selection
from slamjax.slides import slide_features

# Encoder baselines: config overrides on the run's own config.
ENCODERS = {
    "simclr": {"pretrain": {"task_weights": (1.0, 0.0), "surgery": "sum"}},
    "random_init": {"pretrain": {"epochs": 0}},
    "pretrained": {"pretrain": {"epochs": 0}},
    # The run's encoder plus 3 rounds of pseudo-label SupCon (issue 27).
    "pseudo_label": {"pseudo": {"rounds": 3}},
}
SLIDE_FEATURES = ("pixel_stats", "cell_count", "mean_pool")
NAMES = (*ENCODERS, *SLIDE_FEATURES)
MEAN_EMBEDDINGS = workdir_lib.MEAN_EMBEDDINGS  # per fold of slam_ags: what mean_pool reads


def method_config(cfg, method: str):
  """The run's config for encoder ``method`` ("slam_ags" = the config as given)."""
  c = copy.deepcopy(cfg)
  for section, values in ENCODERS.get(method, {}).items():
    for key, value in values.items():
      c[section][key] = value
  return c


def check(cfg, baselines) -> None:
  """Config errors that the registry alone cannot see."""
  if "pretrained" in baselines and not cfg.model.init_from:
    raise ValueError("config.eval.baselines has 'pretrained', which needs "
                     "config.model.init_from=/path/to/weights (the frozen weights to compare)")


def features(cohort, method: str, fold_dir: str | None = None,
             stats: np.ndarray | None = None) -> np.ndarray:
  """[num_slides, F] inputs of a slide-feature baseline. ``mean_pool`` reads
  the fold's SLAM-AGS mean embeddings (rows for the fold's slides only)."""
  if method == "mean_pool":
    with np.load(os.path.join(fold_dir, MEAN_EMBEDDINGS), allow_pickle=False) as z:
      x = np.full((len(cohort.slide_ids), z["mean"].shape[1]), np.nan, np.float32)
      x[z["slides"]] = z["mean"]
    return x
  name = {"pixel_stats": "pixel_stats", "cell_count": "log_count"}[method]
  return slide_features.slide_matrix(cohort.images, cohort.cells, (name,), stats)


def run_fold(cohort, fold: dict, method: str, x: np.ndarray, seed: int,
             inner_k: int) -> dict:
  """A fold record (as :func:`slamjax.slides.run.fold_record` writes it) of
  a logistic regression on ``x``, one per task."""
  t0 = time.perf_counter()
  tr, te = fold["train"], fold["test"]
  y = cohort.labels[tr]
  folds = model_selection.run_inner_folds(y, [cohort.patient_ids[i] for i in tr], inner_k,
                                          seed, f"{method} {fold['name']}")
  probs, thresholds = [], []
  for t in range(y.shape[1]):
    lr = model_selection.fit_logreg(x[tr], y[:, t], folds)
    probs.append(lr.predict(x[te]))
    thresholds.append(lr.threshold)
  prob = np.stack(probs, 1)
  return {"prob": prob, "thresholds": thresholds,
          "timing_s": {"fit": time.perf_counter() - t0}}
