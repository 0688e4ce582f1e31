"""Builds the cell pool named by ``config.data.source``."""

from __future__ import annotations

import ml_collections

from slamjax.data import folder
from slamjax.data import pool as pool_lib
from slamjax.data import synthetic


def _synthetic(cfg: ml_collections.ConfigDict, seed: int) -> pool_lib.CellPool:
  images, labels = synthetic.generate_cells(
      dict(cfg.num_per_class), image_size=cfg.image_size, seed=seed,
      stain_std=cfg.stain_std)
  names = tuple(cfg.num_per_class.keys())
  ids = tuple(f"synthetic/{names[y]}/{i:06d}" for i, y in enumerate(labels))
  return pool_lib.CellPool(images, labels, names, ids)


SOURCES = {"synthetic": _synthetic}
SOURCES["folder"] = folder.pool_from_config


def load_pool(cfg: ml_collections.ConfigDict, seed: int) -> pool_lib.CellPool:
  """Loads the pool of ``cfg.source`` (one of ``SOURCES``)."""
  if cfg.source not in SOURCES:
    raise ValueError(f"config.data.source={cfg.source!r} is not one of "
                     f"{sorted(SOURCES)}")
  return SOURCES[cfg.source](cfg, seed)
