"""MIL heads selectable by name (``cfg.head`` of one head's config; a run
lists its heads in ``config.mil.heads``, see :mod:`slamjax.mil.multihead`).

Every head is a Flax module ``head(x [B, N, D], mask [B, N], train)`` that
returns a dict with at least

* ``logits`` [B, T]: one binary logit per task (sigmoid probability);
* ``attention`` [B, N]: the attention used to rank cells (0 on padding);
* ``attention_rows`` [B, R, N]: the softmax distributions regularisers act on;

and optionally ``task_attention`` [B, T, N] (per-task ranking) plus
head-specific terms. A :class:`HeadSpec` adds what training needs beyond the
supervised loss: extra loss terms, an anchor model, teacher/student phases,
frozen parameters and host-side initialisation.

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
from typing import Callable

import jax
import jax.numpy as jnp

from slamjax.mil import abmil
from slamjax.mil import asmil
from slamjax.mil import mecds
from slamjax.mil import negref
from slamjax.mil import options
from slamjax.mil import pamil
from slamjax.mil import topk


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """How to build and train one head.

  Attributes:
    build: ``(cfg, num_tasks, num_base) -> nn.Module``.
    aux_loss: ``(cfg, model, out, batch, label_known, ctx) -> (per_bag [B],
      {name: per_bag})`` extra loss terms, or None. ``ctx`` holds
      ``anchor_params`` (ASMIL) and ``teacher_params`` (MECDS student phase).
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


# ------------------------------------------------------------------- ABMIL
def _abmil(cfg, num_tasks, num_base=None):
  return abmil.GatedABMIL(hidden_dim=cfg.hidden_dim, attention_dim=cfg.attention_dim,
                          num_tasks=num_tasks, dropout=cfg.dropout)


# ------------------------------------------------------------------- PAMIL
def _pamil_cfg(cfg, variant=None):
  p = cfg.pamil
  if variant is not None:
    p = dict(p.to_dict() if hasattr(p, "to_dict") else p, variant=variant)
    p = options.resolve({"pamil": p}).pamil
  return p


def _make_pamil(variant=None):
  def build(cfg, num_tasks, num_base=None):
    p = _pamil_cfg(cfg, variant)
    return pamil.PAMIL(hidden_dim=cfg.hidden_dim, attention_dim=cfg.attention_dim,
                       num_tasks=num_tasks, num_protos=p.num_protos, variant=p.variant,
                       proto_pred=p.proto_pred, proto_weight=p.proto_weight,
                       inst_pred=p.inst_weight > 0, dropout=cfg.dropout)

  def aux(cfg, model, out, batch, label_known, ctx):
    return pamil.aux_loss(_pamil_cfg(cfg, variant), out, batch, label_known, model.num_tasks)

  def frozen(cfg):
    p = _pamil_cfg(cfg, variant)
    freeze = p.freeze_protos if p.freeze_protos is not None else p.variant == "official"
    return (lambda path: path[-1] == "proto") if freeze else None

  def init_params(cfg, params, bags, seed):
    p = _pamil_cfg(cfg, variant)
    how = p.proto_init or ("kmeans" if p.variant == "official" else "random")
    if how == "random":
      return params
    if how != "kmeans":
      raise ValueError(f"mil.pamil.proto_init={how!r}; valid: random, kmeans")
    protos = pamil.kmeans_prototypes(bags, p.num_protos, seed)
    inner = dict(params["params"], proto=jnp.asarray(protos))
    return dict(params, params=inner)

  return HeadSpec(build=build, aux_loss=aux, frozen=frozen, init_params=init_params)


# ------------------------------------------------------------------- ASMIL
def _asmil(cfg, num_tasks, num_base=None):
  a = cfg.asmil
  return asmil.ASMIL(hidden_dim=cfg.hidden_dim, num_tasks=num_tasks, n_token=a.n_token,
                     n_drop=a.n_drop, num_heads=a.num_heads, dropout=a.dropout)


def _asmil_aux(cfg, model, out, batch, label_known, ctx):
  a = cfg.asmil
  anchor_logits = model.apply(ctx["anchor_params"], batch["x"], batch["mask"],
                              method=asmil.ASMIL.scores)
  kd = asmil.kd_loss(out["attention_logits"], anchor_logits, batch["mask"],
                     a.temperature, a.kd_reduction)
  return a.kd_weight * kd, {"asmil_kd": kd}


# ------------------------------------------------------------------- MECDS
def _mecds(cfg, num_tasks, num_base=None):
  m = cfg.mecds
  return mecds.MECDS(hidden_dim=cfg.hidden_dim, num_tasks=num_tasks, num_base=num_base,
                     num_layers=m.num_layers, num_heads=m.num_heads, top_p=m.top_p,
                     instance_attention=m.instance_attention, dropout=cfg.dropout)


def _mecds_aux(cfg, model, out, batch, label_known, ctx):
  teacher = ctx.get("teacher_params")
  if teacher is None:  # teacher phase: plain supervised loss
    return None, {}
  m = cfg.mecds
  t_logits = model.apply(teacher, batch["x"], batch["mask"])["logits"]
  akd = mecds.akd_loss(out["logits"], t_logits, batch["label"], label_known,
                       m.akd_temperature, m.gamma_pos, m.gamma_neg, m.alpha)
  return ctx.get("kd_scale", 1.0) * m.kd_weight * akd, {"mecds_akd": akd}


# -------------------------------------------------------------------- top-k
def _topk(cfg, num_tasks, num_base=None):
  return topk.TopKMIL(hidden_dim=cfg.hidden_dim, num_tasks=num_tasks, k=int(cfg.topk.k),
                      dropout=cfg.dropout)


# ------------------------------------------------------------------ negref
def _no_module(cfg, num_tasks, num_base=None):
  raise ValueError("negref is non-parametric: it has no Flax module (fit and predict it "
                   "with slamjax.mil.multihead.fit_predict)")


HEADS = {
    "abmil": HeadSpec(build=_abmil),
    "aem": HeadSpec(build=_abmil, aem_default=0.1),
    "pamil": _make_pamil(),
    "pamil_official": _make_pamil("official"),
    "asmil": HeadSpec(build=_asmil, aux_loss=_asmil_aux, anchor=True),
    "mecds": HeadSpec(build=_mecds, aux_loss=_mecds_aux, phases=("teacher", "student"),
                      extensible=True),
    "topk": HeadSpec(build=_topk),
    "negref": HeadSpec(build=_no_module, nonparametric=(negref.fit, negref.predict)),
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

