"""Nash-MTL's update_weights_every schedule (its solver: methods_test)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from slamjax import surgery


def test_nash_mtl_update_weights_every(params, make_grads):
  tx = surgery.nash_mtl(update_weights_every=2, num_tasks=2)
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(make_grads(2, 0), state, params)
  w1 = np.asarray(state.weights)
  _, state = update(make_grads(2, 1), state, params)  # reused
  np.testing.assert_array_equal(state.weights, w1)
  _, state = update(make_grads(2, 1), state, params)  # recomputed
  assert not np.allclose(state.weights, w1)


def test_non_finite_step_does_not_shift_the_schedule(params, make_grads):
  """Solve, NaN (skipped), reuse, solve: as if the NaN step never happened."""
  tx = surgery.nash_mtl(update_weights_every=2, num_tasks=2)
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(make_grads(2, 0), state, params)
  w1 = np.asarray(state.weights)
  bad = make_grads(2, 1)
  bad["trunk"]["w"][0, 0, 0] = np.nan
  out, state = update(bad, state, params)
  assert np.all(np.isnan(out["trunk"]["w"])) and int(state.count) == 1
  _, state = update(make_grads(2, 1), state, params)  # reused
  np.testing.assert_array_equal(state.weights, w1)
  _, state = update(make_grads(2, 1), state, params)  # recomputed
  assert not np.allclose(state.weights, w1)
  np.testing.assert_array_equal(state.inner.alpha, state.weights)
  assert state.inner.alpha.dtype == jnp.float32
