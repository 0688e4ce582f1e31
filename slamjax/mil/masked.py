"""Masked primitives over the instance axis of padded bags.

Every function takes ``mask`` (True = valid instance) broadcastable to the
scores and gives results that do not depend on what padded entries hold, so
a bag padded to any length gives the same values and gradients. Each bag is
assumed to hold at least one valid instance. Compute these in float32.

Example:
  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 2.0, 9.0]]); m = jnp.array([[True, True, False]])
  >>> [round(float(v), 3) for v in masked_softmax(s, m)[0]]
  [0.269, 0.731, 0.0]
  >>> float(masked_max(s, m)[0]), float(masked_mean(s, m)[0])
  (2.0, 1.5)
  >>> v, i, ok = masked_top_k(s, m, 3)
  >>> i[0].tolist()[:2], ok[0].tolist()
  ([1, 0], [True, True, False])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_softmax(scores: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  """Softmax over valid entries; padded entries get exactly 0."""
  s = jnp.where(mask, scores, -jnp.inf)
  s = s - jax.lax.stop_gradient(jnp.max(s, axis=axis, keepdims=True))
  e = jnp.where(mask, jnp.exp(s), 0.0)
  return e / jnp.sum(e, axis=axis, keepdims=True)


def masked_log_softmax(scores: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  """log of :func:`masked_softmax`; padded entries get 0 (not -inf)."""
  s = jnp.where(mask, scores, -jnp.inf)
  s = s - jax.lax.stop_gradient(jnp.max(s, axis=axis, keepdims=True))
  lse = jnp.log(jnp.sum(jnp.where(mask, jnp.exp(s), 0.0), axis=axis, keepdims=True))
  return jnp.where(mask, s - lse, 0.0)


def masked_nsf(scores: jax.Array, mask: jax.Array, temperature: float = 1.0,
               axis: int = -1, eps: float = 1e-8) -> jax.Array:
  """Normalised sigmoid (ASMIL): sigma(s/tau) m / (sum_n sigma(s/tau) m + eps)."""
  g = jnp.where(mask, jax.nn.sigmoid(scores / temperature), 0.0)
  return g / (jnp.sum(g, axis=axis, keepdims=True) + eps)


def masked_neg_entropy(probs: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  """sum_n m a log a (0 log 0 = 0): minus the entropy of each distribution."""
  p = jnp.where(mask, probs, 0.0)
  return jnp.sum(jax.scipy.special.xlogy(p, p), axis=axis)


def masked_max(scores: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  return jnp.max(jnp.where(mask, scores, -jnp.inf), axis=axis)


def masked_mean(values: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  """sum m v / sum m; ``mask`` broadcasts against ``values``."""
  m = jnp.broadcast_to(mask, values.shape)
  total = jnp.sum(jnp.where(m, values, 0.0), axis=axis)
  return total / jnp.maximum(jnp.sum(m, axis=axis), 1)


def masked_top_k(scores: jax.Array, mask: jax.Array, k: int):
  """Top-k of valid entries along the last axis, with a static k.

  Returns ``(values, indices, valid)``, each [..., k]. When a bag has fewer
  than k valid entries the surplus picks are padding: ``valid`` is False
  there and ``values`` is 0 (never -inf), so callers weight them out.
  Ties are broken by position (lower index first), as ``lax.top_k`` does.
  """
  k = min(k, scores.shape[-1])
  s = jnp.where(mask, scores, -jnp.inf)
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(s), k)
  valid = jnp.take_along_axis(jnp.broadcast_to(mask, scores.shape), idx, axis=-1)
  vals = jnp.take_along_axis(scores, idx, axis=-1)
  return jnp.where(valid, vals, 0.0), idx, valid


def masked_rank(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Descending rank (0 = largest) of each valid entry; padding ranks last."""
  s = jnp.where(mask, scores, -jnp.inf)
  order = jnp.argsort(-jax.lax.stop_gradient(s), axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


def top_p_mask(probs: jax.Array, p: float = 0.5, axis: int = -1) -> jax.Array:
  """Minimal set of largest probabilities whose sum reaches ``p``.

  Keeps, in descending order, every element whose preceding cumulative sum is
  below ``p`` (so the element that crosses the threshold is kept). Ties are
  broken by index. Static shapes: sort, cumsum, scatter back.
  """
  probs = jnp.moveaxis(probs, axis, -1)
  order = jnp.argsort(-jax.lax.stop_gradient(probs), axis=-1, stable=True)
  sorted_p = jnp.take_along_axis(probs, order, axis=-1)
  before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
  keep_sorted = jax.lax.stop_gradient(before) < p
  inverse = jnp.argsort(order, axis=-1, stable=True)
  keep = jnp.take_along_axis(keep_sorted, inverse, axis=-1)
  return jnp.moveaxis(keep, -1, axis)
