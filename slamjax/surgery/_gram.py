"""The task Gram matrix and its scale-free split into norms and cosines.

``G[s, t] = <g_s, g_t>`` summed over the leaves (:mod:`._kernels`), then
split as ``G = max_norm**2 * cosine * outer(norms, norms)`` with ``norms``
relative to the largest, so that the solvers never see squared norms that
differ by 1e12. When ``G`` would overflow or underflow in float32 the tasks
are first divided by powers of two (exact), and the Gram matrix is formed
again.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from slamjax.surgery._kernels import acc_dtype, leaf_gram, plain_leaf_gram
from slamjax.surgery._validation import check_task_axis


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
  leaves, _, t = check_task_axis("gram_matrix", task_updates, None, None)
  if t is None:
    raise ValueError("surgery.gram_matrix: the update tree has no leaves.")
  acc = acc_dtype(jnp.result_type(*leaves))
  return sum(leaf_gram(leaf).astype(acc) for leaf in leaves)


class GramStats(NamedTuple):
  """Scale-free split of the Gram matrix (see ``WeightingContext``)."""
  cosine: jax.Array       # (T, T)
  norms: jax.Array        # (T,) relative to max_norm
  max_norm: jax.Array     # ()
  leaf_cosine: Optional[jax.Array]  # (K, T, T) if leafwise
  leaf_norms: Optional[jax.Array]   # (K, T) relative to max_norm
  bad: jax.Array          # () bool: non-finite input

  @property
  def gram(self) -> jax.Array:
    """``G / max_norm**2``."""
    return self.cosine * self.norms[:, None] * self.norms[None, :]

  @property
  def leaf_grams(self) -> jax.Array:
    """``(K, T, T)`` per-leaf ``G / max_norm**2`` (leafwise stats only)."""
    n = self.leaf_norms
    return self.leaf_cosine * n[:, :, None] * n[:, None, :]


def _cos_and_norms(g):
  ns = jnp.sqrt(jnp.maximum(jnp.diagonal(g, axis1=-2, axis2=-1), 0.0))
  nz = ns > 0
  both = nz[..., :, None] & nz[..., None, :]
  denom = jnp.where(both, ns[..., :, None] * ns[..., None, :], 1.0)
  cos = jnp.clip(jnp.where(both, g / denom, 0.0), -1.0, 1.0)
  eye = jnp.eye(g.shape[-1], dtype=bool)
  return jnp.where(eye & both, 1.0, cos), ns


def _rescaled_grams(leaves, t: int, acc, leafwise: bool):
  """Per-task power-of-two scales ``s`` and the Gram matrices of ``g / s``."""
  amax = jnp.max(jnp.stack([
      jnp.max(jnp.abs(leaf.astype(acc)), axis=tuple(range(1, leaf.ndim)))
      if leaf.ndim > 1 else jnp.abs(leaf.astype(acc)) for leaf in leaves]),
                 axis=0)
  ok = jnp.isfinite(amax) & (amax > 0)
  _, e = jnp.frexp(jnp.where(ok, amax, 1.0))
  s = jnp.where(ok, jnp.ldexp(jnp.ones((), acc), e), 1.0).astype(acc)
  s = jnp.where(jnp.isfinite(amax), s, jnp.nan)
  grams = [plain_leaf_gram(leaf.astype(acc) / s.reshape(t, *[1] * (
      leaf.ndim - 1))) for leaf in leaves]
  stacked = jnp.stack(grams) if leafwise else jnp.zeros((0, t, t), acc)
  return sum(grams), stacked, s


def gram_stats(leaves, leafwise: bool) -> GramStats:
  """Forms the Gram matrix of ``leaves`` and splits it (module docstring)."""
  t = leaves[0].shape[0]
  acc = acc_dtype(jnp.result_type(*leaves))
  grams = [leaf_gram(leaf).astype(acc) for leaf in leaves]
  gram = sum(grams)
  size = sum(int(np.prod(leaf.shape[1:])) for leaf in leaves)
  fi = jnp.finfo(acc)
  # Squared norms below `lo` may have lost relative precision to underflowing
  # products; anything non-finite is an overflow or a non-finite input.
  lo = float(fi.tiny) / float(fi.eps) * max(size, 1)
  diag = jnp.diagonal(gram)
  safe = jnp.all(jnp.isfinite(gram)) & jnp.all(diag >= lo)
  stacked = jnp.stack(grams) if leafwise else jnp.zeros((0, t, t), acc)
  # The rescaled branch only runs for extreme (or zero, or non-finite)
  # gradients.
  g, lg, s = jax.lax.cond(
      safe, lambda _: (gram, stacked, jnp.ones((t,), acc)),
      lambda _: _rescaled_grams(leaves, t, acc, leafwise), None)
  bad = ~(jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(s)))
  cos, ns = _cos_and_norms(g)
  smax = jnp.max(s)
  rel = s / smax                      # powers of two, <= 1
  r = ns * rel
  rmax = jnp.max(r)
  pos = rmax > 0
  inv = jnp.where(pos, 1.0 / jnp.where(pos, rmax, 1.0), 0.0)
  leaf_cos = leaf_norms = None
  if leafwise:
    leaf_cos, lns = _cos_and_norms(lg)
    leaf_norms = lns * rel[None, :] * inv
  return GramStats(cos, r * inv, rmax * smax, leaf_cos, leaf_norms, bad)


def with_task_weights(st: GramStats, c: Optional[jax.Array]) -> GramStats:
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
  return GramStats(st.cosine * ss, n * inv, st.max_norm * m, leaf_cos,
                   leaf_norms, bad)


def num_conflicts(cos: jax.Array) -> jax.Array:
  """int32 number of pairs ``i < j`` with a negative cosine."""
  t = cos.shape[0]
  upper = jnp.triu(jnp.ones((t, t), bool), k=1)
  return jnp.sum((cos < 0) & upper).astype(jnp.int32)
