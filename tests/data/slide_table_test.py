"""Tests of slamjax.data.slide_table: one slide-table dialect, one error class."""

import ml_collections
import numpy as np
import pytest
from PIL import Image

from slamjax import runtime
from slamjax.data import slide_table
from slamjax.data import slides
from slamjax.features import dataset as features_dataset


def _csv(tmp_path, text, name="slides.csv"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def _raises(path, *needles, **kw):
  with pytest.raises(slide_table.DataError) as e:
    slide_table.parse(path, **kw)
  msg = str(e.value)
  for n in needles:
    assert n in msg, (n, msg)
  return msg


def test_labels_splits_patients_folds(tmp_path):
  path = _csv(tmp_path, "slide_id,patient_id,a,b,split,fold\n"
                        "s1,p1,1,No,TRAINING,0\ns2,p1,true,0.0,train,0\n"
                        "s3,p2,,null,valid,1\ns4,p3,0,YES,Testing,2\n")
  t = slide_table.parse(path)
  assert t.slide_ids == ["s1", "s2", "s3", "s4"] and t.lines == [2, 3, 4, 5]
  assert t.task_names == ("a", "b")
  np.testing.assert_array_equal(t.labels[[0, 1, 3]], [[1, 0], [1, 0], [0, 1]])
  assert np.isnan(t.labels[2]).all() and t.labelled().tolist() == [1, 1, 0, 1]
  assert t.patient_ids == ["p1", "p1", "p2", "p3"]
  assert t.splits == ["train", "train", "val", "test"]
  assert t.folds.tolist() == [0, 0, 1, 2]
  t = slide_table.parse(path, label_columns="b, a")  # comma-separated, in order
  assert t.task_names == ("b", "a")


def test_categorical_column(tmp_path):
  path = _csv(tmp_path, "slide_id,dx\ns1,normal\ns2,ig\ns3,aml\ns4,NaN\n")
  t = slide_table.parse(path, label_column="dx", negative_label="normal")
  assert t.task_names == ("aml", "ig")
  np.testing.assert_array_equal(t.labels[:3], [[0, 0], [0, 1], [1, 0]])
  assert t.labelled().tolist() == [True, True, True, False]
  _raises(path, "label_column='split' is a reserved column", label_column="split",
          negative_label="x")


def test_split_values_the_caller_can_use(tmp_path):
  path = _csv(tmp_path, "slide_id,label,split\ns1,0,train\ns2,1,Validation\n")
  assert slide_table.parse(path).splits == ["train", "val"]
  msg = _raises(path, "line 3 (slide 's2'): 'Validation' (= 'val')", "['train', 'test']",
                "also testing, training", "(= 'val'). Use train/test",
                splits=("train", "test"), split_note="Use train/test")
  assert "valid," not in msg  # aliases of a split the caller cannot use are not offered


def test_every_problem_names_file_line_and_slide(tmp_path):
  path = _csv(tmp_path, "slide_id,label\ns1,0\ns2,maybe\n")
  _raises(path, path, "column 'label'", "line 3 (slide 's2'): 'maybe'",
          "config.data.label_column='label'", "true, false, yes, no")
  path = _csv(tmp_path, "slide_id,label\ns1,0\ns2,2\n")
  msg = _raises(path, "line 3 (slide 's2'): '2'")
  assert "label_column" not in msg  # a number is no categorical column
  path = _csv(tmp_path, "slide_id;label\ns1;0\n")
  _raises(path, "separated by semicolons")
  path = _csv(tmp_path, "slide_id,patient_id,label\ns1,,0\n")
  _raises(path, "empty patient_id at line 2 (slide 's1')")
  path = _csv(tmp_path, "slide_id,label,fold\ns1,0,-1\n")
  _raises(path, "'fold' must hold integers >= 0", "line 2 (slide 's1'): '-1'")
  _raises(path, "reserved column(s) ['fold']", label_columns=("label", "fold"))
  path = _csv(tmp_path, "slide_id,label\ns1,\ns2,NA\n")
  _raises(path, "every slide is unlabeled")
  assert not slide_table.parse(path, require_labels=False).labelled().any()


def test_unlabeled_table():
  t = slide_table.unlabeled(["a", "b"], "x,y")
  assert t.task_names == ("x", "y") and t.labels.shape == (2, 2)
  assert t.patient_ids == ["a", "b"] and t.splits is None and t.folds is None
  assert slide_table.unlabeled(["a"], ("x",), "dx").task_names == ()


def _slides_cfg(root):
  return ml_collections.ConfigDict(dict(
      source="slides", root=str(root), csv="slides.csv", cells_csv="",
      label_columns=(), label_column="", negative_label="", image_size=8,
      unlisted="error", skip_bad_files=False, cache_dir=str(root) + "_cache",
      num_workers=1))


def test_one_error_class_and_message_for_both_runners(tmp_path):
  assert slides.CohortError is features_dataset.FeatureDataError is slide_table.DataError
  assert issubclass(slide_table.DataError, ValueError)
  assert slide_table.DataError in runtime.user_errors()
  # One table, used by both runners, with one mistake: the same message.
  root = tmp_path / "both"
  for sid in ("s1", "s2"):
    (root / sid).mkdir(parents=True)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / sid / "0.png")
    np.save(root / f"{sid}.npy", np.ones((2, 3), np.float32))
  (root / "slides.csv").write_text("slide_id,patient_id,label\ns1,p1,1\ns2,p2,maybe\n")
  msgs = []
  for load in (lambda: slides.load_cohort(_slides_cfg(root)),
               lambda: features_dataset.load_feature_folder(str(root))):
    with pytest.raises(slide_table.DataError) as e:
      load()
    msgs.append(str(e.value))
  assert msgs[0] == msgs[1] and "line 3 (slide 's2'): 'maybe'" in msgs[0]
  # Fixed, both runners read the same labels and patients.
  (root / "slides.csv").write_text("slide_id,patient_id,label\ns1,p1,yes\ns2,p2,no\n")
  cohort = slides.load_cohort(_slides_cfg(root))
  ds = features_dataset.load_feature_folder(str(root))
  np.testing.assert_array_equal(cohort.labels, ds.labels)
  assert list(cohort.patient_ids) == ds.patient_ids == ["p1", "p2"]
