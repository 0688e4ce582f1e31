"""The slides runner: folds, what reaches pretraining, and the two commands of
the README ("Your own slides") end to end on a small generated cohort: the
training runs in-process (tracebacks point at the failing line), predict
once through its command line."""

import csv
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from slamjax import config as config_lib
from slamjax import validation
from slamjax.data import make_cohort
from slamjax.data import slides as slides_lib
from slamjax.slides import fold_run
from slamjax.slides import folds as folds_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fake_cohort(labels, patients):
  labels = np.asarray(labels, np.float32).reshape(len(labels), -1)
  n = len(labels)
  return types.SimpleNamespace(
      labels=labels, patient_ids=tuple(patients), task_names=("label",),
      slide_ids=tuple(f"s{i}" for i in range(n)), folds=None, splits=None,
      cells=[np.arange(3 * i, 3 * i + 3) for i in range(n)],
      labelled=lambda: ~np.isnan(labels).any(axis=1))


def test_folds_group_patients_and_stratify():
  labels = [0, 1] * 10 + [np.nan]
  patients = [f"p{i // 2}" for i in range(20)] + ["new"]  # two slides per patient
  cohort = _fake_cohort(labels, patients)
  folds = folds_lib.cohort_folds(cohort, k=5, seed=0)
  assert len(folds) == 5
  held_out = np.concatenate([f["test"] for f in folds])
  assert sorted(held_out.tolist()) == list(range(20))  # every labelled slide once
  for f in folds:
    train_p = {patients[i] for i in f["train"]}
    assert not train_p & {patients[i] for i in f["test"]}  # a patient in one fold only
    assert 20 not in f["train"]  # the unlabeled slide is never trained on
  again = folds_lib.cohort_folds(cohort, k=5, seed=0)
  assert all(np.array_equal(a["test"], b["test"]) for a, b in zip(folds, again))


def test_fold_errors_name_the_problem():
  cohort = _fake_cohort([0, 0, 0, 1, 1, 0], [f"p{i}" for i in range(6)])
  with pytest.raises(slides_lib.CohortError, match=r"positive for label: 2 slides .* "
                     r"fewer than config.eval.folds=3"):
    folds_lib.cohort_folds(cohort, k=3, seed=0)
  with pytest.raises(slides_lib.CohortError, match=r"no negative slide.*similarity "
                     r"objective.*SLAM-AGS needs both"):
    folds_lib.check_training_slides(cohort, np.array([3, 4]), "fold0")
  with pytest.raises(slides_lib.CohortError, match=r"no positive slide.*NT-Xent"):
    folds_lib.check_training_slides(cohort, np.array([0, 1]), "fold0")


def test_only_training_slides_reach_pretraining():
  cfg = config_lib.load("slides", "quick")
  cohort = _fake_cohort([0, 1, 0, 1, np.nan], [f"p{i}" for i in range(5)])
  bags = fold_run.pretraining_bags(cfg, cohort, np.array([0, 1]))
  assert sorted(bags.all_cells().tolist()) == list(range(6))  # slides 0 and 1 only
  assert bags.all_cells(1).tolist() == [3, 4, 5] and bags.all_cells(0).tolist() == [0, 1, 2]
  cfg.eval.unlabeled_in_pretraining = True  # the unlabeled slide joins NT-Xent
  bags = fold_run.pretraining_bags(cfg, cohort, np.array([0, 1]))
  assert bags.all_cells(1).tolist() == [3, 4, 5, 12, 13, 14]


def _run(*args, timeout=1200):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT})


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_collapse_marks_tell_collapsed_from_flagged_and_recovered():
  from slamjax.slides import report as slides_report
  m = {k: 0.5 for k in slides_report.METRICS} | {"threshold": 0.5}
  rec = lambda fold, col: {"fold": fold, "heads": {"abmil": {"metrics": {"dx": m}}},
                           "collapse": col}
  recs = {"slam_ags": [rec(0, {"collapsed": True, "collapsed_at_end": True}),
                       rec(1, {"collapsed": True, "collapsed_at_end": False}),
                       rec(2, {"collapsed": False}), rec(3, None)]}
  assert slides_report.summary_rows(recs, ["dx"])[0]["collapsed folds"] == "1/4"
  assert [r["collapsed"] for r in slides_report.fold_rows(recs, ["dx"])] == [
      "yes", "flagged, ended past the thresholds", "no", "no"]


