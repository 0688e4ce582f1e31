"""Package hygiene: import footprint and the docstring examples."""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pathlib
import pkgutil
import subprocess
import sys

import pytest

from slamjax import surgery

# Every module of the package (so a new one cannot miss its doctests).
_MODULES = ["slamjax.surgery"] + sorted(
    f"slamjax.surgery.{m.name}" for m in pkgutil.iter_modules(surgery.__path__))


def test_import_pulls_in_only_jax_numpy_optax():
  code = (
      "import sys, jax, numpy, optax\n"
      "before = set(sys.modules)\n"
      "import slamjax.surgery\n"
      "new = sorted(m for m in set(sys.modules) - before\n"
      "             if m.split('.')[0] != 'slamjax')\n"
      "bad = sorted(m for m in sys.modules if m.split('.')[0] in\n"
      "             ('flax', 'tensorflow', 'tensorboard', 'clu', 'orbax',\n"
      "              'tensorflow_datasets', 'torch', 'chex'))\n"
      "assert not new and not bad, (new, bad)\n"
      "print(sorted(m for m in sys.modules if m.startswith('slamjax')))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, env=env, timeout=120)
  assert res.returncode == 0, res.stderr
  assert "'slamjax.surgery'" in res.stdout
  # Only the (empty) top-level package besides slamjax.surgery itself.
  assert all(m == "slamjax" or m.startswith("slamjax.surgery")
             for m in eval(res.stdout))


def test_every_public_function_has_an_example():
  for name in surgery.__all__:
    obj = getattr(surgery, name)
    if inspect.isfunction(obj):
      assert ">>>" in (obj.__doc__ or ""), name


@pytest.mark.parametrize("module", _MODULES)
def test_docstring_examples_run(module):
  mod = importlib.import_module(module)
  res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE,
                        verbose=False)
  assert res.failed == 0


def test_surgery_guide_example_runs(capsys):
  """The first example of docs/surgery.md ("Gradient surgery in your project")."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(surgery.__file__)))
  path = os.path.join(root, "docs", "surgery.md")
  if not os.path.exists(path):
    pytest.skip("no docs/surgery.md next to the package (installed copy)")
  text = pathlib.Path(path).read_text()
  code = text.split("```python\n", 1)[1].split("```", 1)[0]
  exec(compile(code, path, "exec"), {"__name__": "readme_example"})
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 5 and lines[-1].startswith("step 4: cos=")
  assert "conflicts=1" in lines[0]  # the example's tasks do conflict
