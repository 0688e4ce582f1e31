"""Checkpointer round trips, including the host-copy path of process-local state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamjax import checkpoint


@pytest.mark.parametrize("process_local", [False, True])
def test_save_restore_round_trip(tmp_path, process_local):
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(4)}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), process_local=process_local)
  ckpt.save(4, state, force=True)
  ckpt.wait()
  like = jax.tree.map(jnp.zeros_like, state)
  out = ckpt.restore(like)
  assert ckpt.latest_step() == 4
  ckpt.close()
  for k in state:
    assert isinstance(out[k], jax.Array) and out[k].sharding == like[k].sharding
    np.testing.assert_array_equal(out[k], state[k])
