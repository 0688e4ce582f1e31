"""Plain reductions of the task axis: sum and mean (with diagnostics)."""

from __future__ import annotations

from typing import Optional

import optax

from slamjax.surgery._weighted import gram_weighted


def sum_tasks(*, num_tasks: Optional[int] = None, diagnostics: bool = False
              ) -> optax.GradientTransformationExtraArgs:
  """Sums the task gradients: ``out = sum_t g_t`` (the summed-loss gradient).

  The baseline every other method is compared with. By default it never
  forms the task Gram matrix (one pass over the gradients, as cheap as
  summing the losses); with ``diagnostics=True`` it also records cosines,
  conflicts and task norms, so plain multi-task training can log how often
  its tasks conflict (one more pass).

  Args:
    num_tasks: number of tasks, for a fixed-shape state (see
      :func:`slamjax.surgery.gram_weighted`).
    diagnostics: form the Gram matrix for the diagnostics.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.

  Example:
    >>> import jax.numpy as jnp
    >>> from slamjax import surgery
    >>> tx = surgery.sum_tasks(num_tasks=2, diagnostics=True)
    >>> g = {'w': jnp.array([[1., 2.], [3., -4.]])}
    >>> out, state = tx.update(g, tx.init({'w': jnp.zeros(2)}))
    >>> out['w'], int(state.num_conflicts)
    (Array([ 4., -2.], dtype=float32), 1)
  """

  return gram_weighted(None, name="sum_tasks", num_tasks=num_tasks,
                       diagnostics=diagnostics, fixed_scale=lambda t: 1.0)


def mean_tasks(*, num_tasks: Optional[int] = None, diagnostics: bool = False
               ) -> optax.GradientTransformationExtraArgs:
  """Averages the task gradients: ``out = (1/T) sum_t g_t``.

  Like :func:`sum_tasks`, forms no Gram matrix unless ``diagnostics``.

  Args:
    num_tasks: number of tasks, for a fixed-shape state.
    diagnostics: form the Gram matrix for the diagnostics.

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

  return gram_weighted(None, name="mean_tasks", num_tasks=num_tasks,
                       diagnostics=diagnostics, fixed_scale=lambda t: 1.0 / t)
