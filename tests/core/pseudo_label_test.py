"""Pseudo-label stage: label choice, batches, the loss, and resume after a kill."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamjax import losses
from slamjax import pseudo_label


def _bags():
  # Bag 0 negative (cells 0-3); bag 1 positive (cells 2, 10, 11, 12): cell 2
  # also sits in the negative bag (simulated bags reuse cells).
  return types.SimpleNamespace(
      cells=[np.array([0, 1, 2, 3]), np.array([2, 10, 11, 12]), np.array([13, 14])],
      bag_labels=np.array([0, 1, 1]),
      witness=[np.zeros(4, bool), np.array([0, 0, 1, 0], bool), np.array([1, 0], bool)])


def test_cell_sets_are_the_unique_cells_of_each_bag_label():
  neg, pos = pseudo_label.cell_sets(_bags())
  assert neg.tolist() == [0, 1, 2, 3]
  assert pos.tolist() == [2, 10, 11, 12, 13, 14]  # cell 2 is in both: no leak


def test_choose_positives_takes_the_most_novel_cells_of_each_positive_bag():
  b = _bags()
  novelty = {2: 0.0, 10: 0.1, 11: 0.9, 12: 0.5, 13: 0.2, 14: 0.8}
  assert pseudo_label.choose_positives(b, novelty, 1).tolist() == [11, 14]
  assert pseudo_label.choose_positives(b, novelty, 2).tolist() == [11, 12, 13, 14]
  assert pseudo_label.choose_positives(b, novelty, 4).tolist() == [2, 10, 11, 12, 13, 14]
  q = pseudo_label.label_quality(b, np.array([11, 14]))
  assert q["precision"] == 0.5 and q["recall"] == 0.5 and q["num_witness_cells"] == 2


def test_batches_are_a_function_of_the_step_with_the_asked_share():
  a = pseudo_label.batch_indices(0, 5, np.array([7, 8]), np.arange(20, 100), 16, 0.25)
  b = pseudo_label.batch_indices(0, 5, np.array([7, 8]), np.arange(20, 100), 16, 0.25)
  c = pseudo_label.batch_indices(0, 6, np.array([7, 8]), np.arange(20, 100), 16, 0.25)
  assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
  idx, flag = a
  assert flag.sum() == 4 and set(idx[flag].tolist()) <= {7, 8}
  assert len(set(idx[~flag].tolist())) == 12 and min(idx[~flag]) >= 20


def test_pseudo_supcon_pulls_only_the_positive_class():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
  none = jnp.zeros(8, bool)
  assert np.allclose(losses.pseudo_supcon(z, z + 0.01, none), losses.nt_xent(z, z + 0.01),
                     atol=1e-6)
  pos = jnp.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
  # Pseudo-positives that already coincide score lower than scattered ones.
  together = z.at[:3].set(z[0])
  assert losses.pseudo_supcon(together, together, pos) < losses.pseudo_supcon(z, z, pos)
  # A gradient step moves the positives together, not the others.
  g = jax.grad(lambda x: losses.pseudo_supcon(x, x, pos))(z)
  z2 = z - 0.5 * g
  cos = lambda a, b: float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b))
  assert cos(z2[0], z2[1]) > cos(z[0], z[1])


@pytest.fixture(scope="module")
def setup():
  from configs import default
  from slamjax import pipeline, pretrain, sharding
  cfg = default.get_config("quick")
  cfg.pseudo.rounds = 2
  cfg.pseudo.steps_per_round = 3
  cfg.pseudo.checkpoint_every_steps = 2
  cfg.pseudo.per_bag = (1, 2)
  cfg.pretrain.batch_size = 8
  cfg.pretrain.log_every_steps = 1
  pool, bags = pipeline.prepare_data(cfg)
  mesh = sharding.make_mesh(-1)
  model, tx, _ = pretrain.build(cfg, steps_per_epoch=1)
  state = pretrain.init_state(cfg, model, tx, mesh)
  return cfg, pool, bags, mesh, model, state


def _flat(state):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(
      (state.params, state.batch_stats, state.opt_state)))])


@pytest.mark.slow
def test_rounds_resume_after_a_kill_to_the_same_state(setup, tmp_path, monkeypatch):
  cfg, pool, bags, mesh, model, state = setup
  whole = pseudo_label.finetune(cfg, pool, bags, str(tmp_path / "a"), mesh, model, state)
  rounds = (tmp_path / "a" / pseudo_label.ROUNDS).read_text()
  assert '"round": 1' in rounds and "precision" in rounds

  make = pseudo_label.make_train_step
  calls = {"n": 0}

  def dying(*a, **kw):
    step = make(*a, **kw)

    def wrapped(s, b):
      calls["n"] += 1
      if calls["n"] == 5:  # mid-way through round 2, after its labels were saved
        raise KeyboardInterrupt
      return step(s, b)
    return wrapped

  monkeypatch.setattr(pseudo_label, "make_train_step", dying)
  with pytest.raises(KeyboardInterrupt):
    pseudo_label.finetune(cfg, pool, bags, str(tmp_path / "b"), mesh, model, state)
  monkeypatch.setattr(pseudo_label, "make_train_step", make)
  resumed = pseudo_label.finetune(cfg, pool, bags, str(tmp_path / "b"), mesh, model, state)
  assert int(resumed.step) == 6
  np.testing.assert_array_equal(_flat(whole), _flat(resumed))
  restored = pseudo_label.restore(cfg, str(tmp_path / "b"), state, mesh)
  np.testing.assert_array_equal(_flat(whole), _flat(restored))
