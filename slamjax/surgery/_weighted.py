"""The optax shell of every method: a weighting of the task Gram matrix.

Given per-task gradients ``g_1..g_T`` (stacked on a leading task axis of
every leaf of ``updates``) one update

1. validates the task axis (:mod:`._validation`),
2. forms the Gram matrix and splits it into task norms and cosines
   (:mod:`._gram`),
3. asks the method for task weights ``w`` (a pure function of the tiny
   ``T x T`` problem, plus a PRNG key and a small method state),
4. rescales them if asked and combines every leaf once: ``out = sum_t w_t
   g_t`` (:mod:`._kernels`),
5. writes the new state and the diagnostics.

No per-task copy of the gradients is ever made. Methods whose weights do
not depend on the gradients (``sum_tasks``, ``mean_tasks``) skip steps 2-3
unless diagnostics are asked for.

Non-finite policy (every method): a NaN or inf anywhere in the updates makes
the output NaN, so that ``optax.apply_if_finite`` (or
:func:`slamjax.surgery.apply_if_finite`) rejects the step. Methods that mix
coordinates (all but sum and mean) return NaN everywhere; sum and mean
return NaN in the affected coordinates (an inf becomes NaN too). Such a
step leaves the method's state as it was (GradVac targets, Nash-MTL
weights, the step count and the PRNG key), so a rejected step neither
poisons nor shifts the next ones; only the diagnostics record it (NaN).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slamjax.surgery._gram import (
    GramStats,
    gram_stats,
    num_conflicts,
    with_task_weights,
)
from slamjax.surgery._kernels import acc_dtype, combine
from slamjax.surgery._validation import (
    ACCUMULATION_HINT,
    check_task_axis,
    task_weight_vector,
)


class SurgeryState(NamedTuple):
  """State of every :mod:`slamjax.surgery` transform.

  Read the diagnostics with :func:`slamjax.surgery.diagnostics`. The
  Gram-derived fields (``cosine``, ``num_conflicts``, ``task_norms``) are
  ``None`` when the transform was built with ``diagnostics=False`` (the
  default of ``sum_tasks``/``mean_tasks``, which then never form the Gram
  matrix); the other methods form it anyway and fill them for free.

  Attributes:
    count: int32 number of updates applied so far; an update with a
      non-finite input is not counted (except by ``sum_tasks``/``mean_tasks``
      without diagnostics, which never inspect their input).
    key: PRNG key for methods with a random task order (split on every
      update with a finite input), else ``None``.
    cosine: ``(T, T)`` float32 pairwise cosines of the raw task gradients
      (before ``task_weights``); 0 where a gradient is zero; or ``None``.
    num_conflicts: int32, number of pairs ``i < j`` with ``<g_i, g_j> < 0``;
      or ``None``.
    weights: ``(T,)`` float32 final task weights, ``out = sum_t weights[t] *
      g_t`` (raw gradients, ``task_weights`` included). Exact for every
      method except ``gradvac(granularity='leaf')``, where each leaf has its
      own weights and this is their parameter-count-weighted mean.
    norm_ratio: float32 ``||out|| / ||sum_t c_t g_t||`` (``c`` = task_weights,
      default ones); 1 for ``sum_tasks`` and ``adaptive_pcgrad``.
    task_norms: ``(T,)`` float32 ``||g_t||`` of the raw task gradients; or
      ``None``.
    inner: method-specific state (e.g. GradVac's cosine targets), ``()`` if
      none. Its floating arrays have the parameters' dtype (at least
      float32), so float64 under x64.
  """
  count: jax.Array
  key: Optional[jax.Array]
  cosine: Optional[jax.Array]
  num_conflicts: Optional[jax.Array]
  weights: jax.Array
  norm_ratio: jax.Array
  task_norms: Optional[jax.Array]
  inner: Any = ()


class WeightingContext(NamedTuple):
  """What a weighting function sees (all tiny arrays; no gradients).

  The task Gram matrix comes split into scale-free parts, so that solvers
  stay accurate when task norms differ by many orders of magnitude and
  nothing overflows: ``G = max_norm**2 * gram`` with ``gram = cosine *
  outer(norms, norms)``. All of it is for the task-weight-scaled gradients
  ``c_t g_t``. Dtype: float32, or float64 under x64 with float64 gradients.

  Attributes:
    cosine: ``(T, T)`` cosines; unit diagonal, except zero rows and columns
      for zero-gradient tasks.
    norms: ``(T,)`` task norms relative to the largest (in ``[0, 1]``).
    max_norm: the largest task norm, ``max_t ||c_t g_t||``.
    leaf_cosine: ``(K, T, T)`` per-leaf cosines if the method asked for them
      (``leafwise=True``), else ``None``.
    leaf_norms: ``(K, T)`` per-leaf task norms, relative to ``max_norm``;
      or ``None``.
    key: a fresh PRNG key for this update (``None`` for deterministic
      methods).
    inner: the method's own state from the previous update.
    count: int32 number of previous updates with a finite input (a skipped
      step does not advance schedules built on it).
  """
  cosine: jax.Array
  norms: jax.Array
  max_norm: jax.Array
  leaf_cosine: Optional[jax.Array]
  leaf_norms: Optional[jax.Array]
  key: Optional[jax.Array]
  inner: Any
  count: jax.Array

  @property
  def gram(self) -> jax.Array:
    """``G / max_norm**2`` (largest diagonal entry 1)."""
    return self.cosine * self.norms[:, None] * self.norms[None, :]


class WeightingFn(Protocol):

  def __call__(self, ctx: WeightingContext) -> tuple[jax.Array, Any]:
    """Returns ``(weights, new_inner)``; weights ``(T,)`` or ``(K, T)``."""


class _Spec(NamedTuple):
  """What :func:`gram_weighted` was built with."""
  weighting: Optional[WeightingFn]
  name: str
  num_tasks: Optional[int]
  init_inner: Callable[[int, int], Any]
  leafwise: bool
  rescale_to_sum_norm: bool
  eps: float
  diagnostics: bool
  fixed_scale: Optional[Callable[[int], float]]

  @property
  def gram_free(self) -> bool:
    """Weights known without the Gram matrix, and no diagnostics asked."""
    return self.fixed_scale is not None and not self.diagnostics


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
    diagnostics: bool = True,
    fixed_scale: Optional[Callable[[int], float]] = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds a surgery transform from a weighting of the task Gram matrix.

  This is the shell behind every built-in method; use it to add your own.
  ``weighting(ctx)`` receives a :class:`WeightingContext` and returns
  ``(weights, new_inner)`` with ``weights`` of shape ``(T,)`` (or ``(K, T)``,
  one row per leaf, when ``leafwise=True``). The output update is
  ``sum_t weights[t] * g_t`` leaf by leaf. Non-finite inputs give a NaN
  update and leave the method's state, its count and its key unchanged
  (module docstring).

  Args:
    weighting: the weighting function (pure, jit-able).
    name: method name, used in error messages.
    num_tasks: number of tasks ``T``. Strongly recommended: with it the state
      has fixed shapes from ``init`` on (needed by ``lax.scan`` loops,
      ``apply_if_finite``, buffer donation and checkpoint restore from
      ``jax.eval_shape(tx.init, params)``). Without it the diagnostics start
      with size-0 task axes and take their real shape on the first update (a
      one-off retrace).
    key: PRNG key or int seed for random methods; ``None`` for deterministic
      ones. Split on every update; the weighting gets the fresh half.
    init_inner: ``init_inner(T, K) -> inner state`` for stateful methods
      (``K`` = number of update leaves). Floating arrays in it are cast to
      the parameters' dtype (at least float32).
    leafwise: pass per-leaf cosines and norms and accept per-leaf weights.
    rescale_to_sum_norm: rescale the combined update to the norm of the
      plain (task-weighted) sum, ``||sum_t c_t g_t||``.
    eps: relative floor used when rescaling (``||out||^2`` below
      ``eps * max_t ||g_t||^2`` gives a zero update instead of a blow-up).
    diagnostics: fill the Gram-derived diagnostics (cosines, conflicts, task
      norms). Free when the method needs the Gram matrix anyway.
    fixed_scale: for weights that do not depend on the gradients:
      ``fixed_scale(T)`` is the weight of every task (``weighting`` is then
      ignored), and the Gram matrix is formed only if ``diagnostics``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` accepts the
    keyword-only extra argument ``task_weights`` (``(T,)``, pre-scales the
    task gradients: ``g_t <- task_weights[t] * g_t``). Put it first in
    ``optax.chain``; ``optax.MultiSteps`` goes after it, never around it:
    ``optax.chain(tx, optax.MultiSteps(opt, k).gradient_transformation())``.

  Example:
    >>> import jax.numpy as jnp
    >>> from slamjax import surgery
    >>> def max_norm_task(ctx):  # put all weight on the largest gradient
    ...   w = jnp.zeros(ctx.norms.shape[0]).at[jnp.argmax(ctx.norms)].set(1.)
    ...   return w, ctx.inner
    >>> tx = surgery.gram_weighted(max_norm_task, name='max_norm', num_tasks=2)
    >>> g = {'w': jnp.array([[1., 0.], [0., 3.]])}
    >>> out, state = tx.update(g, tx.init({'w': jnp.zeros(2)}))
    >>> out['w']
    Array([0., 3.], dtype=float32)
  """
  spec = _Spec(weighting, name, num_tasks,
               init_inner if init_inner is not None else lambda t, k: (),
               leafwise, rescale_to_sum_norm, eps, diagnostics, fixed_scale)
  key0 = None if key is None else _as_key(key)

  def init_fn(params):
    return _init_state(spec, key0, params)

  def update_fn(updates, state, params=None, *, task_weights=None,
                **extra_args):
    del extra_args
    return _update(spec, updates, state, params, task_weights)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------
