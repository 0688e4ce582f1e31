"""Transforms around the surgery: task-axis reduction, apply_if_finite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from slamjax.surgery._kernels import combine
from slamjax.surgery._validation import check_task_axis, task_weight_vector


def reduce_tasks(reduction: str = "sum") -> optax.GradientTransformationExtraArgs:
  """Stateless reduction of the task axis (no diagnostics, no Gram matrix).

  Non-finite entries give NaN in the same coordinates (the package's
  non-finite policy).

  Used for task-specific parameters (heads) next to a surgery transform on
  the shared parameters, see :func:`slamjax.surgery.shared_only`. Honours the
  ``task_weights`` extra argument.

  Args:
    reduction: ``'sum'`` or ``'mean'``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with an empty state.

  Example:
    >>> import jax.numpy as jnp
    >>> from slamjax import surgery
    >>> tx = surgery.reduce_tasks('sum')
    >>> out, _ = tx.update({'w': jnp.array([[1., 2.], [3., 4.]])}, tx.init(None))
    >>> out['w']
    Array([4., 6.], dtype=float32)
  """
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduce_tasks: reduction must be 'sum' or 'mean', got "
                     f"{reduction!r}.")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, task_weights=None,
                **extra_args):
    del extra_args
    name = f"reduce_tasks('{reduction}')"
    leaves, treedef, t = check_task_axis(name, updates, params, None)
    if t is None:
      return updates, state
    w = task_weight_vector(name, task_weights, t, jnp.float32)
    if w is None:
      w = jnp.ones((t,), jnp.float32)
    if reduction == "mean":
      w = w / t
    out = []
    for leaf in leaves:
      o = combine(w, leaf)
      out.append(jnp.where(jnp.isfinite(o), o, jnp.asarray(jnp.nan, o.dtype)))
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def apply_if_finite(inner: optax.GradientTransformation,
                    max_consecutive_errors: int
                    ) -> optax.GradientTransformationExtraArgs:
  """``optax.apply_if_finite`` that can wrap a chain starting with surgery.

  ``optax.apply_if_finite(optax.chain(surgery.mgda(...), ...), n)`` cannot
  work: on a rejected step optax returns zeros shaped like its *input*, which
  still has the task axis, while an accepted step returns the combined update
  (a ``TypeError`` under ``jit``). This version returns zeros shaped like the
  inner transform's *output*; otherwise it is the same (same
  ``optax.ApplyIfFiniteState``, same counters, the inner state is kept on a
  rejected step). The other order needs nothing special: surgery first, then
  ``optax.apply_if_finite(...)`` around the rest of the chain, which rejects
  the NaN update a non-finite input produces.

  Args:
    inner: the transformation to protect (e.g. ``optax.chain(surgery.X(...),
      optax.sgd(lr))``).
    max_consecutive_errors: rejected updates in a row before giving up (and
      applying the non-finite update), as in optax.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from slamjax import surgery
    >>> tx = surgery.apply_if_finite(
    ...     optax.chain(surgery.mgda(num_tasks=2), optax.sgd(1.0)), 3)
    >>> params = {'w': jnp.zeros(2)}
    >>> g = {'w': jnp.array([[1., jnp.nan], [0., 1.]])}
    >>> out, state = jax.jit(tx.update)(g, tx.init(params), params)
    >>> out['w'], int(state.total_notfinite)
    (Array([0., 0.], dtype=float32), 1)
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32),
        last_finite=jnp.array(True, jnp.bool_),
        total_notfinite=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    isfinite = jnp.all(jnp.array(
        [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(updates)]))
    notfinite_count = jnp.where(
        isfinite, jnp.zeros([], jnp.int32),
        optax.safe_increment(state.notfinite_count))
    out_shape = jax.eval_shape(
        lambda u, s, p: inner.update(u, s, p, **extra_args)[0],
        updates, state.inner_state, params)

    def do_update(_):
      return inner.update(updates, state.inner_state, params, **extra_args)

    def reject_update(_):
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
      return zeros, state.inner_state

    new_updates, new_inner = jax.lax.cond(
        isfinite | (notfinite_count > max_consecutive_errors),
        do_update, reject_update, None)
    return new_updates, optax.ApplyIfFiniteState(
        notfinite_count=notfinite_count, last_finite=isfinite,
        total_notfinite=jnp.where(isfinite, state.total_notfinite,
                                  optax.safe_increment(state.total_notfinite)),
        inner_state=new_inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
