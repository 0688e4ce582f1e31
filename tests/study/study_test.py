"""The witness-rate study: run plan, resume by records, report from records."""

import json
import os

import numpy as np
import pytest

from configs import default
from configs import witness_study
from slamjax import study
from slamjax import study_report


def _tiny_study(results_dir):
  c = default.get_config("quick")
  c.data.num_per_class = {"normal": 200, "blast": 40}
  c.data.image_size = 24
  c.augment.crop_size = 16
  c.model.width = 4
  c.model.proj_dims = (16, 16)
  c.bags.bag_size = 10
  c.bags.bags_per_split = {"train": (3, 3), "test": (2, 2)}
  c.pretrain.epochs = 1
  c.pretrain.batch_size = 16
  c.mil.epochs = 2
  c.eval.top_k = 2
  c.eval.num_plot_bags = 0
  c.study = study_config = c.__class__()
  study_config.witness_rates = (0.2,)
  study_config.methods = ("random_init", "bag_label")
  study_config.seeds = (0,)
  study_config.results_dir = str(results_dir)
  return c


def test_run_plan_applies_method_overrides():
  cfg = witness_study.get_config()
  runs = dict(study.run_configs(cfg))
  n_methods = len(cfg.study.methods)  # 7 methods of the paper + 2 ablations
  assert n_methods == 9 and len(runs) == 4 * n_methods * 3
  first = list(runs)[:n_methods]  # seed-major: every method of seed 0 at 10% first
  assert all(r.startswith("seed0/wr0.1/") for r in first)
  c = runs["seed2/wr0.005/bag_label"]
  assert (c.seed, c.bags.witness_rate, c.pretrain.objective) == (2, 0.005, "bag_label")
  assert tuple(c.model.proj_dims)[-1] == 1 and c.embed.output == "backbone"
  assert runs["seed0/wr0.01/random_init"].pretrain.epochs == 0
  assert runs["seed0/wr0.01/slam_ags"].pretrain.surgery == "adaptive_pcgrad"
  assert tuple(runs["seed1/wr0.05/slam_ags_lowsim"].pretrain.task_weights) == (1.0, 0.1)
  assert runs["seed1/wr0.05/slam_ags_backbone"].embed.output == "backbone"
  assert "study" not in c
  lym = witness_study.get_config("lymphocyte")
  lym_runs = dict(study.run_configs(lym))
  assert len(lym_runs) == 4 * 7 * 3
  assert lym_runs["seed0/wr0.01/slam_ags"].bags.normal_classes == ("lymphocyte",)
  assert lym.study.results_dir != cfg.study.results_dir
  # 0.5% of a bag must still be at least one witness
  assert cfg.bags.bag_size * min(cfg.study.witness_rates) >= 1


def test_unknown_method_is_named():
  cfg = witness_study.get_config("quick")
  cfg.study.methods = ("slam_ags", "byol")
  with pytest.raises(ValueError, match="byol"):
    list(study.run_configs(cfg))


def test_tiny_study_records_resumes_and_reports(tmp_path):
  cfg = _tiny_study(tmp_path / "results")
  recs = study.run_study(cfg, str(tmp_path / "work"))
  assert sorted(r["method"] for r in recs) == ["bag_label", "random_init"]
  files = os.listdir(tmp_path / "results")
  for name in ("results.md", "results.csv", "f1_vs_witness_rate.png",
               "retrieval_vs_witness_rate.png", "pretrain_losses.png",
               "gradient_conflict.png", "embedding_spread.png"):
    assert name in files
  bag = next(r for r in recs if r["method"] == "bag_label")
  assert bag["pretrain_history"] and bag["embedding"]["spread"] >= 0
  # A rerun finds every record and trains nothing.
  before = {p: os.path.getmtime(tmp_path / "results" / "runs" / p)
            for p in os.listdir(tmp_path / "results" / "runs")}
  study.run_study(cfg, str(tmp_path / "work2"))
  assert not os.path.exists(tmp_path / "work2")
  after = {p: os.path.getmtime(tmp_path / "results" / "runs" / p) for p in before}
  assert before == after


def _record(method, wr, seed, f1, recall):
  return {"id": f"seed{seed}/wr{wr}/{method}", "method": method, "witness_rate": wr,
          "seed": seed, "heads": {"abmil": {
              "bag": {"f1": f1, "auc": f1, "sensitivity": 1.0, "specificity": 1.0},
              "retrieval": {"k": 5, "recall_at_k": recall, "average_precision": recall,
                            "witnesses_found_at_k": 1, "num_witnesses": 2,
                            "precision_at_k": 0.2}}},
          "pretrain_history": [{"step": 1, "loss_simclr": 4.0, "loss_sim": 1.0,
                                "grad_cos": -0.5}, {"step": 2, "loss_simclr": 3.0,
                                                    "loss_sim": 0.5, "grad_cos": 0.1}],
          "embedding": {"spread": 0.5, "mean_cosine": 0.1, "effective_rank": 3.0}}


def test_report_mean_and_std_over_seeds(tmp_path):
  os.makedirs(tmp_path / "runs")
  for seed, f1 in enumerate([0.5, 0.7, 0.9]):
    with open(tmp_path / "runs" / f"s{seed}.json", "w") as f:
      json.dump(_record("slam_ags", 0.01, seed, f1, 0.25), f)
  study_report.write_report(str(tmp_path))
  md = open(tmp_path / "results.md").read()
  assert f"0.700 ± {np.std([0.5, 0.7, 0.9], ddof=1):.3f}" in md
  assert "| slam_ags | 1.0% | " in md  # diagnostics row
  rows = open(tmp_path / "results.csv").read().splitlines()
  assert len(rows) == 4 and "conflict_rate" in rows[0]
  assert ",0.5," in rows[1]  # conflict rate: 1 of 2 logged steps had cos < 0
