"""MGDA (Sener & Koltun, 2018): the minimum-norm point of the gradients' hull."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from slamjax.surgery._weighted import gram_weighted
from slamjax.surgery._qp import active_set_qp

def mgda_weights(cos: jax.Array, norms: jax.Array, reg_eps: float = 0.0,
                 max_iter: Optional[int] = None) -> jax.Array:
  """Convex weights ``w`` minimising ``||sum_t w_t g_t||^2``.

  Solved in unit-direction coordinates ``v_t = n_t w_t`` (``n`` = relative
  task norms): ``min v^T C v`` over ``v >= 0``, ``sum_t v_t / n_t = 1``, with
  ``C`` the cosine matrix (unit diagonal), so a task a million times smaller
  than the others is resolved as accurately as the largest. A zero task
  makes the minimum zero (weight 1 on the zero tasks).
  """
  t = cos.shape[0]
  dtype = cos.dtype
  nz = norms > 0
  eye = jnp.eye(t, dtype=dtype)
  q = jnp.where(nz[:, None] & nz[None, :], cos, eye) + reg_eps * eye
  # a_t = 1/n_t, divided by its largest value (v is then rescaled by it).
  a = jnp.where(nz, jnp.min(jnp.where(nz, norms, jnp.inf)) / jnp.where(
      nz, norms, 1.0), 0.0)
  v = active_set_qp(q, jnp.zeros((t,), dtype), eq=a, max_iter=max_iter)
  w = v * a
  w = w / jnp.sum(w)
  zero = (~nz).astype(dtype)
  return jnp.where(jnp.any(~nz), zero / jnp.maximum(jnp.sum(zero), 1.0), w)

def mgda(*, reg_eps: float = 0.0, max_iter: Optional[int] = None,
         num_tasks: Optional[int] = None, diagnostics: bool = True
         ) -> optax.GradientTransformationExtraArgs:
  """MGDA: the minimum-norm convex combination of the task gradients.

  ``w* = argmin_{w in simplex} ||sum_t w_t g_t||^2`` and ``out = sum_t w*_t
  g_t`` (Sener & Koltun, 2018, "Multi-Task Learning as Multi-Objective
  Optimization"; the common descent direction of Desideri's MGDA). The QP is
  solved *exactly* with Wolfe's minimum-norm-point active-set method (finite
  termination; a few ``T x T`` solves) instead of the paper's Frank-Wolfe
  iterations, which only approximate it. It is posed on the task cosines
  with the norms moved into the constraint, so it stays exact when task
  norms differ by 1e6 or more, and the weights do not change when all tasks
  are rescaled together. The result never conflicts with any task:
  ``<g_t, out> >= ||out||^2 >= 0``. It is zero when some convex combination
  of the gradients vanishes (a Pareto-stationary point), e.g. when a task's
  gradient is zero. Invariant to permuting the tasks.

  Like torchjd's ``MGDA`` (and LibMTL with ``mgda_gn='none'``) the gradients
  are not normalised; scale them with ``task_weights`` if you want that.

  Args:
    reg_eps: ridge added to the cosine matrix (i.e. ``reg_eps ||g_t||^2``
      to each task's squared norm), for (nearly) affinely dependent
      gradients; the exact solver does not need it.
    max_iter: cap on active-set iterations (default ``6 T + 20``).
    num_tasks: number of tasks, for a fixed-shape state.
    diagnostics: record cosines, conflicts and task norms (free here).

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
    return mgda_weights(ctx.cosine, ctx.norms, reg_eps, max_iter), ctx.inner

  return gram_weighted(weighting, name="mgda", num_tasks=num_tasks,
                       diagnostics=diagnostics)
