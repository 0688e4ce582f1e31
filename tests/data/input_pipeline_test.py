"""Tests of the tf.data file pipeline (slamjax/data/input_pipeline.py)."""

import os

import jax
import ml_collections
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from slamjax import sharding  # noqa: E402
from slamjax.data import batching  # noqa: E402
from slamjax.data import folder  # noqa: E402
from slamjax.data import input_pipeline as ip  # noqa: E402

AUG = ml_collections.ConfigDict(dict(
    crop_size=12, flip=True, jitter_strength=0.1, jitter_prob=0.8,
    rot90_prob=0.8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
VIEWS = {"pos": ("augment", "augment"), "neg": ("center", "augment")}


def _two_keys(n_pos, n_neg, seed=0):
  batcher = batching.ProportionalBatcher(np.arange(n_pos), np.arange(n_pos, n_pos + n_neg),
                                         8, seed=seed)
  return lambda step: dict(zip(("pos", "neg"), batcher.indices(step)))


def _take(ds, n):
  return [b for _, b in zip(range(n), ds.as_numpy_iterator())]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture
def files(make_folder):
  index = folder.scan_folder(make_folder({"normal": 14, "blast": 6}, size=16))
  return index


def test_batches_are_deterministic_for_a_seed(files):
  fn = _two_keys(6, 14)
  make = lambda seed: ip.make_dataset(files.abspaths(), fn, image_size=16, seed=seed,
                                      num_steps=3, views=VIEWS, augment=AUG,
                                      labels=files.labels, num_parallel_calls=2)
  a, b, c = _take(make(0), 3), _take(make(0), 3), _take(make(1), 3)
  for x, y in zip(a, b):
    _assert_same(x, y)
  assert a[0]["pos"].shape == (a[0]["pos_index"].shape[0], 2, 12, 12, 3)
  np.testing.assert_array_equal(a[0]["pos_index"], c[0]["pos_index"])
  assert not np.allclose(a[0]["pos"], c[0]["pos"])  # the seed drives the views
  # Negative view 1 is the plain centre crop, normalised.
  img = ip.make_dataset(files.abspaths(), fn, image_size=16, seed=0, num_steps=1)
  raw = next(img.as_numpy_iterator())["neg"][:, 2:14, 2:14] / 255.0
  np.testing.assert_allclose(a[0]["neg"][:, 0], (raw - 0.5) / 0.25, atol=1e-5)
  assert a[0]["pos_label"].tolist() == files.labels[a[0]["pos_index"]].tolist()


def test_resuming_gives_the_same_batches(files):
  fn = ip.epoch_index_fn(len(files), 6, seed=0)
  kw = dict(image_size=16, seed=0, views={"image": ("augment",)}, augment=AUG)
  full = _take(ip.make_dataset(files.abspaths(), fn, num_steps=5, **kw), 5)
  resumed = _take(ip.make_dataset(files.abspaths(), fn, start_step=3, **kw), 2)
  _assert_same(full[3], resumed[0])
  _assert_same(full[4], resumed[1])
  # Epoch-crossing stream: each pass over the data sees every file once.
  seen = np.concatenate([b["image_index"] for b in _take(
      ip.make_dataset(files.abspaths(), fn, image_size=16, seed=0, num_steps=6), 6)])
  assert sorted(seen[:20].tolist()) == list(range(20))


def test_process_slices_make_up_the_global_batch(files):
  fn = _two_keys(6, 14)
  kw = dict(image_size=16, seed=0, num_steps=2, views=VIEWS, augment=AUG)
  whole = _take(ip.make_dataset(files.abspaths(), fn, **kw), 2)
  parts = [_take(ip.make_dataset(files.abspaths(), fn, process_index=p,
                                 process_count=2, **kw), 2) for p in (0, 1)]
  for step in range(2):
    for k in whole[step]:
      np.testing.assert_array_equal(
          whole[step][k], np.concatenate([parts[0][step][k], parts[1][step][k]]))


def test_global_arrays_are_sharded_over_data(files):
  mesh = sharding.make_mesh(-1)
  n = 4 * mesh.size
  fn = ip.epoch_index_fn(len(files), n, seed=0)
  it = ip.global_batches(files.abspaths(), fn, mesh, image_size=16, seed=0, num_steps=2)
  batches = list(it)
  assert len(batches) == 2
  x = batches[0]["image"]
  assert isinstance(x, jax.Array) and x.shape == (n, 16, 16, 3)
  assert x.sharding.spec == jax.sharding.PartitionSpec("data")
  assert len(x.addressable_shards) == mesh.size


@pytest.mark.parametrize("size", [64, 96, 128])
def test_image_sizes(files, size):
  fn = ip.epoch_index_fn(len(files), 4, seed=0)
  aug = ml_collections.ConfigDict(dict(AUG, crop_size=size * 7 // 8))
  b = next(ip.make_dataset(files.abspaths(), fn, image_size=size, seed=0, num_steps=1,
                           views={"image": ("augment",)}, augment=aug).as_numpy_iterator())
  assert b["image"].shape == (4, 1, size * 7 // 8, size * 7 // 8, 3)


def test_corrupt_file_mid_stream_is_named(files):
  bad = files.abspaths()[5]
  data = open(bad, "rb").read()
  with open(bad, "wb") as f:
    f.write(data[:len(data) // 2])
  mesh = sharding.make_mesh(1)
  fn = ip.epoch_index_fn(len(files), 4, seed=0)
  with pytest.raises(folder.BadFileError, match=os.path.basename(bad)):
    for _ in ip.global_batches(files.abspaths(), fn, mesh, image_size=16, seed=0,
                               num_steps=10):
      pass


def test_unsupported_extension(tmp_path):
  with pytest.raises(ValueError, match="cell.tif"):
    ip.make_dataset([str(tmp_path / "cell.tif")], ip.epoch_index_fn(1, 1, 0),
                    image_size=8, seed=0)


def test_views_are_the_reference_ops():
  """The fused batch augmentation equals the reference op sequence."""
  gray = np.array([0.299, 0.587, 0.114])
  yiq_m = ip._RGB2YIQ

  def reference(img, u, crop, s=0.1, p=0.8, rp=0.8):  # as augment._augment_one
    span = img.shape[0] - crop + 1
    top, left = min(int(u[0] * span), span - 1), min(int(u[1] * span), span - 1)
    x = img[top:top + crop, left:left + crop].astype(np.float64) / 255
    if u[2] < 0.5:
      x = x[:, ::-1]
    if u[3] < p:
      f = lambda n: 1 - s + 2 * s * u[n]
      x = x * f(4)
      m = (x @ gray).mean()
      x = (x - m) * f(5) + m
      g = (x @ gray)[..., None]
      x = (x - g) * f(6) + g
      th = 2 * np.pi * s * (2 * u[7] - 1)
      yiq = x @ yiq_m.T
      i, q = yiq[..., 1], yiq[..., 2]
      yiq = np.stack([yiq[..., 0], np.cos(th) * i - np.sin(th) * q,
                      np.sin(th) * i + np.cos(th) * q], -1)
      x = np.clip(yiq @ np.linalg.inv(yiq_m).T, 0, 1)
    k = 1 + min(int(u[9] * 3), 2) if u[8] < rp else 0
    return np.rot90(x, k)

  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (48, 20, 20, 3), dtype=np.uint8)
  u = rng.random((10, 48)).astype(np.float32)
  out = ip._view_batch(tf.constant(img), tf.constant(u), tf.zeros([48], bool), 16,
                       dict(AUG)).numpy()
  want = np.stack([reference(img[t], u[:, t], 16) for t in range(48)])
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_pretrain_batches_match_the_in_memory_pool(make_folder):
  root = make_folder({"lymphocyte": 12, "ig": 6}, size=16)
  pool, _ = folder.load_folder(root, image_size=16)
  index = folder.scan_folder(root)
  batcher = batching.ProportionalBatcher(np.arange(12), np.arange(12, 18), 6, seed=0)
  cfg = ml_collections.ConfigDict(dict(seed=0, data=dict(image_size=16)))
  mesh = sharding.make_mesh(1)
  it = ip.pretrain_batches(cfg, index, batcher, mesh, start_step=1, num_steps=2)
  for step, batch in enumerate(it, start=1):
    pos, neg = batcher.indices(step)
    assert sorted(batch) == ["neg", "pos"]
    np.testing.assert_array_equal(batch["pos"], pool.images[pos])
    np.testing.assert_array_equal(batch["neg"], pool.images[neg])


def test_decoding_matches_the_folder_loader_on_pbc(pbc_root):
  index = folder.scan_folder(pbc_root, max_per_class=2)
  for size in (128, 64):  # PBC files are 128 px: resizing may differ by 1 level
    pool, _ = folder.load_folder(pbc_root, image_size=size, max_per_class=2)
    fn = ip.epoch_index_fn(len(index), len(index), seed=0)
    b = next(ip.make_dataset(index.abspaths(), fn, image_size=size, seed=0,
                             num_steps=1).as_numpy_iterator())
    diff = np.abs(b["image"].astype(int) - pool.images[b["image_index"]].astype(int))
    assert diff.max() <= (0 if size == 128 else 1)
