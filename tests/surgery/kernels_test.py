"""The leaf kernels: the Gram matrix on every CPU path, the combination."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamjax import surgery
from slamjax.surgery import _kernels


@pytest.mark.parametrize("t", [2, 3, 5, 10, 12])
@pytest.mark.parametrize("n", [1 << 15, 36 * 1024 + 384, 3 * (1 << 15) + 1])
def test_gram_matrix_matches_float64_reference_on_every_cpu_path(t, n):
  # n picks the path: 1024-wide blocks, 128-wide blocks, or no block (dot);
  # t picks chunked (2), broadcast (3-10) or dot (12).
  m = np.random.default_rng([t, n]).standard_normal((t, n)).astype(np.float32)
  got = np.asarray(jax.jit(surgery.gram_matrix)({"w": jnp.asarray(m)}))
  want = m.astype(np.float64) @ m.astype(np.float64).T
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("t", [3, 17])  # unrolled multiply-adds, tensordot
def test_combine_matches_float64_and_keeps_the_leaf_dtype(t):
  rng = np.random.default_rng(t)
  leaf = rng.standard_normal((t, 4, 5)).astype(np.float32)
  w = rng.standard_normal(t).astype(np.float32)
  got = jax.jit(_kernels.combine)(jnp.asarray(w), jnp.asarray(leaf))
  want = np.tensordot(w.astype(np.float64), leaf.astype(np.float64), 1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  bf = _kernels.combine(jnp.asarray(w), jnp.asarray(leaf, jnp.bfloat16))
  assert bf.dtype == jnp.bfloat16 and bf.shape == (4, 5)
