"""Reading config values that several modules interpret alike: name lists,
the study shard, the data source a runner implies.

Pure (only :mod:`slamjax.config.base`), so data, MIL and slide modules may
import it; checking a whole config is :mod:`slamjax.validation`.
"""

from __future__ import annotations

from slamjax.config import base as base_lib


def names(value) -> tuple[str, ...]:
  """A tuple of names from a config value; entries may be comma-separated,
  so ``--config.eval.baselines=simclr,random_init`` works on the command line.

  >>> names(("simclr,random_init",)), names("a, b"), names(())
  (('simclr', 'random_init'), ('a', 'b'), ())
  """
  if isinstance(value, str):
    value = (value,)
  return tuple(n.strip() for entry in (value or ()) for n in str(entry).split(",")
               if n.strip())


# Runners that read only one kind of input: their data.source is implied.
IMPLIED_SOURCE = {"features": "features", "slides": "slides"}


def data_source(cfg) -> str:
  """``config.data.source``, or the runner's own when the runner implies one
  and the config leaves the base default (so ``--config.runner=slides`` on
  any config needs no ``--config.data.source=slides``).

  >>> import ml_collections
  >>> data_source(ml_collections.ConfigDict(
  ...     {"runner": "slides", "data": {"source": "synthetic"}}))
  'slides'
  """
  implied = IMPLIED_SOURCE.get(cfg.runner)
  if implied and cfg.data.source == base_lib.get_config().data.source:
    return implied
  return cfg.data.source


def parse_shard(shard: str) -> tuple[int, int]:
  """``(i, n)`` of ``config.study.shard`` ("i/n", or "" for (0, 1)).

  >>> parse_shard("1/2"), parse_shard("")
  ((1, 2), (0, 1))
  """
  if not shard:
    return 0, 1
  try:
    i, n = (int(x) for x in str(shard).split("/"))
  except ValueError:
    i, n = -1, 0
  if not 0 <= i < n:
    raise ValueError(f"config.study.shard={shard!r}; valid: '' (every run) or 'i/n' "
                     "with 0 <= i < n, e.g. '0/2' and '1/2' for two processes")
  return i, n
