r"""Command line entry point (kept thin; ``config.runner`` picks the work: slamjax.runners).

  python -m slamjax.main --config configs/default.py --workdir /tmp/slamjax
  python -m slamjax.main --config configs/default.py:quick --workdir /tmp/q \
      --config.pretrain.surgery=sum
"""

import os
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
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl's flag parsing, with a one-line message (not three chained
  tracebacks) for a misspelt ``--config.`` override or a bad flag value."""
  try:
    return FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    msg = (e.args[0] if e.args else str(e))
    msg = str(msg).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    sys.stderr.write(f"slamjax: bad command line: {msg}\n  in {' '.join(bad) or argv[1:]}\n"
                     "  (every config key and its meaning: slamjax/config/base.py)\n")
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # Orbax/TF INFO lines drown the progress lines
    logging.set_verbosity(logging.WARNING)
  from slamjax import distributed
  distributed.initialize()  # multi-process runs: SLAMJAX_COORDINATOR etc.
  import jax
  from slamjax import config as config_lib
  from slamjax import runners
  config_lib.validate(FLAGS.config)  # before any data is loaded
  if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    raise app.UsageError(f"--workdir={FLAGS.workdir} is a file; give a folder "
                         "(it is created if missing)")
  from slamjax import runtime
  runtime.setup()
  print(f"slamjax: {jax.process_count()} process(es), {jax.device_count()} "
        f"{jax.default_backend()} device(s)", flush=True)
  runners.get(FLAGS.config.runner)(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
