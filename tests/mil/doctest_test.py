"""Runs the docstring examples of the MIL modules (the heads' own examples,
abmil/masked and friends, are covered by the behaviour tests)."""

import doctest
import importlib

import pytest

MODULES = ["slamjax.mil.multihead", "slamjax.mil.resident", "slamjax.mil.padding",
           "slamjax.mil.options", "slamjax.mil.labels", "slamjax.mil.diagnostics",
           "slamjax.mil.heads", "slamjax.mil.train"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0, result
