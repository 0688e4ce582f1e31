"""Features mode end to end: the main command, the export round trip, multi-task."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import features_folder
from slamjax import evaluate
from slamjax import runners
from slamjax import validation
from slamjax.data import bags as bags_lib
from slamjax.data import pool as pool_lib
from slamjax.features import dataset as dataset_lib
from slamjax.features import export
from slamjax.features import pipeline
from slamjax.mil import train as mil_train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_main_command_trains_a_head_from_h5_npz_npy(mixed_folder, tmp_path):
  root, info = mixed_folder
  wd = str(tmp_path / "run")
  env = {**os.environ, "PYTHONPATH": ROOT}
  r = subprocess.run(
      [sys.executable, "-m", "slamjax.main", "--config", "configs/features_folder.py:quick",
       "--config.data.root", root, "--config.mil.epochs=2", "--workdir", wd],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  assert "features: 8 slides, dim 6" in r.stdout and "Bag classification (test split)" in r.stdout
  m = json.loads(pathlib.Path(os.path.join(wd, "metrics.json")).read_text())
  assert m["num_slides"] == {"train": 5, "test": 3} and m["dim"] == 6
  head = m["heads"]["abmil"]
  assert head["bag"]["num_bags"] == 3 and set(head["bag"]) >= {"f1", "auc", "sensitivity"}
  assert "retrieval" not in head  # no instance labels in these files
  assert "not scored" in pathlib.Path(os.path.join(wd, "results.md")).read_text()
  wd = os.path.join(wd, "mil_abmil")  # the head's own files
  preds = _read_csv(os.path.join(wd, "predictions.csv"))
  assert [p["slide_id"] for p in preds] == [f"slide_{i}" for i in range(8)]
  assert [p["split"] for p in preds] == ["train"] * 5 + ["test"] * 3
  assert all(0 < float(p["prob_label"]) < 1 for p in preds)
  for sid, d in info.items():  # attention read back, with coords when the file has them
    rows = _read_csv(os.path.join(wd, "attention", sid + ".csv"))
    assert len(rows) == len(d["x"])
    assert [int(r["instance"]) for r in rows] == list(range(len(d["x"])))
    assert abs(sum(float(r["attention"]) for r in rows) - 1) < 1e-5
    if d["coords"] is None:
      assert "x" not in rows[0]
    else:
      assert [[int(r["x"]), int(r["y"])] for r in rows] == d["coords"].tolist()


def _cells_bags_embeddings(seed=0, dim=8):
  """A tiny labelled pool, simulated bags and per-cell embeddings laid out as
  ``embed.embed_bags`` returns them (one [n_cells, D] array per bag)."""
  labels = np.array([0] * 120 + [1] * 20, np.int32)
  pool = pool_lib.CellPool(np.zeros((140, 4, 4, 3), np.uint8), labels,
                           ("normal", "blast"), tuple(f"cell/{i:04d}" for i in range(140)))
  plan = bags_lib.BagPlan(normal_classes=(0,), abnormal_classes=(1,), witness_rate=0.25,
                          bag_size=8, bags_per_split={"train": (4, 4), "test": (3, 3)})
  bags = bags_lib.make_bags(pool.labels, plan, seed)
  rng = np.random.default_rng(seed)
  cell_emb = (rng.normal(size=(140, dim)) * 3 + 5).astype(np.float32)
  cell_emb[labels == 1, :2] += 6
  return pool, bags, {s: [cell_emb[c] for c in b.cells] for s, b in bags.items()}


def test_round_trip_export_then_features_matches_direct_training(tmp_path):
  pool, bags, emb = _cells_bags_embeddings()
  cfg = features_folder.get_config("quick")
  cfg.mil.epochs = 3
  # Direct: what slamjax.pipeline does after embedding (standardise, fit, predict).
  flat = np.concatenate(emb["train"])
  mu, sd = flat.mean(0), flat.std(0) + 1e-6
  std = {s: [(e - mu) / sd for e in es] for s, es in emb.items()}
  test = bags["test"]
  state = mil_train.fit(cfg.mil, std["train"], bags["train"].bag_labels,
                        str(tmp_path / "direct"), cfg.seed, verbose=False)
  ref = mil_train.predict(cfg.mil, state, std["test"])
  pos = np.flatnonzero(test.bag_labels == 1)
  ref_bag = evaluate.bag_metrics(test.bag_labels, ref["prob"][:, 0])
  ref_ret = evaluate.retrieval_metrics([ref["attention"][i] for i in pos],
                                       [test.witness[i] for i in pos], cfg.eval.top_k)

  folder = export.export_embeddings(str(tmp_path / "image_run"), pool, bags, emb)
  # The export, read back: CLAM/TRIDENT layout + cell ids, witness flags, classes.
  import h5py
  with h5py.File(os.path.join(folder, "test_0004.h5")) as f:
    np.testing.assert_array_equal(f["features"][()], emb["test"][4])
    assert f["features"].dtype == np.float32 and "coords" not in f
    assert f["cell_ids"].asstr()[()].tolist() == [pool.cell_ids[c] for c in test.cells[4]]
    np.testing.assert_array_equal(f["witness"][()], test.witness[4])
    np.testing.assert_array_equal(f["classes"][()], pool.labels[test.cells[4]])
    assert f.attrs["split"] == "test" and json.loads(f.attrs["label"]) == int(test.bag_labels[4])
  rows = _read_csv(os.path.join(folder, "slides.csv"))
  assert rows[0] == {"slide_id": "train_0000", "label": str(bags["train"].bag_labels[0]),
                     "split": "train"}
  assert len(rows) == 14 and rows[8]["slide_id"] == "test_0000"

  # Features mode through the runner registry, same MIL config and seed.
  cfg.runner, cfg.data.source = "features", "features"
  cfg.data.root = folder
  wd = str(tmp_path / "features_run")
  res = runners.get(cfg.runner)(cfg, wd)["heads"]["abmil"]
  wd = os.path.join(wd, "mil_abmil")
  preds = [p for p in _read_csv(os.path.join(wd, "predictions.csv")) if p["split"] == "test"]
  got = np.array([float(p["prob_label"]) for p in preds], np.float32)
  np.testing.assert_array_equal(got, ref["prob"][:, 0])
  assert res["bag"] == ref_bag and res["retrieval"] == ref_ret
  assert res["retrieval"]["num_positive_bags"] == 3
  for i in range(test.num_bags):
    att = _read_csv(os.path.join(wd, "attention", f"test_{i:04d}.csv"))
    np.testing.assert_array_equal(np.array([float(r["attention"]) for r in att], np.float32),
                                  ref["attention"][i])
    assert [r["cell_id"] for r in att] == [pool.cell_ids[c] for c in test.cells[i]]
    assert [int(r["witness"]) for r in att] == test.witness[i].astype(int).tolist()


def test_multi_task_val_split_witness_and_resume(tmp_path, fx, monkeypatch):
  # Heads with per-task attention also return ``task_attention`` ([T, n_i] per
  # bag); emulate one on top of whatever the configured head returns.
  predict = mil_train.predict

  def predict_with_task_attention(*args, **kw):
    out = predict(*args, **kw)
    out.setdefault("task_attention", [np.stack([a, a[::-1]]) for a in out["attention"]])
    return out

  monkeypatch.setattr(mil_train, "predict", predict_with_task_attention)
  root = tmp_path / "mt"
  root.mkdir()
  rng = np.random.default_rng(1)
  rows = []
  for i in range(10):
    a, b = i % 2, (i // 2) % 2
    x, w = fx.slide_features(rng, 4 + i, 5, a)
    if i in (0, 3, 7):  # some slides carry instance labels, some don't
      np.savez(root / f"m{i}.npz", features=x)
    else:
      fx.write_h5(str(root / f"m{i}.h5"), x, witness=w.astype(np.uint8))
    rows.append((f"m{i}", a, b, (["train"] * 6 + ["val"] * 2 + ["test"] * 2)[i]))
  # An unlabeled slide: predicted, never trained on or scored.
  np.savez(root / "m10.npz", features=fx.slide_features(rng, 6, 5, 0)[0])
  rows.append(("m10", "", "", "test"))
  fx.write_csv(root / "slides.csv", ["slide_id", "tumor", "grade", "split"], rows)
  cfg = features_folder.get_config("quick")
  cfg.data.root = str(root)
  cfg.mil.epochs = 2
  cfg.eval.top_k = 2
  wd = str(tmp_path / "run")
  full = pipeline.train_and_evaluate_features(cfg, wd)
  assert full["label_columns"] == ["tumor", "grade"]
  assert full["num_slides"] == {"train": 6, "val": 2, "test": 2, "unlabeled": 1}
  res = full["heads"]["abmil"]
  assert set(res["tasks"]) == {"tumor", "grade"} and res["bag"] == res["tasks"]["tumor"]["bag"]
  assert res["val"]["bag"]["num_bags"] == 2
  # Retrieval only where positive slides have instance labels: test m9 (h5 with
  # witness) yes; val m7 (positive, .npz without witness) no.
  assert res["retrieval"]["num_positive_bags"] == 1 and res["retrieval"]["num_witnesses"] == 2
  assert "retrieval" not in res["val"]
  metrics = json.loads(pathlib.Path(os.path.join(wd, "metrics.json")).read_text())
  assert metrics["heads"]["abmil"]["tasks"]["grade"]["bag"]["num_bags"] == 2
  preds = _read_csv(os.path.join(wd, "mil_abmil", "predictions.csv"))
  assert list(preds[0]) == ["slide_id", "split", "tumor", "grade", "prob_tumor", "prob_grade"]
  assert [p["slide_id"] for p in preds if p["split"] == "unlabeled"] == ["m10"]
  assert preds[-1]["tumor"] == preds[-1]["grade"] == "" and 0 < float(preds[-1]["prob_tumor"]) < 1
  assert os.path.exists(os.path.join(wd, "mil_abmil", "attention", "m10.csv"))
  assert "m10" not in [b["slide_id"] for b in res["per_bag"]]
  assert "1 unlabeled slide(s) are predicted" in pathlib.Path(wd, "results.md").read_text()
  att = _read_csv(os.path.join(wd, "mil_abmil", "attention", "m9.csv"))
  assert list(att[0]) == ["instance", "witness", "attention", "attention_tumor",
                          "attention_grade"]
  assert [r["attention"] for r in att] == [r["attention_tumor"] for r in att]
  assert [r["attention"] for r in att][::-1] == [r["attention_grade"] for r in att]
  # Rerunning resumes the trained head: identical predictions.
  again = pipeline.train_and_evaluate_features(cfg, wd)
  assert again["heads"]["abmil"]["per_bag"] == res["per_bag"]


def test_features_config_errors():
  cfg = features_folder.get_config("quick")
  with pytest.raises(ValueError, match=r"config.data.root is empty"):
    pipeline.train_and_evaluate_features(cfg, "/nonexistent/never/written")
  cfg = features_folder.get_config()
  cfg.data.test_fraction = 1.0
  with pytest.raises(ValueError, match=r"config.data.test_fraction=1.0 is outside"):
    validation.validate(cfg)
  cfg = features_folder.get_config()
  cfg.data.unlisted = "skip"
  with pytest.raises(ValueError, match=r"config.data.unlisted='skip'"):
    validation.validate(cfg)
  cfg = features_folder.get_config()
  cfg.data.source = "folder"  # the features runner reads feature files only
  with pytest.raises(ValueError, match=r"config.data.source='folder'.*'features'"):
    validation.validate(cfg)
  with pytest.raises(ValueError, match="'quick'"):
    features_folder.get_config("fast")


def test_categorical_label_config_reaches_the_folder_loader(monkeypatch, tmp_path):
  seen = {}

  def load(*args, **kw):
    seen.update(kw)
    raise dataset_lib.FeatureDataError("stop here")

  monkeypatch.setattr(dataset_lib, "load_feature_folder", load)
  cfg = features_folder.get_config("quick")
  cfg.data.root = str(tmp_path)
  cfg.data.label_column, cfg.data.negative_label = "diagnosis", "normal"
  with pytest.raises(dataset_lib.FeatureDataError, match="stop here"):
    pipeline.train_and_evaluate_features(cfg, str(tmp_path / "run"))
  assert seen == {"label_column": "diagnosis", "negative_label": "normal"}


def test_per_head_attention_shapes_are_normalised():
  a = np.arange(10, dtype=np.float32).reshape(2, 5)  # [H=2, N=5] from a head
  assert pipeline._instances_first(a, 5).shape == (5, 2)
  assert pipeline._task_scores(a.T, num_tasks=2).tolist() == a[0].tolist()
  assert pipeline._task_scores(a.T, num_tasks=1).tolist() == a.mean(0).tolist()
  with pytest.raises(ValueError, match=r"attention of shape \(2, 5\) for a bag of 4"):
    pipeline._instances_first(a, 4)
