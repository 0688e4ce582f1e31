"""Feature-folder loading: every file format, CSV handling and every error case."""

import os

import numpy as np
import pytest

from slamjax.features import dataset
from slamjax.features.dataset import FeatureDataError


def _simple(tmp_path, fx, n=4, dim=3, ext=".npy", header=("slide_id", "label")):
  """n .npy/.h5 slides s0..s{n-1} of length 2 + i, labels i % 2."""
  root = tmp_path / "f"
  root.mkdir()
  for i in range(n):
    x = np.full((2 + i, dim), float(i), np.float32)
    if ext == ".h5":
      fx.write_h5(str(root / f"s{i}.h5"), x)
    else:
      np.save(root / f"s{i}{ext}", x)
  rows = [(f"s{i}", i % 2, "train" if i < n // 2 else "test")[:len(header)]
          for i in range(n)]
  fx.write_csv(root / "slides.csv", header, rows)
  return root


def test_all_formats_load_with_coords_ids_and_any_bag_length(mixed_folder, fx, tmp_path):
  root, info = mixed_folder
  ds = dataset.load_feature_folder(root)
  assert ds.slide_ids == [f"slide_{i}" for i in range(8)]
  assert ds.dim == 6 and ds.label_columns == ("label",)
  assert [len(x) for x in ds.features] == [3 + 2 * i for i in range(8)]
  for sid, x, c, f in zip(ds.slide_ids, ds.features, ds.coords, ds.files):
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, info[sid]["x"])
    assert f.endswith(info[sid]["ext"])
    if info[sid]["coords"] is None:
      assert c is None
    else:
      np.testing.assert_array_equal(c, info[sid]["coords"])
  assert ds.labels[:, 0].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
  split = ds.split_indices()
  assert split["train"].tolist() == [0, 1, 2, 3, 4] and split["test"].tolist() == [5, 6, 7]
  assert "val" not in split
  assert all(w is None for w in ds.witness) and all(c is None for c in ds.cell_ids)

  # cell ids / witness flags from .h5 and .npz, [1, N, D] features, float16/int.
  other = tmp_path / "other"
  other.mkdir()
  fx.write_h5(str(other / "a.h5"), np.ones((1, 3, 4), np.float16),
              cell_ids=["c0", "c1", "c2"], witness=np.array([0, 1, 0], np.uint8))
  np.savez(other / "b.npz", features=np.arange(8).reshape(2, 4),
           cell_ids=np.array(["x", "y"]), witness=np.array([True, False]))
  fx.write_csv(other / "slides.csv", ["slide_id", "label"], [("a", 1), ("b", 0)])
  ds = dataset.load_feature_folder(str(other))
  assert [x.shape for x in ds.features] == [(3, 4), (2, 4)]
  assert all(x.dtype == np.float32 for x in ds.features)
  assert ds.cell_ids[0].tolist() == ["c0", "c1", "c2"] and ds.cell_ids[1].tolist() == ["x", "y"]
  assert ds.witness[0].tolist() == [False, True, False]
  assert ds.witness[1].tolist() == [True, False]


def test_label_columns_splits_and_manifest_location(tmp_path, fx, monkeypatch):
  root = _simple(tmp_path, fx, n=6)
  fx.write_csv(root / "multi.csv", ["split", "b", "slide_id", "a", "c"],
               [("Train" if i < 3 else "validation" if i == 3 else "TEST",
                 1 - i % 2, f"s{i}", i % 2, "TRUE" if i else "false") for i in range(6)])
  ds = dataset.load_feature_folder(str(root), "multi.csv")
  assert ds.label_columns == ("b", "a", "c")
  assert ds.labels.tolist()[:2] == [[1, 0, 0], [0, 1, 1]]
  assert ds.splits.tolist() == ["train"] * 3 + ["val", "test", "test"]
  assert {k: v.tolist() for k, v in ds.split_indices().items()} == {
      "train": [0, 1, 2], "val": [3], "test": [4, 5]}
  ds = dataset.load_feature_folder(str(root), "multi.csv", label_columns="c, a")
  assert ds.label_columns == ("c", "a") and ds.labels.shape == (6, 2)
  # Absolute manifest path, and a relative one found from the current directory.
  elsewhere = tmp_path / "csvs"
  elsewhere.mkdir()
  fx.write_csv(elsewhere / "l.csv", ["slide_id", "y"], [(f"s{i}", i % 2) for i in range(6)])
  assert dataset.load_feature_folder(str(root), str(elsewhere / "l.csv")).num_slides == 6
  monkeypatch.chdir(tmp_path)
  assert dataset.load_feature_folder(str(root), "csvs/l.csv").label_columns == ("y",)


