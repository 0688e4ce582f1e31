"""shared_only: surgery on the shared parameters, heads reduced."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slamjax import surgery


def test_shared_only_applies_surgery_to_shared_params_and_sums_heads(
    params, make_grads, flat, surgery_state):
  labels = {"trunk": {"w": "shared", "b": "shared"}, "head_a": "a",
            "head_b": "b"}
  tx = optax.chain(
      surgery.shared_only(surgery.mgda(num_tasks=2), labels), optax.sgd(1.0))
  state = tx.init(params)
  g = make_grads(2)
  updates, state = jax.jit(tx.update)(g, state, params)

  # The trunk gets MGDA computed on the trunk alone (T=2 closed form:
  # w1 = clip(<g2 - g1, g2> / ||g1 - g2||^2, 0, 1)) ...
  j = flat(g["trunk"]).astype(np.float64)
  w1 = np.clip((j[1] - j[0]) @ j[1] / np.sum((j[0] - j[1])**2), 0, 1)
  want = w1 * j[0] + (1 - w1) * j[1]
  np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[None],
                                               updates["trunk"]))[0],
                             -want, atol=1e-5)
  # ... the heads are summed over tasks ...
  for k in ("head_a", "head_b"):
    np.testing.assert_allclose(updates[k], -np.sum(g[k], 0), atol=1e-6)
  # ... and the Gram matrix only saw the shared leaves.
  d = surgery.diagnostics(state)
  np.testing.assert_allclose(surgery_state(state).task_norms,
                             np.linalg.norm(j, axis=1), rtol=1e-5)
  assert set(d) == {"cos_mean", "cos_min", "cosine", "num_conflicts",
                    "weights", "norm_ratio"}
  np.testing.assert_allclose(
      d["cosine"][0, 1], j[0] @ j[1] / np.prod(np.linalg.norm(j, axis=1)),
      atol=1e-6)
  assert "0/cosine" not in d  # the head reducer has no surgery state


def test_shared_only_label_forms_and_raw_partition_recipe(
    params, make_grads, flat, surgery_state):
  g = make_grads(2)
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
    out, state = tx.update(g, tx.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 out, want)
    np.testing.assert_allclose(surgery_state(state).task_norms,
                               np.linalg.norm(flat(g["trunk"]), axis=1),
                               rtol=1e-5)
  # No shared leaf at all: the surgery branch sees only masked leaves.
  tx = surgery.shared_only(surgery.mgda(num_tasks=2), lambda p: jax.tree.map(
      lambda _: "head", p))
  out, _ = tx.update(g, tx.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               out, want)


def test_shared_only_passes_task_weights_to_both_branches(params, make_grads):
  labels = {"trunk": "shared", "head_a": "head", "head_b": "head"}
  tx = surgery.shared_only(surgery.sum_tasks(num_tasks=2), labels)
  g = make_grads(2)
  c = jnp.array([2.0, 0.5])
  out, state = tx.update(g, tx.init(params), params, task_weights=c)
  want = jax.tree.map(lambda x: np.tensordot(c, x, 1), g)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               out, want)
  np.testing.assert_allclose(surgery.diagnostics(state)["weights"], c)
