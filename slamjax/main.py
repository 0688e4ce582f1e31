r"""Command line entry point (kept thin; ``config.runner`` picks the work: slamjax.runners).

  python -m slamjax.main --config configs/default.py --workdir /tmp/slamjax
  python -m slamjax.main --config configs/default.py:quick --workdir /tmp/q \
      --config.pretrain.surgery=sum

``--config`` takes a path, from any directory (``configs/slides.py`` is
found in the repository when it is not in the current one), or a config's
name (``slides``). ``--help`` lists the configs. Bad input ends with one
line and no traceback (``--debug`` or ``SLAMJAX_DEBUG=1`` shows it); Ctrl-C
says how to resume.
"""

import os
import shlex
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up lines
# TensorFlow only writes TensorBoard files here; without this its oneDNN
# banner goes to stderr through absl (twice) whatever the log level.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
flags.DEFINE_bool("debug", False, "Show the Python traceback of an input error or "
                  "of Ctrl-C (as SLAMJAX_DEBUG=1 does).")
flags.mark_flags_as_required(["config", "workdir"])

def usage() -> str:
  """``--help``: how to call, the configs with their purpose, the flags."""
  from slamjax import config as config_lib
  configs = config_lib.available()
  width = max([len(n) for n in configs] + [8])
  lines = [
      "usage: python -m slamjax.main --config CONFIG[:quick] --workdir DIR "
      "[--config.KEY=VALUE ...]",
      "",
      "Runs the experiment a config describes (its config.runner) and writes the "
      "results, checkpoints and a resumable state to --workdir.",
      "",
      f"Configs (--config configs/NAME.py, from any directory, or just NAME; "
      f"in {config_lib.CONFIGS_DIR}):",
      *[f"  {n:<{width}}  {purpose}" for n, purpose in configs.items()],
      "",
      "Flags:",
      "  --config PATH[:ARG]     the config file; ':quick' picks a config's small "
      "variant",
      "  --config.KEY=VALUE      override one key (every key and its meaning: "
      "slamjax/config/base.py)",
      "  --workdir DIR           results and checkpoints; rerun the same command "
      "to resume",
      "  --debug                 show tracebacks (or SLAMJAX_DEBUG=1)",
      "  --helpfull              every absl flag",
      "",
      "Example:",
      "  python -m slamjax.main --config configs/slides.py "
      "--config.data.root=/path/to/cohort --workdir /tmp/my_cohort",
  ]
  return "\n".join(lines)


def _fail(msg: str, code: int = 2) -> None:
  sys.stderr.write(f"slamjax: {msg}\n")
  sys.exit(code)


def resolve_config_arg(argv: list[str]) -> list[str]:
  """``argv`` with the ``--config`` path made one that exists (see
  ``config.load.resolve``); a path that matches no config ends the process
  with one line naming the configs."""
  from slamjax import config as config_lib
  argv = list(argv)
  for i, a in enumerate(argv):
    if a in ("--config", "-config") and i + 1 < len(argv):
      j, prefix, value = i + 1, "", argv[i + 1]
    elif a.startswith(("--config=", "-config=")):
      j, prefix, value = i, a.split("=", 1)[0] + "=", a.split("=", 1)[1]
    else:
      continue
    path, sep, arg = value.partition(":")
    try:
      argv[j] = prefix + config_lib.resolve(path) + sep + arg
    except config_lib.ConfigNotFound as e:
      _fail(str(e))
    break
  return argv


def parse_flags(argv):
  """absl's flag parsing, with ``--help`` (or no flag) listing the configs,
  the config path resolved from any directory, and a one-line message (not three
  chained tracebacks) for a misspelt ``--config.`` override or a bad value."""
  if any(a in ("--help", "-help", "-h", "--h", "-?") for a in argv[1:]):
    print(usage())
    sys.exit(0)
  if len(argv) == 1:  # no flags at all: how to call, not absl's complaint
    sys.stderr.write(usage() + "\n")
    sys.exit(2)
  argv = resolve_config_arg(argv)
  try:
    return FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    if "--debug" in argv or os.environ.get("SLAMJAX_DEBUG", "") not in ("", "0"):
      raise
    msg = (e.args[0] if e.args else str(e))
    msg = str(msg).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    sys.stderr.write(f"slamjax: bad command line: {msg}\n  in {' '.join(bad) or argv[1:]}\n"
                     "  (every config key and its meaning: slamjax/config/base.py)\n")
    sys.exit(2)


def run(cfg, workdir: str) -> None:
  """Prepares the run once (:func:`slamjax.launch.prepare`: the config, its
  inputs, the mesh), then runs ``cfg.runner``."""
  from slamjax import distributed
  distributed.initialize()  # multi-process runs: SLAMJAX_COORDINATOR etc.
  import jax
  from slamjax import launch
  from slamjax import runners
  from slamjax import runtime
  mesh = launch.prepare(cfg, workdir)  # once: the runner trusts it
  runtime.setup()  # process-wide: entry points only
  print(f"slamjax: {jax.process_count()} process(es), {jax.device_count()} "
        f"{jax.default_backend()} device(s)", flush=True)
  runners.get(cfg.runner)(cfg, workdir, mesh=mesh)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # Orbax/TF INFO lines drown the progress lines
    logging.set_verbosity(logging.WARNING)
  from slamjax import runtime
  again = "python -m slamjax.main " + shlex.join(sys.argv[1:])
  with runtime.friendly_errors("slamjax", resume=again,
                               debug=runtime.debug_requested(FLAGS.debug)):
    run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
