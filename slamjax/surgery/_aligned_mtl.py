"""Aligned-MTL (Senushkin et al., CVPR 2023): align the gradient system."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slamjax.surgery._weighted import gram_weighted


# Eigenvalues within this factor (times T * eps) of their own rounding scale
# count as zero; see aligned_mtl_weights.
_RANK_MARGIN = 100


def aligned_mtl_weights(gram: jax.Array, pref: Optional[jax.Array] = None,
                        scale_mode: str = "min") -> jax.Array:
  """``w = B pref``, ``B = sqrt(sigma) V diag(lambda^-1/2) V^T`` on the rank.

  The tasks are sorted by norm (largest first) before ``eigh``, which then
  resolves the small eigenvalues of small tasks to their own precision and
  sees the same matrix whatever the task order. An eigenvalue ``lambda_k``
  (eigenvector ``v_k``) counts as zero when ``lambda_k <= 100 T eps (sum_t
  |v_tk| ||g_t|| + eps max_t ||g_t||)^2``: the bracket is the scale of its
  rounding error, so nearly dependent tasks are dropped at any norm while
  small independent tasks are kept.
  """
  t = gram.shape[0]
  dtype = gram.dtype
  eps = jnp.finfo(dtype).eps
  if pref is None:
    pref = jnp.ones((t,), dtype)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  order = jnp.argsort(norms, descending=True, stable=True)
  lam, v = jnp.linalg.eigh(gram[order][:, order])  # ascending
  err_scale = (jnp.abs(v).T @ norms[order] + eps * jnp.max(norms))**2
  keep = lam > _RANK_MARGIN * t * eps * err_scale
  rank = jnp.sum(keep)
  inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
  kept = jnp.sort(jnp.where(keep, lam, jnp.inf))  # kept ones first
  if scale_mode == "min":
    sigma = kept[0]
  elif scale_mode == "median":  # lower median of the kept eigenvalues
    sigma = kept[jnp.maximum(rank - 1, 0) // 2]
  elif scale_mode == "rmse":  # torchjd's name: mean of the kept eigenvalues
    sigma = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(rank, 1)
  else:
    raise ValueError(f"aligned_mtl: scale_mode must be 'min', 'median' or "
                     f"'rmse', got {scale_mode!r}.")
  sigma = jnp.where(rank > 0, sigma, 0.0)
  b = jnp.sqrt(sigma) * (v * inv_sqrt) @ v.T
  back = jnp.argsort(order)
  return b[back][:, back] @ jnp.asarray(pref, dtype)


def aligned_mtl(*, pref: Optional[Sequence[float]] = None,
                scale_mode: str = "min", num_tasks: Optional[int] = None,
                diagnostics: bool = True) -> optax.GradientTransformationExtraArgs:
  """Aligned-MTL: make the task gradients orthogonal with equal norms.

  Senushkin et al., "Independent Component Alignment for Multi-Task
  Learning" (CVPR 2023). With the gradient matrix ``J^T = U S V^T`` (thin
  SVD, rank ``r``), the aligned gradients are ``sigma U V^T`` (all singular
  values set to ``sigma``: the smallest non-zero one by default) and ``out =
  sigma U V^T pref = J^T B pref`` with ``B = sqrt(lambda_min) V
  diag(lambda^-1/2) V^T`` from the eigendecomposition of ``G``.

  Rank cut-off. The tasks are sorted by norm before ``eigh`` (a task 1e4
  times smaller than the others is then resolved, not dropped), and an
  eigenvalue counts as zero below ``100 T eps (sum_t |v_t| ||g_t||)^2``,
  ``v`` its eigenvector (the scale of its rounding error). LibMTL's and
  torchjd's ``max(lambda) T eps`` falls among the rounding errors of nearly
  parallel float32 gradients, so their result there depends on the task
  order and scale. Here, in float32, tasks less than about 0.6 degrees apart
  (T = 2) count as one direction, and the output is invariant to permuting
  the tasks (together with ``pref``) and equivariant to rescaling them: to
  1e-4 away from the cut-off, a few 1e-3 just above it; an eigenvalue within
  rounding of the cut-off may fall on either side (the method jumps where
  the rank changes).

  Args:
    pref: ``(T,)`` task preferences; default ones (LibMTL's
      ``alpha = B.sum(0)``; torchjd's default is ``1/T``, i.e. ``T`` times
      smaller). Kept in float64 under x64.
    scale_mode: ``'min'`` (paper, default), ``'median'`` or ``'rmse'``
      (torchjd's name for the mean kept eigenvalue).
    num_tasks: number of tasks, for a fixed-shape state.
    diagnostics: record cosines, conflicts and task norms (free here).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; first in ``optax.chain``.

  Example:
    >>> import jax.numpy as jnp
    >>> from slamjax import surgery
    >>> tx = surgery.aligned_mtl(num_tasks=2)
    >>> g = {'w': jnp.array([[3., 0.], [0., 1.]])}   # already orthogonal
    >>> out, _ = tx.update(g, tx.init({'w': jnp.zeros(2)}))
    >>> out['w']   # both rescaled to the smallest norm, then summed
    Array([1., 1.], dtype=float32)
  """
  # numpy float64: cast to the gradients' dtype at trace time, so float64
  # preferences are not rounded to float32 under x64.
  pref_arr = None if pref is None else np.asarray(pref, np.float64)
  if scale_mode not in ("min", "median", "rmse"):
    raise ValueError(f"aligned_mtl: scale_mode must be 'min', 'median' or "
                     f"'rmse', got {scale_mode!r}.")

  def weighting(ctx):
    gram = ctx.gram  # normalised: largest diagonal entry 1
    if pref_arr is not None and pref_arr.shape != (gram.shape[0],):
      raise ValueError(f"aligned_mtl: pref has shape {pref_arr.shape}, "
                       f"expected ({gram.shape[0]},).")
    p = None if pref_arr is None else jnp.asarray(pref_arr, gram.dtype)
    return aligned_mtl_weights(gram, p, scale_mode), ctx.inner

  return gram_weighted(weighting, name="aligned_mtl", num_tasks=num_tasks,
                       diagnostics=diagnostics)
