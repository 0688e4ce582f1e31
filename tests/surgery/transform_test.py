"""The optax contract: validation, state, diagnostics, composition, registry."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slamjax import surgery

PARAMS = {"trunk": {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)},
          "head_a": jnp.zeros(2), "head_b": jnp.zeros(2)}


def _grads(t=2, seed=0):
  rng = np.random.default_rng(seed)
  g = jax.tree.map(
      lambda p: rng.normal(size=(t, *p.shape)).astype(np.float32), PARAMS)
  g["trunk"]["w"][1] -= 2 * g["trunk"]["w"][0]  # conflicting trunk
  # Per-task heads: zero gradient for the other task.
  g["head_a"][1:] = 0
  g["head_b"][:1] = 0
  return g


def _surgery_state(opt_state):
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, surgery.SurgeryState))
           if isinstance(s, surgery.SurgeryState)]
  assert len(found) == 1
  return found[0]


def _flat(tree):
  leaves = jax.tree.leaves(tree)
  t = leaves[0].shape[0]
  return np.concatenate([np.asarray(l).reshape(t, -1) for l in leaves], 1)


# ----------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------


def test_missing_task_axis_names_the_leaf():
  tx = surgery.sum_tasks()
  g = _grads()
  g["trunk"]["b"] = jnp.float32(1.0)
  with pytest.raises(ValueError, match=re.escape("['trunk']['b']")):
    tx.update(g, tx.init(PARAMS))


def test_inconsistent_task_axis_names_both_leaves():
  tx = surgery.pcgrad(key=0)
  g = _grads()
  g["head_b"] = jnp.zeros((3, 2))
  with pytest.raises(ValueError, match=r"\['head_b'\].*3 tasks.*\['head_a'\]"):
    tx.update(g, tx.init(PARAMS), PARAMS)


def test_updates_without_task_axis_caught_via_params():
  """A (3, 2) param's plain gradient looks like T=3 tasks of shape (2,)."""
  tx = surgery.mgda()
  plain = jax.tree.map(jnp.ones_like, PARAMS)
  with pytest.raises(ValueError, match=r"\['head_a'\].*task axis"):
    tx.update(plain, tx.init(PARAMS), PARAMS)


def test_num_tasks_and_task_weights_are_checked():
  tx = surgery.sum_tasks(num_tasks=3)
  with pytest.raises(ValueError, match="num_tasks=3"):
    tx.update(_grads(2), tx.init(PARAMS), PARAMS)
  tx = surgery.sum_tasks(num_tasks=2)
  with pytest.raises(ValueError, match="task_weights"):
    tx.update(_grads(2), tx.init(PARAMS), PARAMS, task_weights=jnp.ones(3))


def test_without_num_tasks_state_takes_shape_on_first_update():
  tx = surgery.sum_tasks(diagnostics=True)
  state = tx.init(PARAMS)
  assert state.cosine.shape == (0, 0)
  assert surgery.diagnostics(state)["cos_mean"] == 0
  with pytest.warns(UserWarning, match="num_tasks=2"):
    _, state = tx.update(_grads(2), state, PARAMS)
  assert state.cosine.shape == (2, 2) and state.weights.shape == (2,)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx.update(_grads(2), state, PARAMS)  # no second warning


def test_output_dtype_follows_leaves():
  tx = surgery.sum_tasks(num_tasks=2, diagnostics=True)
  g = {"w": jnp.ones((2, 4), jnp.bfloat16), "v": jnp.ones((2, 1))}
  out, state = tx.update(g, tx.init(None))
  assert out["w"].dtype == jnp.bfloat16 and out["v"].dtype == jnp.float32
  assert state.cosine.dtype == jnp.float32


# ----------------------------------------------------------------------------
# State, jit, scan, randomness.
# ----------------------------------------------------------------------------


