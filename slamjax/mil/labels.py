"""Per-abnormal-class (multi-task) bag labels and witnesses from a BagSet.

Task t is "the bag holds at least one cell of abnormal class c_t", so a bag
simulated by ``slamjax.data.bags`` carries one binary label per abnormal
class, and each task has its own witnesses for retrieval.

Example:
  >>> import numpy as np
  >>> from slamjax.data import bags as bags_lib
  >>> pool = np.array([0] * 300 + [1] * 30 + [2] * 30)
  >>> plan = bags_lib.BagPlan(normal_classes=(0,), abnormal_classes=(1, 2),
  ...     witness_rate=0.2, bag_size=10, bags_per_split={"train": (3, 3)})
  >>> bs = bags_lib.make_bags(pool, plan, seed=0)["train"]
  >>> y = multi_labels(bs, (1, 2))
  >>> y.shape, bool((y.max(1) == bs.bag_labels).all())
  ((6, 2), True)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def multi_labels(bagset, abnormal_classes: Sequence[int]) -> np.ndarray:
  """[num_bags, T] float32: 1 where the bag holds a cell of class c_t."""
  return np.array([[float(np.any(c == k)) for k in abnormal_classes]
                   for c in bagset.classes], np.float32).reshape(
                       len(bagset.classes), len(abnormal_classes))


def multi_witness(bagset, abnormal_classes: Sequence[int]) -> list[np.ndarray]:
  """Per bag, bool [T, n_i]: which cells are witnesses of each task."""
  return [np.stack([c == k for k in abnormal_classes]) for c in bagset.classes]
