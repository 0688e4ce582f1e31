"""Retrieval and attention stability of trained heads (multi-task metrics
are in :mod:`slamjax.evaluate`).

Example:
  >>> import numpy as np
  >>> round(attention_jsd([None], [np.array([1.0, 0.0])]), 4)  # vs uniform
  0.2158
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def attention_jsd(prev: Sequence, cur: Sequence, eps: float = 1e-8) -> float:
  """Mean Jensen-Shannon divergence between two epochs' attention on the same
  bags (``None`` in ``prev`` = uniform), as ASMIL measures instability:
  renormalised, clamped at ``eps``, natural log."""
  vals = []
  for p, q in zip(prev, cur):
    q = np.asarray(q, np.float64)
    p = np.full_like(q, 1.0 / len(q)) if p is None else np.asarray(p, np.float64)
    p, q = np.maximum(p / p.sum(), eps), np.maximum(q / q.sum(), eps)
    m = 0.5 * (p + q)
    vals.append(float(np.sum(0.5 * p * np.log(p / m) + 0.5 * q * np.log(q / m))))
  return float(np.mean(vals)) if vals else float("nan")
