r"""Builds ``cell_bags`` without the ``tfds`` CLI (which needs apache-beam).

  python -m slamjax.data.tfds_cell_bags --manual_dir=../shared/data/pbc \
      --config=pbc_lymphocyte --data_dir=~/tensorflow_datasets

Equivalent to ``tfds build slamjax/data/tfds_cell_bags --manual_dir=...
--config=...`` where apache-beam is installed (tensorflow/datasets#5463).
"""

import argparse
import os

import tensorflow_datasets as tfds

from slamjax.data.tfds_cell_bags import tfds_cell_bags_dataset_builder as cb


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--manual_dir", required=True,
                      help="folder with one sub-folder of images per class")
  parser.add_argument("--config", default=None, choices=[c.name for c in cb.CellBags.BUILDER_CONFIGS],
                      help="builder config (default: all)")
  parser.add_argument("--data_dir", default=None, help="TFDS data dir")
  args = parser.parse_args(argv)
  names = [args.config] if args.config else [c.name for c in cb.CellBags.BUILDER_CONFIGS]
  for name in names:
    builder = cb.CellBags(config=name, data_dir=args.data_dir and os.path.expanduser(args.data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(args.manual_dir)))
    print(f"{builder.info.full_name}: {builder.data_dir}")
    for split, info in builder.info.splits.items():
      print(f"  {split}: {info.num_examples} cells")


if __name__ == "__main__":
  main()
