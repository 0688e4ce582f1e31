"""Shared machinery: input validation, the task Gram matrix, the optax shell.

Every method in :mod:`slamjax.surgery` is a *weighting of the task Gram
matrix*. Given per-task gradients ``g_1..g_T`` (stacked on a leading task axis
of every leaf of ``updates``) the shell

1. validates the task axis,
2. computes ``G[s, t] = <g_s, g_t>`` (float32 or wider accumulation) and
   splits it into task norms and cosines, so the solvers never see squared
   norms that differ by 1e12 (and float32 never overflows: when ``G`` would,
   or would underflow, the tasks are first divided by powers of two),
3. asks the method for task weights ``w`` (a pure function of the tiny
   ``T x T`` problem, plus a PRNG key and a small method state),
4. combines every leaf once: ``out = sum_t w_t g_t``.

No per-task copy of the gradients is ever made; the only ``O(T * |params|)``
work is the Gram matrix and the final combination. Methods whose weights do
not depend on the gradients (``sum_tasks``, ``mean_tasks``) skip step 2
unless diagnostics are asked for.

Non-finite policy (every method): a NaN or inf anywhere in the updates makes
the output NaN, so that ``optax.apply_if_finite`` (or
:func:`slamjax.surgery.apply_if_finite`) rejects the step. Methods that mix
coordinates (all but sum and mean) return NaN everywhere; sum and mean
return NaN in the affected coordinates (an inf becomes NaN too). The
method's own state (GradVac targets, Nash-MTL weights) is left as it was, so
a rejected step does not poison the next ones.
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
    "apply_if_finite",
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

  Read the diagnostics with :func:`slamjax.surgery.diagnostics`. The
  Gram-derived fields (``cosine``, ``num_conflicts``, ``task_norms``) are
  ``None`` when the transform was built with ``diagnostics=False`` (the
  default of ``sum_tasks``/``mean_tasks``, which then never form the Gram
  matrix); the other methods form it anyway and fill them for free.

  Attributes:
    count: int32 number of updates applied so far.
    key: PRNG key for methods with a random task order (split on every
      update), else ``None``.
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
    count: int32 number of previous updates.
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

  @property
  def leaf_grams(self) -> Optional[jax.Array]:
    """``(K, T, T)`` per-leaf Gram matrices over ``max_norm**2``, or None."""
    if self.leaf_cosine is None:
      return None
    n = self.leaf_norms
    return self.leaf_cosine * n[:, :, None] * n[:, None, :]


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
  return [jnp.asarray(leaf) for _, leaf in with_path], treedef, t


def _replicated_out_sharding():
  """``P()`` under a mesh with Explicit axes (JAX's default since 0.9), where
  contracting sharded parameter dimensions must name the output sharding;
  ``None`` otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not any(t == jax.sharding.AxisType.Explicit
                           for t in mesh.axis_types):
    return None
  return jax.sharding.PartitionSpec()


# Leaves at least this large take the chunked CPU path of _leaf_gram.
_CHUNKED_MIN_SIZE = 1 << 15
_CHUNKS = 16
_BROADCAST_MAX_TASKS = 10


def _tree_sum(terms):
  while len(terms) > 1:
    terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i]
             for i in range(0, len(terms), 2)]
  return terms[0]


