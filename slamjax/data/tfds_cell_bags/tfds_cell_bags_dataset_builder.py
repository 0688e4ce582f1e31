"""TFDS builder for cell-bag datasets made from a folder of class folders.

The manual directory is a class-folder dataset (``<class>/<file>.jpg``, e.g.
the PBC set in ``../shared/data/pbc``). The builder config holds a bag plan,
``slamjax.data.bags.make_bags`` simulates the bags (cells split train/test
per class first, so no cell is in two splits), and every example is one cell
of one bag:

* ``image``: the cell (the original file bytes, or resized to
  ``image_size`` and stored as PNG);
* ``cell_label``: its class; ``cell_id``: its path relative to the folder;
* ``bag_id`` (e.g. ``"train/00003"``), ``bag_label`` (negative/positive),
  ``witness`` (the cell is abnormal), ``bag_witness_rate`` (the realised
  witness rate of its bag).

Build it with the standard tooling::

  tfds build slamjax/data/tfds_cell_bags --manual_dir=../shared/data/pbc \\
      --config=pbc_lymphocyte

or from Python with ``tfds.builder("cell_bags/pbc_differential").download_and_prepare(
download_config=tfds.download.DownloadConfig(manual_dir=...))``. Other
datasets get their own ``CellBagsConfig(name=..., class_names=..., ...)``.
"""

from __future__ import annotations

import dataclasses

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from slamjax.data import bags as bags_lib
from slamjax.data import folder

PBC_CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte",
               "monocyte", "neutrophil")


@dataclasses.dataclass(eq=False)
class CellBagsConfig(tfds.core.BuilderConfig):
  """A cell-bag dataset: which classes, and the bag plan.

  Attributes:
    class_names: every class folder to read (the ``cell_label`` names).
    normal_classes, abnormal_classes: class names (see ``bags.BagPlan``).
    normal_proportions: optional mixing proportions of the normal classes.
    witness_rate, bag_size, reuse_cells: see ``bags.BagPlan``.
    bags_per_split: ``((split, num_negative, num_positive), ...)``.
    image_size: resize to this square size (PNG); None keeps the files.
    seed: seed of the split and the bags.
    skip_bad_files: skip undecodable files instead of failing.
  """
  class_names: tuple[str, ...] = PBC_CLASSES
  normal_classes: tuple[str, ...] = ("lymphocyte",)
  abnormal_classes: tuple[str, ...] = ("ig", "erythroblast")
  normal_proportions: tuple[float, ...] | None = None
  witness_rate: float = 0.1
  bag_size: int = 50
  bags_per_split: tuple[tuple[str, int, int], ...] = (("train", 6, 6), ("test", 6, 6))
  reuse_cells: bool = False
  image_size: int | None = None
  seed: int = 0
  skip_bad_files: bool = False

  def plan(self) -> bags_lib.BagPlan:
    idx = {c: i for i, c in enumerate(self.class_names)}
    missing = [c for c in self.normal_classes + self.abnormal_classes if c not in idx]
    if missing:
      raise ValueError(f"Bag classes {missing} are not in class_names "
                       f"{list(self.class_names)}")
    return bags_lib.BagPlan(
        normal_classes=tuple(idx[c] for c in self.normal_classes),
        abnormal_classes=tuple(idx[c] for c in self.abnormal_classes),
        witness_rate=self.witness_rate, bag_size=self.bag_size,
        bags_per_split={s: (n, p) for s, n, p in self.bags_per_split},
        normal_proportions=self.normal_proportions, reuse_cells=self.reuse_cells)


class CellBags(tfds.core.GeneratorBasedBuilder):
  """Witness-rate bags of single-cell images from a class-folder directory."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Point --manual_dir at a folder with one sub-folder of images per class,
  e.g. the PBC set (../shared/data/pbc: basophil/, eosinophil/, ...).
  """
  BUILDER_CONFIGS = [
      CellBagsConfig(
          name="pbc_lymphocyte",
          description="PBC: lymphocyte-only negatives, ig/erythroblast witnesses, "
                      "bags of 50 at 10%, 6+6 bags per split.",
          normal_classes=("lymphocyte",), bag_size=50,
          bags_per_split=(("train", 6, 6), ("test", 6, 6))),
      CellBagsConfig(
          name="pbc_differential",
          description="PBC: negatives with a 60/30/6/3/1% white-cell "
                      "differential, ig/erythroblast witnesses, bags of 100 at "
                      "10%, 10+10 bags per split.",
          normal_classes=("neutrophil", "lymphocyte", "monocyte", "eosinophil",
                          "basophil"),
          normal_proportions=(0.60, 0.30, 0.06, 0.03, 0.01), bag_size=100,
          bags_per_split=(("train", 10, 10), ("test", 10, 10))),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    size = cfg.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(size, size, 3), encoding_format="png" if size else None),
            "cell_label": tfds.features.ClassLabel(names=list(cfg.class_names)),
            "cell_id": tfds.features.Text(),
            "bag_id": tfds.features.Text(),
            "bag_label": tfds.features.ClassLabel(names=["negative", "positive"]),
            "witness": tfds.features.Scalar(dtype=np.bool_),
            "bag_witness_rate": tfds.features.Scalar(dtype=np.float32),
        }),
        supervised_keys=("image", "bag_label"),
        homepage="https://doi.org/10.17632/snkd93bnjr.1",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    root = epath.Path(dl_manager.manual_dir)
    index = folder.scan_folder(str(root), classes=cfg.class_names,
                               skip_bad_files=cfg.skip_bad_files)
    if cfg.skip_bad_files:  # drop undecodable files before bagging
      index = folder.verify_files(index, skip_bad_files=True)
    bag_sets = bags_lib.make_bags(index.labels, cfg.plan(), cfg.seed)
    return {split: self._generate_examples(root, index, bag_set, split)
            for split, bag_set in bag_sets.items()}

  def _generate_examples(self, root: epath.Path, index: folder.FileIndex,
                         bag_set: bags_lib.BagSet, split: str):
    size = self.builder_config.image_size
    rates = bag_set.witness_rates
    for b, (cells, label, witness) in enumerate(
        zip(bag_set.cells, bag_set.bag_labels, bag_set.witness)):
      bag_id = f"{split}/{b:05d}"
      for pos, (i, w) in enumerate(zip(cells, witness)):
        rel = index.paths[i]
        path = root / rel
        data = path.read_bytes()
        image = folder.decode_image(data, size, str(path))  # validates
        yield f"{bag_id}/{pos:05d}", {
            "image": image if size else data,
            "cell_label": int(index.labels[i]),
            "cell_id": rel,
            "bag_id": bag_id,
            "bag_label": int(label),
            "witness": bool(w),
            "bag_witness_rate": np.float32(rates[b]),
        }
