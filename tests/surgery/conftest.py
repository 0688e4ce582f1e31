"""Shared fixtures of the surgery tests: a small model's params and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamjax import surgery


def _params():
  return {"trunk": {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)},
          "head_a": jnp.zeros(2), "head_b": jnp.zeros(2)}


@pytest.fixture
def params():
  """A trunk shared by two per-task heads."""
  return _params()


@pytest.fixture
def make_grads():
  """``make_grads(t=2, seed=0)``: per-task gradients for :func:`params`,
  with a conflicting trunk and zero head gradients for the other task."""

  def make(t=2, seed=0):
    rng = np.random.default_rng(seed)
    g = jax.tree.map(
        lambda p: rng.normal(size=(t, *p.shape)).astype(np.float32), _params())
    g["trunk"]["w"][1] -= 2 * g["trunk"]["w"][0]
    g["head_a"][1:] = 0
    g["head_b"][:1] = 0
    return g

  return make


@pytest.fixture
def flat():
  """``flat(tree)``: the ``(T, P)`` matrix of a tree's task gradients."""

  def f(tree):
    leaves = jax.tree.leaves(tree)
    t = leaves[0].shape[0]
    return np.concatenate([np.asarray(l).reshape(t, -1) for l in leaves], 1)

  return f


@pytest.fixture
def surgery_state():
  """``surgery_state(opt_state)``: the one SurgeryState inside an optax state."""

  def find(opt_state):
    found = [s for s in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, surgery.SurgeryState))
             if isinstance(s, surgery.SurgeryState)]
    assert len(found) == 1
    return found[0]

  return find
