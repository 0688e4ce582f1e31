"""The two passes over the gradients: per-leaf Gram matrices, combination.

These are the only ``O(T * |params|)`` operations of a surgery transform:
``leaf_gram`` reads every leaf once to form its ``(T, T)`` Gram matrix and
``combine`` reads it once more to form ``sum_t w_t g_t``. Both accumulate in
float32 or wider and pick, on XLA:CPU, forms measured to run near memory
bandwidth (``benchmarks/surgery_vs_torchjd.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Leaves at least this large take the chunked or broadcast CPU path.
_CHUNKED_MIN_SIZE = 1 << 15
_CHUNKS = 16
_BROADCAST_MAX_TASKS = 10
# Above this many tasks, combine() uses tensordot instead of T multiply-adds.
_UNROLL_MAX_TASKS = 16


def acc_dtype(dtype) -> jnp.dtype:
  """The accumulation dtype for ``dtype``: float32 or wider."""
  return jnp.promote_types(dtype, jnp.float32)


def tree_sum(terms):
  """Pairwise (tree) sum of a non-empty list of arrays."""
  while len(terms) > 1:
    terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i]
             for i in range(0, len(terms), 2)]
  return terms[0]


def replicated_out_sharding():
  """``P()`` under a mesh with Explicit axes (JAX's default since 0.9), where
  contracting sharded parameter dimensions must name the output sharding;
  ``None`` otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not any(t == jax.sharding.AxisType.Explicit
                           for t in mesh.axis_types):
    return None
  return jax.sharding.PartitionSpec()


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
  p = tree_sum([mm[:, a, None, :] * mm[None, :, a, :] for a in range(chunks)])
  p = jax.lax.optimization_barrier(p)  # keep the reduction out of the fusion
  r = p.shape[-1]
  k = chunks
  while r % k:
    k //= 2
  q = tree_sum(list(jnp.moveaxis(p.reshape(t, t, k, r // k), 2, 0)))
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


def plain_leaf_gram(leaf: jax.Array) -> jax.Array:
  """``(T, T)`` Gram matrix of one leaf as one ``dot_general``.

  Contracts every parameter dimension directly (no reshape, which could
  fight a parameter sharding); the result is replicated.
  """
  dims = tuple(range(1, leaf.ndim))
  return jax.lax.dot_general(
      leaf, leaf, ((dims, dims), ((), ())),
      preferred_element_type=acc_dtype(leaf.dtype),
      out_sharding=replicated_out_sharding())


def leaf_gram(leaf: jax.Array) -> jax.Array:
  """``(T, T)`` Gram matrix of one leaf, in the fastest form for the backend."""
  acc = acc_dtype(leaf.dtype)
  t = leaf.shape[0]
  n = int(np.prod(leaf.shape[1:], dtype=np.int64))
  on_cpu = jax.default_backend() == "cpu" and replicated_out_sharding() is None
  if on_cpu and n >= _CHUNKED_MIN_SIZE:
    # Measured on ResNet-18 gradients (benchmarks/surgery_vs_torchjd.py):
    # the chunked form is fastest at T=2, the broadcast form at T=3-10.
    if t == 2 and n % (_CHUNKS * _CHUNKS) == 0:
      return _chunked_gram(leaf.reshape(t, n).astype(acc), _CHUNKS)
    block = _block_size(n)
    if 3 <= t <= _BROADCAST_MAX_TASKS and block:
      return _broadcast_gram(leaf.reshape(t, n).astype(acc), block)
  return plain_leaf_gram(leaf)


def combine(weights: jax.Array, leaf: jax.Array) -> jax.Array:
  """``sum_t weights[t] * leaf[t]``, accumulated in float32 or wider.

  Written as ``T`` fused multiply-adds instead of ``tensordot``: one
  vectorised pass over the leaf on every backend, where XLA:CPU's dot or
  reduce over a short leading axis is several times slower. The result has
  the leaf's dtype.
  """
  acc = acc_dtype(leaf.dtype)
  t = leaf.shape[0]
  w = weights.astype(acc)
  if t > _UNROLL_MAX_TASKS:
    return jnp.tensordot(w, leaf.astype(acc), axes=1).astype(leaf.dtype)
  return tree_sum([w[i] * leaf[i].astype(acc) for i in range(t)]).astype(
      leaf.dtype)
