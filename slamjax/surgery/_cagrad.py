"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from slamjax.surgery._base import gram_weighted
from slamjax.surgery._qp import active_set_qp, kkt_solve


def _cagrad_simplex(gn, b, cn, max_iter, qp_max_iter):
  """Solves ``min_{w in simplex} b^T w + cn sqrt(w^T gn w)``; returns (w, t).

  With ``sqrt(q) = min_s q / (2 s) + s / 2`` the problem becomes the convex
  parametric QP ``w(t) = argmin_{simplex} 1/2 w^T G w + t b^T w`` plus the
  scalar equation ``cn^2 t^2 = q(w(t))`` (``t = s / cn``), whose sign change
  is unique (it is the derivative of a convex function of ``s``). On a fixed
  active set ``w(t) = w0 + t w1`` is affine, so the equation is a scalar
  quadratic: we solve it exactly for the current active set, re-solve the QP
  there, and stop once the active set is consistent (usually 1-3 rounds);
  bisection on the bracket safeguards the iteration.
  """
  t_dim = gn.shape[0]
  dtype = gn.dtype
  hi0 = jnp.sqrt(jnp.max(jnp.diagonal(gn))) / cn * 1.01 + 1e-30

  def qp(t):
    return active_set_qp(gn, t * b, simplex=True, max_iter=qp_max_iter)

  def support_root(w):
    free = w > 0
    both = kkt_solve(gn, jnp.stack([jnp.zeros_like(b), -b], axis=1), free,
                     simplex=True)
    w0, w1 = both[:, 0], both[:, 1]
    q0, q01, q1 = w0 @ gn @ w0, w0 @ gn @ w1, w1 @ gn @ w1
    a = cn**2 - q1
    disc = jnp.maximum(q01**2 + a * q0, 0.0)
    ok = a > 0
    return jnp.where(ok, (q01 + jnp.sqrt(disc)) / jnp.where(ok, a, 1.0),
                     jnp.inf)

  def cond(carry):
    return (~carry[-1]) & (carry[-2] < max_iter)

  def body(carry):
    t, _, _, lo, hi, it, _ = carry
    w = qp(t)
    phi = cn**2 * t**2 - w @ gn @ w
    lo = jnp.where(phi < 0, t, lo)
    hi = jnp.where(phi >= 0, t, hi)
    cand = support_root(w)
    # The active set at t is the final one iff its root is t itself.
    done = jnp.abs(cand - t) <= 1e-6 * t
    inside = (cand >= lo) & (cand <= hi) & jnp.isfinite(cand)
    mid = jnp.where(lo > 0, jnp.sqrt(lo * hi), 0.5 * hi)
    t_new = jnp.where(inside, cand, mid)
    return t_new, w, t, lo, hi, it + 1, done

  init = (hi0, jnp.zeros((t_dim,), dtype), hi0, jnp.zeros((), dtype),
          hi0 * 1.0001, 0, jnp.zeros((), bool))
  # (w, t) of the last evaluated point; on convergence t_new ~ t.
  _, w, t, _, _, _, _ = jax.lax.while_loop(cond, body, init)
  return w, t


def cagrad_weights(gram: jax.Array, c: float = 0.5, rescale: int = 1,
                   max_iter: int = 30,
                   qp_max_iter: Optional[int] = None) -> jax.Array:
  """CAGrad task weights: ``1/T + w*/t*``, divided by the rescale factor."""
  t_dim = gram.shape[0]
  dtype = gram.dtype
  mean_w = jnp.full((t_dim,), 1.0 / t_dim, dtype)
  scale = jnp.max(jnp.diagonal(gram))
  ok_scale = scale > 0
  gn = jnp.where(ok_scale, gram / jnp.where(ok_scale, scale, 1.0),
                 jnp.eye(t_dim, dtype=dtype))
  g0_norm = jnp.sqrt(jnp.maximum(jnp.mean(gn), 0.0))  # ||g0|| (normalised)
  cn = c * g0_norm
  active = ok_scale & (cn > 1e-12)
  cn_safe = jnp.where(active, cn, 1.0)
  b = gn @ mean_w                                       # G g0 / 1, i.e. G 1/T
  w, t = _cagrad_simplex(gn, b, cn_safe, max_iter, qp_max_iter)
  ok = active & (t > 0) & jnp.isfinite(t)
  # lambda = c ||g0|| / ||g_w|| = 1 / t at the solution.
  weights = mean_w + jnp.where(ok, w / jnp.where(ok, t, 1.0), 0.0)
  if rescale == 1:
    weights = weights / (1.0 + c**2)
  elif rescale == 2:
    weights = weights / (1.0 + c)
  return weights


def cagrad(*, c: float = 0.5, rescale: int = 1, max_iter: int = 30,
           num_tasks: Optional[int] = None
           ) -> optax.GradientTransformationExtraArgs:
  """CAGrad: the best worst-case improvement in a ball around the mean.

  Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning"
  (NeurIPS 2021), as in the official code and LibMTL: with ``g0`` the mean
  gradient, ``w* = argmin_{w in simplex} <g_w, g0> + c ||g0|| ||g_w||``
  (``g_w = sum_t w_t g_t``) and ``out = g0 + (c ||g0|| / ||g_w*||) g_w*``,
  divided by ``1 + c^2`` (``rescale=1``, default), ``1 + c`` (``2``) or 1
  (``0``). The reference implementations call scipy's SLSQP on the host; here
  the simplex problem is solved exactly in JAX (a parametric active-set QP
  plus a scalar equation per active set, see ``_cagrad_simplex``).
  ``c = 0`` gives the mean. Invariant to permuting the tasks.

  Args:
    c: radius of the ball, relative to ``||g0||`` (``calpha``; default 0.5).
    rescale: 0, 1 or 2, as above.
    max_iter: cap on the outer (active-set consistency) iterations.
    num_tasks: number of tasks, for a fixed-shape state.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from slamjax import surgery
    >>> tx = surgery.cagrad(c=0.0, rescale=0, num_tasks=2)  # c = 0: the mean
    >>> g = {'w': jnp.array([[1., 0.], [-1., 1.]])}
    >>> out, _ = jax.jit(tx.update)(g, tx.init({'w': jnp.zeros(2)}))
    >>> out['w']
    Array([0. , 0.5], dtype=float32)
  """
  if rescale not in (0, 1, 2):
    raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale!r}.")
  if c < 0:
    raise ValueError(f"cagrad: c must be >= 0, got {c}.")

  def weighting(ctx):
    return cagrad_weights(ctx.gram, c, rescale, max_iter), ctx.inner

  return gram_weighted(weighting, name="cagrad", num_tasks=num_tasks)
