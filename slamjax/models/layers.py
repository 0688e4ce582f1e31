"""Backend-dependent formulations of the encoder's layers.

The ``'cpu'`` formulation computes the same convolutions and max-pool as
XLA's native ops, with the same parameters (``flax.linen.Conv``'s kernel),
but in the forms that are fast on XLA:CPU: im2col products for 1x1
convolutions and tiny maps, XLA's weight gradient on materialized inputs
(:func:`_materialize`), a custom max-pool gradient, and YNNPACK kept off
convolutions (:func:`compiler_options`). Outputs agree with ``'native'`` to
float32 rounding, so checkpoints are interchangeable. Why each of these, with
the measurements: ``docs/performance.md``, section "CPU convolution path".

:func:`tune_cpu_allocator` changes glibc malloc for the whole process; the
model never calls it, entry points do (once).

Example:
  >>> import jax, jax.numpy as jnp
  >>> x = jnp.ones((2, 4, 4, 8)); w = jnp.ones((3, 3, 8, 16))
  >>> y_cpu = conv2d(x, w, (1, 1), impl="cpu")
  >>> y_native = conv2d(x, w, (1, 1), impl="native")
  >>> bool(jnp.allclose(y_cpu, y_native)), y_cpu.shape
  (True, (2, 4, 4, 16))
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "native", "cpu")

# Output maps with at most this many positions use the im2col product on CPU.
SMALL_MAP_POSITIONS = 4
# Convolutions with fewer input channels (the RGB stem) keep XLA's own
# weight gradient; the others materialize its inputs (:func:`_materialize`).
MIN_MATERIALIZED_IN_CHANNELS = 8

_ALLOCATOR_TUNED = False


def resolve_impl(impl: str) -> str:
  """Maps ``'auto'`` to ``'cpu'`` on the CPU backend, else ``'native'``."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; valid: {list(IMPLS)}")
  if impl == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "native"
  return impl


# XLA:CPU options for programs that run the 'cpu' formulation: YNNPACK for
# dots and reductions only, not convolutions (see the module docstring).
# Without its reductions, BatchNorm's statistics become slow reduce-windows.
XLA_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                   "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def compiler_options(impl: str = "auto") -> dict | None:
  """``jax.jit(..., compiler_options=...)`` for a program using ``impl``.

  Returns :data:`XLA_CPU_OPTIONS` when ``impl`` resolves to ``'cpu'`` and
  ``None`` (XLA's defaults) otherwise, e.g. on GPU/TPU.

  Example:
    >>> import jax
    >>> opts = compiler_options("native")
    >>> f = jax.jit(lambda x: x + 1, compiler_options=opts)
    >>> opts is None, int(f(1))
    (True, 2)
  """
  return dict(XLA_CPU_OPTIONS) if resolve_impl(impl) == "cpu" else None


