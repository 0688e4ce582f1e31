"""A small, exact, jit-able active-set solver for the task-space QPs.

Solves ``min_x 1/2 x^T Q x + c^T x`` subject to ``x >= 0`` and, optionally,
``sum(x) = 1`` (the probability simplex), for a ``T x T`` positive
semi-definite ``Q`` with ``T`` small (tens). It is the primal active-set method
of Lawson & Hanson (NNLS, in its Gram-matrix form as in Bro & de Jong's
FNNLS); with the simplex constraint and ``c = 0`` it is Wolfe's minimum-norm
point algorithm. It terminates in finitely many steps in exact arithmetic;
here the loops are ``lax.while_loop`` s with iteration caps, so everything
runs under ``jit``/``vmap`` with no host round trip.

Each iteration solves one (bordered) linear system on the current free set,
expressed with masks so shapes stay static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _kkt_matrix(q, free, simplex):
  """Masked system matrix: ``Q`` on the free set, identity elsewhere."""
  t = q.shape[0]
  a = jnp.where(free[:, None] & free[None, :], q, jnp.eye(t, dtype=q.dtype))
  if not simplex:
    return a
  f = free.astype(q.dtype)
  top = jnp.concatenate([a, f[:, None]], axis=1)
  bottom = jnp.concatenate([f, jnp.zeros((1,), q.dtype)])[None, :]
  return jnp.concatenate([top, bottom], axis=0)


def kkt_solve(q, rhs, free, simplex):
  """Minimiser of ``1/2 x^T Q x - rhs^T x`` over the free set (zeros outside).

  With ``simplex`` the free coordinates additionally sum to one. ``rhs`` may
  have a trailing batch axis of right-hand sides (then the affine constraint
  right-hand side is ``1`` for column 0 and ``0`` for the others, which gives
  the affine path ``x(t) = x_0 + t x_1`` used by CAGrad).
  """
  t = q.shape[0]
  f = free.astype(q.dtype)
  m = _kkt_matrix(q, free, simplex)
  if rhs.ndim == 1:
    b = rhs * f
    if simplex:
      b = jnp.concatenate([b, jnp.ones((1,), q.dtype)])
    return jnp.linalg.solve(m, b)[:t] * f
  b = rhs * f[:, None]
  if simplex:
    last = jnp.zeros((1, rhs.shape[1]), q.dtype).at[0, 0].set(1.0)
    b = jnp.concatenate([b, last], axis=0)
  return jnp.linalg.solve(m, b)[:t] * f[:, None]


def active_set_qp(q, c, *, simplex: bool, tol: float = 1e-6,
                  max_iter: int | None = None):
  """Solves ``min 1/2 x^T Q x + c^T x`` s.t. ``x >= 0`` [and ``sum(x) = 1``].

  Args:
    q: ``(T, T)`` symmetric PSD matrix. Without ``simplex`` it should be
      positive definite (callers regularise).
    c: ``(T,)`` linear term.
    simplex: add the constraint ``sum(x) = 1``.
    tol: relative optimality tolerance on the multipliers, in units of
      ``max(max|diag Q|, max|c|)``.
    max_iter: cap on outer iterations (default ``3 T + 10``).

  Returns:
    ``(T,)`` solution.
  """
  t = q.shape[0]
  dtype = q.dtype
  if max_iter is None:
    max_iter = 3 * t + 10
  idx = jnp.arange(t)
  scale = jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(q))), jnp.max(jnp.abs(c)))
  atol = tol * scale

  def solve(free):
    return kkt_solve(q, -c, free, simplex)

  if simplex:
    k0 = jnp.argmin(0.5 * jnp.diagonal(q) + c)
    x0 = jax.nn.one_hot(k0, t, dtype=dtype)
    free0 = idx == k0
  else:
    x0 = jnp.zeros((t,), dtype)
    free0 = jnp.zeros((t,), bool)

  def inner_cond(carry):
    _, free, s, it = carry
    return jnp.any(free & (s <= 0)) & (it < t)

  def inner_body(carry):
    x, free, s, it = carry
    blocking = free & (s <= 0)
    gap = x - s
    ok = blocking & (gap > 0)
    ratio = jnp.where(ok, x / jnp.where(ok, gap, 1.0), jnp.inf)
    ratio = jnp.where(blocking & ~ok, 0.0, ratio)
    i = jnp.argmin(ratio)
    alpha = jnp.clip(ratio[i], 0.0, 1.0)
    x = x + alpha * (s - x)
    free = free & (x > 0) & (idx != i)
    x = jnp.where(free, x, 0.0)
    return x, free, solve(free), it + 1

  def outer_cond(carry):
    _, _, it, done = carry
    return (~done) & (it < max_iter)

  def outer_body(carry):
    x, free, it, _ = carry
    grad = q @ x + c
    viol = grad - jnp.dot(x, grad) if simplex else grad
    cand = jnp.where(free, jnp.inf, viol)
    j = jnp.argmin(cand)
    optimal = cand[j] >= -atol
    free1 = free | (idx == j)
    x2, free2, s2, _ = jax.lax.while_loop(
        inner_cond, inner_body, (x, free1, solve(free1), 0))
    x_new = jnp.where(free2, jnp.maximum(s2, 0.0), 0.0)
    if simplex:
      total = jnp.sum(x_new)
      x_new = jnp.where(total > 0, x_new / jnp.where(total > 0, total, 1.0), x)
    stalled = ~free2[j]  # entering variable left at once: numerical noise
    keep = optimal | stalled
    x = jnp.where(keep, x, x_new)
    free = jnp.where(keep, free, free2)
    return x, free, it + 1, keep

  x, _, _, _ = jax.lax.while_loop(
      outer_cond, outer_body, (x0, free0, 0, jnp.zeros((), bool)))
  return x
