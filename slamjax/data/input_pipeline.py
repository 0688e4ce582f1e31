"""A tf.data pipeline over image files, for datasets too big to decode in memory.

Batches are a pure function of ``(seed, step)``: an ``index_fn(step)`` gives
the global batch as dataset indices per output key (e.g. the ``pos``/``neg``
cells of ``slamjax.data.batching.ProportionalBatcher.indices``, or an
epoch-shuffled stream from ``epoch_index_fn``). Each process reads its own
contiguous slice of every key, decodes the files in parallel, resizes them to
``image_size`` and optionally applies the reference augmentations with
stateless random ops seeded by ``(seed, step, position)``. So the batches do
not depend on thread timing or the number of processes, and resuming at
``start_step`` gives the same batches as an uninterrupted run.

Two output modes:

* ``views=None``: ``uint8 [B, S, S, 3]`` images, for a train step that
  augments on device (``slamjax.data.augment``), as ``pretrain.make_train_step``.
* ``views={"pos": ("augment", "augment"), "neg": ("center", "augment")}``:
  ``float32 [B, V, C, C, 3]`` normalised views made on the host: random crop,
  horizontal flip, colour jitter (brightness, contrast, saturation, hue in YIQ,
  fixed order, probability ``jitter_prob``) and a 90/180/270-degree rotation
  (probability ``rot90_prob``), as ``slamjax/data/augment.py`` does on device;
  ``"center"`` is a plain centre crop.

``GlobalBatches`` turns the process-local numpy batches into global
``jax.Array`` s sharded over the mesh axis ``data``
(``jax.make_array_from_process_local_data``), one batch ahead. A file that
fails to decode stops it with an error naming the file.

Example:
  >>> import os, tempfile, numpy as np
  >>> from PIL import Image
  >>> from slamjax import sharding
  >>> root = tempfile.mkdtemp()
  >>> paths = [os.path.join(root, f"{i}.png") for i in range(8)]
  >>> for i, p in enumerate(paths):
  ...   Image.new("RGB", (12, 12), (i, 0, 0)).save(p)
  >>> ds = make_dataset(paths, epoch_index_fn(8, 4, seed=0), image_size=8,
  ...                   seed=0, num_steps=3)
  >>> batch = next(ds.as_numpy_iterator())
  >>> batch["image"].shape, batch["image"].dtype, batch["image_index"].shape
  ((4, 8, 8, 3), dtype('uint8'), (4,))
  >>> mesh = sharding.make_mesh(-1)
  >>> x = next(GlobalBatches(ds, mesh))["image"]
  >>> x.shape, x.sharding.spec
  ((4, 8, 8, 3), P('data',))
"""

from __future__ import annotations

import collections
import functools
import math
import os
from typing import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
import tensorflow as tf

from slamjax import sharding
from slamjax.data import folder

try:  # keep TF off accelerators; JAX owns them
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # already initialised
  pass

IndexFn = Callable[[int], Mapping[str, np.ndarray]]
VIEW_MODES = ("center", "augment")
_TF_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_GRAY = (0.299, 0.587, 0.114)
_RGB2YIQ = np.array([[0.299, 0.587, 0.114],
                     [0.596, -0.274, -0.322],
                     [0.211, -0.523, 0.312]])


def epoch_index_fn(n: int, batch_size: int, seed: int,
                   key: str = "image") -> IndexFn:
  """Batches of ``batch_size`` from per-epoch permutations of ``range(n)``.

  Step s takes items ``[s*B, (s+1)*B)`` of the concatenated permutations, so
  every item is seen once per pass and batches can cross epoch boundaries.
  """
  if n < 1:
    raise ValueError("epoch_index_fn needs at least one item")

  @functools.lru_cache(maxsize=2)
  def permutation(epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)

  def index_fn(step: int) -> dict[str, np.ndarray]:
    start, out, count = step * batch_size, [], batch_size
    while count:
      epoch, offset = divmod(start, n)
      take = min(count, n - offset)
      out.append(permutation(epoch)[offset:offset + take])
      start, count = start + take, count - take
    return {key: np.concatenate(out)}

  index_fn.steps_per_epoch = math.ceil(n / batch_size)
  return index_fn