# init.
# ----------------------------------------------------------------------------


def _as_key(key) -> jax.Array:
  if isinstance(key, (int, np.integer)):
    return jax.random.PRNGKey(int(key))
  return key


def _state_dtype(params) -> jnp.dtype:
  """Dtype of floating method state: the params' (at least float32)."""
  leaves = [l for l in jax.tree.leaves(params)
            if jnp.issubdtype(jnp.result_type(l), jnp.floating)]
  if not leaves:
    return jnp.result_type(float)
  return acc_dtype(jnp.result_type(*leaves))


def _cast_floating(tree, dtype):
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree)


def _init_inner(spec: _Spec, t: int, k: int, params):
  return _cast_floating(spec.init_inner(t, k), _state_dtype(params))


def _init_state(spec: _Spec, key0, params) -> SurgeryState:
  t = 0 if spec.num_tasks is None else int(spec.num_tasks)
  if spec.diagnostics:
    diag = dict(cosine=jnp.zeros((t, t), jnp.float32),
                num_conflicts=jnp.zeros((), jnp.int32),
                task_norms=jnp.zeros((t,), jnp.float32))
  else:
    diag = dict(cosine=None, num_conflicts=None, task_norms=None)
  return SurgeryState(
      count=jnp.zeros((), jnp.int32), key=key0,
      weights=jnp.zeros((t,), jnp.float32),
      norm_ratio=jnp.ones((), jnp.float32),
      inner=_init_inner(spec, t, len(jax.tree.leaves(params)), params),
      **diag)