def test_random_split_is_stratified_seeded_and_never_empty(tmp_path, fx):
  root = _simple(tmp_path, fx, n=10, header=("slide_id", "label"))
  ds = dataset.load_feature_folder(str(root))
  assert ds.splits is None
  a, b = ds.split_indices(0.3, seed=1), ds.split_indices(0.3, seed=1)
  assert a["test"].tolist() == b["test"].tolist()
  assert sorted(a["train"].tolist() + a["test"].tolist()) == list(range(10))
  assert ds.labels[a["test"], 0].tolist().count(1) == 2  # round(0.3 * 5) per class
  assert len(ds.split_indices(0.01)["test"]) == 2  # >= 1 slide of every class
  with pytest.raises(FeatureDataError, match=r"test_fraction=1.0"):
    ds.split_indices(1.0)



def test_categorical_column_as_in_the_slides_runner(tmp_path, fx):
  root = _simple(tmp_path, fx, n=5)
  fx.write_csv(root / "slides.csv", ["slide_id", "diagnosis"],
               [("s0", "normal"), ("s1", "aml"), ("s2", "normal"), ("s3", "cml"),
                ("s4", "NA")])
  ds = dataset.load_feature_folder(str(root), label_column="diagnosis",
                                   negative_label="normal")
  assert ds.label_columns == ("aml", "cml")  # one-vs-rest, sorted
  np.testing.assert_array_equal(ds.labels[:4], [[0, 0], [1, 0], [0, 0], [0, 1]])
  assert ds.labelled().tolist() == [True] * 4 + [False]
  # Without label_column the text column is refused, with the hint.
  msg = _expect(root, r"column 'diagnosis' has values outside \{0, 1\}")
  assert "config.data.label_column='diagnosis'" in msg
  _expect(root, r"negative_label='Normal' never occurs in column 'diagnosis'",
          label_column="diagnosis", negative_label="Normal")


