"""Nash-MTL (Navon et al., ICML 2022), with a jit-able Newton solver."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from slamjax.surgery._weighted import gram_weighted
from slamjax.surgery._qp import small_solve


_NORMALIZATIONS = ("official", "frobenius")


class NashMTLInner(NamedTuple):
  alpha: jax.Array  # (T,) the weights of the last solve (reused in between)


def nash_mtl_weights(gram: jax.Array, alpha0: Optional[jax.Array] = None,
                     num_iters: int = 20, reg_eps: float = 0.0) -> jax.Array:
  """Solves ``G_n alpha = 1 / alpha``, ``alpha > 0``, ``G_n = G / ||G||_F``.

  ``alpha`` is the minimiser of the strictly convex, self-concordant
  ``f(a) = 1/2 a^T G_n a - sum_t log a_t``, found with damped Newton steps
  (step ``1 / (1 + lambda)`` while the Newton decrement ``lambda > 1/4``,
  which keeps ``a > 0`` and converges globally, then full steps). Returns
  ``(alpha, ||G||_F)``; the solution for ``G`` itself is
  ``alpha / sqrt(||G||_F)``.
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

  return jax.lax.fori_loop(0, num_iters, body, a), jnp.where(ok, fro, 1.0)


def nash_mtl(*, update_weights_every: int = 1, num_iters: int = 20,
             reg_eps: float = 0.0, normalization: str = "official",
             num_tasks: Optional[int] = None, diagnostics: bool = True
             ) -> optax.GradientTransformationExtraArgs:
  """Nash-MTL: the Nash bargaining solution between the tasks.

  Navon et al., "Multi-Task Learning as a Bargaining Game" (ICML 2022):
  ``out = sum_t alpha_t g_t`` with ``alpha > 0`` solving ``G alpha = 1 /
  alpha``, i.e. every task's utility ``alpha_t <g_t, out>`` equals 1.

  Normalisation. ``'official'`` (default) is the equation above in the
  gradients' own units, as the official code (whose cvxpy constraint
  multiplies the normalisation factor back in), LibMTL and torchjd solve
  it: the update does not change when all gradients are rescaled together,
  and ``g = [[1, 0], [0, 4]]`` gives ``alpha = (1, 1/4)``, ``out = (1, 1)``.
  ``'frobenius'`` solves it for ``G / ||G||_F`` instead (this library's
  earlier behaviour): ``alpha`` is ``sqrt(||G||_F)`` times larger, so the
  update scales with the gradients like a sum (``(4.0, 4.0)`` above).

  The official code approximates the solution with up to 20 rounds of
  sequential convex programming in cvxpy on the host; here the equation is
  solved to machine precision with damped Newton on ``1/2 a^T G_n a - sum
  log a`` (``G_n = G / ||G||_F``, well scaled), warm-started from the
  previous step (all inside ``jit``). Not included from the official code:
  its ``max_norm`` gradient clipping (chain ``optax.clip_by_global_norm`` if
  you want it). When some positive combination of the gradients vanishes
  the equation has no solution and the weights grow with ``num_iters`` (use
  ``reg_eps > 0`` to bound them). Invariant to permuting the tasks.

  Args:
    update_weights_every: recompute ``alpha`` every this many updates and
      reuse it in between (official default 1). Updates with a non-finite
      input are skipped and do not count.
    num_iters: Newton iterations per solve.
    reg_eps: ridge added to ``G_n``.
    normalization: ``'official'`` or ``'frobenius'``, see above.
    num_tasks: number of tasks, for a fixed-shape state.
    diagnostics: record cosines, conflicts and task norms (free here).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.
    ``state.inner.alpha`` holds the weights of the last solve.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from slamjax import surgery
    >>> g = {'w': jnp.array([[1., 0.], [0., 4.]])}
    >>> tx = surgery.nash_mtl(num_tasks=2)
    >>> out, state = jax.jit(tx.update)(g, tx.init({'w': jnp.zeros(2)}))
    >>> [round(float(x), 4) for x in (*state.weights, *out['w'])]
    [1.0, 0.25, 1.0, 1.0]
    >>> tx = surgery.nash_mtl(normalization='frobenius', num_tasks=2)
    >>> out, state = jax.jit(tx.update)(g, tx.init({'w': jnp.zeros(2)}))
    >>> [round(float(x), 4) for x in state.weights]  # ||G||_F = 16.03
    [4.0039, 1.001]
  """
  if update_weights_every < 1:
    raise ValueError("nash_mtl: update_weights_every must be >= 1.")
  if normalization not in _NORMALIZATIONS:
    raise ValueError(f"nash_mtl: normalization must be one of "
                     f"{_NORMALIZATIONS}, got {normalization!r}.")

  def init_inner(t, k):
    del k
    return NashMTLInner(alpha=jnp.zeros((t,), jnp.float32))

  def weighting(ctx):
    # ctx.gram = G / max_norm^2; alpha for G_n is the same for any scale.
    gram = ctx.gram
    prev = ctx.inner.alpha.astype(gram.dtype)
    fro = jnp.sqrt(jnp.sum(gram**2))
    # Factor from the G_n solution to the reported weights.
    if normalization == "official":
      to_out = 1.0 / (ctx.max_norm * jnp.sqrt(jnp.where(fro > 0, fro, 1.0)))
      to_out = jnp.where(ctx.max_norm > 0, to_out, 1.0)
    else:
      to_out = jnp.ones((), gram.dtype)
    recompute = (ctx.count % update_weights_every == 0) | ~jnp.all(prev > 0)

    def solve():
      alpha_n, _ = nash_mtl_weights(gram, prev / to_out, num_iters, reg_eps)
      return alpha_n * to_out

    alpha = jax.lax.cond(recompute, solve, lambda: prev)
    return alpha, NashMTLInner(alpha=alpha.astype(ctx.inner.alpha.dtype))

  return gram_weighted(weighting, name="nash_mtl", num_tasks=num_tasks,
                       init_inner=init_inner, diagnostics=diagnostics)
