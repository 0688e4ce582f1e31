"""Slide features: known answers on drawn cells, and the baselines that use them."""

import numpy as np

from slamjax.slides import slide_features as sf


def _disk(radius, size=32, dark=40, light=220):
  yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
  img = np.full((size, size, 3), light, np.uint8)
  img[yy ** 2 + xx ** 2 <= radius ** 2] = dark
  return img


def test_dark_mask_area_and_colour_follow_the_nucleus():
  imgs = np.stack([_disk(6), _disk(12)])
  s = sf.cell_stats(imgs)
  area = s[:, 14]
  expected = [np.pi * 36 / 1024, np.pi * 144 / 1024]
  np.testing.assert_allclose(area, expected, rtol=0.1)
  np.testing.assert_allclose(s[:, 15:18], 40 / 255, atol=1e-4)  # inside: the dark stain
  np.testing.assert_allclose(s[:, 18:21], 220 / 255, atol=1e-4)  # outside: background
  np.testing.assert_allclose(s[:, 0:3].mean(1), [
      (e * 40 + (1 - e) * 220) / 255 for e in area], atol=1e-3)


def test_slide_matrix_pools_per_slide():
  imgs = np.stack([_disk(4)] * 3 + [_disk(10)] * 5)
  x = sf.slide_matrix(imgs, [np.arange(3), np.arange(3, 8)], ("log_count", "pixel_stats"))
  assert x.shape == (2, 1 + 4 * sf.CELL_STATS)
  np.testing.assert_allclose(x[:, 0], np.log([3, 5]))
  assert x[1, 1 + 14] > x[0, 1 + 14]  # larger mean dark area
  np.testing.assert_allclose(x[:, 1 + sf.CELL_STATS:1 + 2 * sf.CELL_STATS], 0, atol=1e-6)
  stats = sf.cell_stats(imgs)  # precomputed statistics give the same matrix
  np.testing.assert_allclose(sf.slide_matrix(imgs, [np.arange(3), np.arange(3, 8)],
                                             ("pixel_stats",), stats), x[:, 1:], atol=1e-6)
