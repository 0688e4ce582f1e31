"""Pretraining batches: proportional, every cell once per epoch, by step."""

import numpy as np
import pytest

from slamjax.data import batching


def test_every_cell_once_per_pass_and_proportional():
  pos, neg = np.arange(0, 90), np.arange(1000, 1270)
  b = batching.ProportionalBatcher(pos, neg, batch_size=64, seed=0, multiple=8)
  assert (b.b_pos, b.b_neg) == (16, 48)
  steps = [b.indices(s) for s in range(12)]
  pos_seen = np.concatenate([p for p, _ in steps])
  # The first len(pos) positives drawn are a permutation of all positives.
  assert sorted(pos_seen[:90]) == list(pos)
  neg_seen = np.concatenate([n for _, n in steps])
  assert sorted(neg_seen[:270]) == list(neg)
  # No overlapping batches within a pass (the reference's bug).
  assert len(set(pos_seen[:90])) == 90


def test_batches_are_a_function_of_seed_and_step():
  pos, neg = np.arange(50), np.arange(50, 150)
  a = batching.ProportionalBatcher(pos, neg, 30, seed=4)
  b = batching.ProportionalBatcher(pos, neg, 30, seed=4)
  for s in (0, 7, 3):
    for x, y in zip(a.indices(s), b.indices(s)):
      np.testing.assert_array_equal(x, y)


def test_bad_batch_sizes():
  with pytest.raises(ValueError, match="multiple of the device count"):
    batching.split_batch(30, 10, 10, multiple=8)
  with pytest.raises(ValueError, match="both positive and negative"):
    batching.split_batch(32, 0, 10)
