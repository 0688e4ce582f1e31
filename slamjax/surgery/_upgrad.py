"""UPGrad (Quinton & Rey, 2024): project every gradient onto the dual cone."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slamjax.surgery._weighted import gram_weighted
from slamjax.surgery._qp import active_set_qp


def upgrad_weights(cos: jax.Array, norms: jax.Array,
                   pref: Optional[jax.Array] = None, reg_eps: float = 1e-6,
                   max_iter: Optional[int] = None) -> jax.Array:
  """UPGrad weights: ``sum_i v_i``, ``v_i = argmin_{v >= pref_i e_i} v^T G v``.

  Each projection is solved in unit-direction coordinates ``x = n * v``
  (``n`` = task norms), where it reads ``min x^T (C + reg_eps I) x`` over
  ``x >= pref_i n_i e_i`` with ``C`` the cosine matrix: the bound only
  scales the solution, so every task's problem is posed at scale 1
  (``x = pref_i n_i (e_i + y)``, ``y >= 0``) and tiny tasks are solved as
  accurately as large ones. The ridge ``reg_eps`` is thus relative to each
  task's own squared norm.
  """
  t = cos.shape[0]
  dtype = cos.dtype
  if pref is None:
    pref = jnp.full((t,), 1.0 / t, dtype)
  pref = jnp.asarray(pref, dtype)
  nz = norms > 0
  eye = jnp.eye(t, dtype=dtype)
  q = jnp.where(nz[:, None] & nz[None, :], cos, eye) + reg_eps * eye

  def project(e_i):
    # x = e_i + y, y >= 0: min 1/2 y^T Q y + (Q e_i)^T y.
    return e_i + active_set_qp(q, q @ e_i, max_iter=max_iter)

  x = jax.vmap(project)(eye)                      # row i: x_i / (pref_i n_i)
  inv = jnp.where(nz, 1.0 / jnp.where(nz, norms, 1.0), 0.0)
  v = (pref * norms)[:, None] * x * inv[None, :]  # v_i = x_i / n
  # A zero task keeps its own bound (its gradient adds nothing anyway).
  v = jnp.where(nz[None, :], v, eye * pref[:, None])
  return jnp.sum(v, axis=0)


def upgrad(*, pref: Optional[Sequence[float]] = None, norm_eps: float = 0.0,
           reg_eps: float = 1e-6, max_iter: Optional[int] = None,
           num_tasks: Optional[int] = None, diagnostics: bool = True
           ) -> optax.GradientTransformationExtraArgs:
  """UPGrad: average of each gradient projected onto the dual cone of all.

  From "Jacobian Descent for Multi-Objective Optimization" (Quinton & Rey,
  2024), as in torchjd's ``UPGrad``: for each task ``i``, the projection of
  ``pref_i g_i`` onto the cone ``{x : <g_t, x> >= 0 for all t}`` is ``J^T
  v_i`` with ``v_i = argmin_{v >= pref_i e_i} v^T G v`` (Proposition 1 of the
  paper); ``out = J^T sum_i v_i``. The small non-negative QPs are solved
  exactly with an active-set (Lawson-Hanson) method in JAX, vectorised over
  ``i``, and posed on the task cosines (see ``upgrad_weights``), so they stay
  exact when task norms differ by 1e6 or more and the weights do not change
  when all tasks are rescaled together. The result does not conflict with
  any task up to the ridge: ``<g_t, out> >= -reg_eps ||g_t||^2 w_t`` (``w``
  = the final weights); for ``T = 2``, ``pref = (1, 1)`` and ``reg_eps=0``
  it equals PCGrad. Invariant to permuting the tasks.

  Differences from torchjd's defaults, both for scale invariance: torchjd
  adds its ridge (1e-4) to the trace-normalised Gram matrix, i.e. relative
  to the *sum* of squared norms, which swamps tasks 100x smaller than the
  others; here it is relative to each task's own squared norm. torchjd also
  returns the plain mean when ``trace(G) < norm_eps = 1e-4`` in absolute
  units; here ``norm_eps`` defaults to 0 (pass 1e-4 for torchjd's rule).

  Args:
    pref: ``(T,)`` preference weights; default ``1/T`` each (the paper's
      mean, torchjd's default; so the scale is that of the mean gradient).
      Kept in float64 under x64.
    norm_eps: return ``pref`` itself (the weighted mean) when ``trace(G)``
      is below this absolute threshold.
    reg_eps: ridge relative to each task's squared norm (see above), for
      (nearly) dependent gradients.
    max_iter: cap on active-set iterations per QP (default ``6 T + 20``).
    num_tasks: number of tasks, for a fixed-shape state.
    diagnostics: record cosines, conflicts and task norms (free here).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from slamjax import surgery
    >>> tx = surgery.upgrad(num_tasks=2)
    >>> g = {'w': jnp.array([[1., 0.], [-1., 1.]])}
    >>> out, state = jax.jit(tx.update)(g, tx.init({'w': jnp.zeros(2)}))
    >>> g['w'] @ out['w'] >= 0   # no task is made worse
    Array([ True,  True], dtype=bool)
  """
  # numpy float64: cast to the gradients' dtype at trace time, so float64
  # preferences are not rounded to float32 under x64.
  pref_arr = None if pref is None else np.asarray(pref, np.float64)

  def weighting(ctx):
    t = ctx.cosine.shape[0]
    p = None
    if pref_arr is not None:
      if pref_arr.shape != (t,):
        raise ValueError(f"upgrad: pref has shape {pref_arr.shape}, expected "
                         f"({t},).")
      p = jnp.asarray(pref_arr, ctx.cosine.dtype)
    w = upgrad_weights(ctx.cosine, ctx.norms, p, reg_eps, max_iter)
    if norm_eps > 0:
      tiny = ctx.max_norm**2 * jnp.sum(ctx.norms**2) < norm_eps
      base = p if p is not None else jnp.full((t,), 1.0 / t, w.dtype)
      w = jnp.where(tiny, base, w)
    return w, ctx.inner

  return gram_weighted(weighting, name="upgrad", num_tasks=num_tasks,
                       diagnostics=diagnostics)
