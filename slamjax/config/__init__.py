"""Configs: the base (every key and default), validation, and loading by name.

Example:
  >>> from slamjax import config
  >>> c = config.load("default", "quick")
  >>> config.validate(c)
  >>> c.runner
  'pipeline'
"""

from slamjax.config.base import get_config as defaults
from slamjax.config.load import load
from slamjax.config.validate import names
from slamjax.config.validate import parse_shard
from slamjax.config.validate import validate

__all__ = ["defaults", "load", "names", "parse_shard", "validate"]
