"""Bags of different lengths padded into fixed-shape batches with masks.

Lengths are rounded up to a few bucket sizes (powers of two, at least
``min_len``; or ``per_octave`` evenly spaced sizes per power of two), so jit
compiles once per bucket. Batches that are not full are completed with dummy
bags of weight 0; no real bag is ever dropped.

Example:
  >>> import numpy as np
  >>> bags = [np.ones((3, 2)), np.ones((5, 2))]
  >>> b = pad_batch(bags, labels=np.array([0, 1]), batch_size=4, min_len=4)
  >>> b["x"].shape, b["mask"].sum(1).tolist(), b["weight"].tolist()
  ((4, 8, 2), [3, 5, 1, 1], [1.0, 1.0, 0.0, 0.0])
"""

from __future__ import annotations

import numpy as np


def bucket_length(n: int, min_len: int = 16, per_octave: int = 1) -> int:
  """Smallest bucket >= max(n, min_len).

  Buckets are the powers of two (``per_octave=1``) or, with ``per_octave=k``,
  the multiples of 2^j / k inside each octave [2^j, 2^(j+1)): at most k
  compiled shapes per octave, padding waste below 1/k of the length.

  >>> [bucket_length(n) for n in (3, 17, 50, 64)]
  [16, 32, 64, 64]
  >>> [bucket_length(n, per_octave=4) for n in (17, 50, 64, 65, 1000)]
  [20, 56, 64, 80, 1024]
  """
  n = max(int(n), min_len, 1)
  low = 2 ** int(np.floor(np.log2(n)))
  step = max(1, low // max(1, per_octave))
  return int(-(-n // step) * step)


def pad_batch(bags, labels, batch_size: int, min_len: int = 16,
              instance_labels=None, per_octave: int = 1) -> dict[str, np.ndarray]:
  """Pads a list of [n_i, D] bags into one batch dict.

  Returns ``x`` [B, L, D] float32, ``mask`` [B, L] bool, ``label`` [B, ...]
  float32, ``weight`` [B] (0 for filler bags) and, if given,
  ``instance_label`` [B, L] (witness flags; 0 on padding).
  """
  if not 1 <= len(bags) <= batch_size:
    raise ValueError(f"pad_batch got {len(bags)} bags for batch_size {batch_size}")
  for i, b in enumerate(bags):
    if len(b) == 0:
      raise ValueError(f"bag {i} of the batch is empty; every bag needs >= 1 instance")
  dim = bags[0].shape[1]
  length = bucket_length(max(len(b) for b in bags), min_len, per_octave)
  labels = np.asarray(labels, np.float32)
  x = np.zeros((batch_size, length, dim), np.float32)
  mask = np.zeros((batch_size, length), bool)
  mask[:, 0] = True  # filler bags keep one valid (zero) instance: no NaNs
  lab = np.zeros((batch_size,) + labels.shape[1:], np.float32)
  inst = np.zeros((batch_size, length), np.float32)
  for i, b in enumerate(bags):
    x[i, :len(b)] = b
    mask[i, :len(b)] = True
    lab[i] = labels[i]
    if instance_labels is not None:
      inst[i, :len(b)] = instance_labels[i]
  weight = np.zeros((batch_size,), np.float32)
  weight[:len(bags)] = 1.0
  out = dict(x=x, mask=mask, label=lab, weight=weight)
  if instance_labels is not None:
    out["instance_label"] = inst
  return out


def iterate_batches(bags, labels, batch_size: int, order=None, min_len: int = 16,
                    instance_labels=None, per_octave: int = 1):
  """Yields ``(bag indices, padded batch)`` covering every bag once, in order."""
  order = np.arange(len(bags)) if order is None else np.asarray(order)
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    yield idx, pad_batch(
        [bags[i] for i in idx], np.asarray(labels)[idx], batch_size, min_len,
        None if instance_labels is None else [instance_labels[i] for i in idx],
        per_octave)
