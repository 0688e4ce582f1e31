"""The command line a first-time user meets: --help, config paths from any
directory, one-line errors without tracebacks, Ctrl-C."""

import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from slamjax import config as config_lib
from slamjax import runtime
from slamjax.data import slides as slides_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, cwd, env=None, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, **(env or {})})


def test_help_lists_the_configs_and_exits_0(tmp_path):
  r = _run(["-m", "slamjax.main", "--help"], cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  for name, purpose in config_lib.available().items():
    assert f"  {name}" in r.stdout and purpose in r.stdout
  assert "Your own slides: SLAM-AGS cross-validation" in r.stdout
  assert "--debug" in r.stdout and r.stderr == ""


def test_misspelt_config_is_one_line_naming_the_configs(tmp_path):
  r = _run(["-m", "slamjax.main", "--config", "configs/slids.py:quick",
            "--workdir", str(tmp_path / "wd")], cwd=tmp_path)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
  assert lines[0].startswith("slamjax: no config file 'configs/slids.py' (did you mean "
                             "'slides'?); the configs in ")
  assert "default, features_folder" in lines[0] and "slides, witness_study" in lines[0]


@pytest.mark.slow  # two interpreters with JAX and TensorFlow: 5-18 s
def test_missing_data_root_is_one_line_before_the_workdir(tmp_path):
  # From another directory: configs/slides.py is found in the repository.
  wd = tmp_path / "wd"
  r = _run(["-m", "slamjax.main", "--config", "configs/slides.py:quick",
            "--workdir", str(wd)], cwd=tmp_path)
  assert r.returncode == 1, r.stderr
  lines = r.stderr.strip().splitlines()
  assert lines == [
      "slamjax: error: config.data.root is empty; set --config.data.root to the cohort "
      "folder (slides.csv and one folder of cell images per slide; `python -m "
      "slamjax.data.make_cohort --out /tmp/cohort --source synthetic` makes one)",
      "  (rerun with --debug, or SLAMJAX_DEBUG=1, to see the traceback)"], r.stderr
  assert not wd.exists()
  # --debug shows the traceback.
  r = _run(["-m", "slamjax.main", "--config", "slides:quick", "--workdir", str(wd),
            "--debug"], cwd=tmp_path)
  assert r.returncode == 1 and "Traceback" in r.stderr and "InputError" in r.stderr


def test_config_paths_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  want = os.path.join(ROOT, "configs", "slides.py")
  assert config_lib.resolve("configs/slides.py") == want
  assert config_lib.resolve("slides") == want
  assert config_lib.resolve(want) == want
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "slides.py").write_text("x")
  assert config_lib.resolve("configs/slides.py") == os.path.join("configs", "slides.py")
  with pytest.raises(config_lib.ConfigNotFound, match="did you mean 'default'"):
    config_lib.resolve("defualt.py")


def test_input_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
  for err in (slides_lib.CohortError("slides.csv line 3: empty slide_id"),
              runtime.InputError("bad config: config.eval.folds=1\nmust be >= 2")):
    with pytest.raises(SystemExit) as e:
      with runtime.friendly_errors("slamjax"):
        raise err
    assert e.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0] == "slamjax: error: " + str(err).replace("\n", " ")
  with pytest.raises(ZeroDivisionError):  # a bug is not an input error
    with runtime.friendly_errors("slamjax"):
      raise ZeroDivisionError
  with pytest.raises(slides_lib.CohortError):  # --debug: the traceback
    with runtime.friendly_errors("slamjax", debug=True):
      raise slides_lib.CohortError("x")


def test_debug_flag_or_environment(monkeypatch):
  monkeypatch.delenv("SLAMJAX_DEBUG", raising=False)
  assert runtime.debug_requested(True) and not runtime.debug_requested(False)
  monkeypatch.setenv("SLAMJAX_DEBUG", "1")
  assert runtime.debug_requested(False)
  monkeypatch.setenv("SLAMJAX_DEBUG", "0")
  assert not runtime.debug_requested(False)


def test_data_root_checked_for_sources_that_read_one(tmp_path):
  cfg = ml_collections.ConfigDict({"data": {"source": "synthetic", "root": ""}})
  runtime.check_data_root(cfg)  # generated data needs no root
  cfg.data.source, cfg.data.root = "slides", str(tmp_path / "missing")
  with pytest.raises(runtime.InputError, match="is not a folder .*missing does not exist"):
    runtime.check_data_root(cfg)
  cfg.data.root = str(tmp_path)
  runtime.check_data_root(cfg)


def test_ctrl_c_says_how_to_resume_in_one_line(tmp_path):
  # A KeyboardInterrupt, also one that arrives inside a __del__ (where Python
  # would print and ignore it), ends with one line and exit code 130.
  script = textwrap.dedent("""
      import gc, os, signal, sys, time
      from slamjax import runtime

      class Deleted:
        def __del__(self):
          os.kill(os.getpid(), signal.SIGINT)
          time.sleep(0.01)  # the handler runs here, inside __del__

      with runtime.friendly_errors("slamjax", resume="python -m slamjax.main --workdir w"):
        Deleted()
        gc.collect()
        for _ in range(200):
          time.sleep(0.01)
        print("not interrupted")
      """)
  r = _run(["-c", script], cwd=tmp_path, timeout=120)
  assert r.returncode == 130, (r.stdout, r.stderr)
  assert "not interrupted" not in r.stdout
  assert r.stderr.strip().splitlines() == [
      "slamjax: stopped (Ctrl-C); rerun the same command to resume: "
      "python -m slamjax.main --workdir w"], r.stderr
