"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from slamjax.surgery._weighted import gram_weighted
from slamjax.surgery._qp import active_set_qp, kkt_solve


def _cagrad_simplex(q, b, a, cn, hi0, max_iter, qp_max_iter):
  """Solves ``min b^T v + cn sqrt(v^T q v)`` over ``v >= 0``, ``a^T v = 1``.

  Returns ``(v, t)``. With ``sqrt(x) = min_s x / (2 s) + s / 2`` the problem
  becomes the convex parametric QP ``v(t) = argmin 1/2 v^T q v + t b^T v``
  plus the scalar equation ``cn^2 t^2 = q(v(t))`` (``t = s / cn``), whose
  sign change is unique (it is the derivative of a convex function of
  ``s``). On a fixed active set ``v(t) = v0 + t v1`` is affine, so the
  equation is a scalar quadratic: we solve it exactly for the current active
  set, re-solve the QP there, and stop once the active set is consistent
  (usually 1-3 rounds); bisection on the bracket ``(0, hi0]`` safeguards the
  iteration.
  """
  t_dim = q.shape[0]
  dtype = q.dtype

  def qp(t):
    return active_set_qp(q, t * b, eq=a, max_iter=qp_max_iter)

  def support_root(v):
    free = v > 0
    both = kkt_solve(q, jnp.stack([jnp.zeros_like(b), -b], axis=1), free, a)
    v0, v1 = both[:, 0], both[:, 1]
    q0, q01, q1 = v0 @ q @ v0, v0 @ q @ v1, v1 @ q @ v1
    aa = cn**2 - q1
    disc = jnp.maximum(q01**2 + aa * q0, 0.0)
    ok = aa > 0
    return jnp.where(ok, (q01 + jnp.sqrt(disc)) / jnp.where(ok, aa, 1.0),
                     jnp.inf)

  def cond(carry):
    return (~carry[-1]) & (carry[-2] < max_iter)

  def body(carry):
    t, _, _, lo, hi, it, _ = carry
    v = qp(t)
    phi = cn**2 * t**2 - v @ q @ v
    lo = jnp.where(phi < 0, t, lo)
    hi = jnp.where(phi >= 0, t, hi)
    cand = support_root(v)
    # The active set at t is the final one iff its root is t itself.
    done = jnp.abs(cand - t) <= 1e-6 * t
    inside = (cand >= lo) & (cand <= hi) & jnp.isfinite(cand)
    mid = jnp.where(lo > 0, jnp.sqrt(lo * hi), 0.5 * hi)
    t_new = jnp.where(inside, cand, mid)
    return t_new, v, t, lo, hi, it + 1, done

  init = (hi0, jnp.zeros((t_dim,), dtype), hi0, jnp.zeros((), dtype),
          hi0 * 1.0001, 0, jnp.zeros((), bool))
  # (v, t) of the last evaluated point; on convergence t_new ~ t.
  _, v, t, _, _, _, _ = jax.lax.while_loop(cond, body, init)
  return v, t


def cagrad_weights(cos: jax.Array, norms: jax.Array, c: float = 0.5,
                   rescale: int = 1, max_iter: int = 30,
                   qp_max_iter: Optional[int] = None) -> jax.Array:
  """CAGrad task weights: ``1/T + w*/t*``, divided by the rescale factor.

  Posed in unit-direction coordinates ``v_t = n_t w_t / n_min`` (``n`` =
  task norms, the smallest non-zero one scaled to 1), where the quadratic
  form is the cosine matrix: the tolerances then mean the same for every
  task, however small. Zero-gradient tasks are left out of the inner
  problem (they constrain nothing).
  """
  t_dim = cos.shape[0]
  dtype = cos.dtype
  mean_w = jnp.full((t_dim,), 1.0 / t_dim, dtype)
  nz = norms > 0
  eye = jnp.eye(t_dim, dtype=dtype)
  q = jnp.where(nz[:, None] & nz[None, :], cos, eye)
  n_min = jnp.min(jnp.where(nz, norms, jnp.inf))
  n_min = jnp.where(jnp.isfinite(n_min), n_min, 1.0)
  a = jnp.where(nz, n_min / jnp.where(nz, norms, 1.0), 0.0)  # in (0, 1]
  b = (q @ norms) / t_dim                       # b^T v = <g0, g_w> / n_min
  g0_norm = jnp.sqrt(jnp.maximum(norms @ cos @ norms, 0.0)) / t_dim
  cn = c * g0_norm
  active = jnp.any(nz) & (cn > 1e-12)
  cn_safe = jnp.where(active, cn, 1.0)
  # v^T q v <= max_t (1 / a_t)^2 = (1 / n_min)^2 on the feasible set.
  hi0 = 1.01 / (n_min * cn_safe) + 1e-30
  v, t = _cagrad_simplex(q, b, a, cn_safe, hi0, max_iter, qp_max_iter)
  ok = active & (t > 0) & jnp.isfinite(t)
  # lambda = c ||g0|| / ||g_w|| = 1 / (n_min t); w = a v on the simplex.
  extra = jnp.where(nz, v / jnp.where(nz, norms, 1.0), 0.0)
  weights = mean_w + jnp.where(ok, extra / jnp.where(ok, t, 1.0), 0.0)
  if rescale == 1:
    weights = weights / (1.0 + c**2)
  elif rescale == 2:
    weights = weights / (1.0 + c)
  return weights


def cagrad(*, c: float = 0.5, rescale: int = 1, max_iter: int = 30,
           num_tasks: Optional[int] = None, diagnostics: bool = True
           ) -> optax.GradientTransformationExtraArgs:
  """CAGrad: the best worst-case improvement in a ball around the mean.

  Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning"
  (NeurIPS 2021), as in the official code and LibMTL: with ``g0`` the mean
  gradient, ``w* = argmin_{w in simplex} <g_w, g0> + c ||g0|| ||g_w||``
  (``g_w = sum_t w_t g_t``) and ``out = g0 + (c ||g0|| / ||g_w*||) g_w*``,
  divided by ``1 + c^2`` (``rescale=1``, default), ``1 + c`` (``2``) or 1
  (``0``). The reference implementations call scipy's SLSQP on the host; here
  the simplex problem is solved exactly in JAX (a parametric active-set QP
  plus a scalar equation per active set, see ``_cagrad_simplex``), posed on
  the task cosines with the norms moved into the constraint: exact for task
  norms that differ by 1e6 or more, and the weights do not change when all
  tasks are rescaled together. ``c = 0`` gives the mean. Zero-gradient tasks
  are left out of the inner problem. Invariant to permuting the tasks.

  Args:
    c: radius of the ball, relative to ``||g0||`` (``calpha``; default 0.5).
    rescale: 0, 1 or 2, as above.
    max_iter: cap on the outer (active-set consistency) iterations.
    num_tasks: number of tasks, for a fixed-shape state.
    diagnostics: record cosines, conflicts and task norms (free here).

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
    return (cagrad_weights(ctx.cosine, ctx.norms, c, rescale, max_iter),
            ctx.inner)

  return gram_weighted(weighting, name="cagrad", num_tasks=num_tasks,
                       diagnostics=diagnostics)
