"""What training needs of a MIL head beyond its module: :class:`HeadSpec`.

Every head module (``abmil``, ``pamil``, ``asmil``, ``mecds``, ``topk``,
``negref``) defines its own spec next to its model; :mod:`slamjax.mil.heads`
is the table of them by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple


class AuxContext(NamedTuple):
  """What a head's ``aux_loss`` may read besides its own outputs, built by
  the train step (:func:`slamjax.mil.train.make_steps`) at every step.

  Attributes:
    anchor_params: the anchor parameter copy (ASMIL), or None.
    teacher_params: the frozen teacher's parameters in MECDS's student
      phase; None in its teacher phase and for other heads.
    kd_scale: multiplies the teacher distillation term (0 in MECDS's
      teacher phase, so both phases share one compilation).
  """
  anchor_params: Any = None
  teacher_params: Any = None
  kd_scale: Any = 1.0


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """How to build and train one head.

  Attributes:
    build: ``(cfg, num_tasks, num_base) -> nn.Module``.
    aux_loss: ``(cfg, model, out, batch, label_known, ctx) -> (per_bag [B],
      {name: per_bag})`` extra loss terms, or None. ``ctx`` is an
      :class:`AuxContext`.
    anchor: keeps an anchor parameter copy in the train state (ASMIL).
    phases: ``("train",)`` or ``("teacher", "student")`` (MECDS).
    aem_default: AEM weight used when ``mil.aem_weight`` is 0.
    frozen: ``cfg -> (path -> bool)``, parameters never updated, or None.
    init_params: ``(cfg, params, bags, seed) -> params`` host-side init, or None.
    extensible: supports :func:`slamjax.mil.train.extend`.
    nonparametric: ``(fit, predict)`` of a head fitted without gradients, or
      None. ``fit(cfg, bags, labels, seed) -> state`` (a dict of numpy
      arrays, saved as ``<head>.npz`` in the head's folder) and
      ``predict(cfg, state, bags) -> {"prob", "attention"}`` as
      :func:`slamjax.mil.train.predict`. Such a head's ``build`` raises.
  """
  build: Callable
  aux_loss: Callable | None = None
  anchor: bool = False
  phases: tuple[str, ...] = ("train",)
  aem_default: float = 0.0
  frozen: Callable | None = None
  init_params: Callable | None = None
  extensible: bool = False
  nonparametric: tuple[Callable, Callable] | None = None
