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

import numpy as np
from sklearn import metrics as skm


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
