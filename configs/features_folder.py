r"""A MIL head trained on your own per-slide feature files (no pretraining).

Expected folder layout (CLAM / TRIDENT HDF5 files work as they are)::

  /path/to/features/
    slide_001.h5     # "features" [N, D] (N may differ per slide, N >= 1);
                     # optional "coords" [N, 2], "witness" [N] (0/1 instance
                     # labels, enables retrieval metrics), "cell_ids" [N]
    slide_002.npz    # arrays with the same names
    slide_003.npy    # just the [N, D] features
    slides.csv       # one row per slide:
                     #   slide_id,label,split
                     #   slide_001,0,train
                     #   slide_002,1,train
                     #   slide_003,1,test

``slide_id`` is the file name without its extension. The CSV is the same
slide table as the slides runner's (docs/slides.md, "The slide table"):
label columns hold 0/1 (or true/false, yes/no; empty = unlabeled: predicted,
not trained on); with several label columns the head is trained multi-task
(one output per column; select some with ``--config.data.label_columns=a,b``),
or one categorical column is split one-vs-rest with
``--config.data.label_column=dx --config.data.negative_label=normal``.
``split`` (train/val/test) is optional: without it, ``data.test_fraction`` of
the patients (``patient_id``, else each slide; stratified by the first label
column, from ``seed``) are held out for test.

  python -m slamjax.main --config configs/features_folder.py \
      --config.data.root=/path/to/features --workdir /tmp/slamjax_features

Quick variant (few epochs, small head) for smoke runs and tests:
``--config configs/features_folder.py:quick``. Results go to
``workdir/results.md`` / ``metrics.json`` (one row per head of
``mil.heads``); per head, per-slide predictions to
``workdir/mil_<head>/predictions.csv`` and per-slide attention (instance, x,
y, attention) to ``workdir/mil_<head>/attention/<slide_id>.csv``.
"""

import ml_collections

from slamjax import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  quick = arg == "quick"
  if arg not in (None, "", "quick"):
    raise ValueError(f"configs/features_folder.py takes no argument or 'quick', got {arg!r}")
  c = config_lib.defaults()
  c.runner = "features"
  c.data.source = "features"
  c.data.root = ""  # required: the feature folder
  # The slide CSV; a relative path not found from the current directory is
  # looked up inside data.root.
  c.data.manifest = "slides.csv"
  c.data.label_columns = ()  # () = every column but slide_id/split
  c.data.test_fraction = 0.3  # only used when the CSV has no split column
  c.data.standardize = True  # z-score features with training-slide statistics
  c.data.unlisted = "error"  # or "ignore": feature files not in the CSV

  c.mil.hidden_dim = 32 if quick else 128
  c.mil.attention_dim = 16 if quick else 64
  c.mil.epochs = 5 if quick else 50
  c.mil.batch_size = 4 if quick else 8
  c.mil.lr = 1e-3 if quick else 5e-4

  c.eval.top_k = 10  # attention retrieval cut-off (needs "witness" in the files)
  c.eval.export_attention = True  # workdir/attention/<slide_id>.csv
  return c
