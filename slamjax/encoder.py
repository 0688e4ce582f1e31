"""The encoder step every runner shares: train it (or not), and load it back.

:func:`train_or_init` is what the pipeline, the slides folds and the study
run: SLAM-AGS / SimCLR pretraining (:mod:`slamjax.pretrain`, resumed from
``workdir/pretrain_ckpt``), or a randomly initialised encoder when
``pretrain.epochs == 0``, then the pseudo-label stage when
``pseudo.rounds > 0`` (:mod:`slamjax.pseudo_label`). :func:`load` gives back
the encoder a finished :func:`train_or_init` left in a workdir, which is what
``predict``, the study's encoder measures and the benchmarks read.

Example::

  model, state = encoder.train_or_init(cfg, pool, bags, workdir, mesh)
  ...
  model, state = encoder.load(cfg, workdir, mesh)  # the same encoder, later
"""

from __future__ import annotations

import os
import time

from slamjax import checkpoint as ckpt_lib
from slamjax import pretrain as pretrain_lib
from slamjax import pseudo_label
from slamjax import workdir as workdir_lib


def _random_init(cfg, mesh):
  model, tx, _ = pretrain_lib.build(cfg, steps_per_epoch=1)
  return model, pretrain_lib.init_state(cfg, model, tx, mesh)


def train_or_init(cfg, pool, bags: dict, workdir: str, mesh,
                  timing: dict | None = None):
  """(model, state) of the run's encoder, trained (or resumed) in ``workdir``.

  ``bags`` holds the training ``BagSet`` under ``"train"`` (its cells are
  what pretraining and the pseudo-label stage see). Wall times of the
  stages go to ``timing`` ("pretrain", "pseudo") when given.
  """
  timing = {} if timing is None else timing
  t0 = time.perf_counter()
  if cfg.pretrain.epochs > 0:
    state = pretrain_lib.pretrain(cfg, pool, bags, workdir, mesh)
    model = pretrain_lib.build_model(cfg)
  else:  # the "no pretraining" baseline
    model, state = _random_init(cfg, mesh)
  timing["pretrain"] = time.perf_counter() - t0
  if cfg.pseudo.rounds > 0:  # slide labels as pseudo-labels
    t0 = time.perf_counter()
    state = pseudo_label.finetune(cfg, pool, bags, workdir, mesh, model, state)
    timing["pseudo"] = time.perf_counter() - t0
  return model, state


def load(cfg, workdir: str, mesh):
  """(model, state) that :func:`train_or_init` left in ``workdir`` (random
  init, rebuilt from the seed, when ``pretrain.epochs == 0``)."""
  model, state = _random_init(cfg, mesh)
  if cfg.pretrain.epochs > 0:
    path = os.path.join(workdir, workdir_lib.PRETRAIN_CKPT)
    ckpt = ckpt_lib.Checkpointer(path)
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"No encoder checkpoint in {path}")
    state = ckpt.restore(state)
    ckpt.close()
  if cfg.pseudo.rounds > 0:
    state = pseudo_label.restore(cfg, workdir, state, mesh)
  return model, state
