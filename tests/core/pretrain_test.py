"""Pretraining step: sharding equivalence, resume-after-SIGKILL equality, the
per-task gradients of every variant, and collapse detection."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(code, env=None, **kw):
  env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                        env=env, capture_output=True, text=True, **kw)


@pytest.mark.slow
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
    state = pretrain.init_state(cfg, model, tx, mesh)
    step = pretrain.make_train_step(cfg, model, tx, mesh)
    state, m = step(state, sharding.shard_batch(mesh, batch))
    assert len(state.params["head"]["dense1"]["kernel"].sharding.device_set) == n
    assert abs(float(m["ntxent_uniform"]) - np.log(2 * 16 - 1)) < 1e-5, m
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
from slamjax import pipeline, pretrain, sharding
import jax, numpy as np
cfg = default.get_config("quick")
cfg.pretrain.epochs = 3
cfg.pretrain.checkpoint_every_steps = 2
cfg.pretrain.log_every_steps = 1
pool, bags = pipeline.prepare_data(cfg)
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


@pytest.mark.slow
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
  victim.stdout.close()
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
  summary = json.loads(pathlib.Path(os.path.join(kill_dir, "pretrain_collapse.json")).read_text())
  assert {"collapsed", "first_step", "final_spread", "final_ntxent",
          "ntxent_uniform"} <= set(summary)
  assert summary == json.loads(pathlib.Path(os.path.join(ref_dir, "pretrain_collapse.json")).read_text())
  # The metric history has exactly one line per step after the resume.
  steps = [int(l.split('"step": ')[1].split(",")[0])
           for l in pathlib.Path(os.path.join(kill_dir, "pretrain_metrics.jsonl")).read_text().splitlines()]
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


# --- Variants: each task's gradient is that of its own loss. ------------------
# Tiny encoder, random float views; XLA's slow optimisations are skipped.

@pytest.fixture(scope="module")
def fast_compiles():
  import jax
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def _cfg(projection="shared", **pretrain_kw):
  from slamjax.config import base
  cfg = base.get_config()
  cfg.model.width, cfg.model.proj_dims, cfg.model.impl = 2, (8, 8), "native"
  cfg.model.projection = projection
  cfg.data.image_size, cfg.augment.crop_size = 20, 16
  for k, v in pretrain_kw.items():
    cfg.pretrain[k] = v
  return cfg


def _model(cfg):
  """The config's encoder with one block per stage (same layer types)."""
  from slamjax.models import resnet
  m = cfg.model
  return resnet.Encoder(width=m.width, proj_dims=tuple(m.proj_dims), impl=m.impl,
                        projection=m.projection, stage_sizes=(1, 1, 1, 1))


def _task_grads(cfg, sim_task_ref):
  """Task gradients from make_loss_fn, and independent references, in one jit.

  Returns (model, params, (g_simclr, g_similarity), (ref_simclr,
  ref_similarity), aux); ``sim_task_ref(model, apply, p, pos, neg)`` is the
  similarity task's loss written out by hand, ``apply(p, x, **kw)`` the
  train-mode model.
  """
  import jax
  from slamjax import losses, pretrain
  model = _model(cfg)
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)  # 4 cells x 2 views
  neg = rng.normal(size=(6, 16, 16, 3)).astype(np.float32)  # 3 cells x 2 views
  loss_fn = pretrain.make_loss_fn(cfg, model)
  t = cfg.pretrain.temperature

  @jax.jit
  def run(key):
    variables = model.init(key, pos[:2], train=False)
    params, stats = variables["params"], variables["batch_stats"]
    grads, aux = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, params, stats, pos, neg)

    def apply(p, x, **kw):
      return model.apply({"params": p, "batch_stats": stats}, x, train=True,
                         mutable=["batch_stats"], **kw)[0]

    def simclr(p):
      z = apply(p, pos)[1]
      return cfg.pretrain.task_weights[0] * losses.nt_xent(z[:4], z[4:], t)

    refs = (jax.grad(simclr)(params),
            jax.grad(lambda p: sim_task_ref(model, apply, p, pos, neg))(params))
    return params, grads, refs, aux

  params, grads, refs, aux = run(jax.random.key(0))
  return model, params, grads, refs, aux


def _max_abs(tree):
  import jax
  return max(float(np.max(np.abs(x))) for x in jax.tree.leaves(tree))


def _assert_trees_close(a, b):
  import jax
  scale = _max_abs(b)
  assert scale > 0
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-4 * scale), a, b)


