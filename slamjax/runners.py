"""What ``python -m slamjax.main`` runs, by ``config.runner``.

Each runner is ``fn(cfg, workdir) -> dict`` (its results). They are imported
only when chosen, so a features-only run never imports the image pipeline.

* ``pipeline``: simulated bags from a cell pool -> pretraining -> embeddings
  -> MIL heads -> metrics (:func:`slamjax.pipeline.train_and_evaluate`).
* ``features``: MIL heads on a folder of feature files
  (:func:`slamjax.features.pipeline.train_and_evaluate_features`).
* ``study``: many pipeline runs: methods x witness rates x seeds
  (:func:`slamjax.study.run.run_study`).
* ``slides``: your own slides: cross-validation and a final model
  (:func:`slamjax.slides.run.run_slides`).

Example:
  >>> sorted(RUNNERS)
  ['features', 'pipeline', 'slides', 'study']
"""

from __future__ import annotations

import importlib
from typing import Callable

# name -> "module:function"
RUNNERS = {
    "pipeline": "slamjax.pipeline:train_and_evaluate",
    "features": "slamjax.features.pipeline:train_and_evaluate_features",
    "study": "slamjax.study.run:run_study",
    "slides": "slamjax.slides.run:run_slides",
}


def get(name: str) -> Callable:
  """The runner called ``name`` (see :data:`RUNNERS`)."""
  if name not in RUNNERS:
    raise ValueError(f"config.runner={name!r}; valid: {sorted(RUNNERS)}")
  module, fn = RUNNERS[name].split(":")
  return getattr(importlib.import_module(module), fn)
