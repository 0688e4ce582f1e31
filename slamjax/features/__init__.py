"""Bring your own features: MIL heads on per-slide feature files, and exports.

* :mod:`slamjax.features.dataset`: a folder of ``.h5``/``.npy``/``.npz``
  feature files plus a slide CSV (``load_feature_folder``), read with the
  slides runner's rules (:mod:`slamjax.data.slide_table`); its errors are
  ``FeatureDataError``, the same class as ``slide_table.DataError``.
* :mod:`slamjax.features.export`: slamjax embeddings of cell bags in the same
  HDF5 layout (``export_embeddings``) and per-slide attention CSVs
  (``export_attention``).
* :mod:`slamjax.features.pipeline`: ``train_and_evaluate_features``, what
  ``python -m slamjax.main`` runs for ``config.data.source == "features"``.

h5py is imported only when an ``.h5`` file is read or written.
"""

from slamjax.features.dataset import FeatureDataError
from slamjax.features.dataset import FeatureDataset
from slamjax.features.dataset import load_feature_folder
from slamjax.features.export import export_attention
from slamjax.features.export import export_bag_attention
from slamjax.features.export import export_embeddings


def train_and_evaluate_features(cfg, workdir: str) -> dict:
  """See :func:`slamjax.features.pipeline.train_and_evaluate_features`."""
  from slamjax.features import pipeline  # imports jax/flax; keep the package light
  return pipeline.train_and_evaluate_features(cfg, workdir)


__all__ = ["FeatureDataError", "FeatureDataset", "export_attention", "export_bag_attention",
           "export_embeddings", "load_feature_folder", "train_and_evaluate_features"]
