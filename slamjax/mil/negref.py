"""Negative-reference scoring: a non-parametric MIL head.

A cell's novelty is one minus its mean cosine similarity to its k nearest
cells of the negative training bags (the bank); a bag's score is the largest
novelty of its cells, turned into a probability by a 1-D logistic regression
fitted on the training bags' scores. Cells rank by novelty. No gradients:
:func:`fit` returns a dict of numpy arrays, and
:func:`slamjax.mil.multihead.fit_predict` runs it as head ``negref``
(``config.mil.negref``: ``k``, ``bank_size``), saving that dict as
``mil_negref/negref.npz`` for reruns.

A negative training bag is scored against the bank without its own cells
(group exclusion), so its score is what an unseen negative bag would get and
the calibration transfers to test bags. A cell never counts a copy of itself
(cosine > 1 - 1e-6), since the same cell may recur in several bags.

Example:
  >>> import numpy as np
  >>> rng = np.random.default_rng(0)
  >>> bags = [rng.normal(size=(6, 4)).astype("float32") + [4, 0, 0, 0] for _ in range(8)]
  >>> for b in bags[1::2]:
  ...   b[0] = [0, 0, 0, 4]  # the witness: a direction no negative cell takes
  >>> labels = np.array([0, 1] * 4)
  >>> cfg = {"negref": {"k": 3, "bank_size": 100}}
  >>> state = fit(cfg, bags, labels, seed=0)
  >>> sorted(state), state["bank"].shape
  (['bank', 'bank_group', 'coef', 'intercept', 'k'], (24, 4))
  >>> out = predict(cfg, state, bags)
  >>> out["prob"].shape, bool((out["prob"][1::2] > out["prob"][::2]).all())
  ((8, 1), True)
  >>> [int(np.argmax(a)) for a in out["attention"][1::2]]
  [0, 0, 0, 0]
  >>> q = np.array([[1.0, 0.0], [0.0, 1.0]]); bank = np.array([[1.0, 0.0], [1.0, 1.0]])
  >>> [round(float(v), 3) for v in knn_novelty(q, bank, k=1)]  # the copy is skipped
  [0.293, 0.293]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DUPLICATE = 1.0 - 1e-6  # cosine above this: the same cell
CHUNK = 1024  # query rows per compiled call: bounds the [chunk, bank] matrix


def _normalise(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames="k")
def _chunk_novelty(q, qg, bank, bg, k: int):
  # HIGHEST: the duplicate test needs float32 cosines, not bf16 passes.
  sim = jnp.dot(_normalise(q), _normalise(bank).T, precision=jax.lax.Precision.HIGHEST)
  same = (qg[:, None] >= 0) & (qg[:, None] == bg[None, :])
  sim = jnp.where(same | (sim > DUPLICATE), -jnp.inf, sim)
  top, _ = jax.lax.top_k(sim, k)
  ok = jnp.isfinite(top)
  # No neighbour left (tiny bank): similarity 0, novelty 1.
  mean = jnp.sum(jnp.where(ok, top, 0.0), -1) / jnp.maximum(jnp.sum(ok, -1), 1)
  return 1.0 - mean


def knn_novelty(query, bank, k: int, query_group=None, bank_group=None,
                chunk: int = CHUNK) -> np.ndarray:
  """1 - mean cosine similarity of each query row to its k nearest bank rows.

  Args:
    query: [n, D]; bank: [m, D] (rows are L2-normalised here).
    k: neighbours averaged (all the bank has, if fewer).
    query_group, bank_group: [n] / [m] int group ids or None; a bank row of
      the query's group (ids >= 0; -1 = no group) is not a neighbour, nor is
      a duplicate of the query (cosine > 1 - 1e-6).
    chunk: query rows per call; the last chunk is padded, so one compiled
      program serves every chunk and memory stays at [chunk, m].

  Returns:
    [n] float32 novelty (1 where no bank row is left).
  """
  query = np.asarray(query, np.float32)
  bank = np.asarray(bank, np.float32)
  n, m = len(query), len(bank)
  if n == 0:
    return np.zeros((0,), np.float32)
  if m == 0:
    return np.ones((n,), np.float32)
  qg = np.full(n, -1, np.int32) if query_group is None else np.asarray(query_group, np.int32)
  bg = np.full(m, -1, np.int32) if bank_group is None else np.asarray(bank_group, np.int32)
  chunk = min(chunk, n)
  pad = -n % chunk
  query = np.concatenate([query, np.zeros((pad, query.shape[1]), np.float32)])
  qg = np.concatenate([qg, np.full(pad, -1, np.int32)])
  bank_d, bg_d = jnp.asarray(bank), jnp.asarray(bg)
  k = max(1, min(int(k), m))
  out = [_chunk_novelty(query[i:i + chunk], qg[i:i + chunk], bank_d, bg_d, k)
         for i in range(0, len(query), chunk)]
  return np.asarray(jnp.concatenate(out))[:n]


def _section(cfg):
  c = cfg["negref"]  # a ConfigDict or a plain dict
  return int(c["k"]), int(c["bank_size"])


def _one_label(labels) -> np.ndarray:
  y = np.asarray(labels, np.float32)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    raise ValueError(f"negref takes one bag label per bag (labels of shape [n] or [n, 1]); "
                     f"got shape {y.shape}: multi-task labels need a trained head")
  return y


def _bag_scores(bags, novelty) -> np.ndarray:
  ends = np.cumsum([len(b) for b in bags])
  return np.array([p.max() for p in np.split(novelty, ends[:-1])], np.float32)


def fit(cfg, bags, labels, seed: int) -> dict:
  """Bank of negative-bag cells and the calibration of bag scores.

  ``labels`` is [n] (or [n, 1]) with 0/1 and NaN = unknown (left out of the
  bank and the calibration). Returns numpy arrays: ``bank`` [m, D] (every cell
  of the negative bags, or a random subset of ``negref.bank_size`` drawn with
  ``seed``), ``bank_group`` [m] (their bag index), ``coef`` and ``intercept``
  [1] (logistic regression, balanced classes, of label on bag score:
  probability = sigmoid(coef * score + intercept)), and the
  ``k`` the calibration holds for (:func:`predict` uses it).
  """
  from sklearn.linear_model import LogisticRegression  # heavy import: only here
  k, bank_size = _section(cfg)
  y = _one_label(labels)
  known = np.flatnonzero(np.isfinite(y))
  if len(np.unique(y[known])) != 2:
    raise ValueError("negref needs negative and positive training bags")
  neg = [i for i in known if y[i] == 0]
  bank = np.concatenate([np.asarray(bags[i], np.float32) for i in neg])
  group = np.concatenate([np.full(len(bags[i]), i, np.int32) for i in neg])
  if len(bank) > bank_size:
    keep = np.sort(np.random.default_rng(seed).choice(len(bank), bank_size, replace=False))
    bank, group = bank[keep], group[keep]
  train = [np.asarray(bags[i], np.float32) for i in known]
  q_group = np.concatenate([np.full(len(b), i, np.int32) for b, i in zip(train, known)])
  nov = knn_novelty(np.concatenate(train), bank, k, q_group, group)
  scores = _bag_scores(train, nov)
  # Fitted on standardised scores, so that the L2 penalty does not depend on
  # the scale of novelty; folded back into coef and intercept of raw scores.
  mu, sd = float(scores.mean()), float(scores.std()) or 1.0
  lr = LogisticRegression(class_weight="balanced").fit(((scores - mu) / sd)[:, None],
                                                        y[known].astype(int))
  coef = lr.coef_[0].astype(np.float64) / sd
  return {"bank": bank, "bank_group": group, "coef": coef,
          "intercept": lr.intercept_.astype(np.float64) - coef * mu, "k": np.int64(k)}


def predict(cfg, state: dict, bags) -> dict:
  """``prob`` [n, 1] float32 and ``attention`` (per bag, novelty clipped at 0
  and summed to 1: cells rank by novelty; uniform if all are 0).

  Bags are scored against the whole bank, so a training negative bag scores
  lower here than in :func:`fit` (its own cells are neighbours).
  """
  if not len(bags):
    return {"prob": np.zeros((0, 1), np.float32), "attention": []}
  bags = [np.asarray(b, np.float32) for b in bags]
  nov = knn_novelty(np.concatenate(bags), state["bank"], int(state["k"]))
  z = state["coef"][0] * _bag_scores(bags, nov) + state["intercept"][0]
  prob = (1.0 / (1.0 + np.exp(-z)))[:, None].astype(np.float32)
  attention = []
  for p in np.split(np.clip(nov, 0.0, None), np.cumsum([len(b) for b in bags])[:-1]):
    total = p.sum()
    attention.append(p / total if total > 0 else np.full(len(p), 1.0 / len(p), np.float32))
  return {"prob": prob, "attention": attention}
