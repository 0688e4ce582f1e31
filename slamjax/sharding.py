"""Device mesh and data-parallel placement helpers.

One mesh axis, ``data``: batches are split over it, parameters and optimizer
state are replicated. Inside ``jax.jit`` the gradients of a sharded batch are
already reduced over the whole global batch, which gradient surgery needs.

Example:
  >>> import numpy as np
  >>> mesh = make_mesh(-1)
  >>> x = shard_batch(mesh, np.zeros((jax.device_count() * 2, 3), np.float32))
  >>> x.shape == (jax.device_count() * 2, 3)
  True
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_data: int = -1) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over ``num_data`` devices (-1: all)."""
  n = jax.device_count() if num_data in (-1, None) else int(num_data)
  if not 1 <= n <= jax.device_count() or jax.device_count() % n:
    raise ValueError(f"config.mesh.data={num_data} must be -1 or a divisor of "
                     f"the device count {jax.device_count()}")
  return jax.make_mesh((n,), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def data_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(mesh, tree):
  """Places a global host batch (same on every process) sharded over ``data``.

  Each process contributes its own contiguous slice of the leading axis, so
  this works unchanged for multi-process runs.
  """
  sharding = data_sharding(mesh)
  nproc, pid = jax.process_count(), jax.process_index()

  def put(x):
    x = np.asarray(x)
    if x.shape[0] % mesh.size:
      raise ValueError(f"Batch of {x.shape[0]} does not split over "
                       f"{mesh.size} devices")
    per = x.shape[0] // nproc
    local = x[pid * per:(pid + 1) * per]
    return jax.make_array_from_process_local_data(sharding, local, x.shape)

  return jax.tree.map(put, tree)


def replicate(mesh, tree):
  """Places a host pytree replicated on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