def tune_cpu_allocator(top_pad_bytes: int = 1 << 30) -> bool:
  """Makes glibc malloc keep freed memory instead of returning it to the OS.

  XLA:CPU allocates each step's temporaries with malloc, the largest as one
  block (2.5 GiB for a 128x128 SLAM-AGS step). By default glibc serves any
  block over its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
  unmaps it on free, so every step page-faults its whole working set again:
  660,000 faults and 3 s of kernel time per 128x128 step on 2 cores. This
  disables mmap for allocations (``M_MMAP_MAX`` = 0), never trims the heap
  (``M_TRIM_THRESHOLD`` = -1), pads heap growth (``M_TOP_PAD``) and uses one
  arena: a step then reuses the heap pages of the previous one (0 faults;
  the 128x128 step 15% faster, the 64x64 one 22%, measured back to back in
  one process). The price: the process keeps its peak heap until it exits.

  Affects the whole process (PyTorch too), so no model or step calls it:
  call it once at program start (``slamjax.main``, the benchmarks).
  Idempotent; a no-op off glibc or when ``SLAMJAX_NO_MALLOC_TUNING`` is set.
  Returns whether the settings were applied.
  """
  global _ALLOCATOR_TUNED
  if _ALLOCATOR_TUNED:
    return True
  if os.environ.get("SLAMJAX_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_max, m_arena_max = -1, -2, -4, -8
    ok = all([bool(libc.mallopt(m_arena_max, 1)),
              bool(libc.mallopt(m_top_pad, int(top_pad_bytes))),
              bool(libc.mallopt(m_mmap_max, 0)),
              bool(libc.mallopt(m_trim_threshold, -1))])  # -1: never trim
  except (OSError, AttributeError):
    return False
  _ALLOCATOR_TUNED = ok
  return ok


def _same_padding(size: int, k: int, s: int) -> tuple[int, tuple[int, int]]:
  """Output size and (low, high) padding of XLA's 'SAME' padding."""
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return out, (total // 2, total - total // 2)


def _im2col_conv(x, w, strides):
  """'SAME' convolution as one matmul over k*k shifted (strided) slices."""
  n, h, wd, c = x.shape
  kh, kw, _, o = w.shape
  sh, sw = strides
  ho, ph = _same_padding(h, kh, sh)
  wo, pw = _same_padding(wd, kw, sw)
  xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  cols = []
  for i in range(kh):
    for j in range(kw):
      cols.append(lax.slice(xp, (0, i, j, 0),
                            (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                            (1, sh, sw, 1)))
  cols = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
  y = jnp.dot(cols.reshape(n * ho * wo, kh * kw * c), w.reshape(kh * kw * c, o),
              precision=lax.Precision.HIGHEST)
  return y.reshape(n, ho, wo, o)


def _native_conv(x, w, strides):
  return lax.conv_general_dilated(
      x, w, window_strides=strides, padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _materialize(*arrays):
  """``arrays``, unchanged, as buffers that XLA cannot fuse past.

  A while loop of one trip, with a trip count XLA cannot know (it depends on
  whether the last array's first element is NaN; at zero trips the values
  pass through all the same) and a body XLA cannot prove to be the identity.
  Its consumers read its output buffers instead of recomputing the arrays
  from their producers. Costs one elementwise copy of each array.
  """
  trips = 1 - jnp.isnan(arrays[-1].reshape(-1)[0]).astype(jnp.int32)

  def body(carry):
    i, n, xs = carry
    return i + 1, n, tuple(jnp.where(i < n, a, jnp.zeros_like(a)) for a in xs)

  return lax.while_loop(lambda c: c[0] < c[1], body, (0, trips, tuple(arrays)))[2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_custom_dw(x, w, strides):
  """XLA's convolution, whose weight gradient reads materialized inputs.

  Forward and input gradient are XLA's own; the weight gradient is XLA's
  convolution on buffers from :func:`_materialize`, so that XLA:CPU cannot
  fuse (and recompute) the inputs' producers into its transposes.
  """
  return _native_conv(x, w, strides)


def _conv_custom_dw_fwd(x, w, strides):
  return _native_conv(x, w, strides), (x, w)


def _conv_custom_dw_bwd(strides, res, dy):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _native_conv(x_, w, strides), x)
  (dx,) = vjp_x(dy)
  xm, dym = _materialize(x, dy)
  _, vjp_w = jax.vjp(lambda w_: _native_conv(xm, w_, strides), w)
  return dx, vjp_w(dym)[0]


_conv_custom_dw.defvjp(_conv_custom_dw_fwd, _conv_custom_dw_bwd)


def conv2d(x: jax.Array, w: jax.Array, strides: Sequence[int] = (1, 1),
           impl: str = "auto") -> jax.Array:
  """'SAME'-padded NHWC convolution with an HWIO kernel, no bias."""
  impl = resolve_impl(impl)
  strides = tuple(int(s) for s in strides)
  if impl == "native":
    return _native_conv(x, w, strides)
  kh, kw = w.shape[:2]
  ho = -(-x.shape[1] // strides[0])
  wo = -(-x.shape[2] // strides[1])
  if (kh, kw) == (1, 1) or ho * wo <= SMALL_MAP_POSITIONS:
    return _im2col_conv(x, w, strides)
  if x.shape[-1] < MIN_MATERIALIZED_IN_CHANNELS:  # the RGB stem
    return _native_conv(x, w, strides)
  return _conv_custom_dw(x, w, strides)


def max_pool(x: jax.Array, window: int = 3, stride: int = 2,
             impl: str = "auto") -> jax.Array:
  """'SAME'-padded NHWC max-pool (square window).

  The 'cpu' gradient routes each output's gradient to the first maximal
  element of its window, as XLA's select-and-scatter does.
  """
  impl = resolve_impl(impl)
  if impl == "native":
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding="SAME")
  return _max_pool(x, window, stride)


def _pool_taps(x, window, stride):
  n, h, w, c = x.shape
  ho, ph = _same_padding(h, window, stride)
  wo, pw = _same_padding(w, window, stride)
  xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)), constant_values=-jnp.inf)
  return [lax.slice(xp, (0, i, j, 0),
                    (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                    (1, stride, stride, 1))
          for i in range(window) for j in range(window)], (ho, wo, ph, pw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, window, stride):
  taps, _ = _pool_taps(x, window, stride)
  out = taps[0]
  for t in taps[1:]:
    out = jnp.maximum(out, t)
  return out


def _max_pool_fwd(x, window, stride):
  y = _max_pool(x, window, stride)
  return y, (x, y)


def _max_pool_bwd(window, stride, res, g):
  x, y = res
  n, h, w, c = x.shape
  taps, (ho, wo, ph, pw) = _pool_taps(x, window, stride)
  hp, wp = h + sum(ph), w + sum(pw)
  taken, dxp = None, None
  for idx, t in enumerate(taps):
    i, j = divmod(idx, window)
    hit = t == y
    if taken is not None:
      hit = hit & ~taken
    taken = hit if taken is None else taken | hit
    # Transpose of the strided slice: interior padding back onto the grid.
    d = lax.pad(jnp.where(hit, g, 0.0).astype(x.dtype), jnp.zeros((), x.dtype),
                ((0, 0, 0), (i, hp - i - (ho - 1) * stride - 1, stride - 1),
                 (j, wp - j - (wo - 1) * stride - 1, stride - 1), (0, 0, 0)))
    dxp = d if dxp is None else dxp + d
  return (dxp[:, ph[0]:ph[0] + h, pw[0]:pw[0] + w],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


class Conv(nn.Module):
  """Bias-free 'SAME' convolution with ``flax.linen.Conv``'s parameters.

  The kernel is ``params['kernel']`` of shape (kh, kw, in, out), initialised
  exactly as ``nn.Conv`` does, so the two are interchangeable.
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init,
                        tuple(self.kernel_size) + (x.shape[-1], self.features),
                        self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return conv2d(x, kernel, self.strides, self.impl)
