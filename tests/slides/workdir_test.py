"""A workdir knows what it holds: a rerun resumes only the run recorded there,
refuses another one (naming what differs) unless told to overwrite, and
predict refuses a final model that does not match its records and says what
the model has seen of the slides it predicts."""

import csv
import json
import os
import pathlib
import re
import shutil

import pytest

from slamjax import config as config_lib
from slamjax import workdir as workdir_lib
from slamjax.data import make_cohort
from slamjax.slides import run as slides_run

# ---------------------------------------------------------------------------
# Fingerprints and the claim on a workdir (no training).


def _data(n=10, **changes):
  slides = {f"s{i}": {"label": [float(i % 2)], "patient": f"p{i}", "cells": 5,
                      "content": f"c{i}"} for i in range(n)}
  for sid, entry in changes.items():
    if entry is None:
      del slides[sid]
    else:
      slides[sid] = {**slides.get(sid, {"label": [0.0], "patient": sid, "cells": 5,
                                         "content": sid}), **entry}
  return {"kind": "slides", "tasks": ["label"], "slides": slides}


def test_differences_name_what_changed_and_free_keys_resume():
  cfg = config_lib.load("slides", "quick")
  old = workdir_lib.fingerprint(cfg, _data())
  diff = lambda c=cfg, d=_data(): workdir_lib.differences(old, workdir_lib.fingerprint(c, d))
  flipped = _data(**{f"s{i}": {"label": [float(1 - i % 2)]} for i in range(10)})
  assert diff(d=flipped) == ["labels of 10 slides differ (s0, s1, s2, s3, s4, s5, s6, s7, "
                             "... and 2 more)"]
  assert diff(d=_data(s9=None, t0={}, t1={})) == ["2 slides added (t0, t1), 1 removed (s9)"]
  assert diff(d=_data(s9=None)) == ["1 slide removed (s9)"]
  assert diff(d=_data(s3={"content": "other"})) == [
      "cell images differ in 1 slide (s3): the files changed, or decode differently"]
  assert diff(d=_data(s3={"patient": "p0"})) == ["patient_id of 1 slide differs (s3)"]
  c = config_lib.load("slides", "quick")
  c.data.image_size = 32
  assert diff(c) == ["augment.crop_size: 21 -> 28", "data.image_size: 24 -> 32"]
  c = config_lib.load("slides", "quick")
  c.eval.folds = 3  # every slide's fold changes: not additive
  assert diff(c) == ["eval.folds: 2 -> 3"]
  # Free keys, keys that decide nothing, and the same names spelt otherwise.
  c = config_lib.load("slides", "quick")
  c.eval.baselines, c.eval.final_model, c.eval.top_k = ("pixel_stats",), False, 3
  c.data.cache_dir, c.data.root, c.pretrain.log_every_steps = "/elsewhere", "/moved", 7
  c.resume = "overwrite"
  c.mil.slide_features = ("log_count,pixel_stats",)
  assert diff(c) == [] and workdir_lib.fingerprint(c, _data())["id"] == old["id"]
  # A key added to slamjax after the run was recorded holds its default: no difference.
  legacy = json.loads(json.dumps(old))
  del legacy["config"]["augment.mean"]
  assert workdir_lib.differences(legacy, old) == []


def _claim(workdir, cfg, data, logs=None):
  claim = workdir_lib.Run(str(workdir), cfg, workdir_lib.OUTPUTS["slides"],
                          log=(logs.append if logs is not None else print))
  return claim.commit(data)


