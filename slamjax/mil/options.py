"""Defaults of every ``config.mil`` key (from the base config), for partial configs.

``resolve(cfg)`` returns a new frozen ConfigDict: the defaults,
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


def _defaults() -> dict:
  """``config.mil`` of the base config, as one head's settings."""
  from slamjax.config import base  # the one place defaults are written
  d = base.get_config().mil.to_dict()
  d.pop("heads")
  return dict(head="abmil", **d)  # any name in slamjax.mil.heads.HEADS


DEFAULTS = _defaults()


def _merge(base: dict, over: dict) -> dict:
  out = copy.deepcopy(base)
  for k, v in over.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = _merge(out[k], v)
    elif v is not None or k not in out:
      out[k] = v
  return out


def resolve(cfg) -> ml_collections.FrozenConfigDict:
  """Defaults overridden by ``cfg`` (a ConfigDict or dict), frozen (hashable,
  so compiled steps can be cached by it); never mutates cfg. Resolving a
  resolved config returns it as it is."""
  if isinstance(cfg, ml_collections.FrozenConfigDict):
    return cfg
  over = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return ml_collections.FrozenConfigDict(_merge(DEFAULTS, over))
