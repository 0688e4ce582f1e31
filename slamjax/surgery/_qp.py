"""A small, exact, jit-able active-set solver for the task-space QPs.

Solves ``min_x 1/2 x^T Q x + c^T x`` subject to ``x >= 0`` and, optionally,
one equality ``a^T x = 1`` (``a >= 0``; ``a = 1`` is the probability
simplex), for a ``T x T`` positive semi-definite ``Q`` with ``T`` small
(tens). It is the primal active-set method of Lawson & Hanson (NNLS, in its
Gram-matrix form as in Bro & de Jong's FNNLS); with the equality and ``c = 0``
it is Wolfe's minimum-norm point algorithm. It terminates in finitely many
steps in exact arithmetic; here the loops are ``lax.while_loop`` s with
iteration caps, so everything runs under ``jit``/``vmap`` with no host round
trip.

The callers pose their problems in *unit-direction coordinates* (``Q`` = the
cosine matrix, unit diagonal; task norms moved into ``a`` and ``c``), so the
optimality tolerance here is relative to the current point, not to the
largest task: a task a million times smaller than the others still counts.
Variables with ``a_i = 0`` take no part in the equality (callers use this to
leave zero-gradient tasks out).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def default_tol(dtype) -> float:
  """Relative optimality tolerance: ``1e-12`` in float64, else ``1e-6``."""
  return 1e-12 if jnp.finfo(dtype).bits >= 64 else 1e-6


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


def _kkt_matrix(q, free, eq):
  """Masked system matrix: ``Q`` on the free set, identity elsewhere."""
  t = q.shape[0]
  a = jnp.where(free[:, None] & free[None, :], q, jnp.eye(t, dtype=q.dtype))
  if eq is None:
    return a
  f = jnp.where(free, eq, 0.0).astype(q.dtype)
  top = jnp.concatenate([a, f[:, None]], axis=1)
  bottom = jnp.concatenate([f, jnp.zeros((1,), q.dtype)])[None, :]
  return jnp.concatenate([top, bottom], axis=0)


def kkt_solve(q, rhs, free, eq: Optional[jax.Array] = None):
  """Minimiser of ``1/2 x^T Q x - rhs^T x`` over the free set (zeros outside).

  With ``eq`` the free coordinates additionally satisfy ``eq^T x = 1``.
  ``rhs`` may have a trailing batch axis of right-hand sides (then the
  equality's right-hand side is ``1`` for column 0 and ``0`` for the others,
  which gives the affine path ``x(t) = x_0 + t x_1`` used by CAGrad).
  """
  t = q.shape[0]
  f = free.astype(q.dtype)
  m = _kkt_matrix(q, free, eq)
  if rhs.ndim == 1:
    b = rhs * f
    if eq is not None:
      b = jnp.concatenate([b, jnp.ones((1,), q.dtype)])
    return small_solve(m, b)[:t] * f
  b = rhs * f[:, None]
  if eq is not None:
    last = jnp.zeros((1, rhs.shape[1]), q.dtype).at[0, 0].set(1.0)
    b = jnp.concatenate([b, last], axis=0)
  return small_solve(m, b)[:t] * f[:, None]


def active_set_qp(q, c, *, eq: Optional[jax.Array] = None,
                  tol: Optional[float] = None, max_iter: int | None = None):
  """Solves ``min 1/2 x^T Q x + c^T x`` s.t. ``x >= 0`` [and ``eq^T x = 1``].

  Lawson-Hanson in one flat loop: every iteration solves the equality
  problem on the current free set, then either (infeasible solution) moves
  towards it until a free variable hits zero and frees that bound, or
  (feasible) accepts it and adds the most violated bound to the free set,
  stopping when no multiplier is below ``-tol * (||x||_Q sqrt(max diag Q) +
  max|c|)``, i.e. relative to the current point's own scale.

  Args:
    q: ``(T, T)`` symmetric PSD matrix. Without ``eq`` it should be
      positive definite (callers regularise).
    c: ``(T,)`` linear term.
    eq: ``(T,)`` non-negative equality coefficients, or ``None``. Variables
      with ``eq_i = 0`` never enter the free set from the start vertex and
      are only freed if that lowers the objective.
    tol: relative tolerance (default :func:`default_tol`).
    max_iter: cap on iterations, i.e. linear solves (default ``6 T + 20``).

  Returns:
    ``(T,)`` solution.
  """
  t = q.shape[0]
  dtype = q.dtype
  if max_iter is None:
    max_iter = 6 * t + 20
  if tol is None:
    tol = default_tol(dtype)
  idx = jnp.arange(t)
  qscale = jnp.sqrt(jnp.max(jnp.abs(jnp.diagonal(q))))
  cscale = jnp.max(jnp.abs(c))

  if eq is not None:
    eq = eq.astype(dtype)
    # Best vertex e_k / a_k of the feasible set.
    ok = eq > 0
    inv = 1.0 / jnp.where(ok, eq, 1.0)
    f0 = jnp.where(ok, 0.5 * jnp.diagonal(q) * inv**2 + c * inv, jnp.inf)
    k0 = jnp.argmin(f0)
    x0 = jax.nn.one_hot(k0, t, dtype=dtype) * inv[k0]
    free0 = idx == k0
  else:
    x0 = jnp.zeros((t,), dtype)
    free0 = jnp.zeros((t,), bool)

  def cond(carry):
    _, _, _, it, done = carry
    return (~done) & (it < max_iter)

  def body(carry):
    x, free, entered, it, _ = carry
    s = kkt_solve(q, -c, free, eq)
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
    qx = q @ x_b
    grad = qx + c
    if eq is None:
      viol = grad
    else:  # multiplier of the equality: mu = x.grad / (a.x) = x.grad
      viol = grad - jnp.dot(x_b, grad) * eq
    cand = jnp.where(free, jnp.inf, viol)
    j = jnp.argmin(cand)
    scale = jnp.sqrt(jnp.maximum(jnp.dot(x_b, qx), 0.0)) * qscale + cscale
    optimal = cand[j] >= -tol * scale
    free_b = free | (idx == j)
    x = jnp.where(infeasible, jnp.where(stalled, x, x_a), x_b)
    free = jnp.where(infeasible, jnp.where(stalled, free, free_a), free_b)
    entered = jnp.where(infeasible, -1, j)
    done = jnp.where(infeasible, stalled, optimal)
    return x, free, entered, it + 1, done

  x, _, _, _, _ = jax.lax.while_loop(
      cond, body, (x0, free0, jnp.asarray(-1), 0, jnp.zeros((), bool)))
  return x
