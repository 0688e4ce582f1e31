"""Orbax checkpointing of pure train states, with automatic resume.

Example:
  >>> import tempfile, jax.numpy as jnp
  >>> ckpt = Checkpointer(tempfile.mkdtemp() + "/ckpt", max_to_keep=2)
  >>> ckpt.save(3, {"w": jnp.ones(2)}, force=True)
  True
  >>> ckpt.wait(); ckpt.latest_step()
  3
  >>> ckpt.restore({"w": jnp.zeros(2)})["w"].tolist()
  [1.0, 1.0]
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` for one pytree item.

  By default every process of a multi-process run must make the same calls
  (Orbax synchronises them and writes each shard once). ``process_local=True``
  is for state that lives on one process only, such as the MIL head trained
  on process 0: that process saves and restores alone, without barriers.
  """

  def __init__(self, directory: str, max_to_keep: int = 2,
               save_interval_steps: int = 1, save_on_steps=(),
               process_local: bool = False):
    self.directory = os.path.abspath(directory)
    # Orbax refuses process-local jax.Arrays in a multi-process run: such
    # state goes through host (numpy) copies instead (in every run, so that
    # single-process tests cover this path).
    self._host_copies = process_local
    multiprocessing, create = ocp.options.MultiprocessingOptions(), True
    if process_local and jax.process_count() > 1:
      me = jax.process_index()
      multiprocessing = ocp.options.MultiprocessingOptions(
          primary_host=me, active_processes={me},
          barrier_sync_key_prefix=f"process{me}")
      os.makedirs(self.directory, exist_ok=True)  # Orbax refuses to here
      create = False
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=create,
            # Every save_interval_steps and on save_on_steps (and when
            # preempted); not Orbax's default extra save on the first step.
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy([
                ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                ocp.checkpoint_managers.SpecificStepsPolicy(tuple(save_on_steps)),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]),
            enable_async_checkpointing=False,
            multiprocessing_options=multiprocessing))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, force: bool = False) -> bool:
    """Saves if Orbax's policy (or ``force``) says so; returns whether it did."""
    if not force and not self.manager.should_save(step):
      return False
    if self._host_copies:
      state = jax.device_get(state)
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, like, step: int | None = None):
    """Restores into the structure, shapes and shardings of ``like``."""
    step = self.latest_step() if step is None else step
    if self._host_copies:
      restored = self.manager.restore(
          step, args=ocp.args.StandardRestore(jax.device_get(like)))
      return jax.tree.map(
          lambda r, l: jax.device_put(r, l.sharding) if isinstance(l, jax.Array) else r,
          restored, like)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
