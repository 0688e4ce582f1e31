"""gram_weighted, the shell of every method: state, jit/scan, dtypes, NaN."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slamjax import surgery


def test_without_num_tasks_state_takes_shape_on_first_update(params,
                                                              make_grads):
  tx = surgery.sum_tasks(diagnostics=True)
  state = tx.init(params)
  assert state.cosine.shape == (0, 0)
  assert surgery.diagnostics(state)["cos_mean"] == 0
  with pytest.warns(UserWarning, match="num_tasks=2"):
    _, state = tx.update(make_grads(2), state, params)
  assert state.cosine.shape == (2, 2) and state.weights.shape == (2,)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx.update(make_grads(2), state, params)  # no second warning


def test_output_dtype_follows_leaves():
  tx = surgery.sum_tasks(num_tasks=2, diagnostics=True)
  g = {"w": jnp.ones((2, 4), jnp.bfloat16), "v": jnp.ones((2, 1))}
  out, state = tx.update(g, tx.init(None))
  assert out["w"].dtype == jnp.bfloat16 and out["v"].dtype == jnp.float32
  assert state.cosine.dtype == jnp.float32


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


def test_non_finite_step_leaves_count_and_key_as_they_were():
  """A rejected step does not shift the method: with the NaN step rejected
  inside the chain, the updates equal those of surgery.apply_if_finite
  (whose inner state never sees the step), key and count included."""
  params = {"w": jnp.zeros(6)}
  rng = np.random.default_rng(1)
  good = [{"w": jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)}
          for _ in range(4)]
  bad = {"w": good[0]["w"].at[1, 2].set(jnp.nan)}
  orders = [
      optax.chain(surgery.pcgrad(key=0, num_tasks=3),
                  optax.apply_if_finite(optax.sgd(1.0), 3)),
      surgery.apply_if_finite(
          optax.chain(surgery.pcgrad(key=0, num_tasks=3), optax.sgd(1.0)), 3),
  ]
  runs = []
  for tx in orders:
    update, state, outs = jax.jit(tx.update), tx.init(params), []
    for g in (good[0], bad, *good[1:]):
      out, state = update(g, state, params)
      outs.append(np.asarray(out["w"]))
    runs.append((outs, state))
  (outs_in, state_in), (outs_out, _) = runs
  np.testing.assert_array_equal(outs_in[1], 0.0)
  for a, b in zip(outs_in, outs_out):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert int(state_in[0].count) == 4  # 5 updates, one rejected


def test_sum_forms_no_gram_matrix_unless_diagnostics_are_asked_for(
    params, make_grads, flat):
  g = make_grads(2)
  for name in ("sum", "mean"):
    tx = surgery.get(name, num_tasks=2)
    jaxpr = str(jax.make_jaxpr(tx.update)(g, tx.init(params), params))
    assert "dot_general" not in jaxpr and "cond" not in jaxpr, name
    out, state = tx.update(g, tx.init(params), params)
    assert set(surgery.diagnostics(state)) == {"weights", "norm_ratio"}
    assert state.cosine is None and state.task_norms is None
    scale = 1.0 if name == "sum" else 0.5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, scale * np.sum(b, 0), rtol=1e-6), out, g)
  tx = surgery.sum_tasks(num_tasks=2, diagnostics=True)
  _, state = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(state.task_norms, np.linalg.norm(flat(g), axis=1),
                             rtol=1e-5)
