"""Gradient Vaccine (Wang et al., ICLR 2021), in task-weight space."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from slamjax.surgery._base import gram_weighted
from slamjax.surgery._pcgrad import task_orders


def gradvac_weights(gram: jax.Array, rho_target: jax.Array,
                    orders: jax.Array, beta: float
                    ) -> tuple[jax.Array, jax.Array]:
  """GradVac for one parameter group: ``(weights (T,), new targets (T, T))``.

  ``gram`` is the group's ``(T, T)`` Gram matrix; ``rho_target[i, j]`` the EMA
  cosine target of the pair. Row ``i`` of ``W`` holds ``gpc_i`` as weights on
  the original gradients.
  """
  t = gram.shape[0]
  if t < 2:
    return jnp.ones((t,), gram.dtype), rho_target.astype(gram.dtype)
  rows = jnp.arange(t)
  diag = jnp.maximum(jnp.diagonal(gram), 0.0)

  def body(step, carry):
    w, rho_t = carry
    j = orders[:, step]
    dot = jnp.sum(w * gram[j], axis=1)                    # <gpc_i, g_j>
    n_i = jnp.sqrt(jnp.maximum(jnp.einsum("ik,kl,il->i", w, gram, w), 0.0))
    n_j = jnp.sqrt(diag[j])
    ok = (n_i > 0) & (n_j > 0)
    rho = jnp.where(ok, dot / jnp.where(ok, n_i * n_j, 1.0), 0.0)
    rho = jnp.clip(rho, -1.0, 1.0)
    target = rho_t[rows, j]
    s_t = jnp.sqrt(jnp.maximum(1.0 - target**2, 0.0))
    s_r = jnp.sqrt(jnp.maximum(1.0 - rho**2, 0.0))
    adjust = (rho < target) & ok & (s_t > 0)
    coef = n_i * (target * s_r - rho * s_t) / jnp.where(
        adjust, n_j * s_t, 1.0)
    onehot = j[:, None] == rows[None, :]  # entry (i, j_i)
    w = w + jnp.where(adjust, coef, 0.0)[:, None] * onehot
    new_target = (1.0 - beta) * target + beta * rho
    rho_t = jnp.where(onehot, new_target[:, None], rho_t)
    return w, rho_t

  w, rho_t = jax.lax.fori_loop(
      0, orders.shape[1], body,
      (jnp.eye(t, dtype=gram.dtype), rho_target.astype(gram.dtype)))
  return jnp.sum(w, axis=0), rho_t


def gradvac(key: Any = 0, *, beta: float = 0.5, granularity: str = "model",
            shuffle: bool = True, num_tasks: Optional[int] = None
            ) -> optax.GradientTransformationExtraArgs:
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

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.
    ``state.inner`` is the ``(K, T, T)`` array of cosine targets (``K = 1``
    for ``'model'``).

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
    return jnp.zeros((k if leafwise else 1, t, t), jnp.float32)

  def weighting(ctx):
    t = ctx.gram.shape[0]
    orders = task_orders(ctx.key, t, shuffle)
    grams = ctx.leaf_grams if leafwise else ctx.gram[None]
    if ctx.inner.shape[0] != grams.shape[0]:
      raise ValueError(
          f"gradvac(granularity='leaf'): the state holds cosine targets for "
          f"{ctx.inner.shape[0]} leaves but the updates have "
          f"{grams.shape[0]}; call init with the params being optimised.")
    w, rho = jax.vmap(gradvac_weights, in_axes=(0, 0, None, None))(
        grams, ctx.inner, orders, beta)
    rho = rho.astype(jnp.float32)
    return (w if leafwise else w[0]), rho

  return gram_weighted(weighting, name="gradvac", num_tasks=num_tasks,
                       key=key, init_inner=init_inner, leafwise=leafwise)
