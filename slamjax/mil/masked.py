"""Masked primitives over the instance axis of padded bags.

Example:
  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 2.0, 9.0]]); m = jnp.array([[True, True, False]])
  >>> [round(float(v), 3) for v in masked_softmax(s, m)[0]]
  [0.269, 0.731, 0.0]
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
