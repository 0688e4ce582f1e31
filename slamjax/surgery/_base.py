"""Shared machinery: input validation, the task Gram matrix, the optax shell.

Every method in :mod:`slamjax.surgery` is a *weighting of the task Gram
matrix*. Given per-task gradients ``g_1..g_T`` (stacked on a leading task axis
of every leaf of ``updates``) the shell

1. validates the task axis,
2. computes ``G[s, t] = <g_s, g_t>`` with one contraction per leaf (float32
   accumulation),
3. asks the method for task weights ``w`` (a pure function of the tiny
   ``T x T`` matrix, plus a PRNG key and a small method state),
4. combines every leaf once: ``out = tensordot(w, leaf, 1)``.

No per-task copy of the gradients is ever made; the only ``O(T * |params|)``
work is the Gram contraction and the final combination.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "SurgeryState",
    "WeightingContext",
    "diagnostics",
    "gram_matrix",
    "gram_weighted",
    "reduce_tasks",
]

_TASK_AXIS_HINT = (
    "Surgery transforms expect per-task gradients with a leading task axis on "
    "every leaf, shape (T, *param.shape) (e.g. jax.jacrev(task_losses)(params) "
    "for a loss vector, or jnp.stack of per-task grads), and must come first "
    "in optax.chain.")


class SurgeryState(NamedTuple):
  """State of every :mod:`slamjax.surgery` transform.

  The diagnostics are cheap (``O(T^2)``) and refreshed on every update; read
  them with :func:`slamjax.surgery.diagnostics`.

  Attributes:
    count: int32 number of updates applied so far.
    key: PRNG key for methods with a random task order (split on every
      update), else ``None``.
    cosine: ``(T, T)`` float32 pairwise cosines of the raw task gradients
      (before ``task_weights``); 0 where a gradient is zero.
    num_conflicts: int32, number of pairs ``i < j`` with ``<g_i, g_j> < 0``.
    weights: ``(T,)`` float32 final task weights, ``out = sum_t weights[t] *
      g_t`` (raw gradients, ``task_weights`` included). Exact for every
      method except ``gradvac(granularity='leaf')``, where each leaf has its
      own weights and this is their parameter-count-weighted mean.
    norm_ratio: float32 ``||out|| / ||sum_t c_t g_t||`` (``c`` = task_weights,
      default ones); 1 for ``sum_tasks`` and ``adaptive_pcgrad``.
    task_norms: ``(T,)`` float32 ``||g_t||`` of the raw task gradients.
    inner: method-specific state (e.g. GradVac's cosine targets), ``()`` if
      none.
  """
  count: jax.Array
  key: Optional[jax.Array]
  cosine: jax.Array
  num_conflicts: jax.Array
  weights: jax.Array
  norm_ratio: jax.Array
  task_norms: jax.Array
  inner: Any = ()


class WeightingContext(NamedTuple):
  """What a weighting function sees (all tiny arrays; no gradients).

  Attributes:
    gram: ``(T, T)`` Gram matrix of the (task-weight-scaled) task gradients,
      float32 (float64 under x64 with float64 gradients).
    leaf_grams: ``(K, T, T)`` per-leaf Gram matrices if the method asked for
      them (``leafwise=True``), else ``None``.
    key: a fresh PRNG key for this update (``None`` for deterministic
      methods).
    inner: the method's own state from the previous update.
    count: int32 number of previous updates.
  """
  gram: jax.Array
  leaf_grams: Optional[jax.Array]
  key: Optional[jax.Array]
  inner: Any
  count: jax.Array


class WeightingFn(Protocol):

  def __call__(self, ctx: WeightingContext) -> tuple[jax.Array, Any]:
    """Returns ``(weights, new_inner)``; weights ``(T,)`` or ``(K, T)``."""


# ----------------------------------------------------------------------------
# Validation and Gram matrix.
# ----------------------------------------------------------------------------


def _acc_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _check_task_axis(name: str, updates, params, num_tasks: Optional[int]):
  """Returns ``(leaves, treedef, T)``; raises ``ValueError`` naming a leaf."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(updates)
  if not with_path:
    return [], treedef, None
  first_path, t = None, None
  for path, leaf in with_path:
    shape = jnp.shape(leaf)
    where = jax.tree_util.keystr(path) or "<root>"
    if len(shape) < 1:
      raise ValueError(
          f"surgery.{name}: update leaf {where} has shape {shape}, with no "
          f"leading task axis. {_TASK_AXIS_HINT}")
    if t is None:
      first_path, t = where, shape[0]
    elif shape[0] != t:
      raise ValueError(
          f"surgery.{name}: inconsistent task axis: update leaf {where} has "
          f"{shape[0]} tasks (shape {shape}) but leaf {first_path} has {t}. "
          f"{_TASK_AXIS_HINT}")
  if params is not None:
    p_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    if len(p_with_path) == len(with_path):
      for (path, leaf), (_, p) in zip(with_path, p_with_path):
        if tuple(jnp.shape(leaf)[1:]) != tuple(jnp.shape(p)):
          where = jax.tree_util.keystr(path) or "<root>"
          raise ValueError(
              f"surgery.{name}: update leaf {where} has shape "
              f"{jnp.shape(leaf)} but the parameter has shape "
              f"{jnp.shape(p)}; expected (T, *param.shape). {_TASK_AXIS_HINT}")
  if num_tasks is not None and t != num_tasks:
    raise ValueError(
        f"surgery.{name}: built with num_tasks={num_tasks} but the updates "
        f"have {t} tasks on their leading axis (leaf {first_path}).")
  return [leaf for _, leaf in with_path], treedef, t


def _replicated_out_sharding():
  """``P()`` under a mesh with Explicit axes (JAX's default since 0.9), where
  contracting sharded parameter dimensions must name the output sharding;
  ``None`` otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not any(t == jax.sharding.AxisType.Explicit
                           for t in mesh.axis_types):
    return None
  return jax.sharding.PartitionSpec()


def _leaf_gram(leaf: jax.Array) -> jax.Array:
  # Contract every parameter dimension directly (no reshape, which could
  # fight a parameter sharding); the T x T result is replicated.
  dims = tuple(range(1, leaf.ndim))
  return jax.lax.dot_general(
      leaf, leaf, ((dims, dims), ((), ())),
      preferred_element_type=_acc_dtype(leaf.dtype),
      out_sharding=_replicated_out_sharding())


def gram_matrix(task_updates: Any) -> jax.Array:
  """Task Gram matrix ``G[s, t] = <g_s, g_t>`` of stacked per-task gradients.

  One contraction per leaf with float32 (or wider) accumulation; no copies.

  Args:
    task_updates: pytree whose leaves are shaped ``(T, *param.shape)``.

  Returns:
    ``(T, T)`` array.

  Example:
    >>> import jax.numpy as jnp
    >>> from slamjax import surgery
    >>> g = {'w': jnp.array([[1., 0.], [1., 1.]]), 'b': jnp.array([[2.], [0.]])}
    >>> surgery.gram_matrix(g)
    Array([[5., 1.],
           [1., 2.]], dtype=float32)
  """
  leaves, _, t = _check_task_axis("gram_matrix", task_updates, None, None)
  if t is None:
    raise ValueError("surgery.gram_matrix: the update tree has no leaves.")
  return sum(_leaf_gram(leaf) for leaf in leaves)


def _cosine(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  diag = jnp.maximum(jnp.diagonal(gram), 0.0)
  norms = jnp.sqrt(diag)
  denom = norms[:, None] * norms[None, :]
  ok = denom > 0
  cos = jnp.where(ok, gram / jnp.where(ok, denom, 1.0), 0.0)
  return jnp.clip(cos, -1.0, 1.0), norms


def _num_conflicts(gram: jax.Array) -> jax.Array:
  t = gram.shape[0]
  upper = jnp.triu(jnp.ones((t, t), bool), k=1)
  return jnp.sum((gram < 0) & upper).astype(jnp.int32)


def _as_key(key) -> jax.Array:
  if isinstance(key, (int, np.integer)):
    return jax.random.PRNGKey(int(key))
  return key


# ----------------------------------------------------------------------------
# The optax shell.
# ----------------------------------------------------------------------------


def _empty_diagnostics(t: int):
  return (jnp.zeros((t, t), jnp.float32), jnp.zeros((), jnp.int32),
          jnp.zeros((t,), jnp.float32), jnp.ones((), jnp.float32),
          jnp.zeros((t,), jnp.float32))


def gram_weighted(
    weighting: WeightingFn,
    *,
    name: str,
    num_tasks: Optional[int] = None,
    key: Any = None,
    init_inner: Optional[Callable[[int, int], Any]] = None,
    leafwise: bool = False,
    rescale_to_sum_norm: bool = False,
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  """Builds a surgery transform from a weighting of the task Gram matrix.

  This is the shell behind every built-in method; use it to add your own.
  ``weighting(ctx)`` receives a :class:`WeightingContext` and returns
  ``(weights, new_inner)`` with ``weights`` of shape ``(T,)`` (or ``(K, T)``,
  one row per leaf, when ``leafwise=True``). The output update is
  ``sum_t weights[t] * g_t`` leaf by leaf.

  Args:
    weighting: the weighting function (pure, jit-able).
    name: method name, used in error messages.
    num_tasks: number of tasks ``T``. Strongly recommended: with it the state
      has fixed shapes from ``init`` on (needed by ``lax.scan`` loops,
      ``optax.apply_if_finite``, buffer donation and checkpoint restore from
      ``jax.eval_shape(tx.init, params)``). Without it the diagnostics start
      with size-0 task axes and take their real shape on the first update (a
      one-off retrace).
    key: PRNG key or int seed for random methods; ``None`` for deterministic
      ones. Split on every update; the weighting gets the fresh half.
    init_inner: ``init_inner(T, K) -> inner state`` for stateful methods
      (``K`` = number of update leaves).
    leafwise: pass per-leaf Gram matrices and accept per-leaf weights.
    rescale_to_sum_norm: rescale the combined update to the norm of the
      plain (task-weighted) sum, ``||sum_t c_t g_t||``.
    eps: relative floor used when rescaling (``||out||^2`` below
      ``eps * max_t ||g_t||^2`` gives a zero update instead of a blow-up).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` accepts the
    keyword-only extra argument ``task_weights`` (``(T,)``, pre-scales the
    task gradients: ``g_t <- task_weights[t] * g_t``).

  Example:
    >>> import jax.numpy as jnp
    >>> from slamjax import surgery
    >>> def max_norm_task(ctx):  # put all weight on the largest gradient
    ...   w = jnp.zeros(ctx.gram.shape[0]).at[jnp.argmax(jnp.diag(ctx.gram))].set(1.)
    ...   return w, ctx.inner
    >>> tx = surgery.gram_weighted(max_norm_task, name='max_norm', num_tasks=2)
    >>> g = {'w': jnp.array([[1., 0.], [0., 3.]])}
    >>> out, state = tx.update(g, tx.init({'w': jnp.zeros(2)}))
    >>> out['w']
    Array([0., 3.], dtype=float32)
  """
  if init_inner is None:
    init_inner = lambda t, k: ()
  random = key is not None
  key0 = _as_key(key) if random else None

  def init_fn(params):
    k = len(jax.tree.leaves(params))
    t = 0 if num_tasks is None else int(num_tasks)
    cos, nc, w, ratio, norms = _empty_diagnostics(t)
    return SurgeryState(
        count=jnp.zeros((), jnp.int32), key=key0, cosine=cos,
        num_conflicts=nc, weights=w, norm_ratio=ratio, task_norms=norms,
        inner=init_inner(t, k))

  def update_fn(updates, state, params=None, *, task_weights=None,
                **extra_args):
    del extra_args
    leaves, treedef, t = _check_task_axis(name, updates, params, num_tasks)
    if t is None:  # e.g. every leaf masked out by optax.partition
      return updates, state
    k = len(leaves)
    inner = state.inner
    if state.weights.shape != (t,):
      if num_tasks is None and state.weights.shape == (0,):
        warnings.warn(
            f"surgery.{name} was built without num_tasks; its state changes "
            f"shape on the first update (T={t}). Pass num_tasks={t} for a "
            "fixed-shape state (lax.scan, donation, checkpoint restore).",
            stacklevel=3)
      else:
        raise ValueError(
            f"surgery.{name}: state was initialised for "
            f"{state.weights.shape[0]} tasks but the updates have {t}.")
      inner = init_inner(t, k)

    leaf_grams = jnp.stack([_leaf_gram(leaf) for leaf in leaves])  # (K,T,T)
    raw_gram = jnp.sum(leaf_grams, axis=0)
    dtype = raw_gram.dtype
    if task_weights is None:
      c = jnp.ones((t,), dtype)
    else:
      c = jnp.asarray(task_weights, dtype)
      if c.shape != (t,):
        raise ValueError(
            f"surgery.{name}: task_weights has shape {c.shape}, expected "
            f"({t},).")
    cc = c[:, None] * c[None, :]
    gram = raw_gram * cc
    scaled_leaf_grams = leaf_grams * cc if leafwise else None

    if random:
      new_key, step_key = jax.random.split(state.key)
    else:
      new_key = step_key = None
    w_scaled, new_inner = weighting(WeightingContext(
        gram=gram, leaf_grams=scaled_leaf_grams, key=step_key, inner=inner,
        count=state.count))
    w_scaled = w_scaled.astype(dtype)

    sum_norm2 = jnp.sum(gram)
    if leafwise:
      out_norm2 = jnp.einsum("kt,kts,ks->", w_scaled, scaled_leaf_grams,
                             w_scaled)
    else:
      out_norm2 = w_scaled @ gram @ w_scaled
    scale = jnp.max(jnp.diagonal(gram))
    if rescale_to_sum_norm:
      ok = out_norm2 > eps * scale
      factor = jnp.where(
          ok, jnp.sqrt(jnp.maximum(sum_norm2, 0.0) / jnp.where(ok, out_norm2,
                                                               1.0)), 0.0)
      w_scaled = w_scaled * factor
      out_norm2 = out_norm2 * factor**2
    weights = w_scaled * c  # weights on the raw task gradients

    if leafwise:
      out_leaves = [
          jnp.tensordot(weights[i], leaf.astype(_acc_dtype(leaf.dtype)),
                        axes=1).astype(leaf.dtype)
          for i, leaf in enumerate(leaves)]
      sizes = jnp.asarray([np.prod(leaf.shape[1:]) for leaf in leaves], dtype)
      mean_weights = (sizes / jnp.sum(sizes)) @ weights
    else:
      out_leaves = [
          jnp.tensordot(weights, leaf.astype(_acc_dtype(leaf.dtype)),
                        axes=1).astype(leaf.dtype) for leaf in leaves]
      mean_weights = weights

    cos, norms = _cosine(raw_gram)
    ok = sum_norm2 > 0
    ratio = jnp.where(ok, jnp.sqrt(jnp.maximum(out_norm2, 0.0)
                                   / jnp.where(ok, sum_norm2, 1.0)), 1.0)
    new_state = SurgeryState(
        count=optax.safe_increment(state.count), key=new_key,
        cosine=cos.astype(jnp.float32),
        num_conflicts=_num_conflicts(raw_gram),
        weights=mean_weights.astype(jnp.float32),
        norm_ratio=ratio.astype(jnp.float32),
        task_norms=norms.astype(jnp.float32), inner=new_inner)
    return jax.tree.unflatten(treedef, out_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def reduce_tasks(reduction: str = "sum") -> optax.GradientTransformationExtraArgs:
  """Stateless reduction of the task axis (no diagnostics, no Gram matrix).

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
    leaves, treedef, t = _check_task_axis(f"reduce_tasks('{reduction}')",
                                          updates, params, None)
    if t is None:
      return updates, state
    w = jnp.ones((t,), jnp.float32) if task_weights is None else jnp.asarray(
        task_weights, jnp.float32)
    if w.shape != (t,):
      raise ValueError(f"reduce_tasks: task_weights has shape {w.shape}, "
                       f"expected ({t},).")
    if reduction == "mean":
      w = w / t
    out = [jnp.tensordot(w.astype(_acc_dtype(l.dtype)),
                         l.astype(_acc_dtype(l.dtype)), axes=1).astype(l.dtype)
           for l in leaves]
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------
# Diagnostics.
# ----------------------------------------------------------------------------


def _find_states(opt_state) -> list[SurgeryState]:
  found = jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, SurgeryState))
  return [s for s in found if isinstance(s, SurgeryState)]


def _state_diagnostics(s: SurgeryState) -> dict[str, jax.Array]:
  t = s.cosine.shape[0]
  if t >= 2:
    iu = np.triu_indices(t, k=1)
    pairs = s.cosine[iu]
    cos_mean, cos_min = jnp.mean(pairs), jnp.min(pairs)
  else:
    cos_mean = cos_min = jnp.zeros((), jnp.float32)
  return {
      "cos_mean": cos_mean,
      "cos_min": cos_min,
      "cosine": s.cosine,
      "num_conflicts": s.num_conflicts,
      "weights": s.weights,
      "norm_ratio": s.norm_ratio,
  }


def diagnostics(opt_state: Any) -> dict[str, jax.Array]:
  """Loggable diagnostics of the surgery state(s) inside any optax state.

  Searches ``opt_state`` (a chain tuple, ``optax.partition``/``masked``
  state, ``named_chain`` dict, ...) for :class:`SurgeryState` instances. Works
  inside and outside ``jax.jit``.

  Returns:
    ``{}`` if there is no surgery state. For one state, the scalars
    ``cos_mean`` and ``cos_min`` (mean/min pairwise cosine over pairs ``i <
    j``, 0 if ``T < 2``), ``num_conflicts`` (int32) and ``norm_ratio``
    (``||out|| / ||sum_t g_t||``), and the arrays ``cosine`` ``(T, T)`` and
    ``weights`` ``(T,)``. (Per-task gradient norms are in the state,
    ``SurgeryState.task_norms``.) With several surgery states the keys of the
    ``i``-th one (in tree order) are prefixed ``f"{i}/"``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from slamjax import surgery
    >>> tx = optax.chain(surgery.pcgrad(key=0, num_tasks=2), optax.sgd(0.1))
    >>> params = {'w': jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {'w': jnp.array([[1., 0.], [-1., 1.]])}
    >>> _, state = jax.jit(tx.update)(g, state, params)
    >>> d = surgery.diagnostics(state)
    >>> int(d['num_conflicts']), d['weights']
    (1, Array([2. , 1.5], dtype=float32))
  """
  states = _find_states(opt_state)
  if len(states) == 1:
    return _state_diagnostics(states[0])
  out = {}
  for i, s in enumerate(states):
    out.update({f"{i}/{k}": v for k, v in _state_diagnostics(s).items()})
  return out
