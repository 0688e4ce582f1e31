"""Bag metrics and retrieval against hand-computed values."""

import numpy as np

from slamjax import evaluate


def test_bag_metrics():
  m = evaluate.bag_metrics(np.array([1, 1, 1, 0, 0]), np.array([.9, .8, .2, .6, .1]))
  assert m["sensitivity"] == 2 / 3 and m["specificity"] == 1 / 2
  assert abs(m["f1"] - 2 * (2 / 3 * 2 / 3) / (4 / 3)) < 1e-12
  assert abs(m["auc"] - 5 / 6) < 1e-12


def test_retrieval_topk():
  att = [np.array([.5, .1, .3, .05, .05]), np.array([.2, .2, .6])]
  wit = [np.array([0, 1, 1, 0, 0], bool), np.array([1, 0, 0], bool)]
  r = evaluate.retrieval_metrics(att, wit, k=2)
  # bag 0: top2 = {0, 2} -> 1 hit of 2; bag 1: top2 = {2, 0} -> 1 hit of 1.
  assert r["witnesses_found_at_k"] == 2 and r["num_witnesses"] == 3
  assert r["precision_at_k"] == 0.5 and r["recall_at_k"] == 0.75
  # Negative bags (no witnesses) are skipped.
  assert evaluate.retrieval_metrics([np.ones(3)], [np.zeros(3, bool)], 2)["num_positive_bags"] == 0
