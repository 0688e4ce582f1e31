"""Plain reductions of the task axis: sum and mean (with diagnostics)."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import optax

from slamjax.surgery._base import gram_weighted


def sum_tasks(*, num_tasks: Optional[int] = None
              ) -> optax.GradientTransformationExtraArgs:
  """Sums the task gradients: ``out = sum_t g_t`` (the summed-loss gradient).

  The baseline every other method is compared with. Still records the
  diagnostics (cosines, conflicts), so plain multi-task training can log how
  often its tasks conflict.

  Args:
    num_tasks: number of tasks, for a fixed-shape state (see
      :func:`slamjax.surgery.gram_weighted`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.

  Example:
    >>> import jax.numpy as jnp
    >>> from slamjax import surgery
    >>> tx = surgery.sum_tasks(num_tasks=2)
    >>> g = {'w': jnp.array([[1., 2.], [3., -4.]])}
    >>> out, state = tx.update(g, tx.init({'w': jnp.zeros(2)}))
    >>> out['w'], int(state.num_conflicts)
    (Array([ 4., -2.], dtype=float32), 1)
  """

  def weighting(ctx):
    return jnp.ones(ctx.gram.shape[0], ctx.gram.dtype), ctx.inner

  return gram_weighted(weighting, name="sum_tasks", num_tasks=num_tasks)


def mean_tasks(*, num_tasks: Optional[int] = None
               ) -> optax.GradientTransformationExtraArgs:
  """Averages the task gradients: ``out = (1/T) sum_t g_t``.

  Args:
    num_tasks: number of tasks, for a fixed-shape state.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.

  Example:
    >>> import jax.numpy as jnp
    >>> from slamjax import surgery
    >>> tx = surgery.mean_tasks(num_tasks=2)
    >>> g = {'w': jnp.array([[1., 2.], [3., -4.]])}
    >>> out, _ = tx.update(g, tx.init({'w': jnp.zeros(2)}))
    >>> out['w']
    Array([ 2., -1.], dtype=float32)
  """

  def weighting(ctx):
    t = ctx.gram.shape[0]
    return jnp.full((t,), 1.0 / t, ctx.gram.dtype), ctx.inner

  return gram_weighted(weighting, name="mean_tasks", num_tasks=num_tasks)
