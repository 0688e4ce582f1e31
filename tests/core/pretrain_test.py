"""Pretraining step: sharding equivalence and resume-after-SIGKILL equality."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(code, env=None, **kw):
  env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                        env=env, capture_output=True, text=True, **kw)


def test_one_step_on_8_devices_equals_1_device():
  code = """
  import jax, numpy as np
  from configs import default
  from slamjax import pretrain, sharding
  assert jax.device_count() == 8, jax.devices()
  cfg = default.get_config("quick")
  rng = np.random.default_rng(0)
  batch = {"pos": rng.integers(0, 255, (16, 40, 40, 3), dtype=np.uint8),
           "neg": rng.integers(0, 255, (16, 40, 40, 3), dtype=np.uint8)}
  out = []
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    model, tx, _ = pretrain.build(cfg, steps_per_epoch=4)
    state = pretrain.init_state(cfg, model, tx, mesh, 40)
    step = pretrain.make_train_step(cfg, model, tx, mesh)
    state, m = step(state, sharding.shard_batch(mesh, batch))
    assert len(state.params["head"]["dense1"]["kernel"].sharding.device_set) == n
    out.append(jax.device_get(state.params))
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                       out[0], out[1]))
  print("MAXDIFF", max(diffs))
  """
  r = _python(code, env={"JAX_NUM_CPU_DEVICES": "8"})
  assert r.returncode == 0, r.stderr[-3000:]
  maxdiff = float(r.stdout.split("MAXDIFF")[1])
  assert maxdiff < 1e-5, maxdiff


_PRETRAIN = """
import sys
from configs import default
from slamjax import pretrain, sharding, train
import jax, numpy as np
cfg = default.get_config("quick")
cfg.pretrain.epochs = 3
cfg.pretrain.checkpoint_every_steps = 2
cfg.pretrain.log_every_steps = 1
pool, bags = train.prepare_data(cfg)
state = pretrain.pretrain(cfg, pool, bags, sys.argv[1], sharding.make_mesh(-1))
flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(
    (state.params, state.batch_stats, state.opt_state)))])
np.save(sys.argv[1] + "/final.npy", flat)
"""


def _run_pretrain(workdir, **kw):
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.Popen([sys.executable, "-c", _PRETRAIN, workdir], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kw)


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
  ref_dir, kill_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
  ref = _run_pretrain(ref_dir)
  # Kill the second run as soon as its first checkpoint exists.
  victim = _run_pretrain(kill_dir)
  ckpt = os.path.join(kill_dir, "pretrain_ckpt")
  deadline = time.time() + 300
  while time.time() < deadline and victim.poll() is None:
    if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
      break
    time.sleep(0.05)
  assert victim.poll() is None, "run finished before it could be killed:\n" + victim.stdout.read()
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert not os.path.exists(os.path.join(kill_dir, "final.npy"))
  out, _ = ref.communicate(timeout=600)
  assert ref.returncode == 0, out[-3000:]
  resumed = _run_pretrain(kill_dir)
  out2, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out2[-3000:]
  assert "resumed from step" in out2
  a = np.load(os.path.join(ref_dir, "final.npy"))
  b = np.load(os.path.join(kill_dir, "final.npy"))
  np.testing.assert_array_equal(a, b)
  # The metric history has exactly one line per step after the resume.
  steps = [int(l.split('"step": ')[1].split(",")[0])
           for l in open(os.path.join(kill_dir, "pretrain_metrics.jsonl"))]
  assert steps == sorted(set(steps)) and steps[-1] == len(steps)


def test_task_grad_metrics_match_direct_cosine_and_norms():
  import jax.numpy as jnp
  from slamjax import pretrain
  rng = np.random.default_rng(0)
  g1 = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
  g2 = {"a": rng.normal(size=(3, 4)), "b": -2.0 * g1["b"]}
  stacked = {k: jnp.stack([jnp.asarray(g1[k], jnp.float32), jnp.asarray(g2[k], jnp.float32)])
             for k in g1}
  m = pretrain._task_grad_metrics(stacked)
  v1 = np.concatenate([g1["a"].ravel(), g1["b"]])
  v2 = np.concatenate([g2["a"].ravel(), g2["b"]])
  np.testing.assert_allclose(float(m["grad_norm_simclr"]), np.linalg.norm(v1), rtol=1e-5)
  np.testing.assert_allclose(float(m["grad_norm_sim"]), np.linalg.norm(v2), rtol=1e-5)
  np.testing.assert_allclose(float(m["grad_cos"]),
                             v1 @ v2 / (np.linalg.norm(v1) * np.linalg.norm(v2)), rtol=1e-5)
