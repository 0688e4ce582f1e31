"""Configs: the base (every key and default), finding and loading them by
name or path, and reading values several modules share (name lists, the
study shard). Checking a whole config: :mod:`slamjax.validation`.

The package imports nothing of slamjax beyond itself, so any module may
import it.

Example:
  >>> from slamjax import config
  >>> c = config.load("default", "quick")
  >>> c.runner
  'pipeline'
"""

from slamjax.config.base import get_config as defaults
from slamjax.config.load import CONFIGS_DIR
from slamjax.config.load import ConfigNotFound
from slamjax.config.load import available
from slamjax.config.load import load
from slamjax.config.load import resolve
from slamjax.config.values import data_source
from slamjax.config.values import names
from slamjax.config.values import parse_shard

__all__ = ["CONFIGS_DIR", "ConfigNotFound", "available", "defaults", "load", "names",
           "parse_shard", "resolve", "data_source"]
