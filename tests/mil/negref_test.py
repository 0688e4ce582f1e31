"""Negative-reference head: k-NN novelty (group and duplicate exclusion,
chunk padding), planted witnesses found through multihead.fit_predict, resume
from negref.npz, and clear errors for multi-task labels and gradient training."""

import dataclasses
import os

import ml_collections
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from slamjax.mil import heads, multihead, negref, options
from slamjax.mil import train as mil_train


def _reference(query, bank, k, qg, bg):
  """Plain numpy novelty, one query at a time."""
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  sim = unit(query.astype(np.float64)) @ unit(bank.astype(np.float64)).T
  out = []
  for i, row in enumerate(sim):
    keep = (row <= 1 - 1e-6) & ~((qg[i] >= 0) & (bg == qg[i]))
    top = np.sort(row[keep])[::-1][:k]
    out.append(1.0 - (top.mean() if len(top) else 0.0))
  return np.array(out)


def test_knn_novelty_known_answer():
  bank = np.array([[1, 0], [0.6, 0.8], [0, 1], [-1, 0]], np.float32)
  bank_group = np.array([0, 1, 2, -1])
  query = np.array([[1, 0], [0.8, 0.6], [0, 2]], np.float32)
  query_group = np.array([1, -1, 0])
  # q0: bank 0 is its copy, bank 1 its group: neighbours bank 2 (0), bank 3 (-1).
  # q1: no exclusion: 0.96 and 0.8. q2: bank 2 is a copy (cosine 1), bank 0
  # its group: bank 1 (0.8) and bank 3 (0).
  want = {1: [1.0, 0.04, 0.2], 2: [1.5, 0.12, 0.6]}
  for k, w in want.items():
    for chunk in (2, 1024):  # 3 queries: the last chunk of 2 is padded
      got = negref.knn_novelty(query, bank, k, query_group, bank_group, chunk=chunk)
      assert got.shape == (3,) and got.dtype == np.float32
      np.testing.assert_allclose(got, w, atol=1e-6)
  # Without groups only the copies are skipped; k beyond the bank: all of it.
  np.testing.assert_allclose(negref.knn_novelty(query[:1], bank, 10), [1 - (0.6 + 0 - 1) / 3],
                             atol=1e-6)
  # Every bank row excluded: novelty 1.
  assert negref.knn_novelty(query[:1], bank[:2], 1, [5], [5, 5])[0] == 1.0

  rng = np.random.default_rng(0)
  q, b = rng.normal(size=(23, 5)), rng.normal(size=(40, 5))
  b[7] = 3 * q[4]  # a copy up to scale: the same direction
  qg, bg = rng.integers(-1, 4, 23), rng.integers(-1, 4, 40)
  got = negref.knn_novelty(q, b, 6, qg, bg, chunk=8)
  np.testing.assert_allclose(got, _reference(q, b, 6, qg, bg), atol=1e-5)


def _bags(n_neg, n_pos, seed, cells=20, dim=16):
  """Negative cells from 3 clusters; a positive bag adds 1 witness from a
  distant fourth cluster. Returns (bags, labels, witness index or -1)."""
  rng = np.random.default_rng(100)  # the same clusters for every split
  centres = rng.normal(size=(4, dim)) * 4
  rng = np.random.default_rng(seed)
  bags, labels, witness = [], [], []
  for y in [0] * n_neg + [1] * n_pos:
    x = centres[rng.integers(3, size=cells)] + rng.normal(size=(cells, dim))
    j = int(rng.integers(cells)) if y else -1
    if y:
      x[j] = centres[3] + rng.normal(size=dim)
    bags.append(x.astype(np.float32))
    labels.append(y)
    witness.append(j)
  return bags, np.array(labels), witness


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(heads=("negref",),
                                        negref=dict(k=5, bank_size=300), **kw))


