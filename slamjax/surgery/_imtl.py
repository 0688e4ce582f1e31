"""IMTL-G (Liu et al., ICLR 2021): impartial gradient weighting."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from slamjax.surgery._weighted import gram_weighted


def imtl_g_weights(cos: jax.Array, norms: jax.Array) -> jax.Array:
  """IMTL-G weights from the task cosines and norms (see :func:`imtl_g`).

  Solves, for the tasks with ``||g_t|| > 0`` ("valid"), the linear system of
  the paper's closed form written in Gram entries: with ``n_t = ||g_t||`` and
  ``M[s, t] = <g_s, u_t> = G[s, t] / n_t``, the projections ``p_t = sum_s w_s
  M[s, t]`` must be equal over the valid ``t`` (``T - 1`` equations, written
  as ``p - mean(p) = 0``) and ``sum_s w_s = 1``. Eliminating ``w_1`` with the
  last equation and differencing against task 1 gives exactly the paper's
  ``(T-1) x (T-1)`` system ``w_{2:T} (D U^T) = g_1 U^T``. Unlike
  ``G^-1 d / (1^T G^-1 d)`` this system stays well conditioned when task
  gradients are nearly opposite (where ``G`` is nearly singular).

  The ``(T+1) x T`` system is solved with a truncated-SVD pseudo-inverse
  and one step of iterative refinement (minimum-norm ``w``;
  permutation-equivariant): if it is singular (e.g.
  identical or parallel gradients, more tasks than dimensions) the result is
  the minimum-norm solution, which is finite and has weights of order 1.
  Zero-norm tasks get weight 0; if every task is zero all weights are 0.
  """
  dtype = cos.dtype
  t = cos.shape[-1]
  valid = norms > 0
  # M[s, t] = <g_s, u_t>, in units of max_t ||g_t|| (the weights are scale
  # invariant) so that the projection rows and the sum row are both O(1).
  m = norms[:, None] * cos
  vf = valid.astype(dtype)
  m = m * vf[:, None] * vf[None, :]
  num_valid = jnp.maximum(jnp.sum(vf), 1.0)
  # Row t: p_t - mean_valid(p) = 0 for valid t (invalid rows are zero).
  rows = (m - (m @ vf)[:, None] / num_valid) * vf[None, :]
  a = jnp.concatenate([rows.T, vf[None, :]], axis=0)        # (T + 1, T)
  b = jnp.zeros((t + 1,), dtype).at[t].set(1.0)
  # pinv's default cutoff (10 (T + 1) eps relative to the largest singular
  # value; strict, so an all-zero system gives w = 0) only drops projection
  # constraints at the level of float32 round-off in the Gram entries, i.e.
  # gradients within ~0.1 degree of parallel, where they are ill-determined.
  a_pinv = jnp.linalg.pinv(a)
  w = a_pinv @ b
  w = w + a_pinv @ (b - a @ w)   # one step of iterative refinement
  return jnp.where(valid, w, 0.0)


def imtl_g(*, num_tasks: Optional[int] = None, diagnostics: bool = True
           ) -> optax.GradientTransformationExtraArgs:
  """IMTL-G: the update has the same projection on every task's direction.

  Liu et al., "Towards Impartial Multi-task Learning" (ICLR 2021), gradient
  part: find ``w`` with ``sum_t w_t = 1`` such that ``out = sum_t w_t g_t``
  has equal inner products with all unit vectors ``u_t = g_t / ||g_t||``. The
  paper's closed form ``w_{2:T} = g_1 U^T (D U^T)^-1`` (``D_t = g_1 - g_t``,
  ``U_t = u_1 - u_t``) is computed from the Gram matrix as its equivalent
  symmetric linear system (equal projections, weights summing to 1; see
  ``imtl_g_weights``), solved with a truncated-SVD pseudo-inverse. This is
  the same solution as ``G^-1 d / (1^T G^-1 d)`` (``d_t = ||g_t||``, torchjd)
  when ``G`` is well conditioned, but unlike a pseudo-inverse of ``G`` it
  stays accurate for nearly opposite task gradients (e.g. ``g_2 = -0.4 g_1``
  gives ``out = 0``, not a large step along ``g_1``). Singular cases (e.g.
  parallel gradients) give the minimum-norm weights; zero-norm tasks get
  weight 0. Invariant to permuting the tasks; scale is that of a mean.

  Args:
    num_tasks: number of tasks, for a fixed-shape state.
    diagnostics: record cosines, conflicts and task norms (free here).

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
    return imtl_g_weights(ctx.cosine, ctx.norms), ctx.inner

  return gram_weighted(weighting, name="imtl_g", num_tasks=num_tasks,
                       diagnostics=diagnostics)
