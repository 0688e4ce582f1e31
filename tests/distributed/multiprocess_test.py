"""``python -m slamjax.main`` as 2 processes equals the same run as 1 process.

Runs a shortened ``configs/default.py:quick`` pipeline (4 SLAM-AGS steps,
embeddings, ABMIL, report) once as one process with two CPU devices and once
as two ``jax.distributed`` processes on localhost (gloo CPU collectives) with
one device each: the same mesh size, so the same global batches. Checks that
the pretrained parameters and BatchNorm statistics, the logged metrics, every
cell's embedding and all results agree, and that only process 0 printed
progress and wrote the logs and reports.
"""

import json
import os
import pathlib

import numpy as np
import pytest

from tests.distributed import launch

h5py = pytest.importorskip("h5py")

OVERRIDES = ["--config.pretrain.epochs=1", "--config.pretrain.log_every_steps=1",
             "--config.mil.epochs=2", "--config.eval.num_plot_bags=0",
             "--config.eval.export_features=True"]


def _main(workdir, **env):
  return launch.start(["-m", "slamjax.main", "--config", "configs/default.py:quick",
                       "--workdir", str(workdir), *OVERRIDES], **env)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def _pretrained(workdir) -> dict:
  """{path: array} of the last pretraining checkpoint (params, BN statistics)."""
  import jax
  import orbax.checkpoint as ocp
  folder = workdir / "pretrain_ckpt"
  step = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
  path = folder / str(step) / "default"
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path).item_metadata.tree
  tree = ckptr.restore(path, restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(
      {"params": tree["params"], "batch_stats": tree["batch_stats"]})[0]}


def _features(workdir):
  out = {}
  folder = os.path.join(workdir, "features")
  for name in sorted(os.listdir(folder)):
    if name.endswith(".h5"):
      with h5py.File(os.path.join(folder, name)) as f:
        out[name] = f["features"][()]
  return out


@pytest.mark.slow
def test_main_on_two_processes_matches_one_process(tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  port = launch.free_port()
  procs = [_main(single, JAX_NUM_CPU_DEVICES="2")]
  procs += [_main(multi, **launch.process_env(port, pid)) for pid in range(2)]
  logs = launch.communicate(procs)
  assert "2 process(es), 2 cpu device(s)" in logs[1], logs[1][-3000:]
  # Progress lines and the results table come from process 0 only.
  assert "pretrain " in logs[1] and "pretrain " not in logs[2].replace("pretrain:", "")
  assert "# slamjax results" in logs[1] and "# slamjax results" not in logs[2]

  params_one, params_two = _pretrained(single), _pretrained(multi)
  assert params_two.keys() == params_one.keys() and params_one
  for k, v in params_one.items():
    scale = max(float(np.abs(v).max()), 1e-3)
    np.testing.assert_allclose(params_two[k], v, atol=2e-5 * scale, rtol=1e-4, err_msg=k)

  one, two = _jsonl(single / "pretrain_metrics.jsonl"), _jsonl(multi / "pretrain_metrics.jsonl")
  assert [r["step"] for r in two] == [r["step"] for r in one]  # each line once
  for a, b in zip(one, two):
    for k in ("loss_simclr", "loss_sim", "grad_cos", "param_norm"):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)
  logs_one = sorted(p.relative_to(single) for p in single.rglob("*.jsonl"))
  assert sorted(p.relative_to(multi) for p in multi.rglob("*.jsonl")) == logs_one
  for rel in logs_one:  # MIL logs: written once, by process 0
    assert len(_jsonl(multi / rel)) == len(_jsonl(single / rel)), rel

  emb_one, emb_two = _features(single), _features(multi)
  assert sorted(emb_two) == sorted(emb_one) and emb_one
  for name, e in emb_one.items():  # every cell, in bag order
    np.testing.assert_allclose(emb_two[name], e, rtol=1e-3, atol=1e-4, err_msg=name)

  # Every number of the results (bag metrics, per-bag probabilities,
  # retrieval) except wall times.
  res_one, res_two = (_numbers(json.loads(pathlib.Path(d / "metrics.json").read_text())) for d in (single, multi))
  assert res_two.keys() == res_one.keys() and res_one
  for k, v in res_one.items():
    np.testing.assert_allclose(res_two[k], v, atol=2e-3, err_msg=k)


def _numbers(tree, prefix=""):
  """{path: number} of a JSON tree, leaving out timings."""
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, list):
    items = enumerate(tree)
  else:
    ok = isinstance(tree, (int, float)) and not isinstance(tree, bool)
    return {prefix: tree} if ok else {}
  out = {}
  for k, v in items:
    if "timing" not in str(k) and "seconds" not in str(k):
      out.update(_numbers(v, f"{prefix}/{k}"))
  return out
