"""Training bags padded once and kept on the device; an epoch is one jit call.

``fit`` trains on the same bags every epoch, only their order changes. When
the bags have similar lengths (simulated bags all have ``bag_size`` cells),
they are padded once to a common length and put on the device; each epoch
is then a single jitted ``lax.scan`` over its batches, which gathers every
batch's rows by index. No padding, host-to-device copy or dispatch per step,
and one device-to-host copy of the step metrics per epoch.

The batches are the same as in the per-step loop (``order`` cut into
``batch_size`` bags, completed with filler bags of weight 0), as are the step
rngs. Only the padded length can differ (the common length instead of each
batch's bucket); padding does not change any head's outputs or gradients
(``tests/mil/padding_invariance_test.py``), so results agree to float
rounding.

Example:
  >>> import numpy as np
  >>> bags = [np.ones((6, 2), np.float32), np.ones((7, 2), np.float32)]
  >>> length = resident_length(bags, min_len=4, per_octave=1)
  >>> data = make_resident(bags, np.array([[0.0], [1.0]]), length)
  >>> length, data["x"].shape, np.asarray(data["mask"]).sum(1).tolist()
  (8, (3, 8, 2), [6, 7, 1])
  >>> batch_indices(np.array([1, 0]), batch_size=3, num_bags=2).tolist()
  [[1, 0, 2]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from slamjax.mil import padding

# Pad once only when it costs at most this much more compute than padding
# each bag to its own bucket (a lower bound of the per-batch padding)...
MAX_EXTRA_PADDING = 0.25
# ...and the padded copy fits in this much memory (else: per-step padding).
MAX_BYTES = 1 << 30


def resident_length(bags, min_len: int, per_octave: int, dim: int | None = None,
                    max_extra: float = MAX_EXTRA_PADDING,
                    max_bytes: int = MAX_BYTES) -> int | None:
  """The common padded length, or None when per-step padding is cheaper
  (lengths too different) or the padded copy would be too big."""
  lengths = [len(b) for b in bags]
  common = padding.bucket_length(max(lengths), min_len, per_octave)
  own = sum(padding.bucket_length(n, min_len, per_octave) for n in lengths)
  dim = bags[0].shape[1] if dim is None else dim
  if common * len(bags) > (1 + max_extra) * own:
    return None
  if (len(bags) + 1) * common * dim * 4 > max_bytes:
    return None
  return common


def make_resident(bags, labels2, length: int) -> dict:
  """Device arrays ``x`` [n + 1, L, D], ``mask`` [n + 1, L], ``label``
  [n + 1, T]; row n is the filler bag (one zero instance, label 0), as
  :func:`slamjax.mil.padding.pad_batch` fills batches."""
  n, dim = len(bags), bags[0].shape[1]
  labels2 = np.asarray(labels2, np.float32)
  x = np.zeros((n + 1, length, dim), np.float32)
  mask = np.zeros((n + 1, length), bool)
  mask[:, 0] = True
  label = np.zeros((n + 1,) + labels2.shape[1:], np.float32)
  for i, b in enumerate(bags):
    x[i, :len(b)] = b
    mask[i, :len(b)] = True
    label[i] = labels2[i]
  return jax.device_put({"x": x, "mask": mask, "label": label})


def batch_indices(order, batch_size: int, num_bags: int) -> np.ndarray:
  """[steps, batch_size] int32 rows of an epoch; ``num_bags`` = filler."""
  order = np.asarray(order, np.int32)
  steps = -(-len(order) // batch_size)
  idx = np.full((steps * batch_size,), num_bags, np.int32)
  idx[:len(order)] = order
  return idx.reshape(steps, batch_size)


def gather_batch(data: dict, idx) -> dict:
  """The batch of rows ``idx`` (inside jit), with weight 0 for filler rows."""
  batch = {k: v[idx] for k, v in data.items()}
  batch["weight"] = (idx < data["x"].shape[0] - 1).astype(jnp.float32)
  return batch


def make_epoch_fn(step_fn):
  """Jitted ``epoch(state, data, idx [S, B], base_key, epoch, *args) ->
  (state, metrics stacked over S steps)``, a ``lax.scan`` of
  ``step_fn(state, batch, rng, *args)``; the rng of step i is
  ``fold_in(base_key, epoch * 100003 + i)``, as in the per-step loop."""

  @jax.jit
  def epoch_fn(state, data, idx, base_key, epoch, *args):
    def body(state, xs):
      i, rows = xs
      rng = jax.random.fold_in(base_key, epoch * 100_003 + i)
      return step_fn(state, gather_batch(data, rows), rng, *args)
    steps = jnp.arange(idx.shape[0], dtype=jnp.int32)
    return jax.lax.scan(body, state, (steps, idx))

  return epoch_fn