def test_in_chain_under_jit_and_scan_with_fixed_state_shapes():
  """Random order: key in the state, split every step, no host round trip."""
  tx = optax.chain(surgery.adaptive_pcgrad(key=0, num_tasks=3),
                   optax.sgd(0.1, momentum=0.9))
  params = {"w": jnp.zeros(6)}
  rng = np.random.default_rng(0)
  grads = jnp.asarray(rng.normal(size=(4, 3, 6)), jnp.float32)  # 4 steps

  def step(carry, g):
    p, s = carry
    u, s = tx.update({"w": g}, s, p)
    return (optax.apply_updates(p, u), s), (s[0].key, surgery.diagnostics(s))

  init = tx.init(params)
  (_, state), (keys, diags) = jax.jit(
      lambda c: jax.lax.scan(step, c, grads))((params, init))
  assert int(state[0].count) == 4
  keys = np.asarray(keys)
  assert len({tuple(k) for k in keys}) == 4  # a fresh key every step
  # Diagnostics were computed inside jit for every step.
  g = np.asarray(grads[-1], np.float64)
  n = np.linalg.norm(g, axis=1)
  np.testing.assert_allclose(diags["cosine"][-1], (g @ g.T) / np.outer(n, n),
                             atol=1e-5)
  conflicts = [int(np.sum(np.triu((gs @ gs.T) < 0, 1)))
               for gs in np.asarray(grads)]
  np.testing.assert_array_equal(diags["num_conflicts"], conflicts)
  np.testing.assert_allclose(diags["norm_ratio"], 1.0, rtol=1e-5)


def test_nash_mtl_update_weights_every():
  tx = surgery.nash_mtl(update_weights_every=2, num_tasks=2)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  _, state = update(_grads(2, 0), state, PARAMS)
  w1 = np.asarray(state.weights)
  _, state = update(_grads(2, 1), state, PARAMS)  # reused
  np.testing.assert_array_equal(state.weights, w1)
  _, state = update(_grads(2, 1), state, PARAMS)  # recomputed
  assert not np.allclose(state.weights, w1)


# ----------------------------------------------------------------------------
# Diagnostics and optax.partition (shared parameters only).
# ----------------------------------------------------------------------------


def test_diagnostics_absent_or_several():
  assert surgery.diagnostics(optax.adam(1e-3).init(PARAMS)) == {}
  state = (surgery.sum_tasks(num_tasks=2, diagnostics=True).init(PARAMS),
           {"x": surgery.mgda(num_tasks=3).init(PARAMS)})
  d = surgery.diagnostics(state)
  assert d["0/cosine"].shape == (2, 2) and d["1/weights"].shape == (3,)


def test_shared_only_applies_surgery_to_shared_params_and_sums_heads():
  labels = {"trunk": {"w": "shared", "b": "shared"}, "head_a": "a",
            "head_b": "b"}
  tx = optax.chain(
      surgery.shared_only(surgery.mgda(num_tasks=2), labels), optax.sgd(1.0))
  state = tx.init(PARAMS)
  g = _grads(2)
  updates, state = jax.jit(tx.update)(g, state, PARAMS)

  # The trunk gets MGDA computed on the trunk alone (T=2 closed form:
  # w1 = clip(<g2 - g1, g2> / ||g1 - g2||^2, 0, 1)) ...
  j = _flat(g["trunk"]).astype(np.float64)
  w1 = np.clip((j[1] - j[0]) @ j[1] / np.sum((j[0] - j[1])**2), 0, 1)
  want = w1 * j[0] + (1 - w1) * j[1]
  np.testing.assert_allclose(_flat(jax.tree.map(lambda x: x[None],
                                                updates["trunk"]))[0],
                             -want, atol=1e-5)
  # ... the heads are summed over tasks ...
  for k in ("head_a", "head_b"):
    np.testing.assert_allclose(updates[k], -np.sum(g[k], 0), atol=1e-6)
  # ... and the Gram matrix only saw the shared leaves.
  d = surgery.diagnostics(state)
  np.testing.assert_allclose(_surgery_state(state).task_norms,
                             np.linalg.norm(j, axis=1), rtol=1e-5)
  assert set(d) == {"cos_mean", "cos_min", "cosine", "num_conflicts",
                    "weights", "norm_ratio"}
  np.testing.assert_allclose(
      d["cosine"][0, 1], j[0] @ j[1] / np.prod(np.linalg.norm(j, axis=1)),
      atol=1e-6)
  assert "0/cosine" not in d  # the head reducer has no surgery state


