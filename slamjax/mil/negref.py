"""Negative-reference scoring: a non-parametric MIL head.

Every cell of a negative training bag is a known negative; a positive bag is
negatives plus a few witnesses. ``config.mil.negref.score`` picks how a cell
is scored against these references (cosine similarities, k nearest rows):

* ``"ratio"`` (default): its mean similarity to its k nearest positive-bag
  cells minus that to its k nearest negative-bag cells, a k-NN estimate of
  the density ratio p_pos(x) / p_neg(x), which is monotone in the
  probability that x is a witness (negative-unlabeled learning). A normal
  cell is as close to both references; a witness has its like only among
  the positive bags. The two references hold the same number of distinct
  cells, so that neither is denser by its size alone.
* ``"novelty"``: one minus its mean similarity to its k nearest negative-bag
  cells (one-class: how unlike every negative it is).

A bag's score is the largest score of its cells, turned into a probability
by a 1-D logistic regression fitted on the training bags' scores; cells rank
by score. No gradients: :func:`fit` returns a dict of numpy arrays, and
:func:`slamjax.mil.multihead.fit_predict` runs it as head ``negref``
(``config.mil.negref``: ``k``, ``bank_size``, ``score``), saving that dict
as ``mil_negref/negref.npz`` for reruns.

A training bag is scored without its own cells in the references (group
exclusion), so its score is what an unseen bag would get and the
calibration transfers to test bags. A cell never counts a copy of itself
(cosine > 1 - 1e-6), and each reference keeps one copy of a repeated cell,
since simulated bags reuse cells.

Example:
  >>> import numpy as np
  >>> rng = np.random.default_rng(0)
  >>> bags = [rng.normal(size=(6, 4)).astype("float32") + [4, 0, 0, 0] for _ in range(8)]
  >>> for b in bags[1::2]:
  ...   b[0] = [0, 0, 0, 4]  # the witness: a direction no negative cell takes
  >>> labels = np.array([0, 1] * 4)
  >>> cfg = {"negref": {"k": 3, "bank_size": 100, "score": "novelty"}}
  >>> state = fit(cfg, bags, labels, seed=0)
  >>> sorted(state), state["bank"].shape
  (['bank', 'bank_group', 'coef', 'intercept', 'k', 'pos_bank', 'pos_group', 'score'], (24, 4))
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
from slamjax.mil import spec as spec_lib

DUPLICATE = 1.0 - 1e-6  # cosine above this: the same cell
CHUNK = 1024  # query rows per compiled call: bounds the [chunk, bank] matrix


def _normalise(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames="k")
def _chunk_similarity(q, qg, bank, bg, k: int):
  # HIGHEST: the duplicate test needs float32 cosines, not bf16 passes.
  sim = jnp.dot(_normalise(q), _normalise(bank).T, precision=jax.lax.Precision.HIGHEST)
  same = (qg[:, None] >= 0) & (qg[:, None] == bg[None, :])
  sim = jnp.where(same | (sim > DUPLICATE), -jnp.inf, sim)
  top, _ = jax.lax.top_k(sim, k)
  ok = jnp.isfinite(top)
  # No neighbour left (tiny bank): similarity 0, novelty 1.
  return jnp.sum(jnp.where(ok, top, 0.0), -1) / jnp.maximum(jnp.sum(ok, -1), 1)


def knn_novelty(query, bank, k: int, query_group=None, bank_group=None,
                chunk: int = CHUNK) -> np.ndarray:
  """1 - :func:`knn_similarity`: how unlike its k nearest bank rows each query is."""
  return 1.0 - knn_similarity(query, bank, k, query_group, bank_group, chunk)


def knn_similarity(query, bank, k: int, query_group=None, bank_group=None,
                   chunk: int = CHUNK) -> np.ndarray:
  """Mean cosine similarity of each query row to its k nearest bank rows.

  Args:
    query: [n, D]; bank: [m, D] (rows are L2-normalised here).
    k: neighbours averaged (all the bank has, if fewer).
    query_group, bank_group: [n] / [m] int group ids or None; a bank row of
      the query's group (ids >= 0; -1 = no group) is not a neighbour, nor is
      a duplicate of the query (cosine > 1 - 1e-6).
    chunk: query rows per call; the last chunk is padded, so one compiled
      program serves every chunk and memory stays at [chunk, m].

  Returns:
    [n] float32 similarity (0 where no bank row is left).
  """
  query = np.asarray(query, np.float32)
  bank = np.asarray(bank, np.float32)
  n, m = len(query), len(bank)
  if n == 0 or m == 0:
    return np.zeros((n,), np.float32)
  qg = np.full(n, -1, np.int32) if query_group is None else np.asarray(query_group, np.int32)
  bg = np.full(m, -1, np.int32) if bank_group is None else np.asarray(bank_group, np.int32)
  chunk = min(chunk, n)
  pad = -n % chunk
  query = np.concatenate([query, np.zeros((pad, query.shape[1]), np.float32)])
  qg = np.concatenate([qg, np.full(pad, -1, np.int32)])
  bank_d, bg_d = jnp.asarray(bank), jnp.asarray(bg)
  k = max(1, min(int(k), m))
  out = [_chunk_similarity(query[i:i + chunk], qg[i:i + chunk], bank_d, bg_d, k)
         for i in range(0, len(query), chunk)]
  return np.asarray(jnp.concatenate(out))[:n]


SCORES = ("ratio", "novelty")


def _section(cfg):
  c = cfg["negref"]  # a ConfigDict or a plain dict
  score = c["score"] if "score" in c else "ratio"
  if score not in SCORES:
    raise ValueError(f"config.mil.negref.score={score!r}; valid: {list(SCORES)}")
  return int(c["k"]), int(c["bank_size"]), score


def _distinct(cells) -> np.ndarray:
  """Sorted indices of the first copy of every distinct row."""
  return np.sort(np.unique(cells, axis=0, return_index=True)[1])


def reference(cells, groups, size: int, seed: int, first: np.ndarray | None = None):
  """(rows, groups) of a reference: one copy of each distinct row (``first``:
  their indices, if known), then a random subset of ``size`` rows (drawn
  with ``seed``) if there are more."""
  first = _distinct(cells) if first is None else first
  if len(first) > size:
    first = np.sort(np.random.default_rng(seed).choice(first, size, replace=False))
  return cells[first], groups[first]


def references(neg, neg_group, pos, pos_group, score: str, bank_size: int, seed: int):
  """(neg, neg_group, pos, pos_group) references of ``score``: distinct rows;
  for "ratio" both of min(distinct negatives, distinct positives,
  ``bank_size``) rows; for "novelty" no positive rows."""
  neg_first = _distinct(neg)
  if score == "ratio":  # equal sizes: neither reference denser by its size alone
    pos_first = _distinct(pos)
    size = min(len(neg_first), len(pos_first), bank_size)
    pos, pos_group = reference(pos, pos_group, size, seed + 1, pos_first)
  else:
    size, pos, pos_group = bank_size, pos[:0], pos_group[:0]
  return (*reference(neg, neg_group, size, seed, neg_first), pos, pos_group)


def cell_scores(query, score: str, k: int, neg, neg_group, pos=None, pos_group=None,
                query_group=None) -> np.ndarray:
  """Per query row: ``"novelty"`` (1 - similarity to the negatives) or
  ``"ratio"`` (similarity to the positives - similarity to the negatives).

  >>> neg = np.array([[1.0, 0.0], [0.9, 0.1]]); pos = np.array([[1.0, 0.05], [0.0, 1.0]])
  >>> q = np.array([[0.95, 0.05], [0.1, 0.9]])
  >>> s = cell_scores(q, "ratio", 1, neg, np.array([-1, -1]), pos, np.array([-1, -1]))
  >>> bool(s[1] > s[0])
  True
  """
  sim_neg = knn_similarity(query, neg, k, query_group, neg_group)
  if score == "novelty":
    return 1.0 - sim_neg
  return knn_similarity(query, pos, k, query_group, pos_group) - sim_neg


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
  """References and the calibration of bag scores.

  ``labels`` is [n] (or [n, 1]) with 0/1 and NaN = unknown (left out of the
  references and the calibration). Returns numpy arrays: ``bank`` [m, D] and
  ``pos_bank`` [m', D] (the distinct cells of the negative / positive bags;
  with score "ratio" both hold min(distinct negatives, distinct positives,
  ``negref.bank_size``) rows, drawn with ``seed``; with "novelty" the
  positive one is empty), ``bank_group`` / ``pos_group`` (their bag
  index), ``coef`` and ``intercept`` [1] (logistic regression, balanced
  classes, of label on bag score: probability = sigmoid(coef * score +
  intercept)), and the ``k`` and ``score`` the calibration holds for
  (:func:`predict` uses them).
  """
  from sklearn.linear_model import LogisticRegression  # heavy import: only here
  k, bank_size, score = _section(cfg)
  y = _one_label(labels)
  known = np.flatnonzero(np.isfinite(y))
  if len(np.unique(y[known])) != 2:
    raise ValueError("negref needs negative and positive training bags")

  def cells_of(label):
    idx = [i for i in known if y[i] == label]
    return (np.concatenate([np.asarray(bags[i], np.float32) for i in idx]),
            np.concatenate([np.full(len(bags[i]), i, np.int32) for i in idx]))

  neg, neg_group = cells_of(0)
  pos, pos_group = cells_of(1)
  bank, group, pos, pos_group = references(neg, neg_group, pos, pos_group, score,
                                           bank_size, seed)
  train = [np.asarray(bags[i], np.float32) for i in known]
  q_group = np.concatenate([np.full(len(b), i, np.int32) for b, i in zip(train, known)])
  cell = cell_scores(np.concatenate(train), score, k, bank, group, pos, pos_group, q_group)
  scores = _bag_scores(train, cell)
  # Fitted on standardised scores, so that the L2 penalty does not depend on
  # the scale of novelty; folded back into coef and intercept of raw scores.
  mu, sd = float(scores.mean()), float(scores.std()) or 1.0
  lr = LogisticRegression(class_weight="balanced").fit(((scores - mu) / sd)[:, None],
                                                        y[known].astype(int))
  coef = lr.coef_[0].astype(np.float64) / sd
  return {"bank": bank, "bank_group": group, "pos_bank": pos, "pos_group": pos_group,
          "coef": coef, "intercept": lr.intercept_.astype(np.float64) - coef * mu,
          "k": np.int64(k), "score": np.str_(score)}


def predict(cfg, state: dict, bags) -> dict:
  """``prob`` [n, 1] float32 and ``attention`` (per bag, the cell scores
  shifted to be >= 0 and summed to 1: cells rank by score; uniform if all
  are equal).

  Bags are scored against the whole references, so a training bag scores
  differently here than in :func:`fit` (its own cells are neighbours).
  """
  if not len(bags):
    return {"prob": np.zeros((0, 1), np.float32), "attention": []}
  bags = [np.asarray(b, np.float32) for b in bags]
  score = str(state["score"]) if "score" in state else "novelty"
  nov = cell_scores(np.concatenate(bags), score, int(state["k"]), state["bank"], None,
                    state.get("pos_bank"), None)
  z = state["coef"][0] * _bag_scores(bags, nov) + state["intercept"][0]
  prob = (1.0 / (1.0 + np.exp(-z)))[:, None].astype(np.float32)
  attention = []
  for p in np.split(nov, np.cumsum([len(b) for b in bags])[:-1]):
    p = p - p.min()
    total = p.sum()
    attention.append(p / total if total > 0 else np.full(len(p), 1.0 / len(p), np.float32))
  return {"prob": prob, "attention": attention}


def _no_module(cfg, num_tasks, num_base=None):
  raise ValueError("negref is non-parametric: it has no Flax module (fit and predict it "
                   "with slamjax.mil.multihead.fit_predict)")


SPEC = spec_lib.HeadSpec(build=_no_module, nonparametric=(fit, predict))
