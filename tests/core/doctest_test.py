"""Runs the docstring examples of the core modules."""

import doctest
import importlib

import pytest

MODULES = [
    "slamjax.losses", "slamjax.data.augment", "slamjax.data.batching",
    "slamjax.data.bags", "slamjax.data.synthetic", "slamjax.data.pool",
    "slamjax.sharding", "slamjax.checkpoint", "slamjax.progress",
    "slamjax.evaluate", "slamjax.report", "slamjax.config",
    "slamjax.config.base", "slamjax.config.load", "slamjax.config.validate", "slamjax.runners",
]  # pretrain/embed examples compile the encoder; the pipeline tests cover them.


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0, result
