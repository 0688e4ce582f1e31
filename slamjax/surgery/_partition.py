"""Surgery on the shared parameters only; task-specific heads are summed."""

from __future__ import annotations

from typing import Any, Callable, Collection, Union

import jax
import optax

from slamjax.surgery._wrappers import reduce_tasks

_SURGERY, _REDUCE = "surgery", "reduce"


def shared_only(
    tx: optax.GradientTransformation,
    param_labels: Union[Any, Callable[[Any], Any]],
    *,
    shared_labels: Collection[Any] = ("shared",),
    head_reduction: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  """Applies surgery ``tx`` to the shared parameters, sums the rest.

  A thin wrapper around ``optax.partition``::

    optax.partition({'surgery': tx, 'reduce': reduce_tasks('sum')},
                    labels mapped to 'surgery' / 'reduce')

  The Gram matrix, and thus the surgery, then only sees the shared
  parameters (as LibMTL's ``get_share_params()`` and torchjd's
  ``mtl_backward``); task-specific parameters (heads) just have their task
  axis reduced (a head's gradient is zero for the other tasks, so the sum is
  its own task's gradient). ``task_weights`` reach both branches. Put the
  result first in ``optax.chain``; :func:`slamjax.surgery.diagnostics` finds
  the surgery state inside it.

  Args:
    tx: a surgery transform (e.g. ``surgery.adaptive_pcgrad(key)``).
    param_labels: a pytree with the structure of the params (or a prefix of
      it), or a function ``params -> pytree``; its leaves are labels. Leaves
      that are ``True`` or in ``shared_labels`` get surgery, all others are
      reduced. (A callable is called with the per-task updates at update time,
      so it should depend on the tree paths only, not on shapes.)
    shared_labels: the labels meaning "shared".
    head_reduction: ``'sum'`` (default) or ``'mean'`` for the other leaves.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from slamjax import surgery
    >>> params = {'trunk': {'w': jnp.zeros(2)},
    ...           'head_a': jnp.zeros(1), 'head_b': jnp.zeros(1)}
    >>> labels = {'trunk': 'shared', 'head_a': 'a', 'head_b': 'b'}
    >>> tx = optax.chain(
    ...     surgery.shared_only(surgery.adaptive_pcgrad(0, num_tasks=2), labels),
    ...     optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> g = {'trunk': {'w': jnp.array([[1., 0.], [-1., 1.]])},
    ...      'head_a': jnp.array([[2.], [0.]]), 'head_b': jnp.array([[0.], [3.]])}
    >>> updates, state = jax.jit(tx.update)(g, state, params)
    >>> updates['head_a'], updates['head_b']
    (Array([-0.2], dtype=float32), Array([-0.3], dtype=float32))
    >>> int(surgery.diagnostics(state)['num_conflicts'])
    1
  """
  shared = set(shared_labels)

  def to_binary(labels):
    return jax.tree.map(
        lambda l: _SURGERY if (l is True or (not isinstance(l, bool) and
                                             l in shared)) else _REDUCE,
        labels)

  if callable(param_labels):
    labels = lambda p: to_binary(param_labels(p))
  else:
    labels = to_binary(param_labels)
  return optax.partition(
      {_SURGERY: tx, _REDUCE: reduce_tasks(head_reduction)}, labels)
