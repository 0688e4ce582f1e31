"""Lookup by name: surgery.get and surgery.names."""

from __future__ import annotations

import jax
import optax
import pytest

from slamjax import surgery


def test_registry(params):
  required = ["sum", "mean", "pcgrad", "adaptive_pcgrad", "ags", "gradvac",
              "cagrad", "mgda", "imtl_g", "aligned_mtl", "upgrad", "nash_mtl"]
  for name in required:
    tx = surgery.get(name, key=1, num_tasks=2)  # key ignored if deterministic
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    assert name in surgery.names()
  assert isinstance(surgery.get("AGS", key=jax.random.PRNGKey(0)).init(
      params), surgery.SurgeryState)
  with pytest.raises(ValueError, match=r"valid names: .*adaptive_pcgrad.*ags"):
    surgery.get("pcgard")
  with pytest.raises(ValueError, match="unknown arguments"):
    surgery.get("mgda", c=0.5)
  with pytest.raises(ValueError, match="rescale"):
    surgery.get("cagrad", rescale=3)
  with pytest.raises(ValueError, match="granularity"):
    surgery.get("gradvac", granularity="layer")
  with pytest.raises(ValueError, match="needs a key"):
    surgery.pcgrad(key=None)
  tx = surgery.pcgrad(key=None, shuffle=False, num_tasks=2)  # no key needed
  assert tx.init(params).key is None
