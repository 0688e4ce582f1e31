"""Augmentation policies: what each one may and may not change in a cell image."""

import jax
import ml_collections
import numpy as np

from slamjax.data import augment


def _section(**over):
  a = dict(policy="reference", crop_size=16, flip=True, jitter_strength=0.3,
           jitter_prob=1.0, rot90_prob=0.8, mean=(0.,) * 3, std=(1.,) * 3,
           stain_jitter=0.0, blur_sigma=0.0)
  a.update(over)
  return ml_collections.ConfigDict(a)


def _views(a, img, n=32):
  imgs = np.repeat(img[None], n, 0)
  return np.asarray(augment.augment_batch(jax.random.key(0), imgs,
                                          **augment.policy_kwargs(a)))


def test_cytology_keeps_the_hue_of_a_stain():
  img = np.zeros((16, 16, 3), np.uint8)
  img[...] = (180, 90, 120)  # one stain colour

  def hue(v):  # YIQ hue angle: brightness and contrast scale I and Q alike
    i = v @ np.array([0.596, -0.274, -0.322])
    q = v @ np.array([0.211, -0.523, 0.312])
    return np.arctan2(q, i)

  cyto = _views(_section(policy="cytology"), img)
  np.testing.assert_allclose(hue(cyto), hue(img / 255.0)[0, 0], atol=1e-4)
  ref = _views(_section(policy="reference"), img)
  assert np.abs(hue(ref) - hue(img / 255.0)[0, 0]).max() > 0.05  # hue jitter moves it


def test_cytology_rotates_all_four_ways():
  img = np.zeros((16, 16, 3), np.uint8)
  img[0, 0] = 255  # a marked corner
  v = _views(_section(policy="cytology", jitter_prob=0.0), img, n=200)
  corners = {(int(np.argmax(x[..., 0]) // 16 > 7), int(np.argmax(x[..., 0]) % 16 > 7))
             for x in v}
  assert corners == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_stain_jitter_changes_channels_independently_and_blur_smooths():
  img = np.full((16, 16, 3), 128, np.uint8)
  v = _views(_section(policy="cytology", jitter_prob=0.0, stain_jitter=0.2), img)
  gains = v.reshape(len(v), -1, 3).mean(1) / (128 / 255)
  assert 0.8 - 1e-3 <= gains.min() and gains.max() <= 1.2 + 1e-3
  assert np.std(gains[:, 0] - gains[:, 1]) > 0.05  # not one common brightness
  check = np.indices((16, 16)).sum(0) % 2 * 255
  board = np.repeat(check[..., None], 3, -1).astype(np.uint8)
  sharp = _views(_section(policy="cytology", jitter_prob=0.0), board)
  blurred = _views(_section(policy="cytology", jitter_prob=0.0, blur_sigma=2.0), board)
  assert blurred.std() < 0.9 * sharp.std()