def test_per_task_heads_split_gradients_weights_and_leaf_surgery(fast_compiles):
  # Per-task heads, similarity weight 0.1 and a variance floor; then the
  # per-leaf surgery on those gradients.
  import jax
  import jax.numpy as jnp
  from slamjax import losses, pretrain
  cfg = _cfg("per_task", task_weights=(1.0, 0.1), variance_weight=0.5,
             variance_target=0.8, surgery_granularity="leaf")
  t = cfg.pretrain.temperature

  def sim_task(model, apply, p, pos, neg):
    z = apply(p, neg, task="similarity")[1]
    return 0.1 * (losses.similarity_loss(z[:3], z[3:], t, t)
                  + 0.5 * losses.variance_hinge(z, 0.8))

  model, params, (g0, g1), (r0, r1), aux = _task_grads(cfg, sim_task)
  assert {"backbone", "head", "sim_head"} == set(params)
  # Each head only gets its own task's gradient; the backbone gets both.
  assert _max_abs(g0["sim_head"]) == 0.0 and _max_abs(g1["head"]) == 0.0
  assert _max_abs(g0["backbone"]) > 0 and _max_abs(g1["backbone"]) > 0
  _assert_trees_close(g0, r0)
  _assert_trees_close(g1, r1)
  assert float(aux["loss_var"]) > 0
  np.testing.assert_allclose(float(aux["loss_task_sim"]),
                             float(aux["loss_sim"]) + 0.5 * float(aux["loss_var"]), rtol=1e-5)
  # One surgery per tensor: a head that only one task reaches is never
  # projected; its update is that task's gradient.
  tx = pretrain.build_surgery(cfg, model)
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), g0, g1)
  updates, _ = jax.jit(tx.update)(stacked, tx.init(params), params)
  _assert_trees_close(updates["head"], g0["head"])
  _assert_trees_close(updates["sim_head"], g1["sim_head"])


@pytest.mark.parametrize("projection", ["shared", "per_task"])
def test_repel_gradient_uses_detached_positive_features(projection, fast_compiles):
  import jax
  from slamjax import losses
  cfg = _cfg(projection, similarity="repel")
  t = cfg.pretrain.temperature

  def sim_task(model, apply, p, pos, neg):
    # Positive-bag backbone features held fixed, projected by the similarity
    # task's head with its own parameters.
    feats_pos = jax.lax.stop_gradient(apply(p, pos)[0])
    z = apply(p, neg, task="similarity")[1]
    z_rep = apply(p, feats_pos, task="similarity", method=type(model).project)
    return losses.similarity_repel_loss(z[:3], z[3:], z_rep, t, t)

  _, _, (g0, g1), (r0, r1), _ = _task_grads(cfg, sim_task)
  # The SimCLR gradient is NT-Xent's alone: the repulsion never leaks into it.
  _assert_trees_close(g0, r0)
  _assert_trees_close(g1, r1)
  assert _max_abs(g1["sim_head" if projection == "per_task" else "head"]) > 0


def test_variants_step(fast_compiles):
  # Per-task heads + repulsion + variance floor through the jitted step.
  import jax
  from slamjax import pretrain, sharding
  cfg = _cfg("per_task", similarity="repel", variance_weight=1.0)
  mesh = sharding.make_mesh(1)
  _, tx, _ = pretrain.build(cfg, steps_per_epoch=4)
  model = _model(cfg)
  state = pretrain.init_state(cfg, model, tx, mesh)
  assert "sim_head" in state.params
  step = pretrain.make_train_step(cfg, model, tx, mesh)
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, 255, (4, 20, 20, 3), dtype=np.uint8) for k in ("pos", "neg")}
  for _ in range(2):
    state, m = step(state, sharding.shard_batch(mesh, batch))
  m = jax.device_get(m)
  for k in ("loss_simclr", "loss_sim", "loss_var", "grad_cos", "embed_std",
            "embed_std_neg", "ntxent_uniform"):
    assert np.isfinite(m[k]), (k, m)
  assert float(m["update_norm"]) > 0
  np.testing.assert_allclose(m["ntxent_uniform"], np.log(7), rtol=1e-6)


def test_bag_label_rejects_similarity_variants():
  from slamjax import pretrain
  cfg = _cfg(objective="bag_label", similarity="repel")
  cfg.model.proj_dims = (8, 1)
  with pytest.raises(ValueError, match="no similarity task"):
    pretrain.objective(cfg)
  cfg = _cfg(similarity="push")
  with pytest.raises(ValueError, match="attract"):
    pretrain.objective(cfg)