@pytest.mark.slow
def test_readme_commands_cross_validate_and_predict(tmp_path, capsys):
  from slamjax import main
  from slamjax import workdir as workdir_lib
  from slamjax.slides import predict
  cohort, new = str(tmp_path / "cohort"), str(tmp_path / "new")
  make_cohort.make_cohort(cohort, source="synthetic", patients=12, min_cells=8,
                          max_cells=24, unlabeled=1, new_out=new, new_patients=3, seed=0)
  wd, out = str(tmp_path / "run"), str(tmp_path / "pred")

  def train():  # python -m slamjax.main --config configs/slides.py:quick ...
    cfg = config_lib.load("slides", "quick")
    cfg.data.root, cfg.data.cache_dir = cohort, str(tmp_path / "cache")
    cfg.mil.slide_features = ("log_count", "pixel_stats")
    cfg.eval.baselines = ("pixel_stats", "cell_count", "mean_pool")
    capsys.readouterr()
    main.run(cfg, wd)
    return types.SimpleNamespace(stdout=capsys.readouterr().out)

  # Predicting before a final model exists fails and says how to get one.
  with pytest.raises(workdir_lib.WorkdirError, match="has no final model"):
    predict.predict(wd, new, out)

  r = train()
  assert "## Cross-validation" in r.stdout and "decoded" in r.stdout
  metrics = json.loads(pathlib.Path(os.path.join(wd, "metrics.json")).read_text())
  assert metrics["folds"] == ["fold0", "fold1"] and metrics["tasks"] == ["label"]
  assert {"auc", "balanced_accuracy", "brier", "f1", "sensitivity", "specificity"} <= set(
      metrics["summary"][0])
  assert [r["encoder"] for r in metrics["summary"]] == [
      "slam_ags", "pixel_stats", "cell_count", "mean_pool"]
  assert "## Against the baselines (same folds)" in r.stdout
  model_json = json.loads(pathlib.Path(os.path.join(wd, "final", "model.json")).read_text())
  assert model_json["slide_features"] == ["log_count", "pixel_stats"]
  fusion = model_json["fusion"]["abmil"][0]
  assert len(fusion["meta"]["coef"]) == 3  # head logit, log count, pixel-statistics score
  assert len(fusion["blocks"][1][2]["coef"]) == 84
  labelled = [r for r in _rows(os.path.join(cohort, "slides.csv")) if r["label"] != ""]
  oof = _rows(os.path.join(wd, "oof_predictions.csv"))
  assert sorted(r["slide_id"] for r in oof) == sorted(r["slide_id"] for r in labelled)
  by_patient = {}
  for r in oof:
    by_patient.setdefault(r["patient_id"], set()).add(r["fold"])
  assert all(len(f) == 1 for f in by_patient.values())  # patients never split
  for f in ("roc.png", "results.md", "final/complete.json", "unlabeled_predictions.csv"):
    assert os.path.exists(os.path.join(wd, f)), f
  assert os.listdir(os.path.join(wd, "galleries"))

  # A rerun reads the recorded folds back and the cache skips decoding.
  r2 = train()
  assert r2.stdout.count("recorded, skipped") == 2 and "cache hit" in r2.stdout
  assert json.loads(pathlib.Path(os.path.join(wd, "metrics.json")).read_text())["summary"] == metrics["summary"]

  r = _run("slamjax.predict", "--workdir", wd, "--slides", new, "--out", out)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  preds = _rows(os.path.join(out, "predictions.csv"))
  assert [p["slide_id"] for p in preds] == sorted(
      d for d in os.listdir(new) if os.path.isdir(os.path.join(new, d)))
  assert {"prob_label", "threshold_label", "predicted_label"} <= set(preds[0])
  for p in preds:
    att = _rows(os.path.join(out, "attention", f"{p['slide_id']}.csv"))
    assert sorted(int(a["rank"]) for a in att) == list(range(1, len(att) + 1))
    assert os.path.exists(os.path.join(out, "galleries", f"{p['slide_id']}.png"))
  assert "# slamjax predictions" in pathlib.Path(os.path.join(out, "report.md")).read_text()

  # The default, --ensemble folds: the mean of the fold models and the final model.
  from slamjax import sharding
  ens = predict.predict(wd, new, str(tmp_path / "ens"))
  cfg, _, complete = predict.load_final(wd)
  used = predict.members(wd, "folds", complete["fingerprint"])
  assert [n for n, _ in used] == ["fold0", "fold1", "final"]
  new_cohort = slides_lib.load_cohort(predict.slides_config(cfg, new), require_labels=False)
  feats = fold_run.slide_feature_sets(
      cfg, new_cohort, {"new": np.arange(len(new_cohort.slide_ids))})["new"]
  each = [predict.predict_member(cfg, d, new_cohort, feats, sharding.make_mesh(-1))
          for _, d in used]
  np.testing.assert_allclose(ens["abmil"], np.mean([e[1]["abmil"] for e in each], 0),
                             rtol=1e-6)
  assert not np.allclose(ens["abmil"], each[-1][1]["abmil"])  # not the final model alone
  alone = predict.predict(wd, new, str(tmp_path / "alone"), ensemble="final")
  np.testing.assert_allclose(alone["abmil"], each[-1][1]["abmil"], rtol=1e-6)
  ens_rows = _rows(os.path.join(tmp_path, "ens", "predictions.csv"))
  thr = np.mean([e[0]["thresholds"]["abmil"][0] for e in each])
  assert all(abs(float(r["threshold_label"]) - thr) < 1e-3 for r in ens_rows)
  assert "the mean of 3 models" in (tmp_path / "ens" / "report.md").read_text()


