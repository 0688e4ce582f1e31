"""A tiny end-to-end run through the main command (two MIL heads), multi-task
bags through the pipeline, and config errors."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from slamjax import pipeline
from slamjax import validation

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _main(*args, timeout=900):
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-m", "slamjax.main",
                         "--config", "configs/default.py:quick", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.slow
def test_tiny_end_to_end_through_main(tmp_path):
  wd = str(tmp_path / "run")
  r = _main("--workdir", wd, "--config.mil.epochs=3", "--config.mil.heads=abmil,aem")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  assert "ETA" in r.stdout and "Bag classification" in r.stdout
  m = json.loads(pathlib.Path(os.path.join(wd, "metrics.json")).read_text())
  assert list(m["heads"]) == ["abmil", "aem"]
  for name, head in m["heads"].items():  # one results row per head
    assert set(head["bag"]) >= {"f1", "auc", "sensitivity", "specificity"}
    assert head["retrieval"]["num_positive_bags"] == 3
    assert head["retrieval"]["num_witnesses"] == 3 * 2  # 10% of 20 per bag
    assert f"| {name} |" in r.stdout
    for f in ("attention_top_cells.png", "mil_metrics.jsonl"):
      assert os.path.exists(os.path.join(wd, f"mil_{name}", f)), (name, f)
  assert "AP" in r.stdout and "found@10" in r.stdout
  for f in ("results.md", "pretrain_curves.png", "bags.json", "config.json"):
    assert os.path.exists(os.path.join(wd, f)), f
  assert os.listdir(os.path.join(wd, "tb", "pretrain"))  # TensorBoard events
  bags = json.loads(pathlib.Path(os.path.join(wd, "bags.json")).read_text())
  train_ids = {c for b in bags["train"]["bags"] for c in b["cell_ids"]}
  test_ids = {c for b in bags["test"]["bags"] for c in b["cell_ids"]}
  assert not train_ids & test_ids


@pytest.fixture
def fast_compile():
  """XLA compiles ~2x faster without most optimisations (restored afterwards)."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


@pytest.mark.slow
def test_multi_label_bags_train_heads_on_one_task_per_abnormal_class(tmp_path, fast_compile):
  cfg = default.get_config("quick")
  cfg.data.num_per_class = {"normal": 200, "blast": 30, "erythroblast": 30}
  cfg.bags.abnormal_classes = ("blast", "erythroblast")
  cfg.bags.multi_label = True
  cfg.bags.witness_classes_per_bag = 1  # each positive bag: witnesses of one class
  cfg.bags.bag_size = 10
  cfg.bags.bags_per_split = {"train": (3, 6), "test": (3, 6)}
  cfg.pretrain.epochs = 0  # a random encoder: this test is about the MIL wiring
  cfg.mil.heads = ("abmil", "mecds")
  cfg.mil.epochs = 2
  cfg.mil.hidden_dim, cfg.mil.attention_dim = 16, 8  # tiny heads: compile in seconds
  cfg.mil.mecds.num_layers, cfg.mil.mecds.num_heads = 1, 2
  cfg.eval.linear_probe = False
  cfg.eval.num_plot_bags = 0
  res = pipeline.train_and_evaluate(cfg, str(tmp_path))
  assert res["tasks"] == ["blast", "erythroblast"]
  for name in ("abmil", "mecds"):
    head = res["heads"][name]
    assert set(head["tasks"]) == {"blast", "erythroblast"}
    rows = head["per_bag"]
    labels = np.array([r["task_labels"] for r in rows])
    assert labels.shape == (9, 2) and (labels.sum(1) == [r["label"] for r in rows]).all()
    assert all(len(r["task_probs"]) == 2 and r["prob"] == max(r["task_probs"]) for r in rows)
    for task, t in head["tasks"].items():  # bags positive for the task, its witnesses
      j = res["tasks"].index(task)
      assert t["bag"]["num_bags"] == 9
      assert t["retrieval"]["num_positive_bags"] == int(labels[:, j].sum())
  md = pathlib.Path(tmp_path / "results.md").read_text()
  assert "Per task" in md and "| mecds | erythroblast |" in md


def test_unknown_override_is_rejected_before_training(tmp_path):
  r = _main("--workdir", str(tmp_path / "x"), "--config.pretrain.epoch=3", timeout=120)
  assert r.returncode == 2 and "bad command line" in r.stderr and "epochs" in r.stderr
  assert "Traceback" not in r.stderr  # one message, not chained tracebacks
  assert not os.path.exists(tmp_path / "x" / "pretrain_ckpt")
  (tmp_path / "file").write_text("")
  r = _main("--workdir", str(tmp_path / "file"), timeout=120)
  assert r.returncode != 0 and "is a file; give a folder" in r.stderr


@pytest.mark.parametrize("field,value,match", [
    ("bags.witness_rate", 0.0, r"bags.witness_rate=0.0 is outside the valid range \(0, 1\]"),
    ("bags.witness_rate", 1.2, r"bags.witness_rate"),
    ("bags.bag_size", 0, r"bags.bag_size=0 must be at least 1 \(an integer\)"),
])
def test_out_of_range_values_name_the_field(field, value, match):
  cfg = default.get_config("quick")
  section, key = field.split(".")
  cfg[section][key] = value
  with pytest.raises(ValueError, match=match):
    validation.validate(cfg)


def test_unknown_key_in_config_file_is_rejected():
  cfg = default.get_config("quick")
  cfg.pretrain.unlock()
  cfg.pretrain.epoch = 3
  with pytest.raises(ValueError, match=r"config.pretrain.epoch"):
    validation.validate(cfg)


def test_baselines_outside_the_slides_runner_are_refused_not_ignored():
  cfg = default.get_config("quick")
  cfg.eval.baselines = ("simclr",)
  with pytest.raises(ValueError, match=r"eval.baselines=\('simclr',\) is read by the "
                     r"slides runner only \(config.runner='pipeline'\)"):
    validation.validate(cfg)


def test_plan_needing_more_cells_than_exist_fails_before_training(tmp_path):
  cfg = default.get_config("quick")
  cfg.bags.bag_size = 500
  with pytest.raises(ValueError, match=r"needs.*available|available.*needs"):
    pipeline.train_and_evaluate(cfg, str(tmp_path / "y"))
  assert not os.path.exists(tmp_path / "y" / "pretrain_ckpt")


def test_runner_implies_its_data_source():
  cfg = default.get_config("quick")
  cfg.runner = "slides"  # the base default source ("synthetic") is left as it is
  from slamjax.config.values import data_source
  assert data_source(cfg) == "slides"
  validation.validate(cfg)
  cfg.data.source = "folder"  # a source the runner cannot read: named
  with pytest.raises(ValueError, match=r"config.data.source='folder'.*'slides'"):
    validation.validate(cfg)
