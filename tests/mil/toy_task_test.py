"""Every head learns a toy MIL task (high F1, witnesses ranked first); MECDS
learns two tasks jointly and a third by extension without changing the old
tasks' predictions by a single bit; training resumes from checkpoints."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from slamjax import evaluate
from slamjax.mil import train as mil_train


def _retrieval_hits(attention, witness):
  """Fraction of bags whose top-attention cell is a witness."""
  return float(np.mean([w[np.argmax(a)] for a, w in zip(attention, witness)]))


@pytest.mark.parametrize("head", ["abmil", "aem", "pamil", "asmil"])
def test_single_task_head_learns_toy(head, tmp_path, toy, cfg_for):
  bags, labels, _ = toy(48, seed=0)
  test_bags, test_labels, test_wit = toy(48, seed=1)
  cfg = cfg_for(head)
  state = mil_train.fit(cfg, bags, labels, str(tmp_path), seed=0, verbose=False)
  out = mil_train.predict(cfg, state, test_bags)
  assert out["prob"].shape == (48, 1)
  metrics = evaluate.bag_metrics(test_labels, out["prob"][:, 0])
  assert metrics["f1"] >= 0.9, metrics
  pos = np.flatnonzero(test_labels == 1)
  hits = _retrieval_hits([out["attention"][i] for i in pos], [test_wit[i][0] for i in pos])
  assert hits >= 0.8, hits
  if head == "asmil":  # the EMA anchor trails the online parameters
    gap = jax.tree.map(lambda a, p: float(np.abs(a - p).max()), state.anchor, state.params)
    assert max(jax.tree.leaves(gap)) > 0
  records = [json.loads(l) for l in pathlib.Path(tmp_path / "mil_metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == list(range(1, cfg.epochs + 1))
  assert all(np.isfinite(r["attention_jsd"]) and r["attention_jsd"] >= 0 for r in records)


def test_mecds_multitask_and_extension(tmp_path, toy, cfg_for):
  bags, labels, _ = toy(128, num_tasks=3, seed=2)
  test_bags, test_labels, test_wit = toy(48, num_tasks=3, seed=3)
  cfg = cfg_for("mecds", epochs=15, lr=3e-3, batch_size=16)
  state = mil_train.fit(cfg, bags, labels[:, :2], str(tmp_path), seed=0, verbose=False)
  before = mil_train.predict(cfg, state, test_bags)
  for t in range(2):
    f1 = evaluate.bag_metrics(test_labels[:, t], before["prob"][:, t])["f1"]
    assert f1 >= 0.9, (t, f1)
    pos = np.flatnonzero(test_labels[:, t] == 1)
    hits = _retrieval_hits([before["task_attention"][i][t] for i in pos],
                           [test_wit[i][t] for i in pos])
    assert hits >= 0.8, (t, hits)
  def phases():
    return [json.loads(l)["phase"] for l in pathlib.Path(tmp_path / "mil_metrics.jsonl").read_text().splitlines()]
  assert phases() == ["teacher"] * 15 + ["student"] * 15

  ext = mil_train.extend(cfg, state, bags, labels[:, 2], str(tmp_path), seed=0,
                         verbose=False)
  after = mil_train.predict(cfg, ext, test_bags)
  assert after["prob"].shape == (48, 3) and ext.num_tasks == 3 and ext.num_base == 2
  np.testing.assert_array_equal(after["prob"][:, :2], before["prob"])  # bitwise
  for name, old in state.params["params"].items():
    jax.tree.map(np.testing.assert_array_equal, ext.params["params"][name], old)
  f1 = evaluate.bag_metrics(test_labels[:, 2], after["prob"][:, 2])["f1"]
  assert f1 >= 0.8, f1
  assert phases()[30:] == ["extend2_teacher"] * 15 + ["extend2_student"] * 15


def test_resume_continues_and_rewrites_metrics(tmp_path, toy, cfg_for):
  bags, labels, _ = toy(16, seed=4)
  cfg = cfg_for("abmil", epochs=3, checkpoint_every_epochs=2)
  mil_train.fit(cfg, bags, labels, str(tmp_path), seed=0, verbose=False)
  cfg.epochs = 5  # resumes from the checkpoint of epoch 3 (the last epoch is saved)
  state = mil_train.fit(cfg, bags, labels, str(tmp_path), seed=0, verbose=False)
  assert int(state.epoch) == 5 and int(state.step) == 5 * 2
  epochs = [json.loads(l)["epoch"] for l in pathlib.Path(tmp_path / "mil_metrics.jsonl").read_text().splitlines()]
  assert epochs == [1, 2, 3, 4, 5]
  assert os.path.isdir(tmp_path / "mil_ckpt")
