"""UPGrad (Quinton & Rey, 2024): project every gradient onto the dual cone."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from slamjax.surgery._base import gram_weighted
from slamjax.surgery._qp import active_set_qp


def upgrad_weights(gram: jax.Array, pref: Optional[jax.Array] = None,
                   norm_eps: float = 1e-4, reg_eps: float = 1e-4,
                   max_iter: Optional[int] = None) -> jax.Array:
  """UPGrad weights: ``sum_i v_i``, ``v_i = argmin_{v >= pref_i e_i} v^T G v``.

  ``G`` is first normalised by its trace (zeroed if the trace is below
  ``norm_eps``) and regularised with ``reg_eps * I``, as in torchjd.
  """
  t = gram.shape[0]
  dtype = gram.dtype
  if pref is None:
    pref = jnp.full((t,), 1.0 / t, dtype)
  pref = jnp.asarray(pref, dtype)
  trace = jnp.trace(gram)
  ok = trace >= norm_eps
  g = jnp.where(ok, gram / jnp.where(ok, trace, 1.0), 0.0)
  q = g + reg_eps * jnp.eye(t, dtype=dtype)
  u = jnp.diag(pref)  # row i: lower bound of v_i

  def project(u_i):
    # v = u_i + x, x >= 0: min 1/2 x^T Q x + (Q u_i)^T x.
    x = active_set_qp(q, q @ u_i, simplex=False, max_iter=max_iter)
    return u_i + x

  return jnp.sum(jax.vmap(project)(u), axis=0)


def upgrad(*, pref: Optional[Sequence[float]] = None, norm_eps: float = 1e-4,
           reg_eps: float = 1e-4, max_iter: Optional[int] = None,
           num_tasks: Optional[int] = None
           ) -> optax.GradientTransformationExtraArgs:
  """UPGrad: average of each gradient projected onto the dual cone of all.

  From "Jacobian Descent for Multi-Objective Optimization" (Quinton & Rey,
  2024), as in torchjd's ``UPGrad``: for each task ``i``, the projection of
  ``pref_i g_i`` onto the cone ``{x : <g_t, x> >= 0 for all t}`` is ``J^T
  v_i`` with ``v_i = argmin_{v >= pref_i e_i} v^T G v`` (Proposition 1 of the
  paper); ``out = J^T sum_i v_i``. The small non-negative QPs are solved
  exactly with an active-set (Lawson-Hanson) method in JAX, vectorised over
  ``i``. The result does not conflict with any task (up to the ``reg_eps``
  regularisation: ``<g_t, out> >= -reg_eps * trace(G) * max(v)``); for ``T =
  2``, ``pref = (1, 1)`` and no regularisation it equals PCGrad. Invariant to
  permuting the tasks.

  Args:
    pref: ``(T,)`` preference weights; default ``1/T`` each (the paper's
      mean, torchjd's default; so the scale is that of the mean gradient).
    norm_eps: the Gram matrix is divided by its trace, or zeroed when the
      trace is below this (torchjd default).
    reg_eps: ridge added after normalisation (torchjd default), for
      numerical stability of the QPs.
    max_iter: cap on active-set iterations per QP (default ``3 T + 10``).
    num_tasks: number of tasks, for a fixed-shape state.

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
  pref_arr = None if pref is None else jnp.asarray(pref, jnp.float32)

  def weighting(ctx):
    p = None
    if pref_arr is not None:
      if pref_arr.shape != (ctx.gram.shape[0],):
        raise ValueError(f"upgrad: pref has shape {pref_arr.shape}, expected "
                         f"({ctx.gram.shape[0]},).")
      p = pref_arr
    return upgrad_weights(ctx.gram, p, norm_eps, reg_eps, max_iter), ctx.inner

  return gram_weighted(weighting, name="upgrad", num_tasks=num_tasks)
