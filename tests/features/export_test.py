"""Exports: HDF5 feature folders and attention CSVs, read back; doctests."""

import csv
import dataclasses
import doctest
import os
import pathlib

import numpy as np
import pytest

from slamjax.data import bags as bags_lib
from slamjax.data import pool as pool_lib
from slamjax.features import dataset
from slamjax.features import export


@dataclasses.dataclass(frozen=True)
class _PoolWithCoords(pool_lib.CellPool):
  coords: np.ndarray = None


def _pool_and_bags():
  labels = np.array([0] * 40 + [1] * 8, np.int32)
  pool = _PoolWithCoords(np.zeros((48, 2, 2, 3), np.uint8), labels, ("normal", "blast"),
                         tuple(f"c{i}" for i in range(48)),
                         coords=np.stack([np.arange(48) * 10, np.arange(48) * 20], 1))
  plan = bags_lib.BagPlan(normal_classes=(0,), abnormal_classes=(1,), witness_rate=0.5,
                          bag_size=4, bags_per_split={"train": (2, 2), "test": (1, 1)})
  return pool, bags_lib.make_bags(pool.labels, plan, seed=0)


def test_exported_folder_is_a_valid_feature_folder_with_coords(tmp_path):
  pool, bags = _pool_and_bags()
  cell_emb = np.random.default_rng(0).normal(size=(48, 5)).astype(np.float32)
  emb = {s: [cell_emb[c] for c in b.cells] for s, b in bags.items()}
  folder = export.export_embeddings(str(tmp_path), pool, bags, emb)
  assert folder == os.path.join(str(tmp_path), "features")
  ds = dataset.load_feature_folder(folder)
  assert ds.slide_ids == export.bag_slide_ids("train", 4) + export.bag_slide_ids("test", 2)
  assert ds.splits.tolist() == ["train"] * 4 + ["test"] * 2
  flat = [(s, i) for s, b in bags.items() for i in range(b.num_bags)]
  for k, (s, i) in enumerate(flat):
    cells = bags[s].cells[i]
    np.testing.assert_array_equal(ds.features[k], emb[s][i])
    np.testing.assert_array_equal(ds.coords[k], pool.coords[cells])
    assert ds.cell_ids[k].tolist() == [pool.cell_ids[c] for c in cells]
    np.testing.assert_array_equal(ds.witness[k], bags[s].witness[i])
    assert ds.labels[k, 0] == bags[s].bag_labels[i]
  with pytest.raises(ValueError, match=r"split 'test' has 2 bags but 1 embedding arrays"):
    export.export_embeddings(str(tmp_path / "bad"), pool, bags,
                             {**emb, "test": emb["test"][:1]})


def test_attention_csvs_per_head_coords_ids_witness(tmp_path):
  pool, bags = _pool_and_bags()
  test = bags["test"]
  att = [np.full(len(c), 1 / len(c), np.float32) for c in test.cells]
  paths = export.export_bag_attention(str(tmp_path), pool, test, "test", att)
  assert [os.path.basename(p) for p in paths] == ["test_0000.csv", "test_0001.csv"]
  with open(paths[1], newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["instance", "x", "y", "cell_id", "witness", "attention"]
  cells = test.cells[1]
  assert [(int(r["x"]), int(r["y"])) for r in rows] == [tuple(pool.coords[c]) for c in cells]
  assert [r["cell_id"] for r in rows] == [pool.cell_ids[c] for c in cells]
  assert [int(r["witness"]) for r in rows] == test.witness[1].astype(int).tolist()
  # [N, H] attention: one column per head/class, named or numbered; exact floats.
  a = np.array([[0.1, 0.7], [0.9, 0.3]], np.float32)
  (p,) = export.export_attention(str(tmp_path / "h"), ["s"], [a], names=["tumor", "grade"])
  with open(p, newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["instance", "attention_tumor", "attention_grade"]
  assert np.float32(float(rows[0]["attention_grade"])) == a[0, 1]
  (p,) = export.export_attention(str(tmp_path / "h"), ["s"], [a])
  assert pathlib.Path(p).read_text().splitlines()[0].strip() == "instance,attention_0,attention_1"
  # 1-D ranking attention + per-task attention ([T, N] from predict's task_attention).
  test_att = [np.full(len(c), 0.25) for c in test.cells]
  task_att = [np.stack([np.full(len(c), 0.5), np.full(len(c), 0.125)]) for c in test.cells]
  paths = export.export_bag_attention(str(tmp_path / "t"), pool, test, "test", test_att,
                                      task_attention=task_att)
  with open(paths[0], newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0])[-3:] == ["attention", "attention_0", "attention_1"]
  assert [rows[0][k] for k in list(rows[0])[-3:]] == ["0.25", "0.5", "0.125"]
  with pytest.raises(ValueError, match=r"class attention of shape \(3, 2\) \(need \[2, C\]\)"):
    export.export_attention(str(tmp_path), ["s"], [a[:, 0]], class_attention=[np.zeros((3, 2))])
  with pytest.raises(ValueError, match=r"slide s has 2 attention values but coords of shape \(3, 2\)"):
    export.export_attention(str(tmp_path), ["s"], [a], coords=[np.zeros((3, 2))])


@pytest.mark.parametrize("module", [dataset, export])
def test_docstring_examples_run(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
