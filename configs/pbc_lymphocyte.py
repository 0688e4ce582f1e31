r"""SLAM-AGS on real PBC blood cells, paper-like: lymphocyte-only negatives.

As in the reference, a negative bag holds one normal class only (there: LYT
lymphocytes of the Matek bone-marrow set; here: PBC ``lymphocyte``). A positive
bag replaces a fraction ``witness_rate`` of it with abnormal cells drawn from
``ig`` (immature granulocytes) and ``erythroblast``, which are absent from
healthy peripheral blood. Cells are split train/test per class first, then
bagged; no cell is in two splits or two bags.

PBC has 1,214 lymphocytes, about 607 per split, which caps the bags: the
defaults (bags of 50, 6 negative + 6 positive per split) use 570-594 of them
for any witness rate in [0.02, 1]. Larger or more bags need
``--config.bags.reuse_cells=True`` (cells then recur across bags of a split).

  python -m slamjax.main --config configs/pbc_lymphocyte.py --workdir /tmp/pbc_lym

Overrides: ``--config.data.root=/path/to/pbc`` (default: ``../shared/data/pbc``
next to the repository), ``--config.data.image_size=96`` (or 128; the crop
follows at 7/8 of the image), ``--config.bags.witness_rate=0.05``.
Quick smoke run (80 cells per class, 32 px, bags of 10, 1 epoch):
``--config configs/pbc_lymphocyte.py:quick``. Sized for a 2-core CPU: the
full run pretrains a width-16 ResNet-18 for ~200 steps of 128 cells at 56 px.
"""

import os

import ml_collections

from slamjax import config as config_lib

_PBC = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                     "..", "..", "shared", "data", "pbc"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  quick = arg == "quick"
  if arg not in (None, "", "quick"):
    raise ValueError(f"configs/pbc_lymphocyte.py takes no argument or 'quick', got {arg!r}")
  c = config_lib.defaults()

  # Cell pool: one folder per class (slamjax/data/folder.py).
  c.data.source = "folder"
  c.data.root = _PBC
  c.data.image_size = ml_collections.FieldReference(32 if quick else 64)
  c.data.max_per_class = 80 if quick else None
  c.data.num_workers = 2

  c.bags.normal_classes = ("lymphocyte",)
  c.bags.abnormal_classes = ("ig", "erythroblast")
  c.bags.bag_size = 10 if quick else 50
  c.bags.bags_per_split = {"train": (2, 2) if quick else (6, 6),
                           "test": (2, 2) if quick else (6, 6)}

  c.augment.crop_size = c.data.get_ref("image_size") * 7 // 8
  c.augment.mean = (0.8556, 0.7294, 0.7165)  # PBC pixel statistics
  c.augment.std = (0.1744, 0.1983, 0.0860)

  c.model.width = 8 if quick else 16
  c.model.proj_dims = (64, 64) if quick else (512, 512)

  # (SimCLR, similarity) 1:1 as the reference, on per-task projection heads
  # (the base default); --config.model.projection=shared is the reference.
  c.pretrain.task_weights = (1.0, 1.0)
  c.pretrain.epochs = 1 if quick else 40
  c.pretrain.batch_size = 16 if quick else 128
  c.pretrain.warmup_epochs = 1 if quick else 4
  c.pretrain.checkpoint_every_steps = 2 if quick else 25
  c.pretrain.log_every_steps = 1 if quick else 5

  c.mil.dropout = 0.5
  c.mil.epochs = 2 if quick else 60
  c.mil.batch_size = 2 if quick else 4

  c.eval.top_k = 1 if quick else 5  # = witnesses per positive bag at 10%
  c.eval.num_plot_bags = 2 if quick else 4
  return c
