"""Bag-level classification metrics and attention retrieval of witnesses.

Example:
  >>> import numpy as np
  >>> m = bag_metrics(np.array([0, 1, 1, 0]), np.array([0.2, 0.9, 0.4, 0.1]))
  >>> m["f1"], m["auc"], m["sensitivity"], m["specificity"]
  (0.6666666666666666, 1.0, 0.5, 1.0)
  >>> r = retrieval_metrics([np.array([.1, .7, .2])], [np.array([0, 1, 0], bool)], k=2)
  >>> r["witnesses_found_at_k"], r["recall_at_k"], r["average_precision"]
  (1, 1.0, 1.0)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn import metrics as skm

from slamjax.mil import labels as labels_lib


def bag_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
  """F1 (positive class = abnormal), AUC, accuracy, sensitivity, specificity."""
  labels = np.asarray(labels).astype(int)
  probs = np.asarray(probs, float)
  pred = (probs >= threshold).astype(int)
  tn, fp, fn, tp = skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel()
  both = len(np.unique(labels)) == 2
  return {
      "f1": float(skm.f1_score(labels, pred, zero_division=0.0)),
      "auc": float(skm.roc_auc_score(labels, probs)) if both else float("nan"),
      "accuracy": float(skm.accuracy_score(labels, pred)),
      "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
      "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
      "num_bags": int(len(labels)),
  }


def retrieval_metrics(attention: list[np.ndarray], witness: list[np.ndarray],
                      k: int) -> dict:
  """Ranks each positive bag's cells by attention; scores the top-K.

  Args:
    attention: per positive bag, a score per cell (higher = more abnormal).
    witness: per positive bag, bool flags of the true witnesses.
    k: cut-off (bags smaller than k use all their cells).

  Returns:
    totals over bags (``witnesses_found_at_k``, ``num_witnesses``) and means
    over bags of precision@K, recall@K and average precision of the ranking.
  """
  found, total, prec, rec, ap = 0, 0, [], [], []
  for a, w in zip(attention, witness):
    w = np.asarray(w, bool)
    if not w.any():
      continue
    kk = min(k, len(a))
    top = np.argsort(-np.asarray(a), kind="stable")[:kk]
    hits = int(w[top].sum())
    found += hits
    total += int(w.sum())
    prec.append(hits / kk)
    rec.append(hits / w.sum())
    ap.append(skm.average_precision_score(w, a))
  mean = lambda v: float(np.mean(v)) if v else float("nan")
  return {"k": int(k), "witnesses_found_at_k": found, "num_witnesses": total,
          "precision_at_k": mean(prec), "recall_at_k": mean(rec),
          "average_precision": mean(ap), "num_positive_bags": len(ap)}


def multitask_bag_metrics(labels: np.ndarray, probs: np.ndarray,
                          names: Sequence[str] | None = None) -> dict:
  """Per-task :func:`bag_metrics` (unknown = NaN labels skipped) and their
  macro average over tasks."""
  labels, probs = np.asarray(labels, float), np.asarray(probs, float)
  labels = labels[:, None] if labels.ndim == 1 else labels
  probs = probs[:, None] if probs.ndim == 1 else probs
  names = list(names) if names is not None else [f"task_{t}" for t in range(labels.shape[1])]
  per = {}
  for t, name in enumerate(names):
    known = np.isfinite(labels[:, t])
    per[name] = bag_metrics(labels[known, t].astype(int), probs[known, t])
  keys = ("f1", "auc", "accuracy", "sensitivity", "specificity")
  macro = {k: float(np.nanmean([m[k] for m in per.values()])) for k in keys}
  return {"per_task": per, "macro": macro}


def multitask_retrieval(task_attention: Sequence[np.ndarray], witness: Sequence[np.ndarray],
                        labels: np.ndarray, k: int,
                        names: Sequence[str] | None = None) -> dict:
  """Per task, :func:`retrieval_metrics` of its attention on the bags
  positive for it.

  Args:
    task_attention: per bag [T, n_i] (``predict(...)["task_attention"]``).
    witness: per bag [T, n_i] bool (:func:`slamjax.mil.labels.multi_witness`).
    labels: [n_bags, T] task labels.
    k: cut-off.
    names: task names.
  """
  labels = np.asarray(labels)
  names = list(names) if names is not None else [f"task_{t}" for t in range(labels.shape[1])]
  out = {}
  for t, name in enumerate(names):
    pos = np.flatnonzero(labels[:, t] == 1)
    out[name] = retrieval_metrics([task_attention[i][t] for i in pos],
                                  [witness[i][t] for i in pos], k)
  return out


def linear_probe(train_x, train_y, test_x, test_y) -> dict:
  """Cell-level logistic-regression probe (standardised inputs, C=0.1,
  balanced classes): held-out ``auc``, ``balanced_accuracy`` at 0.5 and the
  test ``scores``. The pipeline's and the study's probe.

  >>> x = np.array([[0.], [1.], [2.], [3.]]); y = np.array([0, 0, 1, 1])
  >>> linear_probe(x, y, x, y)["auc"]
  1.0
  """
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  clf = make_pipeline(StandardScaler(), LogisticRegression(
      C=0.1, max_iter=2000, class_weight="balanced"))
  clf.fit(np.nan_to_num(np.asarray(train_x, np.float64)), train_y)
  p = clf.predict_proba(np.nan_to_num(np.asarray(test_x, np.float64)))[:, 1]
  return {"auc": float(skm.roc_auc_score(test_y, p)),
          "balanced_accuracy": float(skm.balanced_accuracy_score(test_y, p >= 0.5)),
          "scores": p}


def head_results(bagset, out: dict, k: int, tasks=None, seconds: float | None = None) -> dict:
  """Metrics of one MIL head's predictions ``out`` on simulated bags.

  Args:
    bagset: the ``BagSet`` predicted (labels, witnesses, cell classes).
    out: :func:`slamjax.mil.train.predict` on its bags: ``prob`` [n, T],
      ``attention`` and, for heads with per-task attention, ``task_attention``.
    k: retrieval cut-off.
    tasks: None (one bag label) or (task names, pool classes): task t is
      "the bag holds a cell of class t" (:mod:`slamjax.mil.labels`).
    seconds: the head's wall time, stored as ``seconds``.

  Returns:
    ``bag`` (bag label vs the bag probability: the largest task probability,
    as a bag is positive when any task is), ``retrieval`` (attention vs all
    witnesses of the positive bags), ``per_bag``, and with ``tasks``
    ``tasks`` = {name: {"bag", "retrieval"}}: each task's probability, and its
    own attention row (else the shared attention) vs that class's witnesses.
  """
  probs = np.asarray(out["prob"])
  bag_prob = probs.max(1)
  pos = np.flatnonzero(bagset.bag_labels == 1)
  res = {"bag": bag_metrics(bagset.bag_labels, bag_prob),
         "retrieval": retrieval_metrics([out["attention"][i] for i in pos],
                                        [bagset.witness[i] for i in pos], k),
         "per_bag": [{"label": int(y), "prob": float(p), "num_witnesses": int(w.sum())}
                     for y, p, w in zip(bagset.bag_labels, bag_prob, bagset.witness)]}
  if seconds is not None:
    res["seconds"] = round(float(seconds), 1)
  if tasks:
    names, classes = tasks
    y = labels_lib.multi_labels(bagset, classes)
    witness = labels_lib.multi_witness(bagset, classes)
    task_att = out.get("task_attention") or [
        np.broadcast_to(a, (len(names), len(a))) for a in out["attention"]]
    bag = multitask_bag_metrics(y, probs, names)["per_task"]
    ret = multitask_retrieval(task_att, witness, y, k, names)
    res["tasks"] = {n: {"bag": bag[n], "retrieval": ret[n]} for n in names}
    for row, yi, pi in zip(res["per_bag"], y, probs):
      row.update(task_labels=yi.astype(int).tolist(), task_probs=pi.tolist())
  return res


def embedding_spread(embeddings: np.ndarray) -> dict:
  """How collapsed a set of embeddings is (0 spread = all identical).

  ``spread``: sqrt(D) x mean per-dimension std of the L2-normalised
  embeddings (1 for isotropic directions); ``mean_cosine``: mean cosine
  similarity of distinct pairs; ``effective_rank``: exp of the entropy of the
  normalised singular values of the centred embeddings.

  Example:
    >>> r = embedding_spread(np.ones((5, 3)))
    >>> round(r["spread"], 6), round(r["mean_cosine"], 6)
    (0.0, 1.0)
  """
  z = np.asarray(embeddings, np.float64)
  z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  n, d = z.shape
  m = z.sum(0)
  mean_cos = (m @ m - n) / max(n * (n - 1), 1)
  s = np.linalg.svd(z - z.mean(0), compute_uv=False)
  p = s / s.sum() if s.sum() > 1e-12 else np.ones(1)
  p = p[p > 0]
  return {"spread": float(np.sqrt(d) * z.std(0).mean()), "mean_cosine": float(mean_cos),
          "effective_rank": float(np.exp(-(p * np.log(p)).sum()))}
