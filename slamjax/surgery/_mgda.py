"""MGDA (Sener & Koltun, 2018): the minimum-norm point of the gradients' hull."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from slamjax.surgery._base import gram_weighted
from slamjax.surgery._qp import active_set_qp


def mgda_weights(gram: jax.Array, reg_eps: float = 1e-7,
                 max_iter: Optional[int] = None) -> jax.Array:
  """Convex weights ``w`` minimising ``||sum_t w_t g_t||^2 = w^T G w``."""
  t = gram.shape[0]
  scale = jnp.max(jnp.diagonal(gram))
  ok = scale > 0
  gn = jnp.where(ok, gram / jnp.where(ok, scale, 1.0), jnp.eye(t, dtype=gram.dtype))
  gn = gn + reg_eps * jnp.eye(t, dtype=gram.dtype)
  return active_set_qp(gn, jnp.zeros((t,), gram.dtype), simplex=True,
                       max_iter=max_iter)


def mgda(*, reg_eps: float = 1e-7, max_iter: Optional[int] = None,
         num_tasks: Optional[int] = None
         ) -> optax.GradientTransformationExtraArgs:
  """MGDA: the minimum-norm convex combination of the task gradients.

  ``w* = argmin_{w in simplex} ||sum_t w_t g_t||^2`` and ``out = sum_t w*_t
  g_t`` (Sener & Koltun, 2018, "Multi-Task Learning as Multi-Objective
  Optimization"; the common descent direction of Desideri's MGDA). The QP on
  the Gram matrix is solved *exactly* with Wolfe's minimum-norm-point
  active-set method (finite termination; a few ``T x T`` solves) instead of
  the paper's Frank-Wolfe iterations, which only approximate it. The result
  never conflicts with any task: ``<g_t, out> >= ||out||^2 >= 0``. It is zero
  when some convex combination of the gradients vanishes (a Pareto-stationary
  point). Invariant to permuting the tasks.

  Like torchjd's ``MGDA`` (and LibMTL with ``mgda_gn='none'``) the gradients
  are not normalised; scale them with ``task_weights`` if you want that.

  Args:
    reg_eps: ridge added to the Gram matrix after normalising its largest
      diagonal entry to 1; keeps the small linear systems well posed for
      (nearly) affinely dependent gradients.
    max_iter: cap on active-set iterations (default ``3 T + 10``).
    num_tasks: number of tasks, for a fixed-shape state.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from slamjax import surgery
    >>> tx = surgery.mgda(num_tasks=2)
    >>> g = {'w': jnp.array([[2., 0.], [0., 1.]])}
    >>> out, state = jax.jit(tx.update)(g, tx.init({'w': jnp.zeros(2)}))
    >>> [round(float(x), 4) for x in (*out['w'], *state.weights)]  # min-norm point
    [0.4, 0.8, 0.2, 0.8]
  """

  def weighting(ctx):
    return mgda_weights(ctx.gram, reg_eps, max_iter), ctx.inner

  return gram_weighted(weighting, name="mgda", num_tasks=num_tasks)
