"""Tests of the ``cell_bags`` TFDS builder with tfds's testing utilities."""

import io
import os
import tempfile

import numpy as np
import pytest

pytest.importorskip("tensorflow")
import tensorflow_datasets as tfds  # noqa: E402
from PIL import Image  # noqa: E402

from slamjax.data.tfds_cell_bags import tfds_cell_bags_dataset_builder as cb  # noqa: E402

TINY = cb.CellBagsConfig(
    name="tiny", description="Tiny test plan.",
    class_names=("blast", "normal"), normal_classes=("normal",),
    abnormal_classes=("blast",), witness_rate=0.25, bag_size=4,
    bags_per_split=(("train", 2, 2), ("test", 1, 1)))
TINY_RESIZED = cb.CellBagsConfig(
    name="tiny_resized", description="Tiny test plan, 8 px PNG.",
    class_names=TINY.class_names, normal_classes=TINY.normal_classes,
    abnormal_classes=TINY.abnormal_classes, witness_rate=TINY.witness_rate,
    bag_size=TINY.bag_size, bags_per_split=TINY.bags_per_split, image_size=8)


def _write_folder(root, counts, size=12, seed=0):
  rng = np.random.default_rng(seed)
  for cls, n in counts.items():
    os.makedirs(os.path.join(root, cls))
    for i in range(n):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
          buf, format="JPEG")
      with open(os.path.join(root, cls, f"{i:03d}.jpg"), "wb") as f:
        f.write(buf.getvalue())


class CellBagsTest(tfds.testing.DatasetBuilderTestCase):
  """The standard builder checks on a tiny generated manual directory."""
  DATASET_CLASS = cb.CellBags
  BUILDER_CONFIG_NAMES_TO_TEST = [TINY, TINY_RESIZED]
  SPLITS = {"train": 16, "test": 8}  # (negative + positive bags) x bag size
  SKIP_CHECKSUMS = True

  @classmethod
  def setUpClass(cls):
    cls._tmp = tempfile.TemporaryDirectory()
    cls.EXAMPLE_DIR = cls._tmp.name
    _write_folder(cls.EXAMPLE_DIR, {"normal": 30, "blast": 8})
    super().setUpClass()

  @classmethod
  def tearDownClass(cls):
    super().tearDownClass()
    cls._tmp.cleanup()


def test_examples_describe_cells_and_bags(tmp_path):
  manual = tmp_path / "manual"
  _write_folder(str(manual), {"normal": 30, "blast": 8})
  builder = cb.CellBags(config=TINY, data_dir=str(tmp_path / "data"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  rows = {s: list(tfds.as_numpy(builder.as_dataset(split=s))) for s in ("train", "test")}
  ids = {s: {r["cell_id"] for r in rs} for s, rs in rows.items()}
  assert not ids["train"] & ids["test"]  # no cell in two splits
  bags = {}
  for r in rows["train"]:
    bags.setdefault(r["bag_id"], []).append(r)
  assert len(bags) == 4
  for cells in bags.values():
    assert len(cells) == 4 and len({c["bag_label"] for c in cells}) == 1
    witnesses = [bool(c["witness"]) for c in cells]
    assert sum(witnesses) == (1 if cells[0]["bag_label"] == 1 else 0)
    assert cells[0]["bag_witness_rate"] == pytest.approx(np.mean(witnesses))
    for c in cells:  # witness <=> abnormal class; label matches the folder
      assert c["witness"] == (c["cell_label"] == 0)
      assert c["cell_id"].decode().split("/")[0] == TINY.class_names[c["cell_label"]]
      assert c["image"].shape == (12, 12, 3)


def test_bad_file_is_skipped_or_named(tmp_path):
  manual = tmp_path / "manual"
  _write_folder(str(manual), {"normal": 30, "blast": 8})
  (manual / "blast" / "003.jpg").write_bytes(b"\xff\xd8broken")
  dl = tfds.download.DownloadConfig(manual_dir=str(manual))
  skipping = cb.CellBagsConfig(**{**TINY.__dict__, "name": "tiny_skip",
                                  "skip_bad_files": True})
  builder = cb.CellBags(config=skipping, data_dir=str(tmp_path / "skip"))
  builder.download_and_prepare(download_config=dl)
  ids = {r["cell_id"].decode() for s in ("train", "test")
         for r in tfds.as_numpy(builder.as_dataset(split=s))}
  assert len(ids) == 24 and "blast/003.jpg" not in ids
  # Without skipping, a bad witness stops the build with its path.
  for i in range(8):
    (manual / "blast" / f"{i:03d}.jpg").write_bytes(b"\xff\xd8broken")
  builder = cb.CellBags(config=TINY, data_dir=str(tmp_path / "fail"))
  with pytest.raises(Exception, match=r"blast/00\d.jpg: cannot decode"):
    builder.download_and_prepare(download_config=dl)