def test_claim_refuses_resumes_overwrites_and_adopts_old_workdirs(tmp_path):
  cfg = config_lib.load("slides", "quick")
  wd = tmp_path / "run"
  fp = _claim(wd, cfg, _data())
  assert json.loads((wd / "fingerprint.json").read_text()) == fp
  assert json.loads((wd / "config.json").read_text())["data"]["image_size"] == 24
  (wd / "folds").mkdir()  # results to protect
  assert _claim(wd, cfg, _data())["id"] == fp["id"]  # the same run: resumes

  c = config_lib.load("slides", "quick")
  c.data.image_size = 32
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.Run(str(wd), c, workdir_lib.OUTPUTS["slides"])  # before any data
  assert str(e.value) == (
      f"{wd} holds the results of another run: augment.crop_size: 21 -> 28; "
      "data.image_size: 24 -> 32. Nothing in it was changed.\n  Choose a new --workdir, "
      "or add --config.resume=overwrite to discard its results and start afresh.")
  with pytest.raises(workdir_lib.WorkdirError, match=r"1 slide removed \(s9\)"):
    _claim(wd, cfg, _data(s9=None))
  assert json.loads((wd / "fingerprint.json").read_text()) == fp  # untouched

  c.resume = "overwrite"
  logs = []
  new = _claim(wd, c, _data(s9=None), logs)
  assert not (wd / "folds").exists() and new["id"] != fp["id"]
  assert json.loads((wd / "fingerprint.json").read_text()) == new
  assert "removed 1 result file(s)/folder(s)" in logs[0]

  # Made before fingerprints: its config.json is checked, the data adopted.
  (wd / "folds").mkdir()
  os.remove(wd / "fingerprint.json")
  with pytest.raises(workdir_lib.WorkdirError, match=r"data.image_size: 32 -> 24"):
    workdir_lib.Run(str(wd), cfg, workdir_lib.OUTPUTS["slides"])
  c.resume = "auto"
  logs = []
  assert _claim(wd, c, _data(), logs)["id"] != new["id"]
  assert "made before slamjax recorded fingerprints: its config.json matches" in logs[0]


# ---------------------------------------------------------------------------
# The slides runner and predict on a trained workdir.


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("workdir")
  cohort = str(root / "cohort")
  make_cohort.make_cohort(cohort, source="synthetic", patients=12, min_cells=8,
                          max_cells=24, seed=0)
  wd = str(root / "run")
  slides_run.run_slides(_cfg(root, cohort), wd)
  return root, cohort, wd


def _cfg(root, cohort, **overrides):
  cfg = config_lib.load("slides", "quick")
  cfg.data.root, cfg.data.cache_dir = cohort, str(root / "cache")
  for key, value in overrides.items():
    section, name = key.split("__") if "__" in key else (None, key)
    (cfg[section] if section else cfg)[name] = value
  return cfg


def _copy_cohort(cohort, out, edit):
  """A copy of the cohort with its slide table rows passed through ``edit``."""
  shutil.copytree(cohort, out)
  path = os.path.join(out, "slides.csv")
  rows = _rows(path)
  fields = list(rows[0])
  rows = edit(rows)
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fields)
    w.writeheader()
    w.writerows(rows)
  return out, rows


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _flip(rows):
  return [dict(r, label=str(1 - int(r["label"]))) for r in rows]


def _unchanged(wd):
  return {f: pathlib.Path(wd, f).read_bytes() for f in ("config.json", "fingerprint.json")}


@pytest.mark.slow  # trains a slides run (module fixture)
def test_rerun_with_other_labels_or_slides_is_refused(trained):
  root, cohort, wd = trained
  before = _unchanged(wd)
  flipped, rows = _copy_cohort(cohort, str(root / "flipped"), _flip)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=rf"(?s)holds the results of another run: labels of {len(rows)} "
                           r"slides differ \(.*--config.resume=overwrite"):
    slides_run.run_slides(_cfg(root, flipped), wd)
  fewer, rows = _copy_cohort(cohort, str(root / "fewer"), lambda rows: rows[1:])
  gone = sorted(d for d in os.listdir(fewer) if os.path.isdir(os.path.join(fewer, d))
                and d not in {r["slide_id"] for r in rows})
  for sid in gone:
    shutil.rmtree(os.path.join(fewer, sid))
  with pytest.raises(workdir_lib.WorkdirError, match=rf": 1 slide removed \({gone[0]}\)\. "):
    slides_run.run_slides(_cfg(root, fewer), wd)
  assert _unchanged(wd) == before


