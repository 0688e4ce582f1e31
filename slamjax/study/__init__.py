"""The SLAM-AGS variants study: pretraining methods x witness rates x seeds.

Modules (none imports another's heavy dependencies at import time):

* :mod:`slamjax.study.methods`: the methods (config overrides) and the run plan.
* :mod:`slamjax.study.encoder_eval`: encoder-only measures on held-out cells
  (linear-probe and kNN AUC, witness vs normal, on backbone and projection
  features) and MIL on the features a method's heads do not read.
* :mod:`slamjax.study.run`: :func:`run_study`, one record per run, resumable.
* :mod:`slamjax.study.report`: tables (markdown, CSV) with bootstrap CIs and
  plots, from the records only (``python -m slamjax.study.report DIR``).

Example (what ``python -m slamjax.main --config configs/witness_study.py``
runs, through ``slamjax.runners``)::

  from slamjax.study import run
  run.run_study(cfg, "/tmp/slam_variants")
"""


def run_study(cfg, workdir: str):
  """Shortcut for :func:`slamjax.study.run.run_study` (imported on call)."""
  from slamjax.study import run
  return run.run_study(cfg, workdir)
