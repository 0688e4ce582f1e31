"""Nash-MTL (Navon et al., ICML 2022), with a jit-able Newton solver."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from slamjax.surgery._base import gram_weighted
from slamjax.surgery._qp import small_solve


class NashMTLInner(NamedTuple):
  alpha: jax.Array  # (T,) last solution (warm start, reused between solves)


def nash_mtl_weights(gram: jax.Array, alpha0: Optional[jax.Array] = None,
                     num_iters: int = 20, reg_eps: float = 0.0) -> jax.Array:
  """Solves ``G_n alpha = 1 / alpha``, ``alpha > 0``, ``G_n = G / ||G||_F``.

  ``alpha`` is the minimiser of the strictly convex, self-concordant
  ``f(a) = 1/2 a^T G_n a - sum_t log a_t``, found with damped Newton steps
  (step ``1 / (1 + lambda)`` while the Newton decrement ``lambda > 1/4``,
  which keeps ``a > 0`` and converges globally, then full steps).
  """
  t = gram.shape[0]
  dtype = gram.dtype
  fro = jnp.sqrt(jnp.sum(gram**2))
  ok = fro > 0
  gn = jnp.where(ok, gram / jnp.where(ok, fro, 1.0), jnp.eye(t, dtype=dtype))
  gn = gn + reg_eps * jnp.eye(t, dtype=dtype)
  diag = jnp.diagonal(gn)
  cold = jnp.where(diag > 0, 1.0 / jnp.sqrt(jnp.where(diag > 0, diag, 1.0)),
                   1.0)
  if alpha0 is None:
    a = cold
  else:
    good = jnp.all(jnp.isfinite(alpha0) & (alpha0 > 0))
    a = jnp.where(good, alpha0.astype(dtype), cold)

  def body(_, a):
    g = gn @ a - 1.0 / a
    h = gn + jnp.diag(1.0 / a**2)
    d = small_solve(h, g)
    lam = jnp.sqrt(jnp.maximum(g @ d, 0.0))
    step = jnp.where(lam > 0.25, 1.0 / (1.0 + lam), 1.0)
    a_new = a - step * d
    return jnp.where(jnp.all(jnp.isfinite(a_new) & (a_new > 0)), a_new, a)

  return jax.lax.fori_loop(0, num_iters, body, a)


def nash_mtl(*, update_weights_every: int = 1, num_iters: int = 20,
             reg_eps: float = 0.0, num_tasks: Optional[int] = None
             ) -> optax.GradientTransformationExtraArgs:
  """Nash-MTL: the Nash bargaining solution between the tasks.

  Navon et al., "Multi-Task Learning as a Bargaining Game" (ICML 2022):
  ``out = sum_t alpha_t g_t`` with ``alpha > 0`` solving ``G_n alpha = 1 /
  alpha`` (``G_n = G / ||G||_F``, as in the official code), i.e. every task's
  utility ``alpha_t <g_t, out>`` equals 1 in normalised units. The official
  code approximates this with up to 20 rounds of sequential convex
  programming in cvxpy on the host; here the same equation is solved to
  machine precision with damped Newton on ``1/2 a^T G_n a - sum log a``,
  warm-started from the previous step (all inside ``jit``). Not included from
  the official code: its ``max_norm`` gradient clipping (chain
  ``optax.clip_by_global_norm`` if you want it). When some positive
  combination of the gradients vanishes the equation has no solution and the
  weights grow with ``num_iters`` (use ``reg_eps > 0`` to bound them).
  Invariant to permuting the tasks.

  Args:
    update_weights_every: recompute ``alpha`` every this many updates and
      reuse it in between (official default 1).
    num_iters: Newton iterations per solve.
    reg_eps: ridge added to ``G_n``.
    num_tasks: number of tasks, for a fixed-shape state.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.
    ``state.inner.alpha`` holds the last solution.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from slamjax import surgery
    >>> tx = surgery.nash_mtl(num_tasks=2)
    >>> g = {'w': jnp.array([[1., 0.], [0., 4.]])}
    >>> out, state = jax.jit(tx.update)(g, tx.init({'w': jnp.zeros(2)}))
    >>> [round(float(a), 4) for a in state.weights]  # 1/sqrt(G_n[t, t]), ||G||_F=16.03
    [4.0039, 1.001]
  """
  if update_weights_every < 1:
    raise ValueError("nash_mtl: update_weights_every must be >= 1.")

  def init_inner(t, k):
    del k
    return NashMTLInner(alpha=jnp.zeros((t,), jnp.float32))

  def weighting(ctx):
    prev = ctx.inner.alpha
    recompute = (ctx.count % update_weights_every == 0) | ~jnp.all(prev > 0)
    alpha = jax.lax.cond(
        recompute,
        lambda: nash_mtl_weights(ctx.gram, prev, num_iters,
                                 reg_eps).astype(jnp.float32),
        lambda: prev)
    return alpha, NashMTLInner(alpha=alpha)

  return gram_weighted(weighting, name="nash_mtl", num_tasks=num_tasks,
                       init_inner=init_inner)
