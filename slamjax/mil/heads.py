"""MIL heads selectable by name (``cfg.head`` of one head's config; a run
lists its heads in ``config.mil.heads``, see :mod:`slamjax.mil.multihead`).

Every head is a Flax module ``head(x [B, N, D], mask [B, N], train)`` that
returns a dict with at least

* ``logits`` [B, T]: one binary logit per task (sigmoid probability);
* ``attention`` [B, N]: the attention used to rank cells (0 on padding);
* ``attention_rows`` [B, R, N]: the softmax distributions regularisers act on;

and optionally ``task_attention`` [B, T, N] (per-task ranking) plus
head-specific terms. A :class:`slamjax.mil.spec.HeadSpec` adds what training
needs beyond the supervised loss: extra loss terms, an anchor model,
teacher/student phases, frozen parameters and host-side initialisation.
Each head module defines its own spec beside its model (``abmil.SPEC``,
``pamil.make_spec``, ...); this module is the table of them by name.

Names: ``abmil``, ``aem`` (ABMIL + AEM regulariser), ``pamil``,
``pamil_official``, ``asmil``, ``mecds``, ``topk`` (top-k cell classifier,
:mod:`slamjax.mil.topk`) and ``negref`` (non-parametric negative-reference
scoring, :mod:`slamjax.mil.negref`: no Flax module and no gradient training;
its spec's ``nonparametric`` holds its fit and predict, which
:func:`slamjax.mil.multihead.fit_predict` calls). AEM (``mil.aem_weight``)
also applies to any other trained head.
"""

from __future__ import annotations

import dataclasses

import jax

from slamjax.mil import abmil
from slamjax.mil import asmil
from slamjax.mil import mecds
from slamjax.mil import negref
from slamjax.mil import pamil
from slamjax.mil import topk
from slamjax.mil.spec import HeadSpec

HEADS: dict[str, HeadSpec] = {
    "abmil": abmil.SPEC,
    "aem": dataclasses.replace(abmil.SPEC, aem_default=0.1),
    "pamil": pamil.make_spec(),
    "pamil_official": pamil.make_spec("official"),
    "asmil": asmil.SPEC,
    "mecds": mecds.SPEC,
    "topk": topk.SPEC,
    "negref": negref.SPEC,
}


def get_spec(cfg) -> HeadSpec:
  if cfg.head not in HEADS:
    raise ValueError(f"config.mil.head={cfg.head!r}; valid: {sorted(HEADS)}")
  return HEADS[cfg.head]


def aem_weight(cfg) -> float:
  w = float(cfg.aem_weight)
  return w if w > 0 else get_spec(cfg).aem_default


def path_labels(params, predicate) -> dict:
  """'frozen'/'train' label per leaf of ``params`` from ``predicate(path)``."""
  def label(path, _):
    keys = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)
    return "frozen" if predicate is not None and predicate(keys) else "train"
  return jax.tree_util.tree_map_with_path(label, params)

