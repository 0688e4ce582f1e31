"""TFDS builder ``cell_bags``: witness-rate bags of single-cell images.

Importing this package registers the dataset with TFDS (``tfds.builder(
"cell_bags/pbc_lymphocyte")``); build it with the standard tooling::

  tfds build slamjax/data/tfds_cell_bags --manual_dir=../shared/data/pbc \
      --config=pbc_lymphocyte

(the ``tfds`` CLI needs apache-beam, tensorflow/datasets#5463), or without it::

  python -m slamjax.data.tfds_cell_bags --manual_dir=../shared/data/pbc \
      --config=pbc_lymphocyte --data_dir=/tmp/tensorflow_datasets
"""

from slamjax.data.tfds_cell_bags.tfds_cell_bags_dataset_builder import CellBags
from slamjax.data.tfds_cell_bags.tfds_cell_bags_dataset_builder import CellBagsConfig