def test_patient_id_and_fold_keep_a_patients_slides_together(tmp_path, fx):
  root = _simple(tmp_path, fx, n=12)
  rows = [(f"s{i}", f"p{i // 2}", i // 2 % 2, i // 4) for i in range(12)]
  fx.write_csv(root / "slides.csv", ["slide_id", "patient_id", "label", "fold"], rows)
  ds = dataset.load_feature_folder(str(root))
  assert ds.label_columns == ("label",)  # patient_id and fold are not labels
  assert ds.patient_ids == [f"p{i // 2}" for i in range(12)]
  assert ds.folds.tolist() == [i // 4 for i in range(12)] and ds.splits is None
  for seed in range(5):
    split = ds.split_indices(0.3, seed)
    test = {ds.patient_ids[i] for i in split["test"]}
    train = {ds.patient_ids[i] for i in split["train"]}
    assert not test & train and len(test) == 2  # round(0.3 * 3) patients per class
  # A patient's slides must share the fold (and split).
  rows[1] = ("s1", "p0", 0, 1)
  fx.write_csv(root / "slides.csv", ["slide_id", "patient_id", "label", "fold"], rows)
  _expect(root, r"patient 'p0': slide 's0' has fold 0, slide 's1' has fold 1")


def test_unlabeled_slides_are_left_out_of_training_splits(tmp_path, fx):
  root = _simple(tmp_path, fx, n=6)
  fx.write_csv(root / "slides.csv", ["slide_id", "label", "split"],
               [("s0", 0, "train"), ("s1", 1, "train"), ("s2", "", "train"),
                ("s3", "false", "test"), ("s4", "yes", "test"), ("s5", "n/a", "test")])
  ds = dataset.load_feature_folder(str(root))
  assert np.isnan(ds.labels[[2, 5], 0]).all()
  assert {k: v.tolist() for k, v in ds.split_indices().items()} == {
      "train": [0, 1], "test": [3, 4], "unlabeled": [2, 5]}
  fx.write_csv(root / "slides.csv", ["slide_id", "label"],
               [("s0", 0), ("s1", 1), ("s2", ""), ("s3", 0), ("s4", 1), ("s5", "")])
  split = dataset.load_feature_folder(str(root)).split_indices(0.5, seed=0)
  assert split["unlabeled"].tolist() == [2, 5]
  assert sorted(split["train"].tolist() + split["test"].tolist()) == [0, 1, 3, 4]


def test_file_names_match_slide_ids_in_nfc(tmp_path, fx):
  import unicodedata
  root = tmp_path / "f"
  root.mkdir()
  nfd, nfc = unicodedata.normalize("NFD", "Zoë"), unicodedata.normalize("NFC", "Zoë")
  np.save(root / f"{nfd}.npy", np.ones((2, 3), np.float32))  # as macOS names it
  np.save(root / "b.npy", np.ones((2, 3), np.float32))
  (root / "slides.csv").write_text(f"slide_id,label\n{nfc},1\nb,0\n", encoding="utf-8")
  assert dataset.load_feature_folder(str(root)).slide_ids == [nfc, "b"]

def _expect(root, match, **kw):
  with pytest.raises(FeatureDataError, match=match) as e:
    dataset.load_feature_folder(str(root), **kw)
  return str(e.value)


def test_slide_in_csv_without_file_and_file_without_row(tmp_path, fx):
  root = _simple(tmp_path, fx)
  os.remove(root / "s2.npy")
  msg = _expect(root, r"1 slide\(s\) in .*slides.csv have no feature file")
  assert "s2" in msg and str(root) in msg
  np.save(root / "s2.npy", np.ones((2, 3), np.float32))
  np.save(root / "extra_slide.npy", np.ones((2, 3), np.float32))
  msg = _expect(root, r"1 feature file\(s\) in .* have no row in .*slides.csv")
  assert "extra_slide.npy" in msg and "unlisted=ignore" in msg
  assert dataset.load_feature_folder(str(root), unlisted_files="ignore").num_slides == 4


def test_mismatched_dimensions_name_the_odd_file(tmp_path, fx):
  root = _simple(tmp_path, fx)
  np.save(root / "s3.npy", np.ones((5, 7), np.float32))
  msg = _expect(root, r"feature dimensions differ")
  assert "3 file(s) have D=3" in msg and "s3.npy (D=7)" in msg


@pytest.mark.parametrize("ext", [".npy", ".h5"])
def test_nan_and_inf_name_the_file_and_count(tmp_path, fx, ext):
  root = _simple(tmp_path, fx, ext=ext)
  x = np.ones((6, 3), np.float32)
  x[0, 0] = x[1, 2] = np.nan
  x[4, 1] = -np.inf
  if ext == ".h5":
    fx.write_h5(str(root / "s1.h5"), x)
  else:
    np.save(root / "s1.npy", x)
  msg = _expect(root, rf"s1{ext}: 3 non-finite values in 'features' \(2 NaN, 1 infinite")
  assert "3 of 6 instances" in msg


def test_empty_bag_and_every_bad_file_listed_together(tmp_path, fx):
  root = _simple(tmp_path, fx)
  np.save(root / "s0.npy", np.zeros((0, 3), np.float32))
  np.save(root / "s2.npy", np.array([1.0, np.inf, np.inf], np.float32)[None].T.repeat(3, 1))
  msg = _expect(root, r"2 unusable feature file\(s\)")
  assert "s0.npy: empty bag (0 instances)" in msg
  assert "s2.npy: 6 non-finite values" in msg


@pytest.mark.parametrize("header,rows,match", [
    (["slide", "label"], [("s0", 0)], r"no 'slide_id' column; its columns are \['slide', 'label'\]"),
    (["slide_id", "split"], [("s0", "train")], r"no label columns \(columns: \['slide_id', 'split'\]\)"),
    (["slide_id", "label"], [("s0", 2)],
     r"column 'label' has values outside \{0, 1\} at line 2 \(slide 's0'\): '2'\. "
     r"Valid label values: 0, 1, true, false, yes, no"),
    (["slide_id", "label"], [("s0", "")], r"every slide is unlabeled \(label columns \['label'\]"),
    (["slide_id", "label", "split"], [("s0", 0, "holdout")],
     r"column 'split' must be one of \['train', 'val', 'test'\].*got line 2 \(slide 's0'\): 'holdout'"),
    (["slide_id", "label"], [("s0", 0), ("s0", 1)], r"duplicate slide_id 's0' at lines 2 and 3"),
    (["slide_id", "label", "label"], [("s0", 0, 1)], r"column\(s\) \['label'\] appear more than once"),
    (["slide_id", "label"], [("s0", 0, 1)], r"line 2: 3 values but the header has 2 columns"),
    (["slide_id", "label"], [], r"has a header but no slide rows"),
    (["slide_id", "x", "y"], [("s0", 0, 1), ("s1", 1, "")],
     r"some but not all label columns \['x', 'y'\] are empty at line 3 \(slide 's1'\)"),
])
def test_bad_csv_is_named(tmp_path, fx, header, rows, match):
  root = _simple(tmp_path, fx)
  fx.write_csv(root / "slides.csv", header, rows)
  _expect(root, match, unlisted_files="ignore")


def test_bad_csv_label_selection_empty_csv_and_missing_csv(tmp_path, fx):
  root = _simple(tmp_path, fx)
  _expect(root, r"label column\(s\) \['grade'\] named in config.data.label_columns are not in "
          r"the CSV; its columns are \['slide_id', 'label'\]", label_columns="label,grade")
  (root / "slides.csv").write_text("")
  _expect(root, r"slides.csv is empty")
  _expect(root, r"slide table .*nope.csv not found \(config.data.manifest", manifest="nope.csv")


def test_pickles_are_never_loaded(tmp_path, fx):
  root = _simple(tmp_path, fx)
  np.save(root / "s1.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
  np.savez(root / "s2.npz", features=np.array([[1.0]], dtype=object))
  os.remove(root / "s2.npy")
  msg = _expect(root, r"pickled Python objects")
  assert "s1.npy" in msg and "s2.npz" in msg and "allow_pickle=False" in msg


def test_malformed_files_are_named(tmp_path, fx):
  root = _simple(tmp_path, fx)
  for i in range(4):
    os.remove(root / f"s{i}.npy")
  np.savez(root / "s0.npz", feats=np.ones((2, 3)))
  fx.write_h5(str(root / "s1.h5"), np.ones((2, 3)), coords=np.ones((3, 2)))
  import h5py
  with h5py.File(root / "s2.h5", "w") as f:
    f.create_dataset("embeddings", data=np.ones((2, 3)))
  (root / "s3.h5").write_bytes(b"not an hdf5 file")
  msg = _expect(root, r"4 unusable feature file\(s\)")
  assert "s0.npz: no 'features' array; it has ['feats']" in msg
  assert "s1.h5: 'coords' must be [2, 2] to match 2 feature rows, got (3, 2)" in msg
  assert "s2.h5: no 'features' dataset; it has ['embeddings']" in msg
  assert "s3.h5: unreadable" in msg
  for i in range(4):
    for f in (root / f"s{i}.npz", root / f"s{i}.h5"):
      if f.exists():
        os.remove(f)
    np.save(root / f"s{i}.npy", np.ones((2, 3)))
  np.save(root / "s0.npy", np.ones(5))
  _expect(root, r"s0.npy: 'features' must be \[N, D\], got shape \(5,\)")


def test_folder_level_errors(tmp_path, fx):
  root = _simple(tmp_path, fx)
  np.savez(root / "s1.npz", features=np.ones((2, 3)))
  _expect(root, r"more than one feature file: s1.npy and s1.npz")
  _expect(tmp_path / "missing", r"feature folder .*missing does not exist",
          manifest=str(root / "slides.csv"))
  with pytest.raises(FeatureDataError, match=r"config.data.root is not set"):
    dataset.load_feature_folder(None)
  # A CLAM job folder given instead of its h5_files/ subfolder: a hint.
  clam = tmp_path / "clam"
  (clam / "h5_files").mkdir(parents=True)
  (clam / "pt_files").mkdir()
  fx.write_csv(clam / "slides.csv", ["slide_id", "label"], [("a", 0)])
  msg = _expect(clam, r"have no feature file")
  assert "did you mean " + str(clam / "h5_files") in msg
