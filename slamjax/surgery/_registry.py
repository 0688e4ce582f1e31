"""Lookup of surgery methods by name (for config-driven code)."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import optax

from slamjax.surgery._aligned_mtl import aligned_mtl
from slamjax.surgery._cagrad import cagrad
from slamjax.surgery._gradvac import gradvac
from slamjax.surgery._imtl import imtl_g
from slamjax.surgery._mgda import mgda
from slamjax.surgery._nash_mtl import nash_mtl
from slamjax.surgery._pcgrad import adaptive_pcgrad, pcgrad
from slamjax.surgery._simple import mean_tasks, sum_tasks
from slamjax.surgery._upgrad import upgrad

_METHODS: dict[str, Callable[..., optax.GradientTransformationExtraArgs]] = {
    "sum": sum_tasks,
    "mean": mean_tasks,
    "pcgrad": pcgrad,
    "adaptive_pcgrad": adaptive_pcgrad,
    "gradvac": gradvac,
    "cagrad": cagrad,
    "mgda": mgda,
    "imtl_g": imtl_g,
    "aligned_mtl": aligned_mtl,
    "upgrad": upgrad,
    "nash_mtl": nash_mtl,
}
_ALIASES = {"ags": "adaptive_pcgrad", "sum_tasks": "sum",
            "mean_tasks": "mean", "imtl": "imtl_g"}


def names() -> list[str]:
  """All names accepted by :func:`get` (canonical names, then aliases).

  Example:
    >>> from slamjax import surgery
    >>> 'ags' in surgery.names() and 'upgrad' in surgery.names()
    True
  """
  return list(_METHODS) + list(_ALIASES)


def get(name: str, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
  """Builds the surgery transform called ``name`` with ``kwargs``.

  Names: ``'sum'``, ``'mean'``, ``'pcgrad'``, ``'adaptive_pcgrad'`` (alias
  ``'ags'``), ``'gradvac'``, ``'cagrad'``, ``'mgda'``, ``'imtl_g'``,
  ``'aligned_mtl'``, ``'upgrad'``, ``'nash_mtl'`` (case-insensitive; ``-``
  and ``_`` are interchangeable). ``key`` is accepted for every name and
  ignored by deterministic methods, so config-driven code can always pass it
  (and ``num_tasks``).

  Raises:
    ValueError: for an unknown name (listing the valid ones) or unknown
      keyword arguments.

  Example:
    >>> from slamjax import surgery
    >>> tx = surgery.get('ags', key=0, num_tasks=2)
    >>> tx = surgery.get('mgda', key=0, num_tasks=2)   # key ignored
  """
  canon = str(name).strip().lower().replace("-", "_")
  canon = _ALIASES.get(canon, canon)
  if canon not in _METHODS:
    raise ValueError(f"Unknown surgery method {name!r}; valid names: "
                     f"{', '.join(names())}.")
  factory = _METHODS[canon]
  params = inspect.signature(factory).parameters
  if "key" in kwargs and "key" not in params:
    kwargs = {k: v for k, v in kwargs.items() if k != "key"}
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    raise ValueError(f"surgery.get({name!r}): unknown arguments {unknown}; "
                     f"{canon} accepts {sorted(params)}.")
  return factory(**kwargs)
