"""surgery.diagnostics: finding surgery states inside any optax state."""

from __future__ import annotations

import optax

from slamjax import surgery


def test_diagnostics_absent_or_several(params):
  assert surgery.diagnostics(optax.adam(1e-3).init(params)) == {}
  state = (surgery.sum_tasks(num_tasks=2, diagnostics=True).init(params),
           {"x": surgery.mgda(num_tasks=3).init(params)})
  d = surgery.diagnostics(state)
  assert d["0/cosine"].shape == (2, 2) and d["1/weights"].shape == (3,)
