"""Tests of slamjax.data.slides (slide cohorts) and slamjax.data.image_cache."""

import doctest
import io
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from slamjax.data import image_cache
from slamjax.data import slides
from slamjax.data.slides import CohortError


def _png(path, color=(200, 10, 10), size=(12, 12), mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new(mode, size, color).save(path)


def _cfg(root, **kw):
  d = dict(source="slides", root=str(root), csv="slides.csv", cells_csv="",
           label_columns=(), label_column="", negative_label="", image_size=8,
           unlisted="error", skip_bad_files=False,
           cache_dir=str(root) + "_cache", num_workers=1)
  d.update(kw)
  return ml_collections.ConfigDict(d)


@pytest.fixture
def cohort_dir(tmp_path):
  """cohort_dir(csv_text, {slide: n_cells}) -> root with tiny PNG cells."""

  def make(csv_text, cells, name="c"):
    root = tmp_path / name
    root.mkdir()
    for sid, n in cells.items():
      for i in range(n):
        _png(str(root / sid / f"{i}.png"), (10 * i, 20, 30))
    if csv_text is not None:
      (root / "slides.csv").write_text(csv_text)
    return root

  return make


def _raises(cfg, *needles, **kw):
  with pytest.raises(CohortError) as e:
    slides.load_cohort(cfg, **kw)
  msg = str(e.value)
  for n in needles:
    assert n in msg, (n, msg)
  return msg


# --------------------------------------------------------------------------
# Layout and labels.


def test_folder_layout_binary_labels_and_order(cohort_dir):
  root = cohort_dir("slide_id,patient_id,label\nb,p1,1\na,p1,0\nc,p2,\n",
                    {"a": 2, "b": 1, "c": 3})
  # Nested, upper-case extension, hidden and non-image files.
  _png(str(root / "b" / "x" / "y" / "deep.PNG"))
  _png(str(root / "b" / ".hidden.png"))
  _png(str(root / "b" / ".trash" / "z.png"))
  (root / "b" / "notes.txt").write_text("hi")
  c = slides.load_cohort(_cfg(root))
  assert c.slide_ids == ("b", "a", "c")  # CSV order
  assert c.task_names == ("label",)
  np.testing.assert_array_equal(c.labels[:2, 0], [1, 0])
  assert np.isnan(c.labels[2, 0])
  assert c.labelled().tolist() == [True, True, False]
  assert c.patient_ids == ("p1", "p1", "p2")
  assert c.splits is None and c.folds is None and c.witness is None
  paths = [[c.cell_paths[i] for i in idx] for idx in c.cells]
  assert paths == [["b/0.png", "b/x/y/deep.PNG"], ["a/0.png", "a/1.png"],
                   ["c/0.png", "c/1.png", "c/2.png"]]
  assert c.images.shape == (7, 8, 8, 3) and c.images.dtype == np.uint8
  assert isinstance(c.images, np.memmap)
  np.testing.assert_array_equal(c.images[c.cells[1][1]][0, 0], [10, 20, 30])
  assert c.report["num_cells"] == 7 and c.report["num_ignored_files"] == 1
  assert c.report["ignored_files"] == ["b/notes.txt"]
  assert "3 slides (2 labelled, 1 unlabeled)" in c.summary()
  assert "label: 1 pos / 1 neg" in c.summary()


def test_several_binary_columns_and_label_columns_subset(cohort_dir):
  root = cohort_dir("slide_id,ig,ery,notes,split,fold\na,1,0,x,train,0\n"
                    "b,0,0,y,TEST,1\n", {"a": 1, "b": 1})
  c = slides.load_cohort(_cfg(root, label_columns=("ery", "ig")))
  assert c.task_names == ("ery", "ig")
  np.testing.assert_array_equal(c.labels, [[0, 1], [0, 0]])
  assert c.splits == ("train", "test")
  assert c.folds.tolist() == [0, 1]
  # Without label_columns every non-reserved column is a 0/1 label: 'notes' is not.
  msg = _raises(_cfg(root), "'notes'", "line 2", "'x'", "Valid label values: 0, 1")
  assert "label_column='notes'" in msg  # hint for a categorical column


def test_categorical_labels(cohort_dir):
  root = cohort_dir("slide_id,diagnosis\na,normal\nb,ig\nc,erythroblast\nd,\n",
                    {s: 1 for s in "abcd"})
  c = slides.load_cohort(_cfg(root, label_column="diagnosis", negative_label="normal"))
  assert c.task_names == ("erythroblast", "ig")  # sorted, negative left out
  np.testing.assert_array_equal(c.labels[:3], [[0, 0], [0, 1], [1, 0]])
  assert np.isnan(c.labels[3]).all() and c.labelled().tolist() == [1, 1, 1, 0]


def test_no_csv_only_when_labels_not_required(cohort_dir):
  root = cohort_dir(None, {"s2": 1, "s1": 2})
  _raises(_cfg(root), "slides.csv", "not found")
  c = slides.load_cohort(_cfg(root, label_columns=("label",)), require_labels=False)
  assert c.slide_ids == ("s1", "s2") and c.task_names == ("label",)
  assert c.labels.shape == (2, 1) and not c.labelled().any()
  c = slides.load_cohort(_cfg(root, csv=""), require_labels=False)
  assert c.task_names == () and c.labels.shape == (2, 0)
  assert c.patient_ids == ("s1", "s2")


def test_predict_table_without_label_columns(cohort_dir):
  root = cohort_dir("slide_id\na\nb\n", {"a": 1, "b": 1})
  c = slides.load_cohort(_cfg(root, label_columns=("label",)), require_labels=False)
  assert not c.labelled().any()
  _raises(_cfg(root, label_columns=("label",)), "['label']", "slide_id")


# --------------------------------------------------------------------------
# Bad input: every message names the offending file/row/value.


def test_row_without_folder(cohort_dir):
  root = cohort_dir("slide_id,label\na,0\nghost,1\n", {"a": 1})
  _raises(_cfg(root), "line 3", "'ghost'", "no folder")


def test_folder_without_row_error_or_ignore(cohort_dir):
  root = cohort_dir("slide_id,label\na,0\nb,1\n", {"a": 1, "b": 1, "extra": 1})
  _raises(_cfg(root), "extra", "unlisted='ignore'")
  c = slides.load_cohort(_cfg(root, unlisted="ignore"))
  assert c.slide_ids == ("a", "b") and c.report["unlisted_folders"] == ["extra"]
  assert c.images.shape[0] == 2  # the ignored folder is not decoded


def test_empty_slide(cohort_dir):
  root = cohort_dir("slide_id,label\na,0\nb,1\n", {"a": 1})
  (root / "b" / "sub").mkdir(parents=True)
  (root / "b" / "sub" / "readme.txt").write_text("x")
  _raises(_cfg(root), "Empty slide", str(root / "b"), "1 non-image file")


def test_duplicate_slide_id(cohort_dir):
  root = cohort_dir("slide_id,label\na,0\nb,1\na,1\n", {"a": 1, "b": 1})
  _raises(_cfg(root), "duplicate slide_id", "'a' at lines 2 and 4")


def test_binary_label_outside_set(cohort_dir):
  root = cohort_dir("slide_id,label\na,0\nb,2\n", {"a": 1, "b": 1})
  _raises(_cfg(root), "'label'", "outside {0, 1}", "line 3", "'b'", "'2'",
          "Valid label values: 0, 1, true, false, yes, no", "or empty for an unlabeled")


def test_true_false_yes_no_labels(cohort_dir):
  # The spelling of the features runner's tables: one dialect for both runners.
  root = cohort_dir("slide_id,tumor,grade\na,TRUE,no\nb,false,Yes\nc,1.0,0.0\nd,NA,n/a\n",
                    {s: 1 for s in "abcd"})
  c = slides.load_cohort(_cfg(root))
  np.testing.assert_array_equal(c.labels[:3], [[1, 0], [0, 1], [1, 0]])
  assert c.labelled().tolist() == [True, True, True, False]


def test_partial_labels(cohort_dir):
  root = cohort_dir("slide_id,x,y\na,0,1\nb,1,\n", {"a": 1, "b": 1})
  _raises(_cfg(root), "line 3", "'b'", "some but not all")


def test_categorical_errors(cohort_dir):
  root = cohort_dir("slide_id,diagnosis\na,Normal\nb,ig\n", {"a": 1, "b": 1})
  _raises(_cfg(root, label_column="diagnosis", negative_label="normal"),
          "negative_label='normal' never occurs", "['Normal', 'ig']")
  _raises(_cfg(root, label_column="dx", negative_label="normal"),
          "label_column='dx'", "['slide_id', 'diagnosis']")
  _raises(_cfg(root, label_column="diagnosis"), "negative_label", "['Normal', 'ig']")
  _raises(_cfg(root, label_column="diagnosis", negative_label="Normal",
               label_columns=("x",)), "not both")


def test_missing_slide_id_column(cohort_dir):
  root = cohort_dir("slide,label\na,0\n", {"a": 1})
  _raises(_cfg(root), "no 'slide_id' column", "['slide', 'label']")


def test_unknown_label_column(cohort_dir):
  root = cohort_dir("slide_id,label\na,0\n", {"a": 1})
  _raises(_cfg(root, label_columns=("label", "aml")), "['aml']", "['slide_id', 'label']")


def test_split_and_fold_values(cohort_dir):
  root = cohort_dir("slide_id,label,split\na,0,Training\nb,1,testing\n", {"a": 1, "b": 1})
  assert slides.load_cohort(_cfg(root)).splits == ("train", "test")  # aliases
  (root / "slides.csv").write_text("slide_id,label,split\na,0,train\nb,1,valid\n")
  # 'valid' is a valid table value ('val'), but the slides runner has no val split.
  _raises(_cfg(root), "'split'", "['train', 'test']", "line 3", "'valid' (= 'val')",
          "no validation split")
  (root / "slides.csv").write_text("slide_id,label,split\na,0,train\nb,1,holdout\n")
  _raises(_cfg(root), "'split'", "['train', 'test']", "line 3", "'holdout'")
  root = cohort_dir("slide_id,label,fold\na,0,1\nb,1,1.5\n", {"a": 1, "b": 1}, "f")
  _raises(_cfg(root), "'fold'", "integers", "line 3", "'1.5'")


def test_patient_slides_share_split(cohort_dir):
  root = cohort_dir("slide_id,patient_id,label,split\na,p,0,train\nb,p,0,test\n",
                    {"a": 1, "b": 1})
  _raises(_cfg(root), "patient 'p'", "'a'", "'b'", "split")


def test_unreadable_image_error_and_skip(cohort_dir):
  root = cohort_dir("slide_id,label\na,0\nb,1\n", {"a": 2, "b": 1})
  (root / "a" / "broken.jpg").write_bytes(b"not an image")
  _raises(_cfg(root), str(root / "a" / "broken.jpg"), "skip_bad_files")
  c = slides.load_cohort(_cfg(root, skip_bad_files=True))
  assert c.report["skipped_files"] == ["a/broken.jpg"]
  assert c.report["cache_hit"]  # the failed run cached the decode
  assert [len(x) for x in c.cells] == [2, 1] and c.report["num_cells"] == 3
  assert "a/broken.jpg" not in [c.cell_paths[i] for i in c.cells[0]]
  # A slide left empty by skipping is still an error.
  for f in (root / "b").iterdir():
    f.write_bytes(b"garbage")
  _raises(_cfg(root, skip_bad_files=True), "no readable image", "'b'")


# --------------------------------------------------------------------------
# Cell table.


def test_cell_table_with_witness(cohort_dir, tmp_path):
  root = cohort_dir("slide_id,label\ns1,0\ns2,1\n", {"pool": 4})
  outside = tmp_path / "elsewhere" / "o.png"
  _png(str(outside), (0, 255, 0))
  (root / "cells.csv").write_text(
      "slide_id,path,witness\ns2,pool/3.png,1\ns1,pool/0.png,0\ns2,pool/1.png,0\n"
      f"s1,{outside},0\ns2,{root / 'pool' / '2.png'},1\n")
  c = slides.load_cohort(_cfg(root, cells_csv="cells.csv"))
  paths = [[c.cell_paths[i] for i in idx] for idx in c.cells]
  assert paths == [["pool/0.png", str(outside)],  # sorted absolute paths
                   ["pool/1.png", "pool/2.png", "pool/3.png"]]
  assert [w.tolist() for w in c.witness] == [[False, False], [False, True, True]]
  # No slide CSV: slides come from the cell table.
  c = slides.load_cohort(_cfg(root, cells_csv="cells.csv", csv=""),
                         require_labels=False)
  assert c.slide_ids == ("s1", "s2") and not c.labelled().any()


def test_cell_table_errors(cohort_dir):
  root = cohort_dir("slide_id,label\ns1,0\ns2,1\n", {"pool": 3})
  cfg = _cfg(root, cells_csv="cells.csv")
  (root / "cells.csv").write_text("slide_id,path,witness\ns1,pool/0.png,2\ns2,pool/1.png,1\n")
  _raises(cfg, "'witness'", "0 or 1", "line 2", "pool/0.png", "'2'")
  (root / "cells.csv").write_text("slide_id,path\ns1,pool/0.png\ns2,pool/9.png\n")
  _raises(cfg, "not found", "line 3", "pool/9.png")
  (root / "cells.csv").write_text("slide_id,path\ns1,pool/0.png\ns2,pool/1.png\n"
                                  "s2,pool/2.png\ns3,pool/2.png\n")
  _raises(cfg, "line 5", "pool/2.png", "line 4")
  (root / "cells.csv").write_text("slide_id,path\ns1,pool/0.png\ns2,pool/1.png\n"
                                  "s3,pool/2.png\n")
  _raises(cfg, "s3", "unlisted='ignore'")
  assert slides.load_cohort(_cfg(root, cells_csv="cells.csv", unlisted="ignore")
                            ).report["unlisted_folders"] == ["s3"]
  (root / "cells.csv").write_text("slide_id,path\ns1,pool/0.png\n")
  _raises(cfg, "line 3", "'s2'", "no cells")
  (root / "cells.csv").write_text("slide,file\ns1,pool/0.png\n")
  _raises(cfg, "['slide_id', 'path']", "'slide', 'file'")


# --------------------------------------------------------------------------
# Image modes.


def _decode(img: Image.Image, fmt="PNG", size=4):
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return image_cache.decode_cell(buf.getvalue(), size, "x")


def test_image_modes_become_rgb():
  out = _decode(Image.new("L", (10, 10), 77))
  assert out.shape == (4, 4, 3) and (out == 77).all()
  out = _decode(Image.new("RGBA", (10, 10), (10, 200, 30, 255)))
  assert (out == [10, 200, 30]).all()
  out = _decode(Image.new("RGBA", (10, 10), (0, 0, 0, 0)))  # transparent: white
  assert (out == 255).all()
  pal = Image.new("P", (10, 10), 1)
  pal.putpalette([0, 0, 0, 1, 2, 3])
  out = _decode(pal)
  assert (out == [1, 2, 3]).all()
  # 16-bit TIFF: scaled to 8 bits by the full range, not clipped at 255.
  arr = np.array([[0, 1000], [32896, 65535]], np.uint16).repeat(4, 0).repeat(4, 1)
  out = _decode(Image.fromarray(arr), "TIFF", size=8)
  assert out[0, 0].tolist() == [0, 0, 0] and out[0, -1].tolist() == [4, 4, 4]
  assert out[-1, 0].tolist() == [128] * 3 and out[-1, -1].tolist() == [255] * 3
  # Non-square: centre crop (the blue side bands are cut away).
  wide = np.zeros((10, 30, 3), np.uint8)
  wide[:, :10] = wide[:, 20:] = (0, 0, 255)
  wide[:, 10:20] = (0, 255, 0)
  out = _decode(Image.fromarray(wide), size=5)
  assert (out == [0, 255, 0]).all()
  # A large JPEG takes the DCT-downscale path and keeps its colour.
  out = _decode(Image.new("RGB", (200, 120), (180, 40, 90)), "JPEG", size=16)
  assert np.abs(out.astype(int) - [180, 40, 90]).max() <= 3


def test_modes_through_load_cohort(cohort_dir):
  root = cohort_dir("slide_id,label\na,0\n", {})
  arr = (np.ones((20, 40)) * 65535).astype(np.uint16)
  os.makedirs(root / "a")
  Image.fromarray(arr).save(root / "a" / "x16.tif")
  Image.new("LA", (7, 9), (50, 255)).save(root / "a" / "la.png")
  Image.new("RGB", (6, 6), (9, 8, 7)).save(root / "a" / "b.bmp")
  c = slides.load_cohort(_cfg(root))
  got = {c.cell_paths[i]: c.images[i][0, 0].tolist() for i in c.cells[0]}
  assert got == {"a/b.bmp": [9, 8, 7], "a/la.png": [50, 50, 50],
                 "a/x16.tif": [255, 255, 255]}


# --------------------------------------------------------------------------
# Disk cache.


def test_cache_hit_and_invalidation(cohort_dir, monkeypatch):
  root = cohort_dir("slide_id,label\na,0\nb,1\n", {"a": 3, "b": 2})
  c1 = slides.load_cohort(_cfg(root))
  assert not c1.report["cache_hit"] and c1.report["decoded"] == 5
  assert os.path.dirname(c1.report["cache_path"]) == str(root) + "_cache"
  # Second load: no decoding at all.
  def fail(*a, **k):
    raise AssertionError("decoded on a cache hit")
  with monkeypatch.context() as m:
    m.setattr(image_cache, "decode_cell", fail)
    c2 = slides.load_cohort(_cfg(root))
  assert c2.report["cache_hit"] and c2.report["decoded"] == 0
  assert c2.report["cache_path"] == c1.report["cache_path"]
  np.testing.assert_array_equal(np.asarray(c1.images), np.asarray(c2.images))
  # Reordering the CSV keeps the cache.
  (root / "slides.csv").write_text("slide_id,label\nb,1\na,0\n")
  assert slides.load_cohort(_cfg(root)).report["cache_hit"]
  # Changing one file invalidates it.
  f = root / "b" / "1.png"
  _png(str(f), (1, 2, 250))
  st = os.stat(f)
  os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  c3 = slides.load_cohort(_cfg(root))
  assert not c3.report["cache_hit"] and c3.report["decoded"] == 5
  assert c3.report["cache_path"] != c1.report["cache_path"]
  i = c3.cell_paths.index("b/1.png")
  assert c3.images[i][0, 0].tolist() == [1, 2, 250]
  # A different image_size is a different cache entry.
  c4 = slides.load_cohort(_cfg(root, image_size=4))
  assert not c4.report["cache_hit"] and c4.images.shape[1:] == (4, 4, 3)
  # No temporary files left behind.
  assert not [n for n in os.listdir(str(root) + "_cache") if n.endswith(".tmp")]


def test_cache_dir_default_from_env(monkeypatch, tmp_path):
  monkeypatch.setenv("SLAMJAX_CACHE", str(tmp_path / "env"))
  assert image_cache.default_cache_dir("") == str(tmp_path / "env")
  assert image_cache.default_cache_dir("/x") == "/x"
  monkeypatch.delenv("SLAMJAX_CACHE")
  assert image_cache.default_cache_dir("").endswith(os.path.join(".cache", "slamjax"))


def test_chunked_decode_matches_single_chunk(tmp_path):
  paths = []
  for i in range(7):
    paths.append(str(tmp_path / f"{i}.png"))
    _png(paths[-1], (i, 2 * i, 3 * i), size=(9, 5))
  a = image_cache.load_images(paths, 4, cache_dir=str(tmp_path / "c1"), chunk_size=3,
                              num_workers=2, log=None)
  b = image_cache.load_images(paths, 4, cache_dir=str(tmp_path / "c2"), chunk_size=100,
                              log=None)
  np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
  assert a.images[6][0, 0].tolist() == [6, 12, 18]


@pytest.mark.parametrize("module", [slides, image_cache])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0, result
