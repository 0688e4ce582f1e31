"""Patient-grouped, stratified folds of a slide cohort, and what SLAM-AGS needs of them.

Slides of one patient always fall in the same fold. A ``fold`` column in the
slide CSV is used as it is; a ``split`` column (train/test) gives one fold;
otherwise ``StratifiedGroupKFold`` over the labelled slides, stratified by
the slide's class (negative, or its first positive task), grouped by patient.

Example:
  >>> import numpy as np
  >>> labels = np.array([[0.], [1.], [0.], [1.], [0.], [1.], [np.nan]])
  >>> f = assign_folds(labels, patients=("a", "b", "c", "d", "e", "f", "g"), k=3, seed=0)
  >>> f.tolist()[-1], sorted(set(f.tolist()[:-1]))  # unlabeled: -1
  (-1, [0, 1, 2])
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from slamjax.data import slides as slides_lib


def slide_classes(labels: np.ndarray) -> np.ndarray:
  """Per slide: 0 = negative for every task, 1 + t = first positive task t,
  -1 = unlabeled."""
  labels = np.asarray(labels, float)
  out = np.full(len(labels), -1, np.int64)
  known = ~np.isnan(labels).any(axis=1)
  pos = np.nan_to_num(labels) > 0.5
  out[known] = np.where(pos[known].any(axis=1), 1 + pos[known].argmax(axis=1), 0)
  return out


def assign_folds(labels: np.ndarray, patients: Sequence[str], k: int, seed: int,
                 task_names: Sequence[str] | None = None) -> np.ndarray:
  """Fold index per slide (-1 for unlabeled slides), grouped by patient.

  Raises:
    CohortError: when a class has fewer slides (or patients) than folds.
  """
  from sklearn.model_selection import StratifiedGroupKFold
  cls = slide_classes(labels)
  lab = np.flatnonzero(cls >= 0)
  names = ["negative"] + [f"positive for {t}" for t in (task_names or
                                                      [f"task {i}" for i in range(labels.shape[1])])]
  patients = np.asarray(patients)
  for c in np.unique(cls[lab]):
    n_slides = int((cls[lab] == c).sum())
    n_patients = len(set(patients[lab][cls[lab] == c]))
    if min(n_slides, n_patients) < k:
      raise slides_lib.CohortError(
          f"{names[c]}: {n_slides} slides from {n_patients} patients, fewer than "
          f"config.eval.folds={k}; every fold needs at least one. Use fewer folds "
          "(--config.eval.folds=N) or add a split/fold column to the slide CSV.")
  folds = np.full(len(cls), -1, np.int64)
  splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
  for f, (_, test) in enumerate(splitter.split(lab, cls[lab], patients[lab])):
    folds[lab[test]] = f
  return folds


def cohort_folds(cohort, k: int, seed: int) -> list[dict]:
  """The cohort's folds: ``[{"name", "train": idx, "test": idx}]`` over
  labelled slides. CSV ``fold`` or ``split`` columns take precedence over ``k``."""
  labelled = cohort.labelled()
  if cohort.folds is not None:
    fold_of = np.where(labelled, cohort.folds, -1)
    names = sorted(set(fold_of[labelled].tolist()))
    out = [{"name": f"fold{f}", "train": np.flatnonzero(labelled & (fold_of != f)),
            "test": np.flatnonzero(fold_of == f)} for f in names]
  elif cohort.splits is not None:
    split = np.asarray(cohort.splits)
    out = [{"name": "split", "train": np.flatnonzero(labelled & (split == "train")),
            "test": np.flatnonzero(labelled & (split == "test"))}]
  else:
    fold_of = assign_folds(cohort.labels, cohort.patient_ids, k, seed, cohort.task_names)
    out = [{"name": f"fold{f}", "train": np.flatnonzero(labelled & (fold_of != f)),
            "test": np.flatnonzero(fold_of == f)} for f in range(k)]
  for fold in out:
    check_training_slides(cohort, fold["train"], fold["name"])
    if len(fold["test"]) == 0:
      raise slides_lib.CohortError(f"{fold['name']} holds no labelled held-out slide")
  return out


def check_training_slides(cohort, train_idx: np.ndarray, name: str) -> None:
  """SLAM-AGS needs both kinds of training slide: negative slides feed the
  similarity objective, positive slides the NT-Xent objective."""
  cls = slide_classes(cohort.labels[train_idx])
  n_neg, n_pos = int((cls == 0).sum()), int((cls > 0).sum())
  if n_neg == 0:
    raise slides_lib.CohortError(
        f"{name}: the training slides hold no negative slide (negative for every task "
        f"{list(cohort.task_names)}), so the similarity objective has no cells. SLAM-AGS "
        "needs both negative and positive training slides.")
  if n_pos == 0:
    raise slides_lib.CohortError(
        f"{name}: the training slides hold no positive slide, so the NT-Xent (SimCLR) "
        "objective has no cells. SLAM-AGS needs both negative and positive training "
        "slides.")
