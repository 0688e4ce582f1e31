"""On-device image augmentations, as in the reference (all jit/vmap-able).

The reference's positive-cell views use RandomCrop, RandomHorizontalFlip,
ColorJitter(0.1, 0.1, 0.1, 0.1) with p=0.8 and a 90-degree rotation with
p=0.8; its first negative view is a plain centre crop. Here the jitter ops
run in a fixed order (brightness, contrast, saturation, hue) instead of
torchvision's random order, and hue is rotated in YIQ space.

Example:
  >>> import jax, numpy as np
  >>> imgs = np.zeros((4, 40, 40, 3), np.uint8)
  >>> out = augment_batch(jax.random.key(0), imgs, crop_size=32)
  >>> out.shape, out.dtype
  ((4, 32, 32, 3), dtype('float32'))
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

_GRAY = jnp.array([0.299, 0.587, 0.114])
_RGB2YIQ = jnp.array([[0.299, 0.587, 0.114],
                      [0.596, -0.274, -0.322],
                      [0.211, -0.523, 0.312]])
_YIQ2RGB = jnp.linalg.inv(_RGB2YIQ)


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 or [0, 1] float image -> (x - mean) / std, float32."""
  if x.dtype == jnp.uint8:
    x = x.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def center_crop(x: jax.Array, crop_size: int) -> jax.Array:
  """Centre crop of a batch [B, H, W, C]."""
  h, w = x.shape[1:3]
  top, left = (h - crop_size) // 2, (w - crop_size) // 2
  return x[:, top:top + crop_size, left:left + crop_size]


POLICIES = ("reference", "cytology")


def policy_kwargs(a) -> dict:
  """:func:`augment_batch` keyword arguments of config section ``augment``.

  "reference": the keys as given. "cytology": a uniformly random rotation by
  a multiple of 90 degrees and a random flip (cells have no orientation),
  translation-only crops (no rescaling: cell size is diagnostic), and
  brightness/contrast jitter only (stain hue and saturation are diagnostic).

  >>> import ml_collections
  >>> a = ml_collections.ConfigDict(dict(policy="cytology", crop_size=28, flip=False,
  ...     jitter_strength=0.1, jitter_prob=0.8, rot90_prob=0.0, mean=(.5,)*3, std=(.25,)*3))
  >>> k = policy_kwargs(a); k["flip"], k["rot90_prob"], k["hue_saturation"]
  (True, 0.75, False)
  """
  kw = dict(crop_size=a.crop_size, flip=a.flip, jitter_strength=a.jitter_strength,
            jitter_prob=a.jitter_prob, rot90_prob=a.rot90_prob, mean=a.mean, std=a.std,
            hue_saturation=True, stain_jitter=a.get("stain_jitter", 0.0),
            blur_sigma=a.get("blur_sigma", 0.0))
  policy = a.get("policy", "reference")
  if policy == "cytology":
    kw.update(flip=True, rot90_prob=0.75, hue_saturation=False)
  elif policy != "reference":
    raise ValueError(f"config.augment.policy={policy!r}; valid: {list(POLICIES)}")
  return kw


def _color_jitter(key, img, strength, hue_saturation=True):
  kb, kc, ks, kh = jax.random.split(key, 4)
  u = lambda k: jax.random.uniform(k, (), minval=1 - strength, maxval=1 + strength)
  img = img * u(kb)
  gray = img @ _GRAY
  img = (img - gray.mean()) * u(kc) + gray.mean()
  if not hue_saturation:
    return jnp.clip(img, 0.0, 1.0)
  gray = (img @ _GRAY)[..., None]
  img = (img - gray) * u(ks) + gray
  theta = 2 * jnp.pi * jax.random.uniform(kh, (), minval=-strength, maxval=strength)
  yiq = img @ _RGB2YIQ.T
  c, s = jnp.cos(theta), jnp.sin(theta)
  i, q = yiq[..., 1], yiq[..., 2]
  yiq = jnp.stack([yiq[..., 0], c * i - s * q, s * i + c * q], axis=-1)
  return jnp.clip(yiq @ _YIQ2RGB.T, 0.0, 1.0)