def test_planted_witnesses_and_resume(tmp_path, monkeypatch):
  bags, labels, _ = _bags(20, 20, seed=0)  # 400 negative cells > bank_size
  test_bags, test_labels, test_wit = _bags(30, 30, seed=1)
  run, = multihead.fit_predict(_cfg(), bags, labels, {"test": test_bags, "train": bags},
                               str(tmp_path), seed=0, verbose=False)
  assert run.name == "negref" and run.workdir == str(tmp_path / "mil_negref")
  state = run.state
  assert state["bank"].shape == (300, 16) and state["bank_group"].shape == (300,)
  assert set(np.unique(state["bank_group"])) <= set(np.flatnonzero(labels == 0))
  out = run.outputs["test"]
  assert out["prob"].shape == (60, 1) and out["prob"].dtype == np.float32
  assert roc_auc_score(test_labels, out["prob"][:, 0]) > 0.95
  assert np.mean((out["prob"][:, 0] > 0.5) == test_labels) >= 0.9  # calibrated
  pos = np.flatnonzero(test_labels == 1)
  hits = np.mean([np.argmax(out["attention"][i]) == test_wit[i] for i in pos])
  assert hits >= 0.95, hits
  for a, b in zip(out["attention"], test_bags):
    assert a.shape == (len(b),) and (a >= 0).all() and abs(a.sum() - 1) < 1e-5

  # The subset is deterministic in the seed.
  again = negref.fit(options.resolve(_cfg()), bags, labels, seed=0)
  np.testing.assert_array_equal(again["bank"], state["bank"])

  # A rerun loads negref.npz instead of fitting again.
  path = tmp_path / "mil_negref" / "negref.npz"
  stamp = os.stat(path).st_mtime_ns

  def no_fit(*args):
    raise AssertionError("refitted instead of loading negref.npz")
  spec = dataclasses.replace(heads.HEADS["negref"], nonparametric=(no_fit, negref.predict))
  monkeypatch.setitem(heads.HEADS, "negref", spec)
  rerun, = multihead.fit_predict(_cfg(), bags, labels, {"test": test_bags}, str(tmp_path),
                                 seed=0, verbose=False)
  assert os.stat(path).st_mtime_ns == stamp
  assert sorted(rerun.state) == sorted(state)
  for key in state:
    np.testing.assert_array_equal(rerun.state[key], state[key])
  np.testing.assert_array_equal(rerun.outputs["test"]["prob"], out["prob"])


def test_errors():
  bags, labels, _ = _bags(4, 4, seed=2)
  two = np.stack([labels, labels], 1)
  with pytest.raises(ValueError, match="negref takes one bag label"):
    negref.fit(options.resolve(_cfg()), bags, two, seed=0)
  with pytest.raises(ValueError, match="negref takes one bag label"):
    multihead.fit_predict(_cfg(), bags, two, {}, "/nonexistent", seed=0, verbose=False)
  cfg = options.resolve(dict(head="negref"))
  with pytest.raises(ValueError, match="multihead.fit_predict"):
    mil_train.fit(cfg, bags, labels, "/nonexistent", seed=0, verbose=False)
  with pytest.raises(ValueError, match="multihead.fit_predict"):
    mil_train.predict(cfg, None, bags)
  with pytest.raises(ValueError, match="non-parametric: it has no Flax module"):
    heads.get_spec(cfg).build(cfg, 1, None)


def test_ratio_ignores_rare_normal_cells_that_novelty_ranks_first():
  # Normal cells: a tight cluster plus 10% scattered outliers, in every bag;
  # a positive bag adds one witness from a tight cluster of its own. The
  # outliers are as unlike the negatives as the witness (novelty confuses
  # them), but as common in positive as in negative bags (the ratio does not).
  rng = np.random.default_rng(3)
  dim = 16
  centre, witness = np.eye(dim)[0] * 6, np.eye(dim)[1] * 6

  def bag(positive):
    cells = centre + rng.normal(size=(30, dim))
    cells[:3] = rng.normal(size=(3, dim)) * 6  # outliers
    if positive:
      cells[5] = witness + rng.normal(size=dim)
    return cells.astype(np.float32)

  labels = np.array([0, 1] * 40)
  bags = [bag(y) for y in labels]
  test = [bag(1) for _ in range(40)]
  first = {}
  for score in ("novelty", "ratio"):
    cfg = {"negref": {"k": 5, "bank_size": 4096, "score": score}}
    state = negref.fit(cfg, bags, labels, seed=0)
    out = negref.predict(cfg, state, test)
    first[score] = np.mean([int(np.argmax(a)) == 5 for a in out["attention"]])
  assert first["ratio"] >= 0.9, first
  assert first["ratio"] > first["novelty"] + 0.3, first
