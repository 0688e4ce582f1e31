"""Multi-process (multi-host) runs through ``jax.distributed.initialize``.

slamjax's train step is one ``jax.jit`` over a 1-D ``data`` mesh of *all*
devices of all processes, so running on several hosts only needs every
process to (1) call :func:`initialize` before touching JAX, (2) build the
same mesh and (3) feed its own slice of each global batch, which
``slamjax.sharding.shard_batch`` already does. Gradients (and BatchNorm
statistics) are then reduced over the whole global batch by XLA's
collectives: gloo over TCP on CPU, NCCL on GPU, ICI/DCN on TPU.

How a process learns its place, first match wins:

* explicit arguments to :func:`initialize`;
* ``SLAMJAX_COORDINATOR=host:port``, ``SLAMJAX_NUM_PROCESSES=N`` and
  ``SLAMJAX_PROCESS_ID=i`` (``SLAMJAX_LOCAL_DEVICE_IDS=0,1`` optional);
* ``SLAMJAX_DISTRIBUTED=auto``: JAX's cluster auto-detection (TPU pod
  slices, SLURM, Open MPI, GKE), i.e. ``jax.distributed.initialize()``.

Without any of these it does nothing and the run is single-process.
``SLAMJAX_SHUTDOWN_TIMEOUT`` (seconds, default 3600) bounds how long a
finished process waits for the others at exit.

Only process 0 writes files other than Orbax checkpoints
(:func:`is_main_process`); after the embeddings, the MIL head and the
evaluation run on process 0 alone.

Example (two processes on one machine, CPU)::

  SLAMJAX_COORDINATOR=localhost:12355 SLAMJAX_NUM_PROCESSES=2 \\
    SLAMJAX_PROCESS_ID=0 python -m slamjax.main --config ... --workdir /tmp/w &
  SLAMJAX_COORDINATOR=localhost:12355 SLAMJAX_NUM_PROCESSES=2 \\
    SLAMJAX_PROCESS_ID=1 python -m slamjax.main --config ... --workdir /tmp/w
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import jax

_INITIALIZED = False


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
  v = environ.get(name)
  return None if v in (None, "") else int(v)


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None,
               environ: Mapping[str, str] | None = None) -> bool:
  """Joins a multi-process run if one is configured; returns whether it did.

  Must run before any other JAX call that touches devices (``jax.devices()``,
  creating arrays, ...). Safe to call more than once.
  """
  global _INITIALIZED
  if _INITIALIZED:
    return True
  environ = os.environ if environ is None else environ
  coordinator_address = coordinator_address or environ.get("SLAMJAX_COORDINATOR") or None
  if num_processes is None:
    num_processes = _env_int(environ, "SLAMJAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int(environ, "SLAMJAX_PROCESS_ID")
  if local_device_ids is None and environ.get("SLAMJAX_LOCAL_DEVICE_IDS"):
    local_device_ids = [int(i) for i in environ["SLAMJAX_LOCAL_DEVICE_IDS"].split(",")]
  auto = environ.get("SLAMJAX_DISTRIBUTED", "").lower() == "auto"

  if coordinator_address is None and not auto:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError("SLAMJAX_NUM_PROCESSES/SLAMJAX_PROCESS_ID need "
                       "SLAMJAX_COORDINATOR=host:port (or SLAMJAX_DISTRIBUTED=auto)")
    return False
  if coordinator_address is not None and (num_processes is None or process_id is None):
    raise ValueError("SLAMJAX_COORDINATOR needs SLAMJAX_NUM_PROCESSES and SLAMJAX_PROCESS_ID")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process id {process_id} not in [0, {num_processes})")
  # Processes other than 0 finish after the embeddings and then wait at the
  # shutdown barrier while process 0 trains the MIL head: allow for that.
  shutdown_timeout = _env_int(environ, "SLAMJAX_SHUTDOWN_TIMEOUT") or 3600
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids,
                             shutdown_timeout_seconds=shutdown_timeout)
  _INITIALIZED = True
  return True


def is_main_process() -> bool:
  """True on the one process (index 0) that writes logs, plots and reports.

  Every process runs the same program; files that are not Orbax checkpoints
  (metrics, TensorBoard summaries, tables) are written by this one only, so
  a shared workdir gets each file once.

  Example:
    >>> is_main_process()  # a single-process run
    True
  """
  return jax.process_index() == 0


def shutdown() -> None:
  global _INITIALIZED
  if _INITIALIZED:
    jax.distributed.shutdown()
    _INITIALIZED = False


def fetch_replicated(tree):
  """Host copy of a replicated (possibly multi-process) pytree of arrays."""
  import numpy as np

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(get, tree)
