"""The variants study: run plan, statistics, report, and a quick end-to-end run."""

import json
import math
import os
import pathlib

import numpy as np
import pytest

from slamjax import config as config_lib
from slamjax import validation
from slamjax.study import methods
from slamjax.study import report
from slamjax.study import run


def test_run_plan_applies_method_overrides():
  cfg = config_lib.load("witness_study")
  runs = dict(methods.run_configs(cfg))
  n = len(cfg.study.methods)
  assert n == 10 and len(runs) == 4 * n * 3
  first = list(runs)[:n]  # seed-major: every method of seed 0 at 10% first
  assert all(r.startswith("seed0/wr0.1/") for r in first)
  c = runs["seed2/wr0.005/slam_ags"]
  assert (c.seed, c.bags.witness_rate, c.pretrain.surgery) == (2, 0.005, "adaptive_pcgrad")
  assert tuple(c.pretrain.task_weights) == (1.0, 1.0) and c.runner == "pipeline"
  assert c.bags.normal_classes == ("lymphocyte",) and c.bags.reuse_cells
  assert runs["seed0/wr0.01/random_init"].pretrain.epochs == 0
  assert tuple(runs["seed0/wr0.1/simclr"].pretrain.task_weights) == (1.0, 0.0)
  assert runs["seed1/wr0.05/per_task"].model.projection == "per_task"
  assert runs["seed1/wr0.05/repel"].pretrain.similarity == "repel"
  assert runs["seed1/wr0.05/variance"].pretrain.variance_weight > 0
  assert tuple(runs["seed1/wr0.05/lowsim"].pretrain.task_weights) == (1.0, 0.1)
  assert runs["seed1/wr0.05/leaf"].pretrain.surgery_granularity == "leaf"
  # the published recipe is untouched by the variants' keys
  assert c.model.projection == "shared" and c.pretrain.similarity == "attract"
  assert c.pretrain.variance_weight == 0
  # issue 18: >= 100 + 100 bags per split, 0.5% still one witness
  assert all(min(v) >= 100 for v in cfg.bags.bags_per_split.values())
  assert cfg.bags.bag_size * min(cfg.study.witness_rates) >= 1
  validation.validate(c)


def test_shards_split_the_runs_without_overlap():
  cfg = config_lib.load("witness_study")
  ids = [rid for rid, _ in methods.run_configs(cfg)]
  a, b = run.shard_runs(ids, "0/2"), run.shard_runs(ids, "1/2")
  assert sorted(a + b) == sorted(ids) and not set(a) & set(b)
  assert run.shard_runs(ids, "") == ids
  for bad in ("2/2", "1", "x/2", "-1/2"):
    cfg.study.shard = bad
    with pytest.raises(ValueError, match="study.shard"):
      validation.validate(cfg)


def test_unknown_method_and_key_are_named():
  cfg = config_lib.load("witness_study", "quick")
  cfg.study.methods = ("slam_ags", "byol")
  with pytest.raises(ValueError, match="byol"):
    list(methods.run_configs(cfg))
  with pytest.raises(KeyError, match="pretrain.no_such_key"):
    methods.apply(cfg, {"pretrain": {"no_such_key": 1}})


def test_auc_and_f1_rows_match_sklearn():
  from sklearn.metrics import f1_score, roc_auc_score
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, (5, 40))
  s = np.round(rng.random((5, 40)) + 0.3 * y, 1)  # ties
  for yi, si, a, f in zip(y, s, report.auc_rows(y, s), report.f1_rows(y, s)):
    assert a == pytest.approx(roc_auc_score(yi, si))
    assert f == pytest.approx(f1_score(yi, si >= 0.5))
  assert math.isnan(report.auc_rows(np.zeros(4), np.arange(4.0))[0])


def _record(method, wr, seed, shift, collapsed=False, at_end=True):
  rng = np.random.default_rng([seed, int(wr * 1000)])  # same bags for every method
  y = np.repeat([0, 1], 50)
  noise = rng.random(100)
  p = np.clip(0.5 * noise + shift * y, 0, 1)
  cells = np.repeat([0, 1], 60)
  head = {"bag": {"auc": 0.0, "f1": 0.0}, "retrieval": {"recall_at_k": 0.5},
          "labels": y.tolist(), "probs": p.tolist()}
  return {"id": methods.run_id(method, wr, seed), "method": method, "witness_rate": wr,
          "seed": seed, "mil_features": "projection", "bags_per_split": {},
          "mil": {"projection": {"abmil": head}, "backbone": {"abmil": head}},
          "encoder": {f: {"linear_auc": 0.8, "knn_auc": 0.7, "spread": 0.5}
                      for f in ("projection", "backbone")},
          "probe": {"labels": cells.tolist(),
                    **{f: {"linear": (rng.random(120) + shift * cells).tolist(),
                           "knn": rng.random(120).tolist()}
                       for f in ("projection", "backbone")}},
          "batch_pos": 64, "seconds": 10.0,
          "collapse": {"collapsed": collapsed, "first_step": 15 if collapsed else None,
                       "collapsed_at_end": collapsed and at_end},
          "pretrain_history": [{"step": 5, "loss_simclr": 4.8, "loss_sim": 1.0,
                                "grad_cos": -0.5, "embed_std": 0.4},
                               {"step": 10, "loss_simclr": 4.84, "loss_sim": 0.1,
                                "grad_cos": 0.1, "embed_std": 0.02}]}


