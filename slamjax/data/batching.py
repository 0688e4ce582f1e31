"""Pretraining batches: positive and negative cells in proportion, by step.

Each task has its own stream: the concatenation of per-epoch permutations of
its cells. Step s takes the next ``b_pos`` positive and ``b_neg`` negative
cells from the streams, so within every pass over a stream each cell is seen
exactly once (no overlapping batches, no dropped cells) and batch shapes are
fixed. A batch is a pure function of (seed, step), so resuming at any step
gives the same batches as an uninterrupted run.

Example:
  >>> import numpy as np
  >>> b = ProportionalBatcher(np.arange(30), np.arange(100, 190), 40, seed=0)
  >>> (b.b_pos, b.b_neg, b.steps_per_epoch)
  (10, 30, 3)
  >>> pos, neg = b.indices(0)
  >>> sorted(np.concatenate([b.indices(s)[0] for s in range(3)])) == list(range(30))
  True
"""

from __future__ import annotations

import math

import numpy as np


def split_batch(batch_size: int, n_pos: int, n_neg: int, multiple: int = 1):
  """(b_pos, b_neg) proportional to counts, each a positive multiple of ``multiple``."""
  if n_pos < 1 or n_neg < 1:
    raise ValueError(f"Pretraining needs cells from both positive and negative "
                     f"bags, got {n_pos} positive and {n_neg} negative")
  if batch_size % multiple or batch_size < 2 * multiple:
    raise ValueError(f"pretrain.batch_size={batch_size} must be a multiple of "
                     f"the device count {multiple} and at least {2 * multiple}")
  units = batch_size // multiple
  pos_units = int(np.clip(round(units * n_pos / (n_pos + n_neg)), 1, units - 1))
  return pos_units * multiple, (units - pos_units) * multiple


class ProportionalBatcher:
  """Index batches over two cell lists (pool indices) for pretraining."""

  def __init__(self, pos_cells: np.ndarray, neg_cells: np.ndarray,
               batch_size: int, seed: int, multiple: int = 1):
    self.pos_cells = np.asarray(pos_cells)
    self.neg_cells = np.asarray(neg_cells)
    self.seed = seed
    self.b_pos, self.b_neg = split_batch(batch_size, len(pos_cells),
                                         len(neg_cells), multiple)
    n = len(pos_cells) + len(neg_cells)
    self.steps_per_epoch = max(math.ceil(len(pos_cells) / self.b_pos),
                               math.ceil(len(neg_cells) / self.b_neg),
                               math.ceil(n / batch_size))

  def _stream(self, cells, task, start, count):
    n = len(cells)
    out = []
    while count > 0:
      epoch, offset = divmod(start, n)
      perm = np.random.default_rng([self.seed, task, epoch]).permutation(n)
      take = min(count, n - offset)
      out.append(cells[perm[offset:offset + take]])
      start, count = start + take, count - take
    return np.concatenate(out)

  def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Pool indices (positive, negative) of the cells used at ``step``."""
    return (self._stream(self.pos_cells, 0, step * self.b_pos, self.b_pos),
            self._stream(self.neg_cells, 1, step * self.b_neg, self.b_neg))
