"""Executes every notebook in notebooks/ top to bottom, with tiny settings.

Each notebook runs in a fresh IPython kernel of this interpreter (nbclient)
with ``SLAMJAX_NOTEBOOK_SMOKE=1``, which its configuration cell reads to
shrink every run, and fails the test when a cell raises or when the notebook
takes longer than its time limit. JAX's persistent compilation cache is
shared between the notebooks (and across runs) so that the pretraining step
compiled by one notebook is reused by another.

Environment: ``SLAMJAX_SKIP_NOTEBOOKS=1`` skips these tests;
``SLAMJAX_NOTEBOOK_JAX_CACHE`` sets the compilation cache folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import datetime

import nbclient
import nbformat
import pytest
from jupyter_client import AsyncKernelManager  # nbclient's dependency
from jupyter_client.kernelspec import KernelSpecManager

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NB_DIR = os.path.join(ROOT, "notebooks")
PBC_ROOT = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "pbc"))
KERNEL = "slamjax-notebook-test"

# Per-notebook wall-clock limit (s) on a busy 2-core CPU, cold compilation
# cache, and the least number of figures each must draw.
NOTEBOOKS = {
    "quickstart": dict(limit_s=300, min_figures=4),
    "gradient_surgery": dict(limit_s=300, min_figures=5),
    "pbc_attention": dict(limit_s=360, min_figures=3),
}

pytestmark = pytest.mark.skipif(os.environ.get("SLAMJAX_SKIP_NOTEBOOKS") == "1",
                                reason="SLAMJAX_SKIP_NOTEBOOKS=1")


@pytest.fixture(scope="session")
def kernel(tmp_path_factory):
  """(kernel-spec folder, kernel environment) shared by every notebook run.

  The folder holds one spec, KERNEL, that runs *this* interpreter (a
  user-level 'python3' spec may point at another Python; this one cannot).
  The environment turns on the notebooks' smoke settings and JAX's
  persistent compilation cache.
  """
  kernels = tmp_path_factory.mktemp("kernels")
  spec_dir = kernels / KERNEL
  spec_dir.mkdir()
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher",
               "-f", "{connection_file}"],
      "display_name": "slamjax notebook test", "language": "python"}))
  cache = os.environ.get("SLAMJAX_NOTEBOOK_JAX_CACHE") or os.path.join(
      tempfile.gettempdir(), "slamjax_notebook_jax_cache")
  env = dict(os.environ)
  env.update({
      "SLAMJAX_NOTEBOOK_SMOKE": "1",
      "JAX_COMPILATION_CACHE_DIR": cache,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
      "MPLBACKEND": "module://matplotlib_inline.backend_inline",
      "PYDEVD_DISABLE_FILE_VALIDATION": "1",
  })
  return str(kernels), env


def _outputs(nb, kind):
  for i, cell in enumerate(nb.cells):
    for out in cell.get("outputs", []):
      if kind == "png" and "image/png" in out.get("data", {}):
        yield i, out
      elif kind == "text":
        text = out.get("text") or out.get("data", {}).get("text/plain", "")
        yield i, "".join(text) if isinstance(text, list) else text


def _cell_seconds(nb):
  """(seconds, cell index, first source line) per executed code cell."""
  out = []
  for i, cell in enumerate(nb.cells):
    t = cell.get("metadata", {}).get("execution", {})
    start, end = t.get("iopub.execute_input"), t.get("shell.execute_reply")
    if start and end:
      parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))
      line = next((l for l in cell.source.splitlines() if l.strip()), "")
      out.append(((parse(end) - parse(start)).total_seconds(), i, line[:60]))
  return sorted(out, reverse=True)


def run_notebook(name, kernel, workdir, limit_s, **extra_env):
  """Executes notebooks/<name>.ipynb; returns (executed notebook, seconds)."""
  path = os.path.join(NB_DIR, f"{name}.ipynb")
  nb = nbformat.read(path, as_version=4)
  kernel_dir, env = kernel
  env = dict(env, SLAMJAX_NOTEBOOK_WORKDIR=str(workdir), **extra_env)
  km = AsyncKernelManager(kernel_name=KERNEL,
                          kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dir]))
  client = nbclient.NotebookClient(
      nb, km=km, timeout=limit_s, kernel_name=KERNEL, allow_errors=False,
      resources={"metadata": {"path": NB_DIR}})
  t0 = time.perf_counter()
  try:
    asyncio.run(asyncio.wait_for(client.async_execute(env=env), limit_s))
  except (asyncio.TimeoutError, TimeoutError):
    pytest.fail(f"{name}.ipynb ran past its {limit_s}s limit; slowest cells "
                f"(s, index, first line): {_cell_seconds(nb)[:5]}")
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{name}.ipynb: a cell raised\n{e}", pytrace=False)
  seconds = time.perf_counter() - t0
  slow = ", ".join(f"cell {i} {s:.0f}s ({line})" for s, i, line in _cell_seconds(nb)[:4])
  print(f"{name}.ipynb: {seconds:.1f}s; slowest: {slow}")
  return nb, seconds


def test_every_notebook_is_executed_here():
  on_disk = {f[:-len(".ipynb")] for f in os.listdir(NB_DIR) if f.endswith(".ipynb")}
  assert on_disk == set(NOTEBOOKS), "add new notebooks to NOTEBOOKS"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_stored_without_outputs(name):
  nb = nbformat.read(os.path.join(NB_DIR, f"{name}.ipynb"), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, name
  assert not any(c.outputs for c in code), f"{name}.ipynb has stored outputs"
  assert all(c.execution_count is None for c in code), f"{name}.ipynb has execution counts"
  first = code[0].source
  assert "find_spec(\"slamjax\")" in first and "%pip install" in first, (
      f"{name}.ipynb: the first code cell must install slamjax when it is missing")


def _check(name, nb, seconds, record_property):
  record_property("seconds", round(seconds, 1))
  figures = len(list(_outputs(nb, "png")))
  assert figures >= NOTEBOOKS[name]["min_figures"], (
      f"{name}.ipynb drew {figures} figures, expected at least "
      f"{NOTEBOOKS[name]['min_figures']} (is the inline backend active?)")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart", "gradient_surgery"])
def test_notebook_executes(name, kernel, tmp_path, record_property):
  limit = NOTEBOOKS[name]["limit_s"]
  nb, seconds = run_notebook(name, kernel, tmp_path / "work", limit)
  _check(name, nb, seconds, record_property)


@pytest.mark.slow
def test_pbc_attention_executes(kernel, tmp_path, record_property):
  if not os.path.isdir(PBC_ROOT):
    pytest.skip(f"PBC data not found at {PBC_ROOT} (the no-data path is tested below)")
  limit = NOTEBOOKS["pbc_attention"]["limit_s"]
  nb, seconds = run_notebook("pbc_attention", kernel, tmp_path / "work", limit,
                             SLAMJAX_PBC_ROOT=PBC_ROOT)
  _check("pbc_attention", nb, seconds, record_property)


@pytest.mark.slow
def test_pbc_attention_without_data_explains_and_skips(kernel, tmp_path):
  missing = tmp_path / "no_pbc_here"
  nb, _ = run_notebook("pbc_attention", kernel, tmp_path / "work", 120,
                       SLAMJAX_PBC_ROOT=str(missing))
  text = "\n".join(t for _, t in _outputs(nb, "text"))
  assert f"PBC data not found at {missing}" in text, text[-2000:]
  assert "skipped" in text
  assert not list(_outputs(nb, "png"))