def test_report_tables_cis_collapse_marks_and_paired_differences(tmp_path):
  os.makedirs(tmp_path / "runs")
  for seed in range(3):
    for m, shift, col in (("simclr", 0.2, False), ("slam_ags", 0.2, True),
                          ("per_task", 0.6, False), ("lowsim", 0.3, seed == 0)):
      rec = _record(m, 0.01, seed, shift, col, at_end=m != "lowsim")
      with open(tmp_path / "runs" / f"{rec['id'].replace('/', '_')}.json", "w") as f:
        json.dump(rec, f)
  recs = report.write_report(str(tmp_path))
  assert len(recs) == 12
  md = pathlib.Path(tmp_path / "results.md").read_text()
  st = report.Stats(recs, 200)
  c = st.cell("per_task", 0.01, ("bag", "projection", "abmil", "auc"))
  assert c["lo"] <= c["mean"] <= c["hi"] and c["n"] == 3 and c["collapsed"] == 0
  assert st.cell("slam_ags", 0.01, ("bag", "projection", "abmil", "auc"))["collapsed"] == 3
  assert "†3" in md  # collapsed runs are marked in the tables
  low = st.cell("lowsim", 0.01, ("bag", "projection", "abmil", "auc"))
  assert (low["collapsed"], low["recovered"]) == (0, 1) and "‡1" in md
  assert "| low-sim 0.1 | 1.0% | **1/3** (1 not at end) |" in md
  # identical scores give an exactly-zero paired difference
  d = st.diff("slam_ags", "simclr", 0.01, ("bag", "projection", "abmil", "auc"))
  assert d["mean"] == 0 and d["lo"] == 0 and d["hi"] == 0
  d = st.diff("per_task", "simclr", 0.01, ("probe", "backbone", "linear"))
  assert d["lo"] > 0 and "**+" in md
  assert "| SLAM-AGS (published) | 1.0% | **3/3** | 15, 15, 15 | 0.40 → 0.020 |" in md
  rows = pathlib.Path(tmp_path / "results.csv").read_text().splitlines()
  assert len(rows) == 1 + 12 * 2 and "conflict_rate" in rows[0] and "linear_auc" in rows[0]
  for name in ("auc_vs_witness_rate.png", "f1_vs_witness_rate.png",
               "probe_auc_vs_witness_rate.png", "spread_curves.png", "ntxent_curves.png",
               "gradient_conflict.png"):
    assert os.path.getsize(tmp_path / name) > 0


def test_collapse_summary_flags_a_collapsed_history():
  hist = [{"step": s, "loss_simclr": nt, "loss_sim": 0.01, "embed_std": e}
          for s, e, nt in ((5, 0.4, 3.0), (10, 0.2, 3.5), (15, 0.03, 4.84), (20, 0.02, 4.84),
                           (25, 0.02, 4.84))]  # 3 flagged steps in a row (patience)
  out = run.collapse_summary(hist, 64)
  assert out["collapsed"] and out["first_step"] == 15
  assert out["ntxent_uniform"] == pytest.approx(math.log(127))
  healthy = [dict(h, embed_std=0.6, loss_simclr=2.0) for h in hist]
  assert not run.collapse_summary(healthy, 64)["collapsed"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(config_lib.load("pbc_lymphocyte", "quick").data.root),
                    reason="PBC cells not available")
def test_quick_study_records_resumes_and_reports(tmp_path):
  cfg = config_lib.load("witness_study", "quick")
  cfg.study.results_dir = str(tmp_path / "results")
  recs = run.run_study(cfg, str(tmp_path / "work"))
  assert sorted(r["method"] for r in recs) == ["random_init", "slam_ags"]
  for r in recs:
    assert set(r["mil"]) == {"projection", "backbone"}  # both features, every run
    for f in ("projection", "backbone"):
      assert 0 <= r["encoder"][f]["linear_auc"] <= 1 and 0 <= r["encoder"][f]["knn_auc"] <= 1
      assert len(r["probe"][f]["linear"]) == len(r["probe"]["labels"])
    head = r["mil"]["projection"]["abmil"]
    assert len(head["probs"]) == len(head["labels"]) == 8
  slam = next(r for r in recs if r["method"] == "slam_ags")
  assert slam["pretrain_history"] and "collapsed" in slam["collapse"]
  files = os.listdir(tmp_path / "results")
  assert "results.md" in files and "auc_vs_witness_rate.png" in files
  # A rerun finds every record and trains nothing.
  runs_dir = tmp_path / "results" / "runs"
  before = {p: os.path.getmtime(runs_dir / p) for p in os.listdir(runs_dir)}
  run.run_study(cfg, str(tmp_path / "work2"))
  assert not os.path.exists(tmp_path / "work2")
  assert before == {p: os.path.getmtime(runs_dir / p) for p in before}