# ----------------------------------------------------------------------------
# update: the steps.
# ----------------------------------------------------------------------------


def _update(spec: _Spec, updates, state: SurgeryState, params, task_weights):
  leaves, treedef, t = check_task_axis(spec.name, updates, params,
                                       spec.num_tasks)
  if t is None:  # e.g. every leaf masked out by optax.partition
    return updates, state
  inner = _inner_for_tasks(spec, state, t, len(leaves), params)
  acc = acc_dtype(jnp.result_type(*leaves))
  c = task_weight_vector(spec.name, task_weights, t, acc)
  if spec.gram_free:
    outs, new_state = _fixed_step(spec, leaves, state, inner, c, acc)
  else:
    outs, new_state = _gram_step(spec, leaves, state, inner, c, acc)
  return jax.tree.unflatten(treedef, outs), new_state


def _inner_for_tasks(spec: _Spec, state: SurgeryState, t: int, k: int,
                     params):
  """The method state for ``T`` tasks: as stored, or (first update of a
  transform built without ``num_tasks``) freshly initialised."""
  if state.weights.shape == (t,):
    return state.inner
  if spec.num_tasks is None and state.weights.shape == (0,):
    warnings.warn(
        f"surgery.{spec.name} was built without num_tasks; its state changes "
        f"shape on the first update (T={t}). Pass num_tasks={t} for a "
        "fixed-shape state (lax.scan, donation, checkpoint restore).",
        stacklevel=5)
    return _init_inner(spec, t, k, params)
  raise ValueError(
      f"surgery.{spec.name}: state was initialised for "
      f"{state.weights.shape[0]} tasks but the updates have {t}. "
      f"{ACCUMULATION_HINT}")


def _fixed_step(spec: _Spec, leaves, state: SurgeryState, inner, c, acc):
  """Gradient-independent weights, no Gram matrix: one pass per leaf.

  NaN/inf stay in their coordinates (as NaN); the input is never inspected,
  so every update is counted.
  """
  t = leaves[0].shape[0]
  scale = float(spec.fixed_scale(t))
  w = jnp.full((t,), scale, acc) if c is None else c * scale
  outs = []
  for leaf in leaves:
    o = combine(w, leaf)
    outs.append(jnp.where(jnp.isfinite(o), o, jnp.asarray(jnp.nan, o.dtype)))
  new_state = state._replace(
      count=optax.safe_increment(state.count),
      key=None if state.key is None else jax.random.split(state.key)[0],
      weights=w.astype(jnp.float32),
      norm_ratio=jnp.asarray(scale, jnp.float32), inner=inner)
  return outs, new_state


