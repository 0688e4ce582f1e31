"""Gradient Vaccine (Wang et al., ICLR 2021), in task-weight space."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from slamjax.surgery._weighted import gram_weighted
from slamjax.surgery._pcgrad import task_orders


def gradvac_weights(cos: jax.Array, norms: jax.Array, rho_target: jax.Array,
                    orders: jax.Array, beta: float
                    ) -> tuple[jax.Array, jax.Array]:
  """GradVac for one parameter group: ``(weights (T,), new targets (T, T))``.

  ``cos``/``norms`` are the group's cosines and (relative) task norms;
  ``rho_target[i, j]`` the EMA cosine target of the pair. Row ``i`` of ``U``
  holds ``gpc_i`` as coefficients on the unit task directions (as in
  ``pcgrad_weights``), so no squared norm is formed.
  """
  t = cos.shape[0]
  if t < 2:
    return jnp.ones((t,), cos.dtype), rho_target.astype(cos.dtype)
  rows = jnp.arange(t)
  nz = norms > 0

  def body(step, carry):
    u, rho_t = carry
    j = orders[:, step]
    dot = jnp.sum(u * cos[j], axis=1)                     # <gpc_i, u_j>
    n_i = jnp.sqrt(jnp.maximum(jnp.einsum("ik,kl,il->i", u, cos, u), 0.0))
    ok = (n_i > 0) & nz[j]
    rho = jnp.where(ok, dot / jnp.where(ok, n_i, 1.0), 0.0)
    rho = jnp.clip(rho, -1.0, 1.0)
    target = rho_t[rows, j]
    s_t = jnp.sqrt(jnp.maximum(1.0 - target**2, 0.0))
    s_r = jnp.sqrt(jnp.maximum(1.0 - rho**2, 0.0))
    adjust = (rho < target) & ok & (s_t > 0)
    # Coefficient on u_j (i.e. a * ||g_j|| in the paper's notation).
    coef = n_i * (target * s_r - rho * s_t) / jnp.where(adjust, s_t, 1.0)
    onehot = j[:, None] == rows[None, :]  # entry (i, j_i)
    u = u + jnp.where(adjust, coef, 0.0)[:, None] * onehot
    new_target = (1.0 - beta) * target + beta * rho
    rho_t = jnp.where(onehot, new_target[:, None], rho_t)
    return u, rho_t

  u, rho_t = jax.lax.fori_loop(
      0, orders.shape[1], body,
      (jnp.diag(norms), rho_target.astype(cos.dtype)))
  inv = jnp.where(nz, 1.0 / jnp.where(nz, norms, 1.0), 0.0)
  return jnp.where(nz, jnp.sum(u, axis=0) * inv, 1.0), rho_t


def gradvac(key: Any = 0, *, beta: float = 0.5, granularity: str = "model",
            shuffle: bool = True, num_tasks: Optional[int] = None,
            diagnostics: bool = True) -> optax.GradientTransformationExtraArgs:
  """GradVac: steer pairwise gradient cosines towards their running average.

  For each task ``i`` and each other task ``j`` (random order, as in
  PCGrad), with ``rho = cos(gpc_i, g_j)`` and ``phi = rho_T[i, j]`` (an EMA of
  past cosines, initially 0): if ``rho < phi``, add ``a * g_j`` to ``gpc_i``
  with ``a = ||gpc_i|| (phi sqrt(1 - rho^2) - rho sqrt(1 - phi^2)) / (||g_j||
  sqrt(1 - phi^2))``, which makes the cosine exactly ``phi``; then ``rho_T[i,
  j] <- (1 - beta) phi + beta rho``. The update is ``sum_i gpc_i``. The first
  step equals PCGrad (all targets are 0). Follows the paper's Algorithm 1 and
  LibMTL's ``GradVac`` (whose ``beta`` default, 0.5, is kept here; the paper
  reports using a much smaller rate, around 1e-2).

  Args:
    key: PRNG key or int seed for the random task order.
    beta: EMA rate of the cosine targets.
    granularity: ``'model'`` (one group: LibMTL ``group_type=0``) or
      ``'leaf'`` (one group per parameter leaf, i.e. per tensor: LibMTL
      ``group_type=2``). With ``'leaf'`` each leaf gets its own weights and
      ``state.weights`` reports their parameter-count-weighted mean.
    shuffle: random (default) or increasing task order.
    num_tasks: number of tasks, for a fixed-shape state.
    diagnostics: record cosines, conflicts and task norms (free here).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.
    ``state.inner`` is the ``(K, T, T)`` array of cosine targets (``K = 1``
    for ``'model'``), in the parameters' dtype (float64 under x64).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from slamjax import surgery
    >>> tx = surgery.gradvac(key=0, beta=0.5, num_tasks=2)
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> g = {'w': jnp.array([[1., 0.], [1., 1.]])}   # cosine 0.71
    >>> _, state = jax.jit(tx.update)(g, state)
    >>> state.inner[0, 0, 1]   # target moved halfway from 0 to 0.71
    Array(0.35355338, dtype=float32)
  """
  if granularity not in ("model", "leaf"):
    raise ValueError(f"gradvac: granularity must be 'model' or 'leaf', got "
                     f"{granularity!r}.")
  if key is None and shuffle:
    raise ValueError("gradvac: a random task order needs a key (PRNG key or "
                     "int seed); pass shuffle=False for the fixed order.")
  leafwise = granularity == "leaf"

  def init_inner(t, k):
    # Cast by the shell to the params' dtype (float64 under x64).
    return jnp.zeros((k if leafwise else 1, t, t), jnp.float32)

  def weighting(ctx):
    t = ctx.cosine.shape[0]
    orders = task_orders(ctx.key, t, shuffle)
    if leafwise:
      cos, norms = ctx.leaf_cosine, ctx.leaf_norms
    else:
      cos, norms = ctx.cosine[None], ctx.norms[None]
    if ctx.inner.shape[0] != cos.shape[0]:
      raise ValueError(
          f"gradvac(granularity='leaf'): the state holds cosine targets for "
          f"{ctx.inner.shape[0]} leaves but the updates have "
          f"{cos.shape[0]}; call init with the params being optimised.")
    w, rho = jax.vmap(gradvac_weights, in_axes=(0, 0, 0, None, None))(
        cos, norms, ctx.inner, orders, beta)
    return (w if leafwise else w[0]), rho.astype(ctx.inner.dtype)

  return gram_weighted(weighting, name="gradvac", num_tasks=num_tasks,
                       key=key, init_inner=init_inner, leafwise=leafwise,
                       diagnostics=diagnostics)
