"""Finds and loads the configs of the repository's ``configs/`` folder.

One helper for configs that build on another (``pbc_differential`` on
``pbc_lymphocyte``, the study on either), instead of each config loading its
sibling by file path; and for the command line, which takes a config path
from any directory (:func:`resolve`) and lists the configs (:func:`available`).

Example:
  >>> from slamjax.config import load
  >>> load("default", "quick").pretrain.epochs
  2
  >>> os.path.relpath(resolve("configs/slides.py"), REPO_DIR)
  'configs/slides.py'
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os

import ml_collections

REPO_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIGS_DIR = os.path.join(REPO_DIR, "configs")


class ConfigNotFound(ValueError):
  """No config at the path or name given; the message lists the configs."""


def available() -> dict[str, str]:
  """``{name: purpose}`` of every config: its docstring's first line, read
  without running the file.

  >>> available()["slides"].startswith("Your own slides")
  True
  """
  out = {}
  if not os.path.isdir(CONFIGS_DIR):
    return out
  for fn in sorted(os.listdir(CONFIGS_DIR)):
    if not fn.endswith(".py") or fn.startswith("_"):
      continue
    try:
      with open(os.path.join(CONFIGS_DIR, fn), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError, ValueError):
      doc = ""
    out[fn[:-3]] = doc.strip().splitlines()[0] if doc.strip() else ""
  return out


def resolve(path: str) -> str:
  """A config path that exists: ``path`` itself, else the same path from the
  repository root (``configs/slides.py`` from any directory), else a config
  of ``configs/`` by file name or by name (``slides``).

  Raises:
    ConfigNotFound: naming the configs that exist (and the closest one).
  """
  expanded = os.path.expanduser(path)
  name = os.path.basename(expanded)
  name = name[:-3] if name.endswith(".py") else name
  by_name = os.path.join(CONFIGS_DIR, f"{name}.py")
  if name == expanded:  # a bare name: a config of configs/ first
    candidates = [by_name]
  else:
    candidates = [expanded] + ([] if os.path.isabs(expanded)
                               else [os.path.join(REPO_DIR, expanded)]) + [by_name]
  for c in candidates:
    if os.path.isfile(c):
      return os.path.normpath(c)
  names = list(available())
  close = difflib.get_close_matches(name, names, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  raise ConfigNotFound(
      f"no config file {path!r}{hint}; the configs in {CONFIGS_DIR}: "
      f"{', '.join(names) or 'none'} (give a path, or a name such as configs/slides.py)")


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``configs/<name>.py``'s ``get_config(arg)``; ``name`` may also be a path."""
  try:
    path = resolve(name)
  except ConfigNotFound as e:
    raise FileNotFoundError(str(e)) from None
  spec = importlib.util.spec_from_file_location(
      "slamjax_config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
