"""IMTL-G (Liu et al., ICLR 2021): impartial gradient weighting."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from slamjax.surgery._base import gram_weighted


def imtl_g_weights(gram: jax.Array) -> jax.Array:
  """``w = pinv(G) d / sum(pinv(G) d)`` with ``d_t = ||g_t||`` (0 if degenerate)."""
  d = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  v = jnp.linalg.pinv(gram, hermitian=True) @ d
  s = jnp.sum(v)
  ok = jnp.abs(s) > 1e-6 * jnp.sum(jnp.abs(v))
  return jnp.where(ok, v / jnp.where(ok, s, 1.0), 0.0)


def imtl_g(*, num_tasks: Optional[int] = None
           ) -> optax.GradientTransformationExtraArgs:
  """IMTL-G: the update has the same projection on every task's direction.

  Liu et al., "Towards Impartial Multi-task Learning" (ICLR 2021), gradient
  part: find ``w`` with ``sum_t w_t = 1`` such that ``out = sum_t w_t g_t``
  has equal inner products with all unit vectors ``u_t = g_t / ||g_t||``. The
  paper's closed form ``w_{2:T} = g_1 U^T (D U^T)^-1`` (``D_t = g_1 - g_t``,
  ``U_t = u_1 - u_t``) equals ``w = G^-1 d / (1^T G^-1 d)``, ``d_t =
  ||g_t||``, which is what is computed (with a pseudo-inverse, as in torchjd,
  so rank-deficient cases stay finite; if ``1^T G^+ d`` vanishes the weights
  are 0). Invariant to permuting the tasks; scale is that of a mean.

  Args:
    num_tasks: number of tasks, for a fixed-shape state.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.

  Example:
    >>> import jax.numpy as jnp
    >>> from slamjax import surgery
    >>> tx = surgery.imtl_g(num_tasks=2)
    >>> g = {'w': jnp.array([[4., 0.], [0., 1.]])}
    >>> out, _ = tx.update(g, tx.init({'w': jnp.zeros(2)}))
    >>> out['w']   # equal projections on (1, 0) and (0, 1)
    Array([0.8, 0.8], dtype=float32)
  """

  def weighting(ctx):
    return imtl_g_weights(ctx.gram), ctx.inner

  return gram_weighted(weighting, name="imtl_g", num_tasks=num_tasks)