@pytest.mark.slow  # trains a slides run (module fixture)
def test_rerun_with_other_image_size_is_refused_before_decoding(trained):
  root, cohort, wd = trained
  before = sorted(os.listdir(root / "cache"))
  with pytest.raises(workdir_lib.WorkdirError, match=r": augment.crop_size: 21 -> 28; "
                     r"data.image_size: 24 -> 32\. Nothing in it was changed"):
    slides_run.run_slides(_cfg(root, cohort, data__image_size=32), wd)
  assert sorted(os.listdir(root / "cache")) == before  # nothing decoded


@pytest.mark.slow  # trains a slides run (module fixture)
def test_adding_a_baseline_resumes_the_recorded_folds(trained, capsys):
  root, cohort, wd = trained
  metrics = json.loads(pathlib.Path(wd, "metrics.json").read_text())
  capsys.readouterr()
  slides_run.run_slides(_cfg(root, cohort, eval__baselines=("pixel_stats",)), wd)
  out = capsys.readouterr().out
  assert out.count("recorded, skipped") == 2  # slam_ags fold0 and fold1
  assert "slides: pixel_stats: 2 fold(s) done" in out
  again = json.loads(pathlib.Path(wd, "metrics.json").read_text())
  assert [r["encoder"] for r in again["summary"]] == ["slam_ags", "pixel_stats"]
  assert again["summary"][0] == metrics["summary"][0]
  fp = json.loads(pathlib.Path(wd, "fingerprint.json").read_text())
  assert fp["free"]["eval.baselines"] == ["pixel_stats"]
  for method in ("slam_ags", "pixel_stats"):
    rec = json.loads(pathlib.Path(wd, "folds", method, "fold0", "record.json").read_text())
    assert rec["fingerprint"] == fp["id"]


@pytest.mark.slow  # trains a slides run (module fixture)
def test_overwrite_starts_afresh_and_predict_refuses_a_foreign_final_model(trained, capsys):
  root, cohort, wd = trained
  flipped = str(root / "flipped")
  if not os.path.exists(flipped):
    _copy_cohort(cohort, flipped, _flip)
  wd2 = str(root / "run2")
  shutil.copytree(wd, wd2)
  capsys.readouterr()
  slides_run.run_slides(_cfg(root, flipped, resume="overwrite", eval__final_model=False), wd2)
  out = capsys.readouterr().out
  assert "recorded, skipped" not in out and "resume=overwrite: removed" in out
  fp = json.loads(pathlib.Path(wd2, "fingerprint.json").read_text())
  assert json.loads(pathlib.Path(wd2, "folds", "slam_ags", "fold0", "record.json").read_text(
      ))["fingerprint"] == fp["id"]
  assert not os.path.exists(os.path.join(wd2, "final"))
  labels = {r["slide_id"]: r["label"] for r in _rows(os.path.join(flipped, "slides.csv"))}
  oof = _rows(os.path.join(wd2, "oof_predictions.csv"))
  assert {r["slide_id"]: r["label_label"] for r in oof} == labels  # the new labels

  from slamjax.slides import predict
  shutil.copytree(os.path.join(wd, "final"), os.path.join(wd2, "final"))  # left over
  with pytest.raises(workdir_lib.WorkdirError,
                     match=rf"final is not the final model of the run recorded in {re.escape(wd2)} "
                           rf"\(final model -> run\): labels of {len(labels)} slides differ"):
    predict.predict(wd2, cohort, str(root / "pred2"))
  final_cfg = pathlib.Path(wd2, "final", "config.json")
  shutil.rmtree(os.path.join(wd2, "final"))
  shutil.copytree(os.path.join(wd, "final"), os.path.join(wd2, "final"))
  shutil.copy(os.path.join(wd, "fingerprint.json"), os.path.join(wd2, "fingerprint.json"))
  c = json.loads(final_cfg.read_text())
  c["data"]["image_size"] = 32  # a config that does not describe the trained encoder
  final_cfg.write_text(json.dumps(c))
  with pytest.raises(workdir_lib.WorkdirError, match=r"final/config.json does not describe "
                     r"the model trained there \(trained -> config.json\): data.image_size: "
                     r"24 -> 32"):
    predict.predict(wd2, cohort, str(root / "pred2"))


