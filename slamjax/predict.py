r"""Command line: diagnose new patients with a model trained by the ``slides`` runner.

  python -m slamjax.predict --workdir /tmp/my_cohort --slides /path/to/new_slides \
      --out /tmp/my_cohort_predictions [--ensemble final]

What it reads and writes: :mod:`slamjax.slides.predict`.
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained slides run (holding final/).")
flags.DEFINE_string("slides", None, "Folder of slide folders, or a slide CSV.")
flags.DEFINE_string("out", None, "Output folder.")
flags.DEFINE_integer("top_k", None, "Cells per gallery (default: the run's eval.top_k).")
flags.DEFINE_enum("ensemble", "folds", ["folds", "final"],
                  "folds: the mean of the final model and the run's cross-validation "
                  "fold models (ranks better: docs/slides.md); final: the final model "
                  "alone.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from slamjax import runtime
  runtime.setup()
  # A workdir or slide folder that cannot be used: one line, no traceback.
  from slamjax.slides import predict
  with runtime.friendly_errors("predict", debug=runtime.debug_requested()):
    predict.predict(FLAGS.workdir, FLAGS.slides, FLAGS.out, FLAGS.top_k, FLAGS.ensemble)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "slides", "out"])
  app.run(main)
