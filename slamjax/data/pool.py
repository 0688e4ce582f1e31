"""A labelled pool of decoded single-cell crops held in host memory."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class CellPool:
  """All cells of a dataset, decoded once.

  Attributes:
    images: uint8 [N, H, W, 3].
    labels: int32 [N], index into ``class_names``.
    class_names: name of every class label.
    cell_ids: a stable string id per cell (file path or synthetic id).

  Example:
    >>> import numpy as np
    >>> pool = CellPool(np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]),
    ...                 ("normal", "blast"), ("c0", "c1"))
    >>> pool.class_index(["blast"]), pool.counts()
    ((1,), {'normal': 1, 'blast': 1})
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  cell_ids: tuple[str, ...]

  def __post_init__(self):
    n = len(self.images)
    if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
      raise ValueError("CellPool.images must be uint8 [N, H, W, 3], got "
                       f"{self.images.dtype} {self.images.shape}")
    if len(self.labels) != n or len(self.cell_ids) != n:
      raise ValueError(f"CellPool has {n} images but {len(self.labels)} labels "
                       f"and {len(self.cell_ids)} cell ids")

  def __len__(self) -> int:
    return len(self.images)

  def class_index(self, names) -> tuple[int, ...]:
    """Maps class names to labels, with an error listing valid names."""
    missing = [n for n in names if n not in self.class_names]
    if missing:
      raise ValueError(f"Unknown class name(s) {missing}; this dataset has "
                       f"{list(self.class_names)}")
    return tuple(self.class_names.index(n) for n in names)

  def counts(self) -> dict[str, int]:
    return {name: int((self.labels == i).sum())
            for i, name in enumerate(self.class_names)}
