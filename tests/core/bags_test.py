"""Bag simulation invariants: disjoint splits, witness counts, determinism."""

import numpy as np
import pytest

from slamjax.data import bags as bags_lib


def _labels():
  # classes: 0,1 normal; 2,3 abnormal
  return np.array([0] * 500 + [1] * 300 + [2] * 40 + [3] * 30)


def _plan(**kw):
  base = dict(normal_classes=(0, 1), abnormal_classes=(2, 3), witness_rate=0.05,
              bag_size=40, bags_per_split={"train": (5, 5), "test": (4, 4)})
  base.update(kw)
  return bags_lib.BagPlan(**base)


def test_no_cell_in_two_splits_and_no_repeats_within_split():
  out = bags_lib.make_bags(_labels(), _plan(), seed=3)
  train, test = out["train"].all_cells(), out["test"].all_cells()
  assert not set(train) & set(test)
  assert len(set(train)) == len(train) and len(set(test)) == len(test)


def test_witness_counts_and_labels():
  labels = _labels()
  out = bags_lib.make_bags(labels, _plan(), seed=0)
  for bs in out.values():
    for cells, y, w in zip(bs.cells, bs.bag_labels, bs.witness):
      assert len(cells) == 40
      np.testing.assert_array_equal(w, np.isin(labels[cells], [2, 3]))
      assert w.sum() == (2 if y else 0)  # round(0.05 * 40)
    assert bs.summary()["realised_witness_rate"] == [0.05] * int(bs.bag_labels.sum())


def test_at_least_one_witness_at_tiny_rate():
  out = bags_lib.make_bags(_labels(), _plan(witness_rate=0.001), seed=0)
  assert set(out["train"].num_witnesses[out["train"].bag_labels == 1]) == {1}


def test_deterministic_for_seed_and_different_across_seeds():
  a = bags_lib.make_bags(_labels(), _plan(), seed=1)
  b = bags_lib.make_bags(_labels(), _plan(), seed=1)
  c = bags_lib.make_bags(_labels(), _plan(), seed=2)
  for s in a:
    for x, y in zip(a[s].cells, b[s].cells):
      np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(a["train"].cells, c["train"].cells))


def test_normal_proportions_and_reuse():
  plan = _plan(normal_proportions=(0.75, 0.25),
               bags_per_split={"train": (3, 3), "test": (3, 3)})
  out = bags_lib.make_bags(_labels(), plan, seed=0)
  neg = [c for c, y in zip(out["train"].classes, out["train"].bag_labels) if y == 0]
  assert all((c == 0).sum() == 30 and (c == 1).sum() == 10 for c in neg)
  big = _plan(bags_per_split={"train": (30, 30), "test": (2, 2)}, reuse_cells=True,
              split_fractions={"train": 0.5, "test": 0.5})
  out = bags_lib.make_bags(_labels(), big, seed=0)
  assert not set(out["train"].all_cells()) & set(out["test"].all_cells())


@pytest.mark.parametrize("kw,match", [
    (dict(witness_rate=0.0), "witness_rate"),
    (dict(witness_rate=1.5), "witness_rate"),
    (dict(bag_size=0), "bag_size"),
    (dict(bags_per_split={"train": (50, 50), "test": (1, 1)}), r"needs \d+ \w+ cells"),
])
def test_invalid_plans_fail_with_named_field(kw, match):
  with pytest.raises(ValueError, match=match):
    bags_lib.make_bags(_labels(), _plan(**kw), seed=0)


def test_not_enough_abnormal_cells_reports_needed_and_available():
  plan = _plan(witness_rate=0.5, bags_per_split={"train": (1, 10), "test": (1, 1)})
  with pytest.raises(ValueError, match=r"needs 200 abnormal cells .* only 35 are available"):
    bags_lib.make_bags(_labels(), plan, seed=0)
