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


def small_solve(a: jax.Array, b: jax.Array) -> jax.Array:
  """Solves ``a x = b`` for a tiny dense ``a`` (Gauss-Jordan, partial pivoting).

  Same numerics as LU with partial pivoting; written as a short
  ``fori_loop`` because XLA compiles it much faster than
  ``jnp.linalg.solve`` (which matters for the many tiny solves here, and for
  compile-heavy test suites). A zero pivot (singular ``a``) is replaced by
  the smallest normal number, so results stay finite. ``b``: ``(n,)`` or
  ``(n, m)``.
  """
  n = a.shape[0]
  vec = b.ndim == 1
  m = jnp.concatenate([a, b[:, None] if vec else b], axis=1)
  rows = jnp.arange(n)
  tiny = jnp.finfo(a.dtype).tiny

  def body(k, m):
    col = jnp.where(rows >= k, jnp.abs(m[:, k]), -1.0)
    p = jnp.argmax(col)
    row_k, row_p = m[k], m[p]
    m = m.at[p].set(row_k).at[k].set(row_p)
    piv = m[k, k]
    piv = jnp.where(jnp.abs(piv) < tiny, jnp.where(piv < 0, -tiny, tiny), piv)
    pivot_row = m[k] / piv
    factors = m[:, k].at[k].set(0.0)
    m = m - factors[:, None] * pivot_row[None, :]
    return m.at[k].set(pivot_row)

  m = jax.lax.fori_loop(0, n, body, m)
  x = m[:, n:]
  return x[:, 0] if vec else x


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
    return small_solve(m, b)[:t] * f
  b = rhs * f[:, None]
  if simplex:
    last = jnp.zeros((1, rhs.shape[1]), q.dtype).at[0, 0].set(1.0)
    b = jnp.concatenate([b, last], axis=0)
  return small_solve(m, b)[:t] * f[:, None]


def active_set_qp(q, c, *, simplex: bool, tol: float = 1e-6,
                  max_iter: int | None = None):
  """Solves ``min 1/2 x^T Q x + c^T x`` s.t. ``x >= 0`` [and ``sum(x) = 1``].

  Lawson-Hanson in one flat loop: every iteration solves the equality
  problem on the current free set, then either (infeasible solution) moves
  towards it until a free variable hits zero and frees that bound, or
  (feasible) accepts it and adds the most violated bound to the free set,
  stopping when no bound is violated by more than ``tol``.

  Args:
    q: ``(T, T)`` symmetric PSD matrix. Without ``simplex`` it should be
      positive definite (callers regularise).
    c: ``(T,)`` linear term.
    simplex: add the constraint ``sum(x) = 1``.
    tol: relative optimality tolerance on the multipliers, in units of
      ``max(max|diag Q|, max|c|)``.
    max_iter: cap on iterations, i.e. linear solves (default ``6 T + 20``).

  Returns:
    ``(T,)`` solution.
  """
  t = q.shape[0]
  dtype = q.dtype
  if max_iter is None:
    max_iter = 6 * t + 20
  idx = jnp.arange(t)
  scale = jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(q))), jnp.max(jnp.abs(c)))
  atol = tol * scale

  if simplex:
    k0 = jnp.argmin(0.5 * jnp.diagonal(q) + c)
    x0 = jax.nn.one_hot(k0, t, dtype=dtype)
    free0 = idx == k0
  else:
    x0 = jnp.zeros((t,), dtype)
    free0 = jnp.zeros((t,), bool)

  def cond(carry):
    _, _, _, it, done = carry
    return (~done) & (it < max_iter)

  def body(carry):
    x, free, entered, it, _ = carry
    s = kkt_solve(q, -c, free, simplex)
    blocking = free & (s <= 0)
    infeasible = jnp.any(blocking)
    # (a) infeasible: step from x towards s until a blocking variable hits 0.
    gap = x - s
    ok = blocking & (gap > 0)
    ratio = jnp.where(ok, x / jnp.where(ok, gap, 1.0), jnp.inf)
    ratio = jnp.where(blocking & ~ok, 0.0, ratio)
    i = jnp.argmin(ratio)
    alpha = jnp.clip(ratio[i], 0.0, 1.0)
    x_a = x + alpha * (s - x)
    free_a = free & (x_a > 0) & (idx != i)
    x_a = jnp.where(free_a, x_a, 0.0)
    # The variable that just entered leaves at once: numerical noise, stop.
    stalled = infeasible & (i == entered) & (alpha == 0)
    # (b) feasible: accept s, then free the most violated bound (if any).
    x_b = jnp.where(free, s, 0.0)
    grad = q @ x_b + c
    viol = grad - jnp.dot(x_b, grad) if simplex else grad
    cand = jnp.where(free, jnp.inf, viol)
    j = jnp.argmin(cand)
    optimal = cand[j] >= -atol
    free_b = free | (idx == j)
    x = jnp.where(infeasible, jnp.where(stalled, x, x_a), x_b)
    free = jnp.where(infeasible, jnp.where(stalled, free, free_a), free_b)
    entered = jnp.where(infeasible, -1, j)
    done = jnp.where(infeasible, stalled, optimal)
    return x, free, entered, it + 1, done

  x, _, _, _, _ = jax.lax.while_loop(
      cond, body, (x0, free0, jnp.asarray(-1), 0, jnp.zeros((), bool)))
  return x
