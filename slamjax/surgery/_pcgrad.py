"""PCGrad (Yu et al., 2020) and SLAM-AGS adaptive PCGrad, in task-weight space."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from slamjax.surgery._base import gram_weighted


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


def pcgrad_weights(gram: jax.Array, orders: jax.Array) -> jax.Array:
  """PCGrad task weights from the Gram matrix (all tasks in parallel).

  Task ``i``'s projected gradient is kept as a weight vector ``W[i]``
  (``gpc_i = sum_k W[i, k] g_k``). Visiting ``j = orders[i, step]``: if
  ``<gpc_i, g_j> = W[i] . G[:, j] < 0`` then ``W[i, j] -= <gpc_i, g_j> /
  ||g_j||^2`` (projection on the normal plane of the *original* ``g_j``).
  Returns ``sum_i W[i]`` (PCGrad sums the projected gradients).
  """
  t = gram.shape[0]
  if t < 2:
    return jnp.ones((t,), gram.dtype)
  rows = jnp.arange(t)
  diag = jnp.diagonal(gram)

  def body(step, w):
    j = orders[:, step]
    d = jnp.sum(w * gram[j], axis=1)  # <gpc_i, g_j> for every i
    gjj = diag[j]
    proj = (d < 0) & (gjj > 0)
    coef = jnp.where(proj, d / jnp.where(proj, gjj, 1.0), 0.0)
    onehot = (j[:, None] == rows[None, :]).astype(w.dtype)  # W[i, j_i]
    return w - coef[:, None] * onehot

  w = jax.lax.fori_loop(0, orders.shape[1], body,
                        jnp.eye(t, dtype=gram.dtype))
  return jnp.sum(w, axis=0)


def pcgrad(key: Any = 0, *, shuffle: bool = True,
           rescale_to_sum_norm: bool = False, eps: float = 1e-12,
           num_tasks: Optional[int] = None
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

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from slamjax import surgery
    >>> tx = optax.chain(surgery.pcgrad(key=0, num_tasks=2), optax.sgd(1.0))
    >>> params = {'w': jnp.zeros(2)}
    >>> g = {'w': jnp.array([[1., 0.], [-1., 1.]])}  # conflicting tasks
    >>> out, _ = jax.jit(tx.update)(g, tx.init(params), params)
    >>> out['w']  # -(gpc_1 + gpc_2) = -((.5, .5) + (0, 1))
    Array([-0.5, -1.5], dtype=float32)
  """

  if key is None and shuffle:
    raise ValueError("pcgrad: a random task order needs a key (PRNG key or "
                     "int seed); pass shuffle=False for the fixed order.")

  def weighting(ctx):
    t = ctx.gram.shape[0]
    orders = task_orders(ctx.key, t, shuffle)
    return pcgrad_weights(ctx.gram, orders), ctx.inner

  return gram_weighted(
      weighting, name="adaptive_pcgrad" if rescale_to_sum_norm else "pcgrad",
      num_tasks=num_tasks, key=key, rescale_to_sum_norm=rescale_to_sum_norm,
      eps=eps)


def adaptive_pcgrad(key: Any = 0, *, eps: float = 1e-12, shuffle: bool = True,
                    num_tasks: Optional[int] = None
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
                num_tasks=num_tasks)
