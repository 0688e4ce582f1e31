"""Process-wide settings, made once by the entry points (never by models or steps).

Example:
  >>> from slamjax import runtime
  >>> runtime.setup()  # idempotent
"""

from __future__ import annotations

import os


def enable_compilation_cache() -> None:
  """Compiled steps are kept on disk: a rerun, and every fold after the first,
  reads them back instead of compiling again (minutes on a small CPU)."""
  import jax
  from slamjax.data import image_cache
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(image_cache.default_cache_dir(), "xla"))


def hide_accelerators_from_tensorflow() -> None:
  """TensorFlow (clu's TensorBoard writer) must not take the GPU's memory.

  Called where TensorFlow gets imported (``progress.create_writer``), so a
  run that writes no TensorBoard files never imports it.
  """
  import sys
  tf = sys.modules.get("tensorflow")
  if tf is not None:
    tf.config.set_visible_devices([], "GPU")


def setup() -> None:
  from slamjax.models import layers
  layers.tune_cpu_allocator()  # process-wide (mallopt): once, here
  enable_compilation_cache()
