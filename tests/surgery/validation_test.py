"""Input checks: the task axis, num_tasks, task_weights, MultiSteps order."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slamjax import surgery


def test_missing_task_axis_names_the_leaf(params, make_grads):
  tx = surgery.sum_tasks()
  g = make_grads()
  g["trunk"]["b"] = jnp.float32(1.0)
  with pytest.raises(ValueError, match=re.escape("['trunk']['b']")):
    tx.update(g, tx.init(params))


def test_inconsistent_task_axis_names_both_leaves(params, make_grads):
  tx = surgery.pcgrad(key=0)
  g = make_grads()
  g["head_b"] = jnp.zeros((3, 2))
  with pytest.raises(ValueError, match=r"\['head_b'\].*3 tasks.*\['head_a'\]"):
    tx.update(g, tx.init(params), params)


def test_updates_without_task_axis_caught_via_params(params):
  """A (3, 2) param's plain gradient looks like T=3 tasks of shape (2,)."""
  tx = surgery.mgda()
  plain = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match=r"\['head_a'\].*task axis"):
    tx.update(plain, tx.init(params), params)


def test_num_tasks_and_task_weights_are_checked(params, make_grads):
  tx = surgery.sum_tasks(num_tasks=3)
  with pytest.raises(ValueError, match="num_tasks=3"):
    tx.update(make_grads(2), tx.init(params), params)
  tx = surgery.sum_tasks(num_tasks=2)
  with pytest.raises(ValueError, match="task_weights"):
    tx.update(make_grads(2), tx.init(params), params, task_weights=jnp.ones(3))


@pytest.mark.parametrize("with_params", [True, False])
def test_multisteps_around_surgery_says_to_put_it_after(params, make_grads,
                                                        with_params):
  """optax.MultiSteps hands its inner chain params-shaped updates."""
  tx = optax.MultiSteps(
      optax.chain(surgery.mgda(num_tasks=2), optax.sgd(0.1)), 2)
  with pytest.raises(ValueError, match=re.escape(
      "Put it inside the chain, after the surgery: optax.chain(surgery.X(...), "
      "optax.MultiSteps(opt, k).gradient_transformation())")):
    tx.update(make_grads(2), tx.init(params), params if with_params else None)


def test_multisteps_after_surgery_averages_the_combined_updates(params,
                                                                make_grads):
  """The order the error message gives works, under jit, with a fixed state."""
  tx = optax.chain(
      surgery.mgda(num_tasks=2),
      optax.MultiSteps(optax.sgd(1.0), 2).gradient_transformation())
  one = optax.chain(surgery.mgda(num_tasks=2), optax.sgd(1.0))
  update, state = jax.jit(tx.update), tx.init(params)
  combined = []
  for seed in range(4):
    g = make_grads(2, seed)
    out, state = update(g, state, params)
    combined.append(one.update(g, one.init(params), params)[0])
    if seed % 2 == 0:  # accumulating
      jax.tree.map(lambda o: np.testing.assert_array_equal(o, 0.0), out)
    else:  # emits the mean of the two micro-batches' combined updates
      jax.tree.map(lambda o, a, b: np.testing.assert_allclose(
          o, (a + b) / 2, rtol=1e-5, atol=1e-6), out, *combined[-2:])
  assert int(surgery.diagnostics(state)["num_conflicts"]) == 1
