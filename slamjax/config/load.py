"""Loads a config of the repository's ``configs/`` folder by name.

One helper for configs that build on another (``pbc_differential`` on
``pbc_lymphocyte``, the study on either), instead of each config loading its
sibling by file path.

Example:
  >>> from slamjax.config import load
  >>> load("default", "quick").pretrain.epochs
  2
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

CONFIGS_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..",
                                            "configs"))


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``configs/<name>.py``'s ``get_config(arg)``; ``name`` may also be a path."""
  path = name if name.endswith(".py") else os.path.join(CONFIGS_DIR, f"{name}.py")
  if not os.path.isfile(path):
    available = sorted(f[:-3] for f in os.listdir(CONFIGS_DIR)
                       if f.endswith(".py") and not f.startswith("_")) if os.path.isdir(
                           CONFIGS_DIR) else []
    raise FileNotFoundError(f"No config {name!r} at {path}; available: {available}")
  spec = importlib.util.spec_from_file_location(
      "slamjax_config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