def _decode(data: tf.Tensor, image_size: int) -> tf.Tensor:
  """Bytes -> uint8 [S, S, 3]: decode, centre square crop, antialiased resize."""
  # JPEG with the accurate integer DCT, as PIL, so the in-memory and the
  # streaming paths see (nearly) the same pixels.
  img = tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
  shape = tf.shape(img)
  h, w = shape[0], shape[1]
  s = tf.minimum(h, w)
  img = tf.image.crop_to_bounding_box(img, (h - s) // 2, (w - s) // 2, s, s)

  def resize():
    x = tf.image.resize(img, [image_size, image_size], "bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)

  img = tf.cond(tf.equal(s, image_size), lambda: img, resize)
  return tf.ensure_shape(img, [image_size, image_size, 3])


def _view_batch(img, u, center, crop: int, a: Mapping) -> tf.Tensor:
  """One view of every image of a batch, vectorised over the batch.

  Computes the ops of ``augment._augment_one`` (random crop, horizontal flip,
  colour jitter, rot90) in two fused steps: crop, flip and rotation are one
  gather of pixels; brightness, contrast, saturation and the YIQ hue rotation are
  all affine in RGB, so the jitter is one 3x3 matrix and offset per image,
  followed by the final clip to [0, 1].

  Args:
    img: uint8 [T, S, S, 3].
    u: float32 [10, T] uniforms in [0, 1), the random draws of each image.
    center: bool [T]; those images get a plain centre crop.
    crop: output side.
    a: augmentation settings (flip, jitter_strength, jitter_prob, rot90_prob).

  Returns:
    float32 [T, crop, crop, 3] in [0, 1].
  """
  size = img.shape[1]
  span = size - crop + 1
  mid = (size - crop) // 2
  live = tf.logical_not(center)
  col = lambda v: v[:, None, None]
  pick = lambda i: tf.minimum(tf.cast(u[i] * span, tf.int32), span - 1)
  top = col(tf.where(center, mid, pick(0)))
  left = col(tf.where(center, mid, pick(1)))
  rp = float(a.get("rot90_prob", 0.8))
  k = tf.zeros_like(top)
  if rp > 0:
    k = col(tf.where(live & (u[8] < rp),
                     1 + tf.minimum(tf.cast(u[9] * 3, tf.int32), 2), 0))
  i = tf.range(crop)[None, :, None]
  j = tf.range(crop)[None, None, :]
  last = crop - 1
  # out = rot90(y, k) as jnp.rot90: y[i, j], y[j, C-1-i], y[C-1-i, C-1-j], y[C-1-j, i]
  r = tf.where(k == 0, i, tf.where(k == 1, j, tf.where(k == 2, last - i, last - j)))
  c = tf.where(k == 0, j, tf.where(k == 1, last - i, tf.where(k == 2, last - j, i)))
  if a.get("flip", True):  # y = z[:, ::-1], z the crop
    c = tf.where(col(live & (u[2] < 0.5)), last - c, c)
  flat = tf.reshape((r + top) * size + c + left, [-1, crop * crop])
  x = tf.gather(tf.reshape(img, [-1, size * size, 3]), flat, axis=1, batch_dims=1)
  x = tf.reshape(x, [-1, crop, crop, 3])
  x = tf.cast(x, tf.float32) / 255.0

  strength, p = float(a.get("jitter_strength", 0.1)), float(a.get("jitter_prob", 0.8))
  if strength > 0 and p > 0:
    on = live & (u[3] < p)
    f = lambda n: tf.where(on, 1 - strength + 2 * strength * u[n], 1.0)
    bright, contrast, sat = f(4), f(5), f(6)
    theta = tf.where(on, 2 * np.pi * strength * (2 * u[7] - 1), 0.0)
    w = tf.constant(_GRAY, tf.float32)
    # contrast pivots on the mean gray level of the brightened image
    m = bright * tf.tensordot(tf.reduce_mean(x, axis=[1, 2]), w, 1)
    eye = tf.eye(3)[None]
    m_sat = sat[:, None, None] * eye + (1 - sat)[:, None, None] * tf.ones([3, 1]) * w
    cos, sin = tf.cos(theta), tf.sin(theta)
    one, zero = tf.ones_like(cos), tf.zeros_like(cos)
    rot = tf.stack([tf.stack([one, zero, zero], -1),
                    tf.stack([zero, cos, -sin], -1),
                    tf.stack([zero, sin, cos], -1)], -2)
    yiq = tf.constant(_RGB2YIQ, tf.float32)
    m_hue = tf.linalg.inv(yiq)[None] @ rot @ yiq[None]
    mix = m_hue @ m_sat  # [T, 3, 3]
    mat = (contrast * bright)[:, None, None] * mix
    off = ((1 - contrast) * m)[:, None] * tf.reduce_sum(mix, axis=-1)  # [T, 3]
    x = tf.reshape(x, [-1, crop * crop, 3])
    x = tf.matmul(x, mat, transpose_b=True) + off[:, None, :]
    x = tf.reshape(x, [-1, crop, crop, 3])
    x = tf.clip_by_value(x, 0.0, 1.0)
  return x


def make_dataset(paths: Sequence[str], index_fn: IndexFn, *, image_size: int,
                 seed: int, start_step: int = 0, num_steps: int | None = None,
                 views: Mapping[str, Sequence[str]] | None = None,
                 augment=None, labels: np.ndarray | None = None,
                 num_parallel_calls: int | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> tf.data.Dataset:
  """Process-local batches of decoded (and optionally augmented) images.

  Args:
    paths: file of every dataset index (JPEG, PNG, BMP or GIF).
    index_fn: step -> {key: global int array of dataset indices}; the keys and
      their sizes must be the same at every step.
    image_size: side of the decoded images (square centre crop + resize).
    seed: augmentation seed (the index stream has its own, in ``index_fn``).
    start_step, num_steps: steps ``[start_step, start_step + num_steps)``;
      ``num_steps=None`` runs forever.
    views: key -> view modes ("center"/"augment"), one entry per key, all of
      the same length; None for plain uint8 images.
    augment: ``config.augment`` (crop_size, flip, jitter_strength, jitter_prob,
      rot90_prob, mean, std); needed with ``views``.
    labels: optional int label per index, returned as ``<key>_label``.
    num_parallel_calls: decode threads (default: autotune); also caps the
      tf.data thread pool when given.
    process_index, process_count: default to JAX's.

  Returns:
    A dataset of dicts: ``<key>`` images, ``<key>_index`` int64 dataset
    indices (and ``<key>_label``), each the process-local slice of the batch.
  """
  pid = jax.process_index() if process_index is None else process_index
  nproc = jax.process_count() if process_count is None else process_count
  bad_ext = [p for p in paths[:1000] if not p.lower().endswith(_TF_EXTENSIONS)]
  if bad_ext:
    raise ValueError(f"{bad_ext[0]}: tf.data decodes only {_TF_EXTENSIONS}; "
                     "use the in-memory folder loader for other formats")
  probe = index_fn(start_step)
  keys = list(probe)
  sizes = [len(probe[k]) for k in keys]
  for k, n in zip(keys, sizes):
    if n % nproc:
      raise ValueError(f"Batch of {n} {k!r} items does not split over {nproc} processes")
  local = [n // nproc for n in sizes]
  offsets = np.cumsum([0] + sizes)[:-1]
  total, total_local = sum(sizes), sum(local)
  # Global position (within the step) of every process-local element.
  positions = np.concatenate([o + pid * l + np.arange(l)
                              for o, l in zip(offsets, local)]).astype(np.int64)
  key_ids = np.concatenate([np.full(l, i) for i, l in enumerate(local)]).astype(np.int32)

  if views is not None:
    if augment is None:
      raise ValueError("views need the augment config")
    if set(views) != set(keys):
      raise ValueError(f"views name keys {sorted(views)}, the batches have {keys}")
    nviews = {len(v) for v in views.values()}
    if len(nviews) != 1 or any(m not in VIEW_MODES for v in views.values() for m in v):
      raise ValueError(f"views must give every key the same number of modes from "
                       f"{VIEW_MODES}, got {dict(views)}")
    modes = tf.constant([[VIEW_MODES.index(m) for m in views[k]] for k in keys], tf.int32)
    crop = int(augment.crop_size) if hasattr(augment, "crop_size") else int(augment["crop_size"])
    a = dict(augment)
    mean = tf.constant(a.get("mean", (0.5,) * 3), tf.float32)
    std = tf.constant(a.get("std", (0.25,) * 3), tf.float32)
    if crop > image_size:
      raise ValueError(f"augment.crop_size={crop} exceeds image_size={image_size}")

  paths_t = tf.constant([os.fspath(p) for p in paths])
  labels_np = None if labels is None else np.asarray(labels, np.int64)

  def step_indices(step):
    idx = index_fn(int(step))
    return np.concatenate([np.asarray(idx[k], np.int64)[pid * l:(pid + 1) * l]
                           for k, l in zip(keys, local)])

  def per_step(step):
    idx = tf.numpy_function(step_indices, [step], tf.int64, stateful=False)
    idx = tf.ensure_shape(idx, [total_local])
    return tf.data.Dataset.from_tensor_slices(
        (idx, tf.fill([total_local], step)))

  def load(idx, step):
    return _decode(tf.io.read_file(tf.gather(paths_t, idx)), image_size), idx, step

  def finish(images, idx, steps):
    if views is not None:
      # Draws for the whole global batch, then this process's positions:
      # a view depends on (seed, step, position, view) only.
      step_seed = tf.stack([tf.constant(seed, tf.int64), steps[0]])
      out = []
      for v in range(modes.shape[1]):
        vseed = tf.random.experimental.stateless_fold_in(step_seed, v)
        u = tf.gather(tf.random.stateless_uniform([10, total], vseed), positions, axis=1)
        center = tf.equal(tf.gather(modes[:, v], key_ids), 0)
        out.append((_view_batch(images, u, center, crop, a) - mean) / std)
      images = tf.stack(out, axis=1)
    out, start = {}, 0
    for k, l in zip(keys, local):
      out[k] = images[start:start + l]
      out[f"{k}_index"] = idx[start:start + l]
      if labels_np is not None:
        out[f"{k}_label"] = tf.gather(labels_np, idx[start:start + l])
      start += l
    return out

  stop = np.iinfo(np.int64).max if num_steps is None else start_step + num_steps
  calls = num_parallel_calls or tf.data.AUTOTUNE
  ds = tf.data.Dataset.range(start_step, stop)
  ds = ds.flat_map(per_step)
  ds = ds.map(load, num_parallel_calls=calls, deterministic=True)
  ds = ds.batch(total_local, drop_remainder=True)
  ds = ds.map(finish, num_parallel_calls=calls, deterministic=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  opts = tf.data.Options()
  opts.deterministic = True
  if num_parallel_calls:
    opts.threading.private_threadpool_size = num_parallel_calls
  return ds.with_options(opts)


def to_global(mesh, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global arrays sharded over ``data``."""
  spec = sharding.data_sharding(mesh)
  nproc = jax.process_count()
  return {k: jax.make_array_from_process_local_data(
      spec, v, (v.shape[0] * nproc,) + v.shape[1:]) for k, v in batch.items()}


class GlobalBatches:
  """Iterates a ``make_dataset`` dataset as global jax arrays, one step ahead.

  Given the ``paths`` and ``index_fn`` the dataset was made with (and its
  ``start_step``), a decode error is re-raised as ``folder.BadFileError``
  naming the file. ``keys`` keeps only those entries of each batch.
  """

  def __init__(self, ds: tf.data.Dataset, mesh, *, paths: Sequence[str] | None = None,
               index_fn: IndexFn | None = None, start_step: int = 0,
               keys: Sequence[str] | None = None, prefetch: int = 2):
    self._ds, self._mesh, self._keys = ds, mesh, keys
    self._paths, self._index_fn = paths, index_fn
    self._it = iter(ds.as_numpy_iterator())
    self._step = start_step
    self._buf: collections.deque = collections.deque()
    self._prefetch = max(1, prefetch)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def _fill(self):
    while len(self._buf) < self._prefetch:
      try:
        batch = next(self._it)
      except StopIteration:
        return
      except tf.errors.OpError as e:
        self._raise_bad_file(e)
      if self._keys is not None:
        batch = {k: batch[k] for k in self._keys}
      self._buf.append(to_global(self._mesh, batch))
      self._step += 1

  def __next__(self) -> dict[str, jax.Array]:
    self._fill()
    if not self._buf:
      raise StopIteration
    return self._buf.popleft()

  def _raise_bad_file(self, err):
    if self._index_fn is not None and self._paths is not None:
      pid, nproc = jax.process_index(), jax.process_count()
      for idx in self._index_fn(self._step).values():
        n = len(idx) // nproc
        for i in np.asarray(idx)[pid * n:(pid + 1) * n]:
          path = self._paths[i]
          try:
            with open(path, "rb") as f:
              data = f.read()
          except OSError as e:
            raise folder.BadFileError(path, f"cannot read ({e})") from err
          folder.decode_image(data, None, path)  # raises BadFileError
    raise RuntimeError(f"Input pipeline failed at step {self._step}: {err}") from err


def global_batches(paths: Sequence[str], index_fn: IndexFn, mesh, *,
                   keys: Sequence[str] | None = None, prefetch: int = 2,
                   **kwargs) -> GlobalBatches:
  """``make_dataset(paths, index_fn, **kwargs)`` as global arrays on ``mesh``."""
  ds = make_dataset(paths, index_fn, **kwargs)
  return GlobalBatches(ds, mesh, paths=paths, index_fn=index_fn,
                       start_step=kwargs.get("start_step", 0), keys=keys,
                       prefetch=prefetch)


def pretrain_batches(cfg, index: folder.FileIndex, batcher, mesh,
                     start_step: int = 0, num_steps: int | None = None,
                     num_parallel_calls: int | None = None) -> GlobalBatches:
  """Streaming ``{"pos", "neg"}`` uint8 batches for ``pretrain.make_train_step``.

  The same cells as ``pool.images[batcher.indices(step)]`` of the in-memory
  path (with ``index`` in the pool's order), decoded from files each step.
  """
  def index_fn(step):
    pos, neg = batcher.indices(step)
    return {"pos": pos, "neg": neg}

  return global_batches(index.abspaths(), index_fn, mesh, keys=("pos", "neg"),
                        image_size=cfg.data.image_size, seed=cfg.seed,
                        start_step=start_step, num_steps=num_steps,
                        num_parallel_calls=num_parallel_calls)
