"""Bag plans on class-folder data and the PBC configs (no training)."""

import os

import numpy as np
import pytest

from slamjax import config as config_lib
from slamjax import validation
from slamjax.data import bags as bags_lib
from slamjax.data import folder
from slamjax.data import sources

_config = config_lib.load


def _plan(cfg, class_names):
  b = cfg.bags
  idx = {c: i for i, c in enumerate(class_names)}
  missing = [c for c in b.normal_classes + b.abnormal_classes if c not in idx]
  if missing:
    raise ValueError(f"Unknown class name(s) {missing}; this dataset has "
                     f"{list(class_names)}")
  return bags_lib.BagPlan(
      normal_classes=tuple(idx[c] for c in b.normal_classes),
      abnormal_classes=tuple(idx[c] for c in b.abnormal_classes),
      witness_rate=b.witness_rate, bag_size=b.bag_size,
      bags_per_split={k: tuple(v) for k, v in b.bags_per_split.items()},
      normal_proportions=b.normal_proportions, reuse_cells=b.reuse_cells)


def test_witness_plan_needing_more_abnormal_cells_than_exist(make_folder):
  root = make_folder({"lymphocyte": 200, "ig": 3, "erythroblast": 1}, size=8)
  cfg = _config("pbc_lymphocyte", "quick")
  cfg.data.root, cfg.data.max_per_class, cfg.data.image_size = root, None, 8
  cfg.bags.bag_size, cfg.bags.witness_rate = 20, 0.1  # 2 witnesses a bag
  pool = sources.load_pool(cfg.data, cfg.seed)
  # 4 abnormal cells, split 2 + 2; each split's 2 positive bags need 4.
  with pytest.raises(ValueError, match=r"needs 4 abnormal cells in split "
                     r"'(train|test)' but only 2 are available"):
    bags_lib.make_bags(pool.labels, _plan(cfg, pool.class_names), cfg.seed)


def test_witness_plan_error_comes_before_training(make_folder):
  pipeline = pytest.importorskip("slamjax.pipeline")
  root = make_folder({"lymphocyte": 200, "ig": 2, "erythroblast": 1}, size=8)
  cfg = _config("pbc_lymphocyte", "quick")
  cfg.data.root, cfg.data.max_per_class = root, None
  with pytest.raises(ValueError, match=r"needs 2 abnormal cells.*only 1"):
    pipeline.prepare_data(cfg)


@pytest.mark.parametrize("name", ["pbc_lymphocyte", "pbc_differential"])
def test_pbc_bags_are_deterministic_and_splits_disjoint(pbc_root, name):
  cfg = _config(name)
  index = folder.scan_folder(pbc_root)  # labels only; nothing decoded
  plan = _plan(cfg, index.class_names)
  bags = bags_lib.make_bags(index.labels, plan, cfg.seed)
  again = bags_lib.make_bags(index.labels, plan, cfg.seed)
  other = bags_lib.make_bags(index.labels, plan, cfg.seed + 1)
  for split in bags:
    for a, b in zip(bags[split].cells, again[split].cells):
      np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in
                 zip(bags["train"].cells, other["train"].cells))
  train, test = (set(bags[s].all_cells().tolist()) for s in ("train", "test"))
  assert not train & test
  names = np.array(index.class_names)
  for split, bs in bags.items():
    cells = bs.all_cells()
    assert len(set(cells.tolist())) == len(cells)  # no reuse within a split
    neg, pos = cfg.bags.bags_per_split[split]
    assert (bs.num_bags, int(bs.bag_labels.sum())) == (neg + pos, pos)
    k = max(1, round(cfg.bags.witness_rate * cfg.bags.bag_size))
    for c, y, w, rate in zip(bs.cells, bs.bag_labels, bs.witness, bs.witness_rates):
      assert len(c) == cfg.bags.bag_size and w.sum() == (k if y else 0)
      assert rate == pytest.approx(w.mean())
      assert set(names[index.labels[c[w]]]) <= set(cfg.bags.abnormal_classes)
      assert set(names[index.labels[c[~w]]]) <= set(cfg.bags.normal_classes)
  if cfg.bags.normal_proportions:
    neg_bag = bags["train"].cells[int(np.argmin(bags["train"].bag_labels))]
    got = [int((names[index.labels[neg_bag]] == c).sum()) for c in cfg.bags.normal_classes]
    assert got == [round(p * cfg.bags.bag_size) for p in cfg.bags.normal_proportions]


@pytest.mark.parametrize("name", ["pbc_lymphocyte", "pbc_differential"])
def test_quick_variant_fits(pbc_root, name):
  cfg = _config(name, "quick")
  index = folder.scan_folder(pbc_root, max_per_class=cfg.data.max_per_class)
  bags = bags_lib.make_bags(index.labels, _plan(cfg, index.class_names), cfg.seed)
  assert bags["train"].num_bags == sum(cfg.bags.bags_per_split["train"])
  assert cfg.pretrain.epochs == 1 and cfg.data.image_size <= 32


@pytest.mark.parametrize("name", ["pbc_lymphocyte", "pbc_differential"])
@pytest.mark.parametrize("arg", [None, "quick"])
def test_pbc_configs_follow_the_schema(name, arg):
  cfg = _config(name, arg)
  assert cfg.data.source == "folder" and os.path.isabs(cfg.data.root)
  validation.validate(cfg)
  for size in (96, 128):
    cfg.data.image_size = size
    assert cfg.augment.crop_size == size * 7 // 8
    validation.validate(cfg)
