"""Tests of slamjax.data.make_cohort: generated cohorts load with load_cohort."""

import csv
import doctest
import hashlib
import json
import os
import pathlib

import ml_collections
import numpy as np
import pytest

from slamjax.data import make_cohort as mc
from slamjax.data import slides


def _cfg(root, cache, **kw):
  d = dict(source="slides", root=str(root), csv="slides.csv", cells_csv="",
           label_columns=(), label_column="", negative_label="", image_size=16,
           unlisted="error", skip_bad_files=False, cache_dir=str(cache),
           num_workers=0)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def _digest(root):
  """Hash of every file's relative path and bytes (cohort.json excluded)."""
  h = hashlib.sha256()
  for dirpath, dirnames, files in sorted(os.walk(root)):
    dirnames.sort()
    for f in sorted(files):
      if f != "cohort.json":
        p = os.path.join(dirpath, f)
        h.update(os.path.relpath(p, root).encode())
        h.update(pathlib.Path(p).read_bytes())
  return h.hexdigest()


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


SMALL = dict(source="synthetic", patients=6, min_cells=3, max_cells=8,
             image_size=16, second_slide_fraction=0.5, num_workers=2)


def test_synthetic_is_deterministic(tmp_path):
  a = mc.make_cohort(str(tmp_path / "a"), seed=3, **SMALL)
  b = mc.make_cohort(str(tmp_path / "b"), seed=3, **SMALL)
  mc.make_cohort(str(tmp_path / "c"), seed=4, **SMALL)
  assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
  assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
  for k in ("slides", "cells", "witness_cells", "cells_per_slide"):
    assert a[k] == b[k]


def test_synthetic_cohort_loads_with_truth(tmp_path):
  out, new = tmp_path / "c", tmp_path / "new"
  s = mc.make_cohort(str(out), seed=0, diagnosis=True, unlabeled=1,
                     new_out=str(new), new_patients=3, **SMALL)
  assert s["patients"] == 6 and s["positive_patients"] == 3 and s["reused_cells"] == 0
  assert s["patients_with_two_slides"] >= 1 and s["png_files"] > 0
  assert json.loads(pathlib.Path(out / "cohort.json").read_text())["slides"] == s["slides"]
  cache = tmp_path / "cache"
  c = slides.load_cohort(_cfg(out, cache, label_columns=("label",)))
  assert len(c.slide_ids) == s["slides"] and c.report["num_cells"] == s["cells"]
  assert c.labelled().sum() == s["slides"] - 1
  assert len(set(c.patient_ids)) == 6
  table = {r["slide_id"]: r for r in _rows(out / "slides.csv")}
  # The truth table, as a cell table: witnesses exactly in positive slides.
  t = slides.load_cohort(_cfg(out, cache, cells_csv="cells.csv",
                              label_column="diagnosis", negative_label="normal"))
  assert t.report["cache_hit"]  # same files as the folder load
  assert t.task_names == ("blast",)
  for sid, w in zip(t.slide_ids, t.witness):
    if table[sid]["label"]:  # witnesses exactly in positive slides
      assert (w.sum() > 0) == (table[sid]["label"] == "1"), sid
      assert (w.sum() > 0) == (table[sid]["diagnosis"] == "blast"), sid
  for i, sid in enumerate(c.slide_ids):  # both loads list the same cells
    assert [c.cell_paths[j] for j in c.cells[i]] == [t.cell_paths[j] for j in t.cells[i]]
  # New patients: folders only, no labels; truth kept aside.
  assert not (new / "slides.csv").exists()
  n = slides.load_cohort(_cfg(new, cache), require_labels=False)
  assert len(n.slide_ids) == 3 and not n.labelled().any()
  assert {r["slide_id"] for r in _rows(new / "truth_slides.csv")} == set(n.slide_ids)
  assert not set(n.slide_ids) & set(c.slide_ids)


def test_overwrite_guard(tmp_path):
  out = tmp_path / "c"
  mc.make_cohort(str(out), **SMALL)
  with pytest.raises(mc.CohortSpecError, match="not empty"):
    mc.make_cohort(str(out), **SMALL)
  mc.make_cohort(str(out), overwrite=True, **SMALL)
  other = tmp_path / "mine"
  other.mkdir()
  (other / "keep.txt").write_text("x")
  with pytest.raises(mc.CohortSpecError, match="not a cohort"):
    mc.make_cohort(str(other), overwrite=True, **SMALL)
  assert (other / "keep.txt").exists()


def test_command_line(tmp_path, capsys):
  rc = mc.main(["--out", str(tmp_path / "c"), "--source", "synthetic", "--patients",
                "4", "--min_cells", "2", "--max_cells", "4", "--image_size", "16",
                "--reuse", "--pool_size", "5"])
  assert rc == 0
  s = json.loads(capsys.readouterr().out)
  assert s["reuse"] and s["slides"] >= 4
  assert mc.main(["--out", str(tmp_path / "c"), "--source", "synthetic"]) == 2


def test_pbc_cohort(tmp_path, pbc_root):
  out = tmp_path / "pbc"
  s = mc.make_cohort(str(out), source="pbc", pbc_root=pbc_root, patients=8,
                     min_cells=5, max_cells=15, seed=1, num_workers=2)
  rows = _rows(out / "cells.csv")
  sources = [r["source"] for r in rows]
  assert len(set(sources)) == len(sources)  # no cell reused
  types = {r["cell_type"] for r in rows if r["witness"] == "0"}
  assert types <= {"lymphocyte", "neutrophil"}
  assert {r["cell_type"] for r in rows if r["witness"] == "1"} <= {"ig", "erythroblast"}
  exts = {os.path.splitext(r["path"])[1].lower() for r in rows}
  assert exts == {".jpg", ".png"}
  c = slides.load_cohort(_cfg(out, tmp_path / "cache"))
  assert c.report["num_cells"] == s["cells"] == len(rows)
  assert np.nansum(c.labels) == s["positive_slides"]
  assert 0.02 <= s["witness_rate_range"][0] <= s["witness_rate_range"][1] <= 0.2


def test_pbc_pool_cap(tmp_path, pbc_root):
  # More normal cells asked for than lymphocytes + neutrophils hold: capped.
  s = mc.make_cohort(str(tmp_path / "p"), source="pbc", pbc_root=pbc_root,
                     patients=40, min_cells=20, max_cells=2000, png_fraction=0,
                     second_slide_fraction=0, num_workers=2)
  assert s["capped"] and s["max_cells_used"] < 2000 and s["reused_cells"] == 0
  with pytest.raises(mc.CohortSpecError, match="--reuse"):
    mc.make_cohort(str(tmp_path / "q"), source="pbc", pbc_root=pbc_root,
                   patients=300, min_cells=100, max_cells=200)


def test_docstring_example():
  result = doctest.testmod(mc, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0, result