def test_ensemble_members_are_finished_folds_of_the_same_run(tmp_path):
  from slamjax import workdir as workdir_lib
  from slamjax.slides import predict
  wd = tmp_path / "run"
  for fold in ("fold0", "fold1"):
    d = wd / "folds" / "slam_ags" / fold
    d.mkdir(parents=True)
    (d / workdir_lib.RECORD).write_text(json.dumps({"fingerprint": "abc"}))
  assert predict.members(str(wd), "final", "abc") == [("final", str(wd / "final"))]
  assert [n for n, _ in predict.members(str(wd), "folds", "abc")] == [
      "fold0", "fold1", "final"]
  with pytest.raises(workdir_lib.WorkdirError, match=r"fold0 was trained on another run"):
    predict.members(str(wd), "folds", "abd")
  (wd / "folds" / "slam_ags" / "fold1" / workdir_lib.RECORD).unlink()
  with pytest.raises(workdir_lib.WorkdirError, match=r"fold1 did not finish"):
    predict.members(str(wd), "folds", "abc")
  with pytest.raises(ValueError, match=r"--ensemble='mean'; valid: final, folds"):
    predict.members(str(wd), "mean", "abc")
  with pytest.raises(workdir_lib.WorkdirError, match=r"holds no fold models"):
    predict.members(str(tmp_path / "empty"), "folds", "abc")


@pytest.mark.slow
def test_pseudo_label_stage_runs_in_a_slides_fold(tmp_path):
  from slamjax import pseudo_label
  from slamjax.slides import baselines
  cohort_dir = str(tmp_path / "cohort")
  make_cohort.make_cohort(cohort_dir, source="synthetic", patients=8, min_cells=8,
                          max_cells=16, seed=0)
  cfg = baselines.method_config(config_lib.load("slides", "quick"), "pseudo_label")
  cfg.data.root, cfg.data.cache_dir = cohort_dir, str(tmp_path / "cache")
  cfg.pseudo.steps_per_round, cfg.pseudo.rounds = 2, 2
  cfg.eval.inner_folds = 2
  validation.validate(cfg)
  cohort = slides_lib.load_cohort(cfg.data)
  from slamjax import sharding
  wd = str(tmp_path / "fold")
  train = np.flatnonzero(cohort.labelled())[:6]
  out = fold_run.train_model(cfg, cohort, train, {"test": train[:2]}, wd,
                             sharding.make_mesh(-1), verbose=False)
  assert "pseudo" in out["timing_s"]
  rounds = json.loads(pathlib.Path(wd, pseudo_label.ROUNDS).read_text())
  assert [r["round"] for r in rounds] == [0, 1]
  assert "precision" not in rounds[0]  # real slides: no witness flags to score against
  assert out["outputs"]["abmil"]["test"]["prob"].shape == (2, 1)


def test_pseudo_label_baseline_refuses_unlabeled_slides_in_pretraining():
  cfg = config_lib.load("slides", "quick")
  cfg.eval.baselines = ("pseudo_label",)
  validation.validate(cfg)
  cfg.eval.unlabeled_in_pretraining = True
  with pytest.raises(ValueError, match=r"pseudo_label.*unlabeled_in_pretraining"):
    validation.validate(cfg)
  cfg.eval.baselines, cfg.pseudo.rounds = (), 2
  with pytest.raises(ValueError, match=r"pseudo.rounds > 0 with eval.unlabeled"):
    validation.validate(cfg)
