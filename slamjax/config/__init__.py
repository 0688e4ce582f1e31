"""Configs: the base (every key and default), validation, and finding and
loading them by name or path.

Example:
  >>> from slamjax import config
  >>> c = config.load("default", "quick")
  >>> config.validate(c)
  >>> c.runner
  'pipeline'
"""

from slamjax.config.base import get_config as defaults
from slamjax.config.load import CONFIGS_DIR
from slamjax.config.load import ConfigNotFound
from slamjax.config.load import available
from slamjax.config.load import load
from slamjax.config.load import resolve
from slamjax.config.validate import names
from slamjax.config.validate import parse_shard
from slamjax.config.validate import validate

__all__ = ["CONFIGS_DIR", "ConfigNotFound", "available", "defaults", "load", "names",
           "parse_shard", "resolve", "validate"]
