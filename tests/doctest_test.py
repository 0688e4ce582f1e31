"""Runs the docstring examples of every slamjax module (what ``--doctest-modules``
would collect, under the README's test command)."""

import doctest
import importlib
import pkgutil

import pytest

import slamjax

# Entry points define absl flags at import (two of them in one process clash).
SKIP = {"slamjax.main", "slamjax.predict"}
MODULES = sorted(m.name for m in pkgutil.walk_packages(slamjax.__path__, "slamjax.")
                 if m.name not in SKIP and not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, result
