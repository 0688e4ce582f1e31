"""MIL heads selectable by name from ``config.mil.head``."""

from __future__ import annotations

from slamjax.mil import abmil


def _abmil(cfg, num_tasks):
  return abmil.GatedABMIL(hidden_dim=cfg.hidden_dim, attention_dim=cfg.attention_dim,
                          num_tasks=num_tasks, dropout=cfg.dropout)


HEADS = {"abmil": _abmil}


def get_head(cfg, num_tasks: int = 1):
  """Builds the head named ``cfg.head``.

  Example:
    >>> import ml_collections
    >>> cfg = ml_collections.ConfigDict(dict(head="abmil", hidden_dim=8,
    ...                                      attention_dim=4, dropout=0.0))
    >>> type(get_head(cfg)).__name__
    'GatedABMIL'
  """
  if cfg.head not in HEADS:
    raise ValueError(f"config.mil.head={cfg.head!r}; valid: {sorted(HEADS)}")
  return HEADS[cfg.head](cfg, num_tasks)