@pytest.mark.slow  # trains a slides run (module fixture)
def test_predict_names_training_slides_and_scores_labels(trained, capsys):
  root, cohort, wd = trained
  from slamjax.slides import predict
  # The training cohort itself, with its labels, one slide under another id.
  rows = _rows(os.path.join(cohort, "slides.csv"))
  renamed = rows[0]["slide_id"]
  slides = str(root / "renamed")
  _copy_cohort(cohort, slides, lambda rows: [dict(rows[0], slide_id="new_id"), *rows[1:]])
  os.rename(os.path.join(slides, renamed), os.path.join(slides, "new_id"))
  out = str(root / "pred")
  capsys.readouterr()
  predict.predict(wd, slides, out)
  console = capsys.readouterr().out
  n = len(rows)
  assert (f"predict: WARNING: {n - 1} of {n} slides were training slides of this model (same "
          f"slide id); 1 other of {n} slides share cell images with its training slides; "
          f"their ids are in {out}/report.md") in console
  report = pathlib.Path(out, "report.md").read_text()
  assert (f"**Warning: {n - 1} of {n} slides were training slides of this model** (same slide "
          f"id; {n - 1} of them with identical cell images)") in report
  assert (f"**Warning: 1 other of {n} slides share cell images with the model's training "
          "slides** (identical decoded pixels): `new_id` (") in report
  assert "## Against the slide table's labels" in report
  rows = json.loads(pathlib.Path(out, "metrics.json").read_text())
  assert [(r["slides"], r["n"], r["head"], r["task"]) for r in rows] == [
      ("all labelled", n, "abmil", "label")]
  assert rows[0]["TN"] + rows[0]["FP"] + rows[0]["FN"] + rows[0]["TP"] == n
  assert 0 <= rows[0]["AUC"] <= 1 and 0 <= rows[0]["balanced accuracy"] <= 1


def test_a_collapsed_final_model_is_named(tmp_path):
  from slamjax.slides import report as slides_report
  cfg = config_lib.load("slides", "quick")
  assert slides_report.final_collapse_line(cfg, str(tmp_path)) is None
  (tmp_path / "pretrain_collapse.json").write_text(json.dumps(
      {"collapsed": True, "collapsed_at_end": True, "final_spread": 0.01,
       "final_ntxent": 3.43, "ntxent_uniform": 3.43}))
  assert slides_report.final_collapse_line(cfg, str(tmp_path)) == (
      "**Warning: the final model's pretraining ended collapsed** (final spread 0.010, "
      "NT-Xent 3.430 vs log(2B-1) = 3.430; `final/pretrain_collapse.json`): its embeddings "
      "carry little information about the cells, and so do its predictions.")


def test_pool_and_file_summaries_name_what_changed(tmp_path):
  import numpy as np
  from slamjax.data import pool as pool_lib
  images = np.zeros((3, 4, 4, 3), np.uint8)
  pool = pool_lib.CellPool(images, np.array([0, 0, 1]), ("normal", "blast"), ("a", "b", "c"))
  old = workdir_lib.pool_data(pool)
  images2 = images.copy()
  images2[1, 0, 0, 0] = 1
  other = pool_lib.CellPool(images2, np.array([0, 0, 1]), ("normal", "blast"), ("a", "b", "c"))
  assert workdir_lib.data_differences(old, workdir_lib.pool_data(other)) == [
      "the data's content differs (same counts, other cells or files)"]
  fewer = pool_lib.CellPool(images[:2], np.array([0, 1]), ("normal", "blast"), ("a", "c"))
  assert workdir_lib.data_differences(old, workdir_lib.pool_data(fewer)) == [
      'data.cells: 3 -> 2', 'data.classes: {"normal": 2, "blast": 1} -> {"normal": 1, "blast": 1}']
  (tmp_path / "a.png").write_bytes(b"x")
  before = workdir_lib.files_data(str(tmp_path))
  (tmp_path / "b.png").write_bytes(b"y")
  assert workdir_lib.data_differences(before, workdir_lib.files_data(str(tmp_path))) == [
      "data.files: 1 -> 2"]
