"""Defaults of every ``config.mil`` key, filled in for partial configs.

``resolve(cfg)`` returns a new unlocked ConfigDict: the defaults below,
overridden by whatever ``cfg`` sets (``None`` keeps the default, so
``ml_collections.config_dict.placeholder`` fields work). Head-specific
sections live under ``pamil``, ``asmil`` and ``mecds``; ``None`` there means
"the variant's / head's default" (see the head modules).

Example:
  >>> import ml_collections
  >>> c = resolve(ml_collections.ConfigDict(dict(head="asmil", lr=1e-4)))
  >>> c.head, c.lr, c.asmil.n_token, c.asmil.anchor
  ('asmil', 0.0001, 16, 'ema')
"""

from __future__ import annotations

import copy

import ml_collections

DEFAULTS = dict(
    head="abmil",                # any name in slamjax.mil.heads.HEADS
    hidden_dim=128,
    attention_dim=64,
    dropout=0.0,
    epochs=60,
    batch_size=8,
    lr=5e-4,
    weight_decay=1e-4,
    optimizer="adam",            # "adam": L2 added before Adam (torch Adam); "adamw"
    grad_clip=0.0,               # global-norm clip; 0 = off (ASMIL/DTFD use 5)
    schedule="constant",         # or "cosine" (per step, to 0; the ACMIL family)
    min_len=16,                  # smallest padding bucket
    buckets_per_octave=4,        # bucket sizes per power of two (1: powers of two)
    checkpoint_every_epochs=10,
    aem_weight=0.0,              # AEM lambda for any head; head "aem" uses 0.1 if 0
    aem_top_k=0,                 # 0 = full entropy; k > 0 = the top-k variant
    aem_schedule="constant",     # or "cosine" decay to 0
    stability_bags=8,            # training bags whose attention is tracked per epoch
    pamil=dict(
        variant="slamags",       # or "official"
        num_protos=10,
        proto_pred=True,         # prototype branch (needed for the ER loss)
        proto_weight=0.5,
        er_weight=None,          # None: variant default (0.1 / 0.5)
        clst_weight=None,        # (0.005 / 0.5)
        proto_clst_weight=None,  # (0.005 / 0.2)
        inst_weight=0.0,         # CLAM-style instance loss (0.5 in the references)
        k_sample=8,
        proto_init=None,         # "random" | "kmeans"; None: slamags random, official kmeans
        freeze_protos=None,      # None: official frozen, slamags trainable
    ),
    asmil=dict(
        n_token=16, n_drop=10, num_heads=8, dropout=0.1,
        temperature=0.5,         # NSF tau of the anchor attention
        kd_weight=1.0,
        kd_reduction="kl_per_row",   # or "reference_mean"
        anchor="ema",            # or "frozen_random" (the released code)
        anchor_decay=0.999,
    ),
    mecds=dict(
        num_layers=2, num_heads=8, top_p=0.5,
        instance_attention="full",   # or "none" (no N x N; for huge bags)
        kd_weight=1.0,               # lambda of the AKD term (student phase)
        akd_temperature=2.0, gamma_pos=1.0, gamma_neg=4.0, alpha=0.2,
        teacher_epochs=None,         # None: same as epochs
        student_init="teacher",      # or "fresh" (see slamjax/mil/mecds.py)
    ),
)


def _merge(base: dict, over: dict) -> dict:
  out = copy.deepcopy(base)
  for k, v in over.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = _merge(out[k], v)
    elif v is not None or k not in out:
      out[k] = v
  return out


def resolve(cfg) -> ml_collections.ConfigDict:
  """Defaults overridden by ``cfg`` (a ConfigDict or dict); never mutates cfg."""
  over = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return ml_collections.ConfigDict(_merge(DEFAULTS, over))
