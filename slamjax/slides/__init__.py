"""Your own slides: cross-validation, a final model and prediction for new patients.

* :mod:`slamjax.slides.folds`: patient-grouped stratified folds and the
  checks SLAM-AGS needs (negative and positive slides in every training fold).
* :mod:`slamjax.slides.fold_run`: one fold: pretrain on its training slides,
  embed, MIL heads, thresholds chosen on training slides, held-out metrics.
* :mod:`slamjax.slides.run`: the ``slides`` runner (every fold, baselines,
  the final model, tables and plots).
* :mod:`slamjax.slides.report`: tables, out-of-fold CSV, ROC plot, galleries.

The data side is :mod:`slamjax.data.slides` (folders, CSV, decoded-cell cache).
"""
