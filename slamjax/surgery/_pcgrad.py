"""PCGrad (Yu et al., 2020) and SLAM-AGS adaptive PCGrad, in task-weight space."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from slamjax.surgery._weighted import gram_weighted


def task_orders(key: jax.Array, num_tasks: int, shuffle: bool = True
                ) -> jax.Array:
  """The order in which each task visits the others in one PCGrad step.

  Row ``i`` is a uniformly random permutation of ``{0..T-1} \\ {i}``, drawn
  independently per task (as in the paper and LibMTL/torchjd); with
  ``shuffle=False`` it is the increasing order. :func:`pcgrad` and
  :func:`gradvac` split their state key into ``(next_key, step_key)`` on
  every update and use ``task_orders(step_key, T)``.

  Args:
    key: PRNG key.
    num_tasks: ``T``.
    shuffle: random (default) or increasing order.

  Returns:
    ``(T, T - 1)`` int32 array.

  Example:
    >>> import jax
    >>> from slamjax import surgery
    >>> surgery.task_orders(jax.random.PRNGKey(0), 3, shuffle=False)
    Array([[1, 2],
           [0, 2],
           [0, 1]], dtype=int32)
  """
  t = num_tasks
  if t < 2:
    return jnp.zeros((t, 0), jnp.int32)
  if shuffle and key is None:
    raise ValueError("task_orders: shuffle=True needs a key.")
  rows = jnp.arange(t)
  if shuffle:  # independent uniform permutations: argsort of uniforms
    perms = jnp.argsort(jax.random.uniform(key, (t, t - 1)), axis=1)
  else:
    perms = jnp.broadcast_to(jnp.arange(t - 1), (t, t - 1))
  # Map 0..T-2 onto the tasks other than i.
  return (perms + (perms >= rows[:, None])).astype(jnp.int32)


def pcgrad_weights(cos: jax.Array, norms: jax.Array,
                   orders: jax.Array) -> jax.Array:
  """PCGrad task weights from the cosines and norms (all tasks in parallel).

  Task ``i``'s projected gradient is kept as coefficients ``U[i]`` on the
  unit task directions (``gpc_i = sum_k U[i, k] u_k``, initially ``U =
  diag(n)``), so no squared norm is ever formed. Visiting ``j = orders[i,
  step]``: if ``<gpc_i, u_j> = (U C)[i, j] < 0`` then ``U[i, j] -= (U C)[i,
  j]`` (projection on the normal plane of the *original* ``g_j``). Returns
  ``sum_i U[i] / n`` (PCGrad sums the projected gradients), with weight 1
  on zero tasks (never projected against).
  """
  t = cos.shape[0]
  if t < 2:
    return jnp.ones((t,), cos.dtype)
  rows = jnp.arange(t)
  nz = norms > 0

  def body(step, u):
    j = orders[:, step]
    d = jnp.sum(u * cos[j], axis=1)  # <gpc_i, u_j> for every i
    proj = (d < 0) & nz[j]
    onehot = (j[:, None] == rows[None, :]).astype(u.dtype)  # U[i, j_i]
    return u - jnp.where(proj, d, 0.0)[:, None] * onehot

  u = jax.lax.fori_loop(0, orders.shape[1], body, jnp.diag(norms))
  inv = jnp.where(nz, 1.0 / jnp.where(nz, norms, 1.0), 0.0)
  return jnp.where(nz, jnp.sum(u, axis=0) * inv, 1.0)


def pcgrad(key: Any = 0, *, shuffle: bool = True,
           rescale_to_sum_norm: bool = False, eps: float = 1e-12,
           num_tasks: Optional[int] = None, diagnostics: bool = True
           ) -> optax.GradientTransformationExtraArgs:
  """PCGrad: project conflicting task gradients, then sum (Yu et al., 2020).

  For every task ``i``, visit the other tasks ``j`` in a random order
  (fresh every step, from the key in the state); whenever the running
  ``gpc_i`` conflicts with the *original* ``g_j`` (``<gpc_i, g_j> < 0``),
  remove its component along ``g_j``. The update is ``sum_i gpc_i`` (the sum,
  as in the paper, LibMTL and torchjd). Computed exactly in task-weight space
  from the Gram matrix: no per-task gradient copies.

  Zero gradients are never projected against. The result never conflicts
  with a task when ``T = 2``; for ``T > 2`` PCGrad gives no such guarantee
  (use :func:`upgrad` or :func:`mgda` for that).

  Args:
    key: PRNG key or int seed for the random task order.
    shuffle: ``False`` visits the other tasks in increasing order (the
      official TF implementation's effective behaviour).
    rescale_to_sum_norm: rescale the update to ``||sum_t g_t||``; this is
      :func:`adaptive_pcgrad`.
    eps: relative floor for the rescale (see
      :func:`slamjax.surgery.gram_weighted`).
    num_tasks: number of tasks, for a fixed-shape state.
    diagnostics: record cosines, conflicts and task norms (free here).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from slamjax import surgery
    >>> tx = optax.chain(surgery.pcgrad(key=0, num_tasks=2), optax.sgd(1.0))
    >>> params = {'w': jnp.zeros(2)}
    >>> g = {'w': jnp.array([[1., 0.], [-1., 1.]])}  # conflicting tasks
    >>> out, _ = jax.jit(tx.update)(g, tx.init(params), params)
    >>> [round(float(x), 4) for x in out['w']]  # -((.5, .5) + (0, 1))
    [-0.5, -1.5]
  """

  if key is None and shuffle:
    raise ValueError("pcgrad: a random task order needs a key (PRNG key or "
                     "int seed); pass shuffle=False for the fixed order.")

  def weighting(ctx):
    t = ctx.cosine.shape[0]
    orders = task_orders(ctx.key, t, shuffle)
    return pcgrad_weights(ctx.cosine, ctx.norms, orders), ctx.inner

  return gram_weighted(
      weighting, name="adaptive_pcgrad" if rescale_to_sum_norm else "pcgrad",
      num_tasks=num_tasks, key=key, rescale_to_sum_norm=rescale_to_sum_norm,
      eps=eps, diagnostics=diagnostics)


def adaptive_pcgrad(key: Any = 0, *, eps: float = 1e-12, shuffle: bool = True,
                    num_tasks: Optional[int] = None, diagnostics: bool = True
                    ) -> optax.GradientTransformationExtraArgs:
  """SLAM-AGS adaptive gradient surgery: PCGrad, rescaled to the sum's norm.

  ``out = pcgrad(g) * ||sum_t g_t|| / ||pcgrad(g)||``: the direction of
  PCGrad with the step size of plain summed-loss training, so learning-rate
  schedules tuned for the summed loss carry over. The rescale is done on the
  task weights, ``w <- w * sqrt(1^T G 1 / w^T G w)``, so it costs nothing. If
  the PCGrad update vanishes (``||out||^2 <= eps * max_t ||g_t||^2``) the
  update is zero.

  Args:
    key: PRNG key or int seed for the random task order.
    eps: relative floor for the rescale.
    shuffle: random (default) or increasing task order.
    num_tasks: number of tasks, for a fixed-shape state.
    diagnostics: record cosines, conflicts and task norms (free here).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from slamjax import surgery
    >>> tx = surgery.adaptive_pcgrad(key=0, num_tasks=2)
    >>> g = {'w': jnp.array([[3., 0.], [-1., 1.]])}
    >>> out, state = jax.jit(tx.update)(g, tx.init({'w': jnp.zeros(2)}))
    >>> bool(jnp.allclose(optax.tree.norm(out), jnp.linalg.norm(g['w'].sum(0))))
    True
  """
  return pcgrad(key, shuffle=shuffle, rescale_to_sum_norm=True, eps=eps,
                num_tasks=num_tasks, diagnostics=diagnostics)
