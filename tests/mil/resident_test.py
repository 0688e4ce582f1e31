"""Device-resident bags: an epoch as one scan equals the per-step loop (same
batches and rngs); fit falls back to per-step padding for unequal bags."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamjax.mil import heads, options, padding, resident
from slamjax.mil import train as mil_train


def test_resident_length_pads_once_only_when_cheap():
  same = [np.zeros((n, 4), np.float32) for n in (40, 50, 60)]
  assert resident.resident_length(same, min_len=16, per_octave=4) == 64
  mixed = [np.zeros((n, 4), np.float32) for n in (10, 20, 1000)]
  assert resident.resident_length(mixed, min_len=16, per_octave=4) is None
  assert resident.resident_length(same, 16, 4, max_bytes=1000) is None


def _state_and_steps(cfg, bags):
  spec = heads.get_spec(cfg)
  model = spec.build(cfg, 1, None)
  params = mil_train._init_params(cfg, model, bags, 0)
  tx, train_step, _, train_epoch = mil_train._steps(cfg, spec, model, np.ones(1, bool), 1,
                                                    None)
  anchor = params if spec.anchor else None
  state = mil_train.MilState(epoch=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                             anchor=anchor)
  return state, (train_step, train_epoch)


@pytest.mark.parametrize("head,sizes", [("abmil", (12, 16)), ("abmil", (5, 30)),
                                        ("asmil", (12, 16))])
def test_scan_epoch_matches_per_step_loop(head, sizes, toy, cfg_for):
  # (5, 30): per-step batches pad to 16, 24 or 32; the resident copy to 32.
  bags, labels, _ = toy(19, seed=5, sizes=sizes)  # 19 bags: a last batch with fillers
  cfg = options.resolve(cfg_for(head, batch_size=4))
  state, steps = _state_and_steps(cfg, bags)
  labels2 = labels[:, None]
  length = padding.bucket_length(max(len(b) for b in bags), 16, 4)  # forced, even for (5, 30)
  data = resident.make_resident(bags, labels2, length)
  order = np.random.default_rng(0).permutation(len(bags))
  key = jax.random.PRNGKey(3)
  loop, m_loop = mil_train.run_epoch(cfg, steps, state, bags, labels2, order, key, 2)
  scan, m_scan = mil_train.run_epoch(cfg, steps, state, bags, labels2, order, key, 2,
                                     data=data)
  assert int(scan.step) == int(loop.step) == 5
  assert set(m_scan) == set(m_loop) and m_scan["loss"].shape == (5,)
  np.testing.assert_allclose(m_scan["loss"], m_loop["loss"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mil_train.predict(cfg, scan, bags)["prob"],
                             mil_train.predict(cfg, loop, bags)["prob"], rtol=1e-5, atol=1e-6)
  if sizes == (12, 16):  # same padded length on both paths: the same parameters
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 scan.params, loop.params)
  # (Otherwise padding changes float rounding, and Adam turns the rounding noise
  # of a zero gradient, e.g. the attention-score bias under softmax, into steps.)


def test_fit_on_very_unequal_bags_pads_per_step(tmp_path, toy, cfg_for):
  bags, labels, _ = toy(12, seed=6, sizes=(4, 300))
  cfg = cfg_for("abmil", epochs=2)
  assert mil_train.resident_bags(options.resolve(cfg), bags, labels[:, None]) is None
  state = mil_train.fit(cfg, bags, labels, str(tmp_path), seed=0, verbose=False)
  assert int(state.step) == 2 * 2