def _gram_step(spec: _Spec, leaves, state: SurgeryState, inner, c, acc):
  """Gram matrix -> weights -> (rescale) -> combination -> state."""
  raw = gram_stats(leaves, spec.leafwise)
  st = with_task_weights(raw, c)
  if state.key is None:
    new_key = step_key = None
  else:
    new_key, step_key = jax.random.split(state.key)
  w, new_inner = _method_weights(spec, st, step_key, inner, state.count, acc)
  sum_norm2, out_norm2 = _squared_norms(spec, st, w)
  if spec.rescale_to_sum_norm:
    w, out_norm2 = _rescale_to_sum_norm(w, sum_norm2, out_norm2, spec.eps)
  weights = w if c is None else w * c
  bad = st.bad | ~jnp.all(jnp.isfinite(weights))
  weights = jnp.where(bad, jnp.nan, weights)
  outs, mean_weights = _combine_leaves(spec, weights, leaves, acc)
  new_state = SurgeryState(
      # A rejected (non-finite) step must neither poison nor shift the
      # method's state.
      count=_unless(bad, state.count, optax.safe_increment(state.count)),
      key=None if new_key is None else jnp.where(bad, state.key, new_key),
      inner=_unless(bad, inner, new_inner),
      weights=mean_weights.astype(jnp.float32),
      norm_ratio=_norm_ratio(sum_norm2, out_norm2, bad),
      **_diagnostic_fields(spec, raw))
  return outs, new_state


def _method_weights(spec: _Spec, st: GramStats, step_key, inner, count, acc):
  """The weighting's ``(weights, new_inner)`` for the scaled gradients."""
  t = st.norms.shape[0]
  if spec.fixed_scale is not None:  # here only for the diagnostics
    return jnp.full((t,), float(spec.fixed_scale(t)), acc), inner
  w, new_inner = spec.weighting(WeightingContext(
      cosine=st.cosine, norms=st.norms, max_norm=st.max_norm,
      leaf_cosine=st.leaf_cosine, leaf_norms=st.leaf_norms,
      key=step_key, inner=inner, count=count))
  return w.astype(acc), new_inner


def _squared_norms(spec: _Spec, st: GramStats, w):
  """``||sum_t c_t g_t||^2`` and ``||out||^2``, over ``max_norm**2``."""
  gram = st.gram
  if spec.leafwise:
    out_norm2 = jnp.einsum("kt,kts,ks->", w, st.leaf_grams, w)
  else:
    out_norm2 = w @ gram @ w
  return jnp.sum(gram), out_norm2


def _rescale_to_sum_norm(w, sum_norm2, out_norm2, eps):
  ok = out_norm2 > eps  # the largest squared task norm is 1 here
  factor = jnp.where(
      ok, jnp.sqrt(jnp.maximum(sum_norm2, 0.0)
                   / jnp.where(ok, out_norm2, 1.0)), 0.0)
  return w * factor, out_norm2 * factor**2


def _combine_leaves(spec: _Spec, weights, leaves, acc):
  """The output leaves and the (parameter-count-weighted) mean weights."""
  if not spec.leafwise:
    return [combine(weights, leaf) for leaf in leaves], weights
  outs = [combine(weights[i], leaf) for i, leaf in enumerate(leaves)]
  sizes = jnp.asarray([np.prod(leaf.shape[1:]) for leaf in leaves], acc)
  return outs, (sizes / jnp.sum(sizes)) @ weights


def _unless(bad, old, new):
  """``old`` where ``bad``, else ``new`` (pytrees of arrays)."""
  return jax.tree.map(lambda n, o: jnp.where(bad, o, n.astype(o.dtype)),
                      new, old)


def _norm_ratio(sum_norm2, out_norm2, bad):
  pos = sum_norm2 > 0
  ratio = jnp.where(pos, jnp.sqrt(jnp.maximum(out_norm2, 0.0)
                                  / jnp.where(pos, sum_norm2, 1.0)), 1.0)
  return jnp.where(bad, jnp.nan, ratio).astype(jnp.float32)


def _diagnostic_fields(spec: _Spec, raw: GramStats) -> dict[str, Any]:
  if not spec.diagnostics:
    return dict(cosine=None, num_conflicts=None, task_norms=None)
  return dict(
      cosine=jnp.where(raw.bad, jnp.nan, raw.cosine).astype(jnp.float32),
      num_conflicts=num_conflicts(raw.cosine),
      task_norms=jnp.where(raw.bad, jnp.nan,
                           raw.norms * raw.max_norm).astype(jnp.float32))
