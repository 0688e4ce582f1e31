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


def _check_splits(n: int, mesh) -> None:
  if n % mesh.size:
    raise ValueError(f"Batch of {n} does not split over {mesh.size} devices "
                     f"(config batch sizes must be multiples of the mesh size)")


def shard_batch(mesh, tree):
  """Places a global host batch (the same on every process) sharded over ``data``.

  Each device's slice is copied by ``jax.make_array_from_callback``, so a
  process only transfers the rows of its own devices, wherever the mesh puts
  them; this works unchanged for multi-process runs.
  """
  sharding = data_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    _check_splits(x.shape[0], mesh)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, tree)


def take_batch(mesh, source, rows):
  """The global batch ``source[rows]`` sharded over ``data``, for each leaf of ``rows``.

  ``rows`` is a pytree of 1-D integer index arrays (the same on every
  process); ``source`` anything indexable by an index array with a
  ``shape`` (a numpy array or memmap). A process reads only the rows its
  own devices hold, never the whole global batch.

  Example:
    >>> mesh = make_mesh(-1)
    >>> images = np.arange(40, dtype=np.float32).reshape(10, 4)
    >>> b = take_batch(mesh, images, {"x": np.arange(jax.device_count()) * 2})
    >>> np.asarray(b["x"])[0].tolist()
    [0.0, 1.0, 2.0, 3.0]
  """
  sharding = data_sharding(mesh)

  def put(r):
    r = np.asarray(r)
    _check_splits(len(r), mesh)
    shape = (len(r),) + tuple(source.shape[1:])
    return jax.make_array_from_callback(
        shape, sharding, lambda idx: np.asarray(source[r[idx[0]]])[(slice(None),) + idx[1:]])

  return jax.tree.map(put, rows)
