"""Tests of the class-folder loader (slamjax/data/folder.py) and its source."""

import csv
import os
import pathlib
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from slamjax.data import folder
from slamjax.data import sources


def _cfg(root, **kw):
  c = ml_collections.ConfigDict(dict(
      source="folder", root=root, image_size=8, classes=None, manifest=None,
      dedup=False, skip_bad_files=False, max_per_class=None, num_workers=2))
  c.update(kw)
  return c


def test_loads_in_a_fixed_order_with_relative_ids(make_folder):
  root = make_folder({"normal": 5, "blast": 3}, size=16)
  pool, report = folder.load_folder(root, image_size=8, num_workers=2)
  assert pool.class_names == ("blast", "normal")
  assert pool.images.shape == (8, 8, 8, 3) and pool.images.dtype == np.uint8
  assert pool.labels.tolist() == [0] * 3 + [1] * 5
  assert pool.cell_ids[:2] == ("blast/blast_0000.jpg", "blast/blast_0001.jpg")
  assert report.counts == {"blast": 3, "normal": 5}
  assert "total" in report.format()
  again, _ = folder.load_folder(root, image_size=8, num_workers=1)
  np.testing.assert_array_equal(pool.images, again.images)
  assert pool.cell_ids == again.cell_ids


def test_sizes_and_non_square_images(tmp_path):
  (tmp_path / "a").mkdir()
  Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "a" / "wide.png")
  Image.new("L", (20, 20), 128).save(tmp_path / "a" / "gray.png")
  for size in (64, 96, 128):
    pool, _ = folder.load_folder(str(tmp_path), image_size=size)
    assert pool.images.shape == (2, size, size, 3)
  assert pool.images[0, 0, 0].tolist() == [128] * 3  # gray.png sorts first


def test_empty_class_folder(make_folder, capsys):
  root = make_folder({"normal": 3})
  os.makedirs(os.path.join(root, "blast"))
  # Unused (all classes loaded): skipped with a note, not an error.
  pool, _ = folder.load_folder(root, image_size=8)
  assert pool.class_names == ("normal",) and "skipping class folder(s) ['blast']" in (
      capsys.readouterr().out)
  # Asked for by name: an error naming the folder and config.data.classes.
  with pytest.raises(folder.FolderDataError,
                     match=r"blast.*holds no image files; config.data.classes="):
    folder.load_folder(root, classes=["normal", "blast"])


def test_unknown_class_lists_available(make_folder):
  root = make_folder({"normal": 3, "blast": 2})
  with pytest.raises(folder.FolderDataError,
                     match=r"\['plasma'\] not found.*\['blast', 'normal'\]"):
    folder.load_folder(root, classes=["normal", "plasma"])
  # A class named only in the bag plan: the pool's error lists what exists.
  pool = sources.load_pool(_cfg(root), seed=0)
  with pytest.raises(ValueError, match=r"plasma.*\['blast', 'normal'\]"):
    pool.class_index(["normal", "plasma"])


def test_non_image_file_names_it_or_is_skipped(make_folder, capsys):
  root = make_folder({"normal": 3, "blast": 2})
  with open(os.path.join(root, "blast", "notes.txt"), "w") as f:
    f.write("not a cell")
  with pytest.raises(folder.BadFileError, match=r"blast/notes.txt: not an image file"):
    folder.load_folder(root)
  pool = sources.load_pool(_cfg(root, skip_bad_files=True), seed=0)
  assert len(pool) == 5
  assert "skipped 1 bad file(s): blast/notes.txt" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_jpeg_names_it_or_is_skipped(make_folder, kind):
  root = make_folder({"normal": 4, "blast": 2})
  bad = os.path.join(root, "normal", "normal_0002.jpg")
  data = pathlib.Path(bad).read_bytes()
  with open(bad, "wb") as f:
    f.write(data[:len(data) // 2] if kind == "truncated" else b"\xff\xd8" + os.urandom(200))
  with pytest.raises(folder.BadFileError, match=r"normal/normal_0002.jpg: cannot decode"):
    folder.load_folder(root, num_workers=2)
  pool, report = folder.load_folder(root, skip_bad_files=True)
  assert len(pool) == 5 and len(report.skipped) == 1
  assert "normal/normal_0002.jpg" not in pool.cell_ids
  assert report.skipped[0][0] == "normal/normal_0002.jpg"


def test_all_files_bad_in_a_class(make_folder):
  root = make_folder({"normal": 3, "blast": 1})
  with open(os.path.join(root, "blast", "blast_0000.jpg"), "wb") as f:
    f.write(b"junk")
  with pytest.raises(folder.FolderDataError, match=r"No usable images.*blast"):
    folder.load_folder(root, skip_bad_files=True)


def test_dedup_by_content(make_folder):
  root = make_folder({"normal": 3, "blast": 2})
  shutil.copy(os.path.join(root, "normal", "normal_0000.jpg"),
              os.path.join(root, "normal", "normal_0009.jpg"))
  shutil.copy(os.path.join(root, "normal", "normal_0001.jpg"),
              os.path.join(root, "blast", "copy.jpg"))
  pool, _ = folder.load_folder(root)
  assert len(pool) == 7
  pool, report = folder.load_folder(root, dedup=True)
  assert len(pool) == 5
  # Classes are read in sorted order, so blast/copy.jpg is kept.
  assert sorted(report.duplicates) == [
      ("normal/normal_0001.jpg", "blast/copy.jpg"),
      ("normal/normal_0009.jpg", "normal/normal_0000.jpg")]
  assert "filed under another class" in report.format()


def test_manifest_and_max_per_class(make_folder):
  root = make_folder({"normal": 6, "blast": 3})
  with open(os.path.join(root, "list.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["label", "file"])
    for i in range(4):
      w.writerow(["normal", f"normal/normal_{i:04d}.jpg"])
    w.writerow(["blast", "blast/blast_0000.jpg"])
  pool, report = folder.load_folder(root, manifest="list.csv")
  assert report.counts == {"blast": 1, "normal": 4}
  a = folder.scan_folder(root, max_per_class=2, seed=3)
  b = folder.scan_folder(root, max_per_class=2, seed=3)
  assert a.paths == b.paths and a.counts() == {"blast": 2, "normal": 2}


def test_missing_root():
  with pytest.raises(folder.FolderDataError, match="does not exist"):
    folder.scan_folder("/nonexistent/cells")


def test_pbc_scan_counts_and_decode(pbc_root):
  index = folder.scan_folder(pbc_root)
  assert index.counts() == {"basophil": 1212, "eosinophil": 3111,
                            "erythroblast": 1551, "ig": 2892, "lymphocyte": 1214,
                            "monocyte": 1419, "neutrophil": 3328}
  via_manifest = folder.scan_folder(pbc_root, manifest="manifest.csv")
  assert via_manifest.paths == index.paths
  pool, _ = folder.load_folder(pbc_root, image_size=64, max_per_class=3)
  assert pool.images.shape == (21, 64, 64, 3) and pool.images.mean() > 100