def _gaussian_blur(img, sigma, radius: int = 2):
  """Separable Gaussian blur of [H, W, 3] with a traced ``sigma`` (0 = none)."""
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  w = jnp.exp(-taps ** 2 / (2 * jnp.maximum(sigma, 1e-3) ** 2))
  w = w / w.sum()
  for axis in (0, 1):
    pad = [(0, 0)] * 3
    pad[axis] = (radius, radius)
    p = jnp.pad(img, pad, mode="edge")
    n = img.shape[axis]
    img = sum(w[i] * jax.lax.slice_in_dim(p, i, i + n, axis=axis)
              for i in range(2 * radius + 1))
  return img


def _augment_one(key, img, crop_size, flip, jitter_strength, jitter_prob,
                 rot90_prob, hue_saturation=True, stain_jitter=0.0, blur_sigma=0.0):
  """img: float [H, W, 3] in [0, 1]."""
  k_crop, k_flip, k_jp, k_j, k_rp, k_r, k_s, k_b = jax.random.split(key, 8)
  h, w = img.shape[:2]
  top = jax.random.randint(k_crop, (), 0, h - crop_size + 1)
  left = jax.random.randint(jax.random.fold_in(k_crop, 1), (), 0, w - crop_size + 1)
  img = jax.lax.dynamic_slice(img, (top, left, 0), (crop_size, crop_size, 3))
  if flip:
    img = jnp.where(jax.random.bernoulli(k_flip), img[:, ::-1], img)
  if jitter_strength > 0 and jitter_prob > 0:
    img = jnp.where(jax.random.bernoulli(k_jp, jitter_prob),
                    _color_jitter(k_j, img, jitter_strength, hue_saturation), img)
  if stain_jitter > 0:  # per-channel gain: slide-to-slide stain variation
    gain = 1 + jax.random.uniform(k_s, (3,), minval=-stain_jitter, maxval=stain_jitter)
    img = jnp.clip(img * gain, 0.0, 1.0)
  if blur_sigma > 0:  # focus differs between slides and fields
    img = _gaussian_blur(img, jax.random.uniform(k_b, (), maxval=blur_sigma))
  if rot90_prob > 0:
    k = jnp.where(jax.random.bernoulli(k_rp, rot90_prob),
                  jax.random.randint(k_r, (), 1, 4), 0)
    rots = jnp.stack([jnp.rot90(img, r) for r in range(4)])
    img = rots[k]
  return img


def augment_batch(key: jax.Array, images: jax.Array, crop_size: int,
                  flip: bool = True, jitter_strength: float = 0.1,
                  jitter_prob: float = 0.8, rot90_prob: float = 0.8,
                  mean: Sequence[float] = (0.5, 0.5, 0.5),
                  std: Sequence[float] = (0.25, 0.25, 0.25),
                  hue_saturation: bool = True, stain_jitter: float = 0.0,
                  blur_sigma: float = 0.0) -> jax.Array:
  """Random view of every image in a uint8 batch [B, H, W, 3], normalised."""
  x = images.astype(jnp.float32) / 255.0
  keys = jax.random.split(key, x.shape[0])
  x = jax.vmap(lambda k, im: _augment_one(
      k, im, crop_size, flip, jitter_strength, jitter_prob, rot90_prob,
      hue_saturation, stain_jitter, blur_sigma))(keys, x)
  return normalize(x, mean, std)


def eval_view(images: jax.Array, crop_size: int,
              mean: Sequence[float] = (0.5, 0.5, 0.5),
              std: Sequence[float] = (0.25, 0.25, 0.25)) -> jax.Array:
  """Deterministic view (centre crop + normalisation) for negatives/eval."""
  return normalize(center_crop(images, crop_size), mean, std)