# --- Collapse detection. -------------------------------------------------------

def _history(spreads, ntxents, b=32):
  return [{"step": 5 * (i + 1), "embed_std": s, "loss_simclr": l, "grad_cos": 0.0,
           "ntxent_uniform": math.log(2 * b - 1)} for i, (s, l) in enumerate(zip(spreads, ntxents))]


def test_summarize_criteria():
  from slamjax import collapse
  u = math.log(63)
  healthy = collapse.summarize(_history([0.6, 0.5, 0.45], [4.6, 3.9, 3.2]), 32)
  assert not healthy["collapsed"] and healthy["first_step"] is None
  assert healthy["final_spread"] == 0.45 and healthy["final_ntxent"] == 3.2
  assert abs(healthy["ntxent_uniform"] - u) < 1e-12
  by_spread = collapse.summarize(_history([0.5, 0.04, 0.02, 0.01], [3.0] * 4), 32)
  assert by_spread["collapsed"] and by_spread["first_step"] == 10
  assert by_spread["reasons"] == ["spread"] and by_spread["collapsed_at_end"]
  ntx = [3.0, u + 0.03, u - 0.01, u + 0.001, u + 0.2]
  by_ntxent = collapse.summarize(_history([0.5, 0.3, 0.2, 0.2, 0.2], ntx), 32)
  assert by_ntxent["collapsed"] and by_ntxent["first_step"] == 10
  assert by_ntxent["reasons"] == ["ntxent"] and not by_ntxent["collapsed_at_end"]
  # batch_pos=None: log(2B-1) read from the logged ntxent_uniform.
  from_log = collapse.summarize(_history([0.5, 0.3, 0.2, 0.2, 0.2], ntx))
  assert from_log["first_step"] == 10 and from_log["batch_pos"] == 32
  # Isolated steps in the band (NT-Xent passing through log(2B-1) on its way
  # down, or a weak SimCLR hovering there) are not a collapse...
  passing = collapse.summarize(_history([0.5] * 6, [4.5, u + 0.01, 3.6, u - 0.02, u, 2.9]), 32)
  assert not passing["collapsed"] and passing["collapsed_steps"] == 3
  # ...unless the patience is 1 (every flagged step counts).
  assert collapse.summarize(_history([0.5] * 3, [4.5, u, 2.9]), 32, patience=1)["first_step"] == 10
  # Thresholds are parameters; short histories count when every step is flagged.
  assert collapse.summarize(_history([0.04], [3.0]), 32)["collapsed"]
  assert not collapse.summarize(_history([0.04], [3.0]), 32, spread=0.03)["collapsed"]
  assert collapse.summarize([], 32)["collapsed"] is False


def test_monitor_warns_once_and_writes_summary(tmp_path, capsys):
  from slamjax import collapse
  mon = collapse.Monitor(32, 0.05, 0.05, patience=2)
  for h in _history([0.5, 0.03, 0.5, 0.03, 0.01, 0.01], [3.0, 3.0, 3.0, 4.12, 4.14, 4.14]):
    mon.update(h["step"], {k: v for k, v in h.items() if k != "step"})
  out = capsys.readouterr().out
  assert out.count("WARNING") == 1
  assert "collapsed at step 20" in out and "now (step 25)" in out
  assert "log(2B-1) = 4.1431" in out and "per_task" in out
  summary = mon.write(str(tmp_path))
  assert json.loads(pathlib.Path(tmp_path / collapse.FILENAME).read_text()) == summary
  assert summary["collapsed"] and summary["first_step"] == 20 and summary["patience"] == 2
  # A resumed run whose earlier steps collapsed says so at once, once.
  collapse.Monitor(32, patience=2, history=_history([0.5, 0.03, 0.02], [3.0] * 3))
  assert "before this resumed run" in capsys.readouterr().out
  # Per-task heads: the advice is not to switch to per-task heads.
  collapse.Monitor(32, patience=1, projection="per_task").update(5, {"embed_std": 0.01})
  out = capsys.readouterr().out
  assert "SimCLR has not spread" in out and "projection=per_task (one head" not in out
  quiet = collapse.Monitor(32, patience=1, echo=False)
  assert quiet.update(5, {"embed_std": 0.01}) and quiet.warned
  assert capsys.readouterr().out == ""
