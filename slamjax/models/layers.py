"""Backend-dependent formulations of the encoder's layers.

A plain Flax ResNet-18 falls off five performance cliffs of XLA:CPU (JAX
0.10, measured on a 2-core machine; see ``benchmarks/RESULTS.md``):

* YNNPACK convolutions: JAX 0.10's XLA:CPU hands convolutions to YNNPACK,
  whose kernels ran a 3x3 convolution (batch 128, 32x32x64) 1.7-2x slower
  than XLA's own (forward 187 vs 91-111 ms, input gradient 161 vs 89-101 ms;
  PyTorch's forward: 137 ms), and weight gradients slower still. Programs
  using this formulation are compiled with :func:`compiler_options`, which
  keeps YNNPACK for dots and reductions only; XLA's own weight gradient is
  then faster than the im2col product this module used before (140 vs
  252 ms at 32x32x64; ``OPTIONS['conv_dw']`` still selects it).
* Convolutions on tiny maps: a 3x3 convolution on a 2x2 map with 512
  channels takes about 2 s (forward and gradients, batch 128), against
  48 ms for the same work as one matrix product. At 64x64 inputs the last
  stage runs on 2x2 maps, so this one case dominated a training step. Maps
  of at most 4 positions and all 1x1 convolutions are im2col products.
* The max-pool gradient (select-and-scatter): replaced by a custom VJP that
  routes each output's gradient to the first maximum of its window, exactly
  as select-and-scatter does, with fused masks and strided pads (4-6x faster).
* Recomputed transposes: XLA's weight-gradient convolution wants its inputs
  transposed (channels major, batch minor), and XLA:CPU fuses the elementwise
  producers of those inputs (BatchNorm, ReLU, residual adds of the forward;
  the BatchNorm backward) into the transposing copy, recomputing them from
  up to ten inputs read in transposed order: 100-300 ms per 32x32x64 layer
  (batch 128) instead of 10-15 ms for a plain transpose, and 2.3-2.9 s of
  the two threads' time in a 128x128 SLAM-AGS step. ``optimization_barrier``
  does not stop this (XLA:CPU removes it before fusion), so
  :func:`_materialize` hands those inputs over as buffers.
* Every large temporary buffer is a fresh ``mmap`` from glibc malloc, so each
  step page-faults its working set again (~4.5 us per 4 KiB page; 660,000
  faults per 128x128 step). :func:`tune_cpu_allocator` keeps freed memory in
  the heap instead.

The ``'cpu'`` formulation keeps parameters identical to the ``'native'`` one
(``flax.linen.Conv`` / ``BatchNorm``) and computes the same function, so
checkpoints are interchangeable and outputs agree to float32 rounding.
BatchNorm is ``flax.linen.BatchNorm`` in both: XLA fuses it well on CPU.

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

  Affects the whole process (PyTorch too). Idempotent; a no-op off glibc or
  when ``SLAMJAX_NO_MALLOC_TUNING`` is set. Returns whether the settings were
  applied.
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


# Tunables of the 'cpu' formulation, read at trace time (for benchmarks).
CONV_DW_MODES = ("lax", "lax_fused", "im2col", "shift")
# conv_dw: how the weight gradient of convolutions is computed: XLA's on
# materialized inputs ('lax', the fastest with compiler_options()), XLA's
# with whatever fusion XLA picks ('lax_fused', see the module docstring), or
# as matmuls over the im2col columns ('im2col') or over each shifted slice
# ('shift'); for layers with at least conv_dw_min_in_channels inputs and
# conv_dw_min_positions output positions (others: 'lax_fused').
# im2col_min_positions: stride-1 maps at least this large do forward, input
# and weight gradient as chunked im2col products; off by default (faster per
# layer in isolation, not in the whole 2-core step).
OPTIONS = {"conv_dw": "lax", "conv_dw_min_in_channels": 8,
           "conv_dw_min_positions": 1, "conv_dw_chunk_bytes": 16 << 20,
           "im2col_min_positions": 1 << 62, "pool": "custom"}


def _conv_taps(x, kh, kw, strides):
  """The kh*kw shifted (strided) slices of the 'SAME'-padded input."""
  n, h, wd, c = x.shape
  sh, sw = strides
  ho, ph = _same_padding(h, kh, sh)
  wo, pw = _same_padding(wd, kw, sw)
  xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  return [lax.slice(xp, (0, i, j, 0),
                    (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


def _weight_grad_dense(x, dy, kernel_shape, strides, mode):
  kh, kw, c, o = kernel_shape
  dy2 = dy.reshape(-1, o)
  taps = _conv_taps(x, kh, kw, strides)
  if mode == "im2col":
    cols = jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]
    dw = lax.dot_general(cols.reshape(-1, kh * kw * c), dy2, (((0,), (0,)), ((), ())),
                         precision=lax.Precision.HIGHEST)
    return dw.reshape(kernel_shape)
  dws = [lax.dot_general(t.reshape(-1, c), dy2, (((0,), (0,)), ((), ())),
                         precision=lax.Precision.HIGHEST) for t in taps]
  return jnp.stack(dws).reshape(kernel_shape)


def _num_chunks(n: int, total_bytes: int) -> int:
  """Smallest divisor of n that splits total_bytes under the chunk budget."""
  chunks = max(1, min(n, -(-total_bytes // OPTIONS["conv_dw_chunk_bytes"])))
  while n % chunks:
    chunks += 1
  return chunks


def _weight_grad(x, dy, kernel_shape, strides, mode):
  """dL/dkernel of a 'SAME' convolution, as matmuls over shifted slices.

  The batch is processed in chunks (a sequential ``lax.scan``) so that the
  im2col columns of one chunk stay under ``OPTIONS['conv_dw_chunk_bytes']``:
  cache-sized chunks are both faster and far lighter on memory.
  """
  kh, kw, c, _ = kernel_shape
  n = x.shape[0]
  chunks = _num_chunks(n, dy.size // dy.shape[-1] * kh * kw * c * x.dtype.itemsize)
  if chunks == 1:
    return _weight_grad_dense(x, dy, kernel_shape, strides, mode)
  xs = x.reshape((chunks, n // chunks) + x.shape[1:])
  dys = dy.reshape((chunks, n // chunks) + dy.shape[1:])

  def body(acc, xd):
    return acc + _weight_grad_dense(xd[0], xd[1], kernel_shape, strides, mode), None

  dw, _ = lax.scan(body, jnp.zeros(kernel_shape, jnp.float32), (xs, dys))
  return dw.astype(x.dtype)


def _chunked_im2col_conv(x, w):
  """Stride-1 'SAME' im2col convolution over cache-sized batch chunks."""
  n = x.shape[0]
  kh, kw, c, _ = w.shape
  chunks = _num_chunks(n, x.size // c * kh * kw * c * x.dtype.itemsize)
  if chunks == 1:
    return _im2col_conv(x, w, (1, 1))
  ys = lax.map(lambda xc: _im2col_conv(xc, w, (1, 1)),
               x.reshape((chunks, n // chunks) + x.shape[1:]))
  return ys.reshape((n,) + ys.shape[2:])


@jax.custom_vjp
def _conv_im2col_s1(x, w):
  """Stride-1, odd-kernel 'SAME' convolution: forward, input gradient and
  weight gradient all as chunked im2col matrix products (large maps)."""
  return _chunked_im2col_conv(x, w)


def _conv_im2col_s1_fwd(x, w):
  return _chunked_im2col_conv(x, w), (x, w)


def _conv_im2col_s1_bwd(res, dy):
  x, w = res
  # Odd kernel, stride 1, symmetric padding: the input gradient is the
  # 'SAME' convolution of dy with the flipped, in/out-swapped kernel.
  dx = _chunked_im2col_conv(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
  return dx, _weight_grad(x, dy, w.shape, (1, 1), "im2col")


_conv_im2col_s1.defvjp(_conv_im2col_s1_fwd, _conv_im2col_s1_bwd)


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
  """XLA's convolution forward and input gradient; the weight gradient as
  ``OPTIONS['conv_dw']`` says."""
  return _native_conv(x, w, strides)


def _conv_custom_dw_fwd(x, w, strides):
  return _native_conv(x, w, strides), (x, w)


def _conv_custom_dw_bwd(strides, res, dy):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _native_conv(x_, w, strides), x)
  (dx,) = vjp_x(dy)
  mode = OPTIONS["conv_dw"]
  if mode == "lax":
    xm, dym = _materialize(x, dy)
    _, vjp_w = jax.vjp(lambda w_: _native_conv(xm, w_, strides), w)
    return dx, vjp_w(dym)[0]
  return dx, _weight_grad(x, dy, w.shape, strides, mode)


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
  if (strides == (1, 1) and kh == kw and kh % 2 == 1
      and ho * wo >= OPTIONS["im2col_min_positions"]
      and x.shape[-1] >= OPTIONS["conv_dw_min_in_channels"]):
    return _conv_im2col_s1(x, w)
  if (OPTIONS["conv_dw"] == "lax_fused"
      or x.shape[-1] < OPTIONS["conv_dw_min_in_channels"]
      or ho * wo < OPTIONS["conv_dw_min_positions"]):
    return _native_conv(x, w, strides)
  return _conv_custom_dw(x, w, strides)


def max_pool(x: jax.Array, window: int = 3, stride: int = 2,
             impl: str = "auto") -> jax.Array:
  """'SAME'-padded NHWC max-pool (square window).

  The 'cpu' gradient routes each output's gradient to the first maximal
  element of its window, as XLA's select-and-scatter does.
  """
  impl = resolve_impl(impl)
  if impl == "native" or OPTIONS["pool"] == "native":
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
