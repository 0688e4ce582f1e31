"""reduce_tasks and apply_if_finite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slamjax import surgery

METHODS = ["sum", "mean", "pcgrad", "ags", "gradvac", "cagrad", "mgda",
           "imtl_g", "aligned_mtl", "upgrad", "nash_mtl"]
MIXING = [n for n in METHODS if n not in ("sum", "mean")]


def test_reduce_tasks_sum_mean_task_weights_and_nan_coordinates():
  g = {"w": jnp.array([[1.0, 2.0], [3.0, jnp.inf]]), "b": jnp.ones((2, 1))}
  for reduction, scale in (("sum", 1.0), ("mean", 0.5)):
    tx = surgery.reduce_tasks(reduction)
    out, _ = jax.jit(tx.update)(g, tx.init(None), None,
                                task_weights=jnp.array([2.0, 1.0]))
    np.testing.assert_allclose(out["w"], [5.0 * scale, np.nan])
    np.testing.assert_allclose(out["b"], [3.0 * scale])
  with pytest.raises(ValueError, match="'sum' or 'mean'"):
    surgery.reduce_tasks("max")
  with pytest.raises(ValueError, match="task_weights"):
    tx.update(g, tx.init(None), task_weights=jnp.ones(3))


@pytest.mark.parametrize("name", METHODS)
def test_apply_if_finite_composes_in_both_orders(name):
  """surgery.apply_if_finite(chain(surgery, sgd)) and chain(surgery,
  optax.apply_if_finite(sgd)), under jit. (optax.apply_if_finite itself
  cannot wrap a surgery chain: its rejected branch keeps the task axis.)"""
  params = {"w": jnp.zeros(4)}
  good = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)),
                           jnp.float32)}
  bad = {"w": good["w"].at[1, 2].set(jnp.nan)}
  orders = {
      "outside": surgery.apply_if_finite(
          optax.chain(surgery.get(name, key=0, num_tasks=3), optax.sgd(1.0)),
          2),
      "inside": optax.chain(surgery.get(name, key=0, num_tasks=3),
                            optax.apply_if_finite(optax.sgd(1.0), 2)),
  }
  for order, tx in orders.items():
    update = jax.jit(tx.update)
    state = tx.init(params)
    out, state = update(good, state, params)
    assert np.all(np.isfinite(out["w"])) and np.any(out["w"] != 0)
    for step in range(3):  # rejected twice, then given up on (as optax)
      out, state = update(bad, state, params)
      if step < 2:
        np.testing.assert_array_equal(out["w"], 0.0, err_msg=(name, order))
      else:  # the policy's NaN (only the bad coordinate for sum/mean)
        check = np.all if name in MIXING else np.any
        assert check(np.isnan(out["w"])), (name, order)
    out, state = update(good, state, params)  # recovers: state not poisoned
    assert np.all(np.isfinite(out["w"])), (name, order)
