"""Retrieval and attention stability of trained heads (multi-task metrics
are in :mod:`slamjax.evaluate`).

Example:
  >>> import numpy as np
  >>> top_k_cells([np.array([0.1, 0.5, 0.2])], 2)[0].tolist()
  [1, 2]
  >>> round(attention_jsd([None], [np.array([1.0, 0.0])]), 4)  # vs uniform
  0.2158
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


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
