"""slamjax.distributed outside a multi-process run: settings are checked early."""

import doctest

import pytest

from slamjax import distributed


def test_docstring_examples():
  result = doctest.testmod(distributed)
  assert result.failed == 0 and result.attempted > 0, result


def test_no_settings_is_a_single_process_run():
  assert distributed.initialize(environ={}) is False
  assert distributed.is_main_process()


@pytest.mark.parametrize("environ,match", [
    ({"SLAMJAX_NUM_PROCESSES": "2", "SLAMJAX_PROCESS_ID": "1"}, "SLAMJAX_COORDINATOR"),
    ({"SLAMJAX_COORDINATOR": "localhost:1234", "SLAMJAX_NUM_PROCESSES": "2"},
     "SLAMJAX_PROCESS_ID"),
    ({"SLAMJAX_COORDINATOR": "localhost:1234", "SLAMJAX_NUM_PROCESSES": "2",
      "SLAMJAX_PROCESS_ID": "2"}, r"not in \[0, 2\)"),
])
def test_incomplete_settings_fail_with_the_missing_variable(environ, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(environ=environ)