def _chunked_gram(m: jax.Array, chunks: int) -> jax.Array:
  """``m @ m.T`` for a ``(T, n)`` matrix with elementwise ops only.

  XLA:CPU runs ``(T x n) @ (n x T)`` with tiny ``T`` and long reductions
  to a scalar an order of magnitude below memory bandwidth (measured: 5-10x
  slower than PyTorch's matmul for ResNet-18 gradients). Summing the
  ``chunks`` slices of every row pairwise first is a plain vectorised loop
  fusion; only ``n / chunks**2`` elements per pair are left to a reduction.
  """
  t, n = m.shape
  mm = m.reshape(t, chunks, n // chunks)
  p = _tree_sum([mm[:, a, None, :] * mm[None, :, a, :] for a in range(chunks)])
  p = jax.lax.optimization_barrier(p)  # keep the reduction out of the fusion
  r = p.shape[-1]
  k = chunks
  while r % k:
    k //= 2
  q = _tree_sum(list(jnp.moveaxis(p.reshape(t, t, k, r // k), 2, 0)))
  return jnp.sum(q, axis=-1)


def _broadcast_gram(m: jax.Array, block: int) -> jax.Array:
  """``m @ m.T`` for a ``(T, n)`` matrix as one fused product-and-reduce.

  Every pair's products are summed over ``block``-wide rows: XLA:CPU fuses
  the broadcast product into a reduction over the minor axis, which runs near
  memory bandwidth (T=5, ResNet-18 gradients: 43 ms against 96 ms for
  :func:`_chunked_gram` and 300-500 ms for ``dot_general``).
  """
  t, n = m.shape
  mm = m.reshape(t, n // block, block)
  return jnp.sum(mm[:, None] * mm[None, :], axis=(-2, -1))


def _block_size(n: int) -> int:
  """The largest power of two up to 1024 dividing ``n`` (0 if below 128)."""
  b = 1024
  while b >= 128 and n % b:
    b //= 2
  return b if b >= 128 else 0


def _leaf_gram(leaf: jax.Array) -> jax.Array:
  """``(T, T)`` Gram matrix of one leaf, accumulated in float32 or wider."""
  acc = _acc_dtype(leaf.dtype)
  t = leaf.shape[0]
  n = int(np.prod(leaf.shape[1:], dtype=np.int64))
  on_cpu = jax.default_backend() == "cpu" and _replicated_out_sharding() is None
  if on_cpu and n >= _CHUNKED_MIN_SIZE:
    # Measured on ResNet-18 gradients (benchmarks/surgery_vs_torchjd.py):
    # the chunked form is fastest at T=2, the broadcast form at T=3-10.
    if t == 2 and n % (_CHUNKS * _CHUNKS) == 0:
      return _chunked_gram(leaf.reshape(t, n).astype(acc), _CHUNKS)
    block = _block_size(n)
    if 3 <= t <= _BROADCAST_MAX_TASKS and block:
      return _broadcast_gram(leaf.reshape(t, n).astype(acc), block)
  # Contract every parameter dimension directly (no reshape, which could
  # fight a parameter sharding); the T x T result is replicated.
  dims = tuple(range(1, leaf.ndim))
  return jax.lax.dot_general(
      leaf, leaf, ((dims, dims), ((), ())), preferred_element_type=acc,
      out_sharding=_replicated_out_sharding())


def _plain_leaf_gram(leaf: jax.Array) -> jax.Array:
  dims = tuple(range(1, leaf.ndim))
  return jax.lax.dot_general(
      leaf, leaf, ((dims, dims), ((), ())),
      preferred_element_type=_acc_dtype(leaf.dtype),
      out_sharding=_replicated_out_sharding())


def gram_matrix(task_updates: Any) -> jax.Array:
  """Task Gram matrix ``G[s, t] = <g_s, g_t>`` of stacked per-task gradients.

  The same contractions as the surgery transforms use (float32 or wider
  accumulation; no copies), so under one ``jit`` XLA computes them once for
  both. Raw, unscaled: in float32 it overflows for gradients of about 1e19
  and loses the tasks below about 1e-19 (the transforms themselves rescale
  in that case).

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
  acc = _acc_dtype(jnp.result_type(*leaves))
  return sum(_leaf_gram(leaf).astype(acc) for leaf in leaves)


class _Stats(NamedTuple):
  """Scale-free split of the Gram matrix (see :class:`WeightingContext`)."""
  cosine: jax.Array       # (T, T)
  norms: jax.Array        # (T,) relative to max_norm
  max_norm: jax.Array     # ()
  leaf_cosine: Optional[jax.Array]
  leaf_norms: Optional[jax.Array]
  bad: jax.Array          # () bool: non-finite input


def _cos_and_norms(g):
  ns = jnp.sqrt(jnp.maximum(jnp.diagonal(g, axis1=-2, axis2=-1), 0.0))
  nz = ns > 0
  both = nz[..., :, None] & nz[..., None, :]
  denom = jnp.where(both, ns[..., :, None] * ns[..., None, :], 1.0)
  cos = jnp.clip(jnp.where(both, g / denom, 0.0), -1.0, 1.0)
  eye = jnp.eye(g.shape[-1], dtype=bool)
  return jnp.where(eye & both, 1.0, cos), ns


def _gram_stats(leaves, leafwise: bool) -> _Stats:
  t = leaves[0].shape[0]
  acc = _acc_dtype(jnp.result_type(*leaves))
  grams = [_leaf_gram(leaf).astype(acc) for leaf in leaves]
  gram = sum(grams)
  size = sum(int(np.prod(leaf.shape[1:])) for leaf in leaves)
  fi = jnp.finfo(acc)
  # Squared norms below `lo` may have lost relative precision to underflowing
  # products; anything non-finite is an overflow or a non-finite input.
  lo = float(fi.tiny) / float(fi.eps) * max(size, 1)
  diag = jnp.diagonal(gram)
  safe = jnp.all(jnp.isfinite(gram)) & jnp.all(diag >= lo)
  stacked = jnp.stack(grams) if leafwise else jnp.zeros((0, t, t), acc)

  def fast(_):
    return gram, stacked, jnp.ones((t,), acc)

  def rescaled(_):
    # Divide every task by a power of two near its largest entry (exact),
    # then form the Gram matrix again. Only runs for extreme (or zero, or
    # non-finite) gradients.
    amax = jnp.max(jnp.stack([
        jnp.max(jnp.abs(leaf.astype(acc)), axis=tuple(range(1, leaf.ndim)))
        if leaf.ndim > 1 else jnp.abs(leaf.astype(acc)) for leaf in leaves]),
                   axis=0)
    ok = jnp.isfinite(amax) & (amax > 0)
    _, e = jnp.frexp(jnp.where(ok, amax, 1.0))
    s = jnp.where(ok, jnp.ldexp(jnp.ones((), acc), e), 1.0).astype(acc)
    s = jnp.where(jnp.isfinite(amax), s, jnp.nan)
    g2 = [_plain_leaf_gram(leaf.astype(acc) / s.reshape(t, *[1] * (
        leaf.ndim - 1))) for leaf in leaves]
    st = jnp.stack(g2) if leafwise else jnp.zeros((0, t, t), acc)
    return sum(g2), st, s

  g, lg, s = jax.lax.cond(safe, fast, rescaled, None)
  bad = ~(jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(s)))
  cos, ns = _cos_and_norms(g)
  smax = jnp.max(s)
  rel = s / smax                      # powers of two, <= 1
  r = ns * rel
  rmax = jnp.max(r)
  pos = rmax > 0
  inv = jnp.where(pos, 1.0 / jnp.where(pos, rmax, 1.0), 0.0)
  norms = r * inv
  leaf_cos = leaf_norms = None
  if leafwise:
    leaf_cos, lns = _cos_and_norms(lg)
    leaf_norms = lns * rel[None, :] * inv
  return _Stats(cos, norms, rmax * smax, leaf_cos, leaf_norms, bad)


def _with_task_weights(st: _Stats, c: Optional[jax.Array]) -> _Stats:
  """The stats of ``c_t g_t`` (signs flip cosines; ``|c|`` scales norms)."""
  if c is None:
    return st
  sg = jnp.sign(c)
  ss = sg[:, None] * sg[None, :]
  n = st.norms * jnp.abs(c)
  m = jnp.max(n)
  pos = m > 0
  inv = jnp.where(pos, 1.0 / jnp.where(pos, m, 1.0), 0.0)
  leaf_cos = leaf_norms = None
  if st.leaf_cosine is not None:
    leaf_cos = st.leaf_cosine * ss
    leaf_norms = st.leaf_norms * jnp.abs(c) * inv
  bad = st.bad | ~jnp.all(jnp.isfinite(c))
  return _Stats(st.cosine * ss, n * inv, st.max_norm * m, leaf_cos,
                leaf_norms, bad)


def _combine(weights: jax.Array, leaf: jax.Array) -> jax.Array:
  """``sum_t weights[t] * leaf[t]`` in the accumulation dtype.

  Written as ``T`` fused multiply-adds instead of ``tensordot``: one
  vectorised pass over the leaf on every backend, where XLA:CPU's dot or
  reduce over a short leading axis is several times slower.
  """
  acc = _acc_dtype(leaf.dtype)
  t = leaf.shape[0]
  w = weights.astype(acc)
  if t > 16:
    return jnp.tensordot(w, leaf.astype(acc), axes=1).astype(leaf.dtype)
  return _tree_sum([w[i] * leaf[i].astype(acc) for i in range(t)]).astype(
      leaf.dtype)


def _num_conflicts(cos: jax.Array) -> jax.Array:
  t = cos.shape[0]
  upper = jnp.triu(jnp.ones((t, t), bool), k=1)
  return jnp.sum((cos < 0) & upper).astype(jnp.int32)


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
  return _acc_dtype(jnp.result_type(*leaves))


def _cast_floating(tree, dtype):
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree)


# ----------------------------------------------------------------------------
# The optax shell.
# ----------------------------------------------------------------------------


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
  update and leave the method's state unchanged (module docstring).

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
    task gradients: ``g_t <- task_weights[t] * g_t``).

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
  if init_inner is None:
    init_inner = lambda t, k: ()
  random = key is not None
  key0 = _as_key(key) if random else None
  fixed = fixed_scale is not None

  def empty_diag(t):
    if not diagnostics:
      return None, None, None
    return (jnp.zeros((t, t), jnp.float32), jnp.zeros((), jnp.int32),
            jnp.zeros((t,), jnp.float32))

  def init_fn(params):
    k = len(jax.tree.leaves(params))
    t = 0 if num_tasks is None else int(num_tasks)
    cos, nc, norms = empty_diag(t)
    return SurgeryState(
        count=jnp.zeros((), jnp.int32), key=key0, cosine=cos,
        num_conflicts=nc, weights=jnp.zeros((t,), jnp.float32),
        norm_ratio=jnp.ones((), jnp.float32), task_norms=norms,
        inner=_cast_floating(init_inner(t, k), _state_dtype(params)))

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
      inner = _cast_floating(init_inner(t, k), _state_dtype(params))
    acc = _acc_dtype(jnp.result_type(*leaves))
    c = None
    if task_weights is not None:
      c = jnp.asarray(task_weights, acc)
      if c.shape != (t,):
        raise ValueError(
            f"surgery.{name}: task_weights has shape {c.shape}, expected "
            f"({t},).")
    if random:
      new_key, step_key = jax.random.split(state.key)
    else:
      new_key = step_key = None

    if fixed and not diagnostics:
      # No Gram matrix: the weights are known; NaN/inf stay where they are.
      scale = float(fixed_scale(t))
      w = jnp.full((t,), scale, acc) if c is None else c * scale
      outs = []
      for leaf in leaves:
        o = _combine(w, leaf)
        outs.append(jnp.where(jnp.isfinite(o), o, jnp.asarray(jnp.nan, o.dtype)))
      new_state = state._replace(
          count=optax.safe_increment(state.count), key=new_key,
          weights=w.astype(jnp.float32),
          norm_ratio=jnp.asarray(scale, jnp.float32), inner=inner)
      return jax.tree.unflatten(treedef, outs), new_state

    raw = _gram_stats(leaves, leafwise)
    st = _with_task_weights(raw, c)
    gram = st.cosine * st.norms[:, None] * st.norms[None, :]
    if fixed:
      w_scaled = jnp.full((t,), float(fixed_scale(t)), acc)
      new_inner = inner
    else:
      w_scaled, new_inner = weighting(WeightingContext(
          cosine=st.cosine, norms=st.norms, max_norm=st.max_norm,
          leaf_cosine=st.leaf_cosine, leaf_norms=st.leaf_norms,
          key=step_key, inner=inner, count=state.count))
      w_scaled = w_scaled.astype(acc)

    sum_norm2 = jnp.sum(gram)
    if leafwise:
      lg = st.leaf_cosine * st.leaf_norms[:, :, None] * st.leaf_norms[:, None, :]
      out_norm2 = jnp.einsum("kt,kts,ks->", w_scaled, lg, w_scaled)
    else:
      out_norm2 = w_scaled @ gram @ w_scaled
    if rescale_to_sum_norm:
      ok = out_norm2 > eps  # the largest squared task norm is 1 here
      factor = jnp.where(
          ok, jnp.sqrt(jnp.maximum(sum_norm2, 0.0) / jnp.where(ok, out_norm2,
                                                               1.0)), 0.0)
      w_scaled = w_scaled * factor
      out_norm2 = out_norm2 * factor**2
    weights = w_scaled if c is None else w_scaled * c
    bad = st.bad | ~jnp.all(jnp.isfinite(weights))
    weights = jnp.where(bad, jnp.nan, weights)

    if leafwise:
      out_leaves = [_combine(weights[i], leaf)
                    for i, leaf in enumerate(leaves)]
      sizes = jnp.asarray([np.prod(leaf.shape[1:]) for leaf in leaves], acc)
      mean_weights = (sizes / jnp.sum(sizes)) @ weights
    else:
      out_leaves = [_combine(weights, leaf) for leaf in leaves]
      mean_weights = weights

    # A rejected (non-finite) step must not poison the method's state.
    new_inner = jax.tree.map(
        lambda new, old: jnp.where(bad, old, new.astype(old.dtype)),
        new_inner, inner)
    pos = sum_norm2 > 0
    ratio = jnp.where(pos, jnp.sqrt(jnp.maximum(out_norm2, 0.0)
                                    / jnp.where(pos, sum_norm2, 1.0)), 1.0)
    ratio = jnp.where(bad, jnp.nan, ratio)
    if diagnostics:
      cos = jnp.where(raw.bad, jnp.nan, raw.cosine)
      diag_fields = dict(
          cosine=cos.astype(jnp.float32),
          num_conflicts=_num_conflicts(raw.cosine),
          task_norms=jnp.where(raw.bad, jnp.nan,
                               raw.norms * raw.max_norm).astype(jnp.float32))
    else:
      diag_fields = dict(cosine=None, num_conflicts=None, task_norms=None)
    new_state = SurgeryState(
        count=optax.safe_increment(state.count), key=new_key,
        weights=mean_weights.astype(jnp.float32),
        norm_ratio=ratio.astype(jnp.float32), inner=new_inner, **diag_fields)
    return jax.tree.unflatten(treedef, out_leaves), new_state

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


def reduce_tasks(reduction: str = "sum") -> optax.GradientTransformationExtraArgs:
  """Stateless reduction of the task axis (no diagnostics, no Gram matrix).

  Non-finite entries give NaN in the same coordinates (module docstring).

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
    out = []
    for leaf in leaves:
      o = _combine(w, leaf)
      out.append(jnp.where(jnp.isfinite(o), o, jnp.asarray(jnp.nan, o.dtype)))
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
  out = {"weights": s.weights, "norm_ratio": s.norm_ratio}
  if s.cosine is None:  # built with diagnostics=False
    return out
  t = s.cosine.shape[0]
  if t >= 2:
    iu = np.triu_indices(t, k=1)
    pairs = s.cosine[iu]
    cos_mean, cos_min = jnp.mean(pairs), jnp.min(pairs)
  else:
    cos_mean = cos_min = jnp.zeros((), jnp.float32)
  return {"cos_mean": cos_mean, "cos_min": cos_min, "cosine": s.cosine,
          "num_conflicts": s.num_conflicts, **out}


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
    ``SurgeryState.task_norms``.) A transform built with
    ``diagnostics=False`` (the default of ``sum_tasks``/``mean_tasks``)
    gives only ``weights`` and ``norm_ratio``. With several surgery states
    the keys of the
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
    >>> int(d['num_conflicts']), [round(float(w), 4) for w in d['weights']]
    (1, [2.0, 1.5])
  """
  states = _find_states(opt_state)
  if len(states) == 1:
    return _state_diagnostics(states[0])
  out = {}
  for i, s in enumerate(states):
    out.update({f"{i}/{k}": v for k, v in _state_diagnostics(s).items()})
  return out
