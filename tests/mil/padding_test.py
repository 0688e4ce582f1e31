"""Padded batches of bags: masks, filler bags, every bag once. (Padding
invariance of every head's loss and gradients: padding_invariance_test.py.)"""

import numpy as np

from slamjax.mil import padding


def test_masks_and_filler_bags():
  bags = [np.ones((3, 4)), 2 * np.ones((17, 4))]
  b = padding.pad_batch(bags, np.array([1, 0]), batch_size=3, min_len=8,
                        instance_labels=[np.array([1, 0, 0]), np.zeros(17)])
  assert b["x"].shape == (3, 32, 4)
  np.testing.assert_array_equal(b["mask"].sum(1), [3, 17, 1])
  np.testing.assert_array_equal(b["weight"], [1, 1, 0])
  assert b["x"][0, 3:].sum() == 0 and b["instance_label"][0].tolist()[:4] == [1, 0, 0, 0]


def test_iterate_batches_covers_every_bag_once():
  bags = [np.ones((n, 2)) for n in (3, 5, 9, 2, 7)]
  seen = [i for idx, _ in padding.iterate_batches(bags, np.zeros(5), 2) for i in idx]
  assert sorted(seen) == list(range(5))
