"""Helpers for the features tests: tiny per-slide feature files in tmp dirs."""

import os

import numpy as np
import pytest


def write_h5(path, features, **extra):
  import h5py
  with h5py.File(path, "w") as f:
    f.create_dataset("features", data=features)
    for k, v in extra.items():
      if k == "cell_ids":
        f.create_dataset(k, data=np.asarray(v, object), dtype=h5py.string_dtype())
      else:
        f.create_dataset(k, data=v)


def write_csv(path, header, rows):
  with open(path, "w") as f:
    f.write(",".join(header) + "\n")
    for r in rows:
      f.write(",".join(str(v) for v in r) + "\n")


def slide_features(rng, n, dim, positive, num_witness=2):
  """[n, dim] features; a positive slide's first instances are shifted."""
  x = rng.normal(size=(n, dim)).astype(np.float32)
  w = np.zeros(n, bool)
  if positive:
    w[:num_witness] = True
    x[w] += 3.0
  return x, w


@pytest.fixture
def mixed_folder(tmp_path):
  """8 slides of dim 6 in .h5 (with coords), .npz (with coords) and .npy,
  bag lengths 3..17, a slides.csv with a split column. Returns (root, info)."""
  root = tmp_path / "feats"
  root.mkdir()
  rng = np.random.default_rng(0)
  rows, info = [], {}
  exts = [".h5", ".npz", ".npy", ".h5", ".npz", ".npy", ".h5", ".h5"]
  for i, ext in enumerate(exts):
    sid, y = f"slide_{i}", i % 2
    n = 3 + 2 * i
    x, w = slide_features(rng, n, 6, y)
    coords = np.stack([np.arange(n) * 256, np.full(n, 512)], 1)
    path = os.path.join(root, sid + ext)
    if ext == ".h5":
      write_h5(path, x, coords=coords)
    elif ext == ".npz":
      np.savez(path, features=x, coords=coords)
    else:
      np.save(path, x)
    rows.append((sid, y, "train" if i < 5 else "test"))
    info[sid] = dict(x=x, coords=None if ext == ".npy" else coords, ext=ext)
  write_csv(root / "slides.csv", ["slide_id", "label", "split"], rows)
  return str(root), info


@pytest.fixture
def fx():
  """The helpers above, for tests (conftest modules are not importable)."""
  import types
  return types.SimpleNamespace(write_h5=write_h5, write_csv=write_csv,
                               slide_features=slide_features)