def test_shared_only_label_forms_and_raw_partition_recipe():
  g = _grads(2)
  want = jax.tree.map(lambda x: np.sum(x, 0), g)
  fn = lambda p: {"trunk": {"w": True, "b": True}, "head_a": False,
                  "head_b": False}
  variants = [
      surgery.shared_only(surgery.sum_tasks(num_tasks=2, diagnostics=True),
                          fn),
      surgery.shared_only(surgery.sum_tasks(num_tasks=2, diagnostics=True),
                          {"trunk": "body", "head_a": "x", "head_b": "y"},
                          shared_labels=("body",)),
      optax.partition(  # the raw recipe shared_only wraps
          {"s": surgery.sum_tasks(num_tasks=2, diagnostics=True),
           "h": surgery.reduce_tasks("sum")},
          {"trunk": {"w": "s", "b": "s"}, "head_a": "h", "head_b": "h"}),
  ]
  for tx in variants:
    out, state = tx.update(g, tx.init(PARAMS), PARAMS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 out, want)
    np.testing.assert_allclose(_surgery_state(state).task_norms,
                               np.linalg.norm(_flat(g["trunk"]), axis=1),
                               rtol=1e-5)
  # No shared leaf at all: the surgery branch sees only masked leaves.
  tx = surgery.shared_only(surgery.mgda(num_tasks=2), lambda p: jax.tree.map(
      lambda _: "head", p))
  out, _ = tx.update(g, tx.init(PARAMS), PARAMS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               out, want)


def test_shared_only_passes_task_weights_to_both_branches():
  labels = {"trunk": "shared", "head_a": "head", "head_b": "head"}
  tx = surgery.shared_only(surgery.sum_tasks(num_tasks=2), labels)
  g = _grads(2)
  c = jnp.array([2.0, 0.5])
  out, state = tx.update(g, tx.init(PARAMS), PARAMS, task_weights=c)
  want = jax.tree.map(lambda x: np.tensordot(c, x, 1), g)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               out, want)
  np.testing.assert_allclose(surgery.diagnostics(state)["weights"], c)


def test_sum_forms_no_gram_matrix_unless_diagnostics_are_asked_for():
  g = _grads(2)
  for name in ("sum", "mean"):
    tx = surgery.get(name, num_tasks=2)
    jaxpr = str(jax.make_jaxpr(tx.update)(g, tx.init(PARAMS), PARAMS))
    assert "dot_general" not in jaxpr and "cond" not in jaxpr, name
    out, state = tx.update(g, tx.init(PARAMS), PARAMS)
    assert set(surgery.diagnostics(state)) == {"weights", "norm_ratio"}
    assert state.cosine is None and state.task_norms is None
    scale = 1.0 if name == "sum" else 0.5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, scale * np.sum(b, 0), rtol=1e-6), out, g)
  tx = surgery.sum_tasks(num_tasks=2, diagnostics=True)
  _, state = tx.update(g, tx.init(PARAMS), PARAMS)
  j = _flat(g)
  np.testing.assert_allclose(state.task_norms, np.linalg.norm(j, axis=1),
                             rtol=1e-5)


# ----------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------


def test_registry():
  required = ["sum", "mean", "pcgrad", "adaptive_pcgrad", "ags", "gradvac",
              "cagrad", "mgda", "imtl_g", "aligned_mtl", "upgrad", "nash_mtl"]
  for name in required:
    tx = surgery.get(name, key=1, num_tasks=2)  # key ignored if deterministic
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    assert name in surgery.names()
  assert isinstance(surgery.get("AGS", key=jax.random.PRNGKey(0)).init(
      PARAMS), surgery.SurgeryState)
  with pytest.raises(ValueError, match=r"valid names: .*adaptive_pcgrad.*ags"):
    surgery.get("pcgard")
  with pytest.raises(ValueError, match="unknown arguments"):
    surgery.get("mgda", c=0.5)
  with pytest.raises(ValueError, match="rescale"):
    surgery.get("cagrad", rescale=3)
  with pytest.raises(ValueError, match="granularity"):
    surgery.get("gradvac", granularity="layer")
  with pytest.raises(ValueError, match="needs a key"):
    surgery.pcgrad(key=None)
  tx = surgery.pcgrad(key=None, shuffle=False, num_tasks=2)  # no key needed
  assert tx.init(PARAMS).key is None


@pytest.mark.parametrize("t", [2, 3, 5, 10, 12])
@pytest.mark.parametrize("n", [1 << 15, 36 * 1024 + 384, 3 * (1 << 15) + 1])
def test_gram_matrix_matches_float64_reference_on_every_cpu_path(t, n):
  # n picks the path: 1024-wide blocks, 128-wide blocks, or no block (dot);
  # t picks chunked (2), broadcast (3-10) or dot (12).
  m = np.random.default_rng([t, n]).standard_normal((t, n)).astype(np.float32)
  got = np.asarray(jax.jit(surgery.gram_matrix)({"w": jnp.asarray(m)}))
  want = m.astype(np.float64) @ m.astype(np.float64).T
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
