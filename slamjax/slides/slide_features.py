"""Slide-level features that attention pooling cannot see: cell count and
pooled per-cell colour/intensity/shape statistics.

Used by the non-deep baselines (``eval.baselines=pixel_stats,cell_count``)
and, with ``mil.slide_features``, fused with a MIL head's output
(:mod:`slamjax.slides.model_selection`). Per cell: RGB means and stds, an
8-bin grey-level histogram, and a dark-stain mask (Otsu threshold of the
cell's grey levels: in May-Grünwald-Giemsa and similar stains the nucleus is
the dark part) with its area fraction and mean colour, and the mean colour
outside it. Per slide: mean, std, 10th and 90th percentile of each.

Example:
  >>> import numpy as np
  >>> imgs = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), np.uint8)
  >>> cell_stats(imgs).shape
  (10, 21)
  >>> slide_matrix(imgs, [np.arange(4), np.arange(4, 10)], ("log_count", "pixel_stats")).shape
  (2, 85)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

FEATURES = ("log_count", "pixel_stats")
CELL_STATS = 21
_GREY = np.array([0.299, 0.587, 0.114], np.float32)
_BINS = 8
_OTSU_BINS = 32
_CHUNK = 2048  # cells per block: bounded memory on cohorts of any size


def _otsu(grey: np.ndarray) -> np.ndarray:
  """Per image [B, P] in [0, 1]: the Otsu threshold of its grey levels."""
  idx = np.minimum((grey * _OTSU_BINS).astype(np.int64), _OTSU_BINS - 1)
  hist = np.stack([np.bincount(r, minlength=_OTSU_BINS) for r in idx]).astype(np.float64)
  p = hist / hist.sum(1, keepdims=True)
  centers = (np.arange(_OTSU_BINS) + 0.5) / _OTSU_BINS
  w0 = np.cumsum(p, 1)
  m0 = np.cumsum(p * centers, 1)
  mt = m0[:, -1:]
  between = (mt * w0 - m0) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
  return (np.argmax(between, 1) + 1) / _OTSU_BINS


def widths(features: Sequence[str]) -> list[int]:
  """Columns of each named feature block in :func:`slide_matrix`.

  >>> widths(("log_count", "pixel_stats"))
  [1, 84]
  """
  return [1 if f == "log_count" else 4 * CELL_STATS for f in features]


def cell_stats(images: np.ndarray) -> np.ndarray:
  """float32 [N, 21] statistics of uint8 cell images [N, S, S, 3]."""
  out = np.empty((len(images), CELL_STATS), np.float32)
  for s in range(0, len(images), _CHUNK):
    x = np.asarray(images[s:s + _CHUNK], np.float32).reshape(
        min(_CHUNK, len(images) - s), -1, 3) / 255.0
    grey = x @ _GREY
    hist = np.stack([np.histogram(g, _BINS, (0, 1))[0] for g in grey]) / grey.shape[1]
    dark = grey < _otsu(grey)[:, None]
    area = dark.mean(1)
    inside = (x * dark[..., None]).sum(1) / np.maximum(dark.sum(1), 1)[:, None]
    outside = (x * ~dark[..., None]).sum(1) / np.maximum((~dark).sum(1), 1)[:, None]
    out[s:s + len(x)] = np.concatenate(
        [x.mean(1), x.std(1), hist, area[:, None], inside, outside], 1)
  return out


def pool(stats: np.ndarray, cells: Sequence[np.ndarray]) -> np.ndarray:
  """[num_slides, 4 * F]: mean, std, p10, p90 of each cell statistic per slide."""
  rows = []
  for idx in cells:
    v = stats[idx]
    rows.append(np.concatenate([v.mean(0), v.std(0), *np.percentile(v, [10, 90], axis=0)]))
  return np.asarray(rows, np.float32)


def slide_matrix(images: np.ndarray, cells: Sequence[np.ndarray],
                 features: Sequence[str], stats: np.ndarray | None = None) -> np.ndarray:
  """[num_slides, F] with the named ``features`` (see :data:`FEATURES`) side by side.

  ``stats`` (from :func:`cell_stats` over every image) saves recomputing them.
  """
  unknown = [f for f in features if f not in FEATURES]
  if unknown:
    raise ValueError(f"unknown slide feature(s) {unknown}; valid: {list(FEATURES)}")
  cols = []
  for name in features:
    if name == "log_count":
      cols.append(np.log([[len(c)] for c in cells]).astype(np.float32))
    else:
      all_cells = np.concatenate([np.asarray(c) for c in cells]) if len(cells) else []
      if stats is None:
        sub = np.unique(all_cells)
        local = np.full(len(images), -1, np.int64)
        local[sub] = np.arange(len(sub))
        stats_sub = cell_stats(images[sub])
        cols.append(pool(stats_sub, [local[np.asarray(c)] for c in cells]))
      else:
        cols.append(pool(stats, cells))
  return np.concatenate(cols, 1) if cols else np.zeros((len(cells), 0), np.float32)
