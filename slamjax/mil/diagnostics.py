"""Retrieval, multi-task metrics and attention stability of trained heads.

Example:
  >>> import numpy as np
  >>> top_k_cells([np.array([0.1, 0.5, 0.2])], 2)[0].tolist()
  [1, 2]
  >>> round(attention_jsd([None], [np.array([1.0, 0.0])]), 4)  # vs uniform
  0.2158
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from slamjax import evaluate


def top_k_cells(attention: Sequence[np.ndarray], k: int) -> list[np.ndarray]:
  """Per bag, indices of its k highest-attention cells (descending, stable)."""
  return [np.argsort(-np.asarray(a), kind="stable")[:k] for a in attention]


def attention_jsd(prev: Sequence, cur: Sequence, eps: float = 1e-8) -> float:
  """Mean Jensen-Shannon divergence between two epochs' attention on the same
  bags (``None`` in ``prev`` = uniform), as ASMIL measures instability:
  renormalised, clamped at ``eps``, natural log (host version of
  :func:`slamjax.mil.masked.jsd`)."""
  vals = []
  for p, q in zip(prev, cur):
    q = np.asarray(q, np.float64)
    p = np.full_like(q, 1.0 / len(q)) if p is None else np.asarray(p, np.float64)
    p, q = np.maximum(p / p.sum(), eps), np.maximum(q / q.sum(), eps)
    m = 0.5 * (p + q)
    vals.append(float(np.sum(0.5 * p * np.log(p / m) + 0.5 * q * np.log(q / m))))
  return float(np.mean(vals)) if vals else float("nan")


def stability_series(snapshots: Sequence[Sequence[np.ndarray]]) -> list[float]:
  """[JSD(a_0, uniform), JSD(a_0, a_1), ...] over per-epoch attention snapshots."""
  out, prev = [], [None] * len(snapshots[0]) if snapshots else []
  for snap in snapshots:
    out.append(attention_jsd(prev, snap))
    prev = snap
  return out


def read_metrics(workdir: str, phase: str | None = None) -> list[dict]:
  """Per-epoch records of ``workdir/mil_metrics.jsonl`` (optionally one phase)."""
  path = os.path.join(workdir, "mil_metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    recs = [json.loads(l) for l in f if l.strip()]
  return [r for r in recs if phase is None or r["phase"] == phase]


def stability_summary(workdir: str, last_k: int = 5) -> dict:
  """Mean attention JSD over the first epoch and the last ``last_k`` epochs of
  the final training phase (``train`` or ``student``)."""
  recs = read_metrics(workdir, "train") or read_metrics(workdir, "student")
  if not recs:
    return {}
  jsd = [r["attention_jsd"] for r in recs]
  return {"phase": recs[-1]["phase"], "epochs": len(jsd), "first_epoch_jsd": jsd[0],
          f"last{last_k}_mean_jsd": float(np.mean(jsd[-last_k:]))}


def multitask_bag_metrics(labels: np.ndarray, probs: np.ndarray,
                          names: Sequence[str] | None = None) -> dict:
  """Per-task :func:`slamjax.evaluate.bag_metrics` (unknown = NaN labels
  skipped) and their macro average over tasks."""
  labels, probs = np.asarray(labels, float), np.asarray(probs, float)
  labels = labels[:, None] if labels.ndim == 1 else labels
  probs = probs[:, None] if probs.ndim == 1 else probs
  names = list(names) if names is not None else [f"task_{t}" for t in range(labels.shape[1])]
  per = {}
  for t, name in enumerate(names):
    known = np.isfinite(labels[:, t])
    per[name] = evaluate.bag_metrics(labels[known, t].astype(int), probs[known, t])
  keys = ("f1", "auc", "accuracy", "sensitivity", "specificity")
  macro = {k: float(np.nanmean([m[k] for m in per.values()])) for k in keys}
  return {"per_task": per, "macro": macro}


def multitask_retrieval(task_attention: Sequence[np.ndarray], witness: Sequence[np.ndarray],
                        labels: np.ndarray, k: int,
                        names: Sequence[str] | None = None) -> dict:
  """Per task, :func:`slamjax.evaluate.retrieval_metrics` of its attention on
  the bags positive for it.

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
    out[name] = evaluate.retrieval_metrics([task_attention[i][t] for i in pos],
                                           [witness[i][t] for i in pos], k)
  return out
