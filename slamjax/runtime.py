"""Process-wide settings, made once by the entry points (never by models or
steps), and how the entry points end on bad input or Ctrl-C.

Example:
  >>> from slamjax import runtime
  >>> runtime.setup()  # idempotent
"""

from __future__ import annotations

import contextlib
import os


def enable_compilation_cache() -> None:
  """Compiled steps are kept on disk: a rerun, and every fold after the first,
  reads them back instead of compiling again (minutes on a small CPU)."""
  import jax
  from slamjax.data import image_cache
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(image_cache.default_cache_dir(), "xla"))


def hide_accelerators_from_tensorflow() -> None:
  """TensorFlow (clu's TensorBoard writer) must not take the GPU's memory.

  Called where TensorFlow gets imported (``progress.create_writer``), so a
  run that writes no TensorBoard files never imports it.
  """
  import sys
  tf = sys.modules.get("tensorflow")
  if tf is not None:
    tf.config.set_visible_devices([], "GPU")


def setup() -> None:
  from slamjax.models import layers
  layers.tune_cpu_allocator()  # process-wide (mallopt): once, here
  enable_compilation_cache()


# ---------------------------------------------------------------------------
# How the entry points end on bad input and on Ctrl-C.


class InputError(ValueError):
  """Bad input found by an entry point (a config, a path): one line, no
  traceback (see :func:`friendly_errors`)."""


# (module, class) of the errors that describe bad input, not a bug. Looked up
# in sys.modules: an error can only come from a module that was imported.
USER_ERRORS = (
    ("slamjax.runtime", "InputError"),
    # Also slides.CohortError and features.dataset.FeatureDataError (aliases).
    ("slamjax.data.slide_table", "DataError"),
    ("slamjax.data.folder", "FolderDataError"),
    ("slamjax.data.image_cache", "CacheError"),
    ("slamjax.models.pretrained", "InitFromError"),
    ("slamjax.workdir", "WorkdirError"),
)


# What config.data.root must be, per source that reads it (the others
# generate their data).
_ROOTS = {
    "slides": "the cohort folder (slides.csv and one folder of cell images per "
              "slide; `python -m slamjax.data.make_cohort --out /tmp/cohort --source "
              "synthetic` makes one)",
    "features": "the folder of per-slide feature files",
    "folder": "the folder with one sub-folder of images per class",
}


def check_data_root(cfg) -> None:
  """A missing ``config.data.root``, found before the runner makes the workdir.

  Raises:
    InputError: the root is empty or not a folder (relative roots are also
      looked up from the repository, as the loaders do).

  Example:
    >>> import ml_collections
    >>> cfg = ml_collections.ConfigDict({"data": {"source": "slides", "root": ""}})
    >>> check_data_root(cfg)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    slamjax.runtime.InputError: config.data.root is empty; set --config.data.root to the cohort folder ...
  """
  from slamjax.config.values import data_source
  from slamjax.data import folder
  what = _ROOTS.get(data_source(cfg) if "runner" in cfg else cfg.data.source)
  if what is None:
    return
  root = cfg.data.root or ""
  if not root:
    raise InputError(f"config.data.root is empty; set --config.data.root to {what}")
  resolved = folder.resolve_root(os.path.expanduser(root))
  if not os.path.isdir(resolved):
    raise InputError(f"config.data.root={root!r} is not a folder "
                     f"({os.path.abspath(resolved)} does not exist); it must be {what}")


def user_errors() -> tuple[type[BaseException], ...]:
  """The classes of :data:`USER_ERRORS` whose modules are imported."""
  import sys
  out = []
  for module, name in USER_ERRORS:
    cls = getattr(sys.modules.get(module), name, None)
    if isinstance(cls, type) and issubclass(cls, BaseException):
      out.append(cls)
  return tuple(out)


def debug_requested(flag: bool = False) -> bool:
  """``--debug`` or ``SLAMJAX_DEBUG`` set (and not 0): show tracebacks."""
  return bool(flag) or os.environ.get("SLAMJAX_DEBUG", "") not in ("", "0")


def one_line(e: BaseException) -> str:
  """An error's message on one line (its class name when it has none).

  >>> one_line(ValueError("a.\\n  b")), one_line(KeyError())
  ('a. b', 'KeyError')
  """
  import re
  text = re.sub(r"\s*\n\s*", " ", str(e)).strip()
  return text or type(e).__name__


def _interrupt(signum, frame) -> None:
  """SIGINT handler: KeyboardInterrupt, as Python's own, except inside a
  ``__del__`` (say TensorFlow's resource deleters, run by the garbage
  collector): Python prints and ignores an exception raised there, and the
  run would go on. There the signal is sent again 50 ms later."""
  import signal
  import threading
  f = frame
  while f is not None:
    if f.f_code.co_name == "__del__":
      threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
      return
    f = f.f_back
  raise KeyboardInterrupt


@contextlib.contextmanager
def friendly_errors(prog: str, resume: str = "", debug: bool = False):
  """Ends the process cleanly on bad input and on Ctrl-C.

  A :func:`user_errors` exception prints ``prog: error: <message>`` and a
  hint line to stderr and exits 1. Ctrl-C prints one line saying how to
  resume (``resume``: the command to rerun) and exits 130 at once: what a
  run finished is on disk already (records and checkpoints are written
  atomically), and skipping the interpreter's shutdown keeps Orbax's and
  JAX's background threads from printing errors of their own. ``debug``
  (see :func:`debug_requested`) lets both tracebacks through.

  Example:
    >>> import contextlib, io
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...   try:
    ...     with friendly_errors("slamjax"):
    ...       raise InputError("config.data.root is empty")
    ...   except SystemExit as e:
    ...     print(e.code)
    1
    >>> print(err.getvalue().strip())
    slamjax: error: config.data.root is empty
      (rerun with --debug, or SLAMJAX_DEBUG=1, to see the traceback)
  """
  import signal
  import sys
  previous = signal.getsignal(signal.SIGINT)
  ours = (previous is signal.default_int_handler and not debug
          and threading_is_main())
  if ours:
    signal.signal(signal.SIGINT, _interrupt)
  try:
    yield
  except KeyboardInterrupt:
    if debug:
      raise
    sys.stdout.flush()
    again = f"rerun the same command to resume: {resume}" if resume else (
        "rerun the same command to resume")
    sys.stderr.write(f"\n{prog}: stopped (Ctrl-C); {again}\n")
    sys.stderr.flush()
    os._exit(130)
  except user_errors() as e:
    if debug:
      raise
    sys.stdout.flush()
    sys.stderr.write(f"{prog}: error: {one_line(e)}\n"
                     "  (rerun with --debug, or SLAMJAX_DEBUG=1, to see the traceback)\n")
    sys.exit(1)
  finally:
    if ours:
      signal.signal(signal.SIGINT, previous)


def threading_is_main() -> bool:
  """Signal handlers can only be set from the main thread."""
  import threading
  return threading.current_thread() is threading.main_thread()
