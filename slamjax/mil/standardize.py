"""Z-scoring of bag features with training-bag statistics (before any MIL head).

Projection outputs and other tools' features have arbitrary scales, which
saturate a head at initialisation; the statistics come from the training
bags only, so nothing from a held-out bag leaks into them.

Example:
  >>> import numpy as np
  >>> train = [np.array([[0., 2.], [2., 2.]]), np.array([[4., 2.]])]
  >>> mu, sd = fit(train)
  >>> mu.tolist(), apply([np.array([[2., 2.]])], mu, sd)[0].tolist()
  ([2.0, 2.0], [[0.0, 0.0]])
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

EPS = 1e-6  # a constant feature stays finite


def fit(bags: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std + EPS) over every instance of ``bags``."""
  flat = np.concatenate(list(bags))
  return flat.mean(0), flat.std(0) + EPS


def apply(bags: Sequence[np.ndarray], mean: np.ndarray, std: np.ndarray,
          in_place: bool = False) -> list[np.ndarray]:
  """``(x - mean) / std`` per bag; ``in_place`` overwrites the arrays (no copy
  of a large feature folder)."""
  if not in_place:
    return [(x - mean) / std for x in bags]
  for x in bags:
    x -= mean
    x /= std
  return list(bags)
