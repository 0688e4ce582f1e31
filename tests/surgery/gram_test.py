"""The scale-free split of the Gram matrix into norms and cosines."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamjax.surgery import _gram


def _stats(m, c=None):
  st = jax.jit(lambda x: _gram.gram_stats([x], leafwise=True))(jnp.asarray(m))
  return _gram.with_task_weights(st, None if c is None else jnp.asarray(c))


@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-20])  # G over/underflows
def test_norms_and_cosines_at_extreme_float32_scales(scale):
  rng = np.random.default_rng(0)
  m = rng.standard_normal((3, 40)) * np.array([[1.0], [1e-3], [0.0]])
  st = _stats((m * scale).astype(np.float32))
  n = np.linalg.norm(m, axis=1)
  assert not st.bad
  np.testing.assert_allclose(st.max_norm / scale, n[0], rtol=1e-5)
  np.testing.assert_allclose(st.norms, n / n[0], rtol=1e-5)
  cos = (m[:2] @ m[:2].T) / np.outer(n[:2], n[:2])
  np.testing.assert_allclose(st.cosine[:2, :2], cos, atol=1e-6)
  np.testing.assert_array_equal(st.cosine[2], 0.0)  # the zero task
  np.testing.assert_allclose(st.gram, st.leaf_grams[0], rtol=1e-6)


def test_task_weights_flip_signs_and_scale_norms():
  m = np.array([[3.0, 0.0], [1.0, 1.0]], np.float32)
  st = _stats(m, c=[-1.0, 4.0])
  np.testing.assert_allclose(st.max_norm, 4 * np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(st.norms, [3 / (4 * np.sqrt(2)), 1.0], rtol=1e-6)
  np.testing.assert_allclose(st.cosine[0, 1], -np.sqrt(0.5), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_is_flagged(bad):
  m = np.ones((2, 3), np.float32)
  m[1, 1] = bad
  assert _stats(m).bad
  assert _stats(np.ones((2, 3), np.float32), c=[1.0, np.nan]).bad
