"""A tiny end-to-end run through the main command, and config errors."""

import json
import os
import subprocess
import sys

import pytest

from configs import default
from slamjax import config_check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _main(*args, timeout=900):
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-m", "slamjax.main",
                         "--config", "configs/default.py:quick", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_tiny_end_to_end_through_main(tmp_path):
  wd = str(tmp_path / "run")
  r = _main("--workdir", wd, "--config.mil.epochs=3")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  assert "ETA" in r.stdout and "Bag classification" in r.stdout
  m = json.load(open(os.path.join(wd, "metrics.json")))
  assert set(m["bag"]) >= {"f1", "auc", "sensitivity", "specificity"}
  assert m["retrieval"]["num_positive_bags"] == 3
  assert m["retrieval"]["num_witnesses"] == 3 * 2  # 10% of 20 per bag
  for f in ("results.md", "attention_top_cells.png", "pretrain_curves.png",
            "bags.json", "config.json"):
    assert os.path.exists(os.path.join(wd, f)), f
  assert os.listdir(os.path.join(wd, "tb", "pretrain"))  # TensorBoard events
  bags = json.load(open(os.path.join(wd, "bags.json")))
  train_ids = {c for b in bags["train"]["bags"] for c in b["cell_ids"]}
  test_ids = {c for b in bags["test"]["bags"] for c in b["cell_ids"]}
  assert not train_ids & test_ids


def test_unknown_override_is_rejected_before_training(tmp_path):
  r = _main("--workdir", str(tmp_path / "x"), "--config.pretrain.epoch=3", timeout=120)
  assert r.returncode != 0 and "epoch" in r.stderr
  assert not os.path.exists(tmp_path / "x" / "pretrain_ckpt")


@pytest.mark.parametrize("field,value,match", [
    ("bags.witness_rate", 0.0, r"bags.witness_rate=0.0 is outside the valid range \(0, 1\]"),
    ("bags.witness_rate", 1.2, r"bags.witness_rate"),
    ("bags.bag_size", 0, r"bags.bag_size=0 is outside"),
])
def test_out_of_range_values_name_the_field(field, value, match):
  cfg = default.get_config("quick")
  section, key = field.split(".")
  cfg[section][key] = value
  with pytest.raises(ValueError, match=match):
    config_check.validate(cfg)


def test_unknown_key_in_config_file_is_rejected():
  cfg = default.get_config("quick")
  cfg.pretrain.unlock()
  cfg.pretrain.epoch = 3
  with pytest.raises(ValueError, match=r"config.pretrain.epoch"):
    config_check.validate(cfg)


def test_plan_needing_more_cells_than_exist_fails_before_training(tmp_path):
  r = _main("--workdir", str(tmp_path / "y"), "--config.bags.bag_size=500", timeout=300)
  assert r.returncode != 0
  assert "needs" in r.stderr and "available" in r.stderr
  assert not os.path.exists(tmp_path / "y" / "pretrain_ckpt")
