"""Fixtures for the data tests: tiny class-folder image datasets in tmp dirs."""

import io
import os

import numpy as np
import pytest
from PIL import Image

PBC_ROOT = os.path.normpath(os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared", "data", "pbc"))


def jpeg_bytes(rng, size=16, quality=90) -> bytes:
  arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


@pytest.fixture
def make_folder(tmp_path):
  """make_folder({"normal": 10, "blast": 3}, size=16) -> root with random JPEGs."""
  counter = [0]

  def make(counts, size=16, seed=0, name=None):
    counter[0] += 1
    root = tmp_path / (name or f"ds{counter[0]}")
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
      (root / cls).mkdir(parents=True)
      for i in range(n):
        (root / cls / f"{cls}_{i:04d}.jpg").write_bytes(jpeg_bytes(rng, size))
    return str(root)

  return make


@pytest.fixture
def pbc_root():
  if not os.path.isdir(PBC_ROOT):
    pytest.skip(f"PBC data not found at {PBC_ROOT}")
  return PBC_ROOT
