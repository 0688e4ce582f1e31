"""The 'cpu' layer formulations compute the same function as the native ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamjax.models import layers


def _rand(shape, seed):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


CONV_CASES = [
    # (input NHWC, kernel, stride): 7x7/2 stem (XLA's convolution), 3x3/1
    # and 3x3/2 with few channels (XLA's) and with >= 8 channels (weight
    # gradient on materialized inputs), odd sizes (asymmetric 'SAME'
    # padding), 1x1/2 and small maps (im2col product).
    ((2, 16, 16, 3), 7, 2),
    ((2, 9, 9, 4), 3, 1),
    ((2, 8, 8, 4), 3, 2),
    ((2, 9, 9, 8), 3, 1),
    ((2, 7, 7, 8), 3, 2),
    ((2, 8, 8, 4), 1, 2),
    ((2, 2, 2, 8), 3, 1),
    ((2, 4, 4, 8), 3, 2),
    ((2, 1, 1, 8), 3, 1),
]


@pytest.mark.parametrize("shape,k,s", CONV_CASES)
def test_conv_matches_native(shape, k, s):
  x = _rand(shape, 0)
  w = _rand((k, k, shape[-1], 6), 1) * 0.3
  f = lambda impl: jax.jit(lambda x, w: layers.conv2d(x, w, (s, s), impl))
  y_n, y_c = f("native")(x, w), f("cpu")(x, w)
  assert y_n.shape == y_c.shape
  np.testing.assert_allclose(y_c, y_n, atol=1e-5, rtol=1e-5)
  gy = _rand(y_n.shape, 2)
  g_n = jax.vjp(f("native"), x, w)[1](gy)
  g_c = jax.vjp(f("cpu"), x, w)[1](gy)
  for a, b in zip(g_c, g_n):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 2), (1, 2, 2, 4), (1, 1, 1, 2)])
def test_max_pool_matches_native(shape):
  # relu'd input: many exact ties (zeros), where the first maximum must win.
  x = jax.nn.relu(_rand(shape, 3))
  fwd_bwd = lambda impl: jax.jit(lambda x, gy: jax.vjp(
      lambda x: layers.max_pool(x, impl=impl), x)[1](gy)[0])
  y_n = layers.max_pool(x, impl="native")
  y_c = jax.jit(lambda x: layers.max_pool(x, impl="cpu"))(x)
  np.testing.assert_array_equal(y_c, y_n)
  gy = _rand(y_n.shape, 4)
  g_n, g_c = fwd_bwd("native")(x, gy), fwd_bwd("cpu")(x, gy)
  np.testing.assert_allclose(g_c, g_n, atol=1e-6)


def test_max_pool_ties_go_to_first_maximum():
  x = jnp.zeros((1, 4, 4, 1))
  g = jax.jit(jax.grad(lambda x: layers.max_pool(x, impl="cpu").sum()))(x)
  g_native = jax.jit(jax.grad(lambda x: layers.max_pool(x, impl="native").sum()))(x)
  np.testing.assert_array_equal(g, g_native)
  assert float(g.sum()) == 4.0  # one unit per output, not split among ties


def test_resolve_impl():
  assert layers.resolve_impl("native") == "native"
  assert layers.resolve_impl("cpu") == "cpu"
  expected = "cpu" if jax.default_backend() == "cpu" else "native"
  assert layers.resolve_impl("auto") == expected
  with pytest.raises(ValueError, match="valid"):
    layers.resolve_impl("fast")


def test_compiler_options_compile_the_same_function():
  assert layers.compiler_options("native") is None
  opts = layers.compiler_options("cpu")
  assert opts == layers.XLA_CPU_OPTIONS and opts is not layers.XLA_CPU_OPTIONS
  x, w = _rand((2, 9, 9, 8), 7), _rand((3, 3, 8, 4), 8)
  f = lambda x, w: jax.grad(lambda x, w: jnp.sum(layers.conv2d(x, w, (1, 1), "cpu") ** 2),
                            argnums=(0, 1))(x, w)
  for a, b in zip(jax.jit(f, compiler_options=opts)(x, w), jax.jit(f)(x, w)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_materialize_returns_its_inputs_unchanged():
  x, dy = _rand((2, 5, 5, 4), 9), _rand((2, 5, 5, 4), 10)
  xm, dym = jax.jit(layers._materialize)(x, dy)
  np.testing.assert_array_equal(xm, x)
  np.testing.assert_array_equal(dym, dy)
  # A NaN first element means zero trips: the values still pass through.
  dy_nan = dy.at[0, 0, 0, 0].set(jnp.nan)
  xm, dym = jax.jit(layers._materialize)(x, dy_nan)
  np.testing.assert_array_equal(xm, x)
  np.testing.assert_array_equal(dym, dy_nan)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU fusion")
@pytest.mark.parametrize("impl,recomputed", [("cpu", False), ("native", True)])
def test_weight_gradient_inputs_are_not_recomputed_in_transposes(impl, recomputed):
  # conv(relu(a * s + 1)): left alone ('native', the control), XLA fuses the
  # ReLU (and the scale and shift) into the transposing copies of the weight
  # gradient; the 'cpu' formulation makes them read a buffer instead.
  a, w = _rand((4, 12, 12, 16), 11), _rand((3, 3, 16, 16), 12)

  def loss(a, w, s):
    return jnp.sum(layers.conv2d(jax.nn.relu(a * s + 1.0), w, (1, 1), impl) ** 2)

  hlo = jax.jit(jax.grad(loss, argnums=1), compiler_options=layers.compiler_options(
      "cpu")).lower(a, w, 2.0).compile().as_text()
  blocks = hlo.split("\n\n")
  fused = [b for b in blocks if "transpose(" in b and "maximum(" in b]
  assert bool(fused) == recomputed, fused
