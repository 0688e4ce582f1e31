"""Encoder: both implementations share parameters and agree on outputs.

Most checks run on a one-block-per-stage trunk (same layer types: 7x7/2 stem,
max-pool, stride-2 blocks with 1x1 projections, 2x2 and 1x1 maps in the last
stages) to keep compile times short; one runs the full Encoder.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamjax.models import resnet

WIDTH, PROJ, SIZE = 4, (8, 8), 32


def _x(n=4, size=SIZE):
  return jnp.asarray(np.random.RandomState(0).rand(n, size, size, 3).astype(np.float32))


def _everything(model, variables, x):
  """Eval output, train output + new batch stats, and parameter gradients."""
  def loss(params):
    f, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                         x, train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(f)), (f, upd)
  grads, (f_train, upd) = jax.grad(loss, has_aux=True)(variables["params"])
  f_eval = model.apply(variables, x, train=False)
  return dict(eval=f_eval, train=f_train, batch_stats=upd["batch_stats"], grads=grads)


@pytest.fixture(scope="module")
def small_trunk_results():
  x = _x()
  models = {impl: resnet.ResNet18(width=WIDTH, stage_sizes=(1, 1, 1, 1), impl=impl)
            for impl in ("native", "cpu")}
  variables = jax.jit(lambda k, x: models["native"].init(k, x, train=False))(
      jax.random.key(0), x)
  # Perturb the zero-initialised BN scales so every path carries signal.
  variables = {"params": jax.tree.map(lambda p: p + 0.1, variables["params"]),
               "batch_stats": variables["batch_stats"]}
  return {impl: jax.jit(lambda v, x, m=m: _everything(m, v, x))(variables, x)
          for impl, m in models.items()}


def test_parameter_trees_identical():
  x = _x(2)
  shapes = {impl: jax.eval_shape(
      lambda k, m=resnet.Encoder(width=WIDTH, proj_dims=PROJ, impl=impl): m.init(k, x, train=False),
      jax.random.key(1)) for impl in ("native", "cpu")}
  assert jax.tree.structure(shapes["native"]) == jax.tree.structure(shapes["cpu"])
  for a, b in zip(jax.tree.leaves(shapes["native"]), jax.tree.leaves(shapes["cpu"])):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)
  names = flax.traverse_util.flatten_dict(shapes["native"]["params"])
  assert ("backbone", "stem_conv", "kernel") in names
  assert ("backbone", "stage4_block1", "proj_conv", "kernel") in names
  assert ("head", "dense2", "kernel") in names


def test_initial_values_identical():
  x = _x(2, 8)
  inits = [jax.jit(lambda k, x, m=resnet.ResNet18(width=WIDTH, stage_sizes=(1, 1, 1, 1),
                                                    impl=impl): m.init(k, x, train=False))(
      jax.random.key(1), x) for impl in ("native", "cpu")]
  for a, b in zip(jax.tree.leaves(inits[0]), jax.tree.leaves(inits[1])):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("key", ["eval", "train", "batch_stats"])
def test_outputs_agree(small_trunk_results, key):
  r = small_trunk_results
  for a, b in zip(jax.tree.leaves(r["native"][key]), jax.tree.leaves(r["cpu"][key])):
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)


def test_gradients_agree(small_trunk_results):
  g_n, g_c = small_trunk_results["native"]["grads"], small_trunk_results["cpu"]["grads"]
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_n))
  assert scale > 0
  for a, b in zip(jax.tree.leaves(g_n), jax.tree.leaves(g_c)):
    np.testing.assert_allclose(b, a, atol=1e-4 * scale)


def test_full_encoder_outputs_agree():
  x = _x(2)
  native = resnet.Encoder(width=WIDTH, proj_dims=PROJ, impl="native")
  cpu = resnet.Encoder(width=WIDTH, proj_dims=PROJ, impl="cpu")
  variables = jax.jit(lambda k, x: native.init(k, x, train=False))(jax.random.key(0), x)
  variables = jax.tree.map(lambda p: p + 0.05, variables)
  out_n = jax.jit(lambda v, x: native.apply(v, x, train=False))(variables, x)
  out_c = jax.jit(lambda v, x: cpu.apply(v, x, train=False))(variables, x)
  assert out_n[0].shape == (2, 8 * WIDTH) and out_n[1].shape == (2, PROJ[-1])
  for a, b in zip(out_n, out_c):
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)


def test_invalid_impl():
  with pytest.raises(ValueError, match="valid"):
    resnet.Encoder(width=4, proj_dims=(8,), impl="gpu")


def test_get_model_from_config():
  from slamjax.config import base
  cfg = base.get_config().model
  cfg.width, cfg.proj_dims, cfg.impl = 4, (8, 8), "cpu"
  model = resnet.get_model(cfg)
  assert (model.width, tuple(model.proj_dims), model.impl) == (4, (8, 8), "cpu")
  assert (model.head_norm, model.projection) == (False, "per_task")
  cfg.projection = "shared"
  assert resnet.get_model(cfg).projection == "shared"
  cfg.name = "vit"
  with pytest.raises(ValueError, match="resnet18"):
    resnet.get_model(cfg)
  with pytest.raises(ValueError, match="per_task"):
    resnet.Encoder(width=4, proj_dims=(8,), projection="two")


def test_per_task_heads():
  x = _x(2)
  per_task = resnet.Encoder(width=WIDTH, proj_dims=PROJ, impl="native", projection="per_task")
  shared_shapes = jax.eval_shape(lambda k: resnet.Encoder(
      width=WIDTH, proj_dims=PROJ, impl="native").init(k, x, train=False), jax.random.key(0))
  assert set(shared_shapes["params"]) == {"backbone", "head"}

  @jax.jit
  def run(key, x):
    v = per_task.init(key, x, train=False)
    feats, z = per_task.apply(v, x, train=False)  # default: the SimCLR head
    feats_s, z_s = per_task.apply(v, x, train=False, task="similarity")
    z_p = per_task.apply(v, feats, train=False, task="similarity",
                         method=resnet.Encoder.project)
    return v, (feats, z, feats_s, z_s, z_p)

  v, (feats, z, feats_s, z_s, z_p) = run(jax.random.key(0), x)
  assert set(v["params"]) == {"backbone", "head", "sim_head"}
  assert jax.tree.structure(v["params"]["head"]) == jax.tree.structure(
      v["params"]["sim_head"])
  np.testing.assert_array_equal(feats, feats_s)
  np.testing.assert_allclose(z_p, z_s, rtol=1e-5, atol=1e-6)
  # The default output (what embed.output='projection' reads) is the SimCLR
  # head's: the dense layers applied by hand give it back.
  h = v["params"]["head"]
  want = jnp.maximum(feats @ h["dense1"]["kernel"] + h["dense1"]["bias"], 0)
  want = want @ h["dense2"]["kernel"] + h["dense2"]["bias"]
  np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-5)
  assert not np.allclose(z, z_s)
  with pytest.raises(ValueError, match="simclr"):
    jax.eval_shape(lambda: per_task.apply(v, x, train=False, task="other"))
