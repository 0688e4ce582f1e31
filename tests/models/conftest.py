"""Model tests compile ResNet-sized programs: skip LLVM's slow optimisations.

XLA:CPU spends ~25 s optimising even a tiny ResNet init on 2 cores; the
numerical checks here do not need optimised code. Restored after the module.
"""

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
