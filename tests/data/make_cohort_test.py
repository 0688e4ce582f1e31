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
from PIL import Image

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


# --- witness kind: unchanged -------------------------------------------------


def _sha(path):
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_witness_tables_unchanged(tmp_path, pbc_root):
  # The tables that make_cohort wrote before the composition kind and
  # new_reserve existed (images: compared by hand, they depend on Pillow).
  out, new = tmp_path / "w", tmp_path / "w_new"
  mc.make_cohort(str(out), source="pbc", pbc_root=pbc_root, patients=8, min_cells=5,
                 max_cells=15, seed=1, image_size=32, new_out=str(new),
                 new_patients=3, num_workers=2)
  assert _sha(out / "slides.csv").startswith("989b509f21c5")
  assert _sha(out / "cells.csv").startswith("493c941887b9")
  assert _sha(new / "truth_slides.csv").startswith("e69d103bc82d")
  assert _sha(new / "truth_cells.csv").startswith("def15c7d0e88")


def _sources(path):
  return {r["source"] for r in _rows(path)}


def test_witness_new_out_reports_shared_cells(tmp_path, make_folder):
  # A small PBC-like pool: the cohort is capped and uses nearly all of it, so
  # new patients made in another call cannot avoid its cells; the output
  # lists exactly the cells shared with the cohort made without new_out.
  root = make_folder({"lymphocyte": 30, "neutrophil": 30, "ig": 10,
                      "erythroblast": 10}, name="pbc")
  kw = dict(source="pbc", pbc_root=root, patients=6, min_cells=3, max_cells=300,
            second_slide_fraction=0, num_workers=2)
  alone = mc.make_cohort(str(tmp_path / "alone"), **kw)
  assert alone["capped"]
  s = mc.make_cohort(str(tmp_path / "a"), new_out=str(tmp_path / "n"),
                     new_patients=2, **kw)
  new_cells = _rows(tmp_path / "n" / "truth_cells.csv")
  shared = {r["source"] for r in new_cells} & _sources(tmp_path / "alone" / "cells.csv")
  assert s["new"]["shared_with_cohort_without_new_out"] == len(shared) > 0
  assert _sources(tmp_path / "n" / "shared_cells.csv") == shared
  assert "--new_reserve" in s["new"]["note"]
  assert not {r["source"] for r in new_cells} & _sources(tmp_path / "a" / "cells.csv")
  # With a reserve, new patients made later avoid every cohort of the seed.
  kw["new_reserve"] = 0.3
  mc.make_cohort(str(tmp_path / "r1"), **kw)
  mc.make_cohort(str(tmp_path / "r2"), new_out=str(tmp_path / "rn"), new_patients=2,
                 **dict(kw, patients=3))
  assert _sources(tmp_path / "rn" / "truth_cells.csv")
  assert not (_sources(tmp_path / "rn" / "truth_cells.csv")
              & _sources(tmp_path / "r1" / "cells.csv"))


# --- composition kind --------------------------------------------------------


COMP = dict(kind="composition", source="synthetic", min_cells=4, max_cells=10,
            image_size=16, num_workers=2)


def test_composition_synthetic_loads(tmp_path):
  out = tmp_path / "c"
  s = mc.make_cohort(str(out), patients=12, unlabeled=1, diagnosis=True, **COMP)
  assert s["patients"] == s["slides"] == 12 and s["positive_patients"] == 4
  assert set(s["cells_per_class"]) == {"lymphocyte", "neutrophil"}
  meta = json.loads(pathlib.Path(out / "cohort.json").read_text())
  assert meta["parameters"]["kind"] == "composition" and meta["parameters"]["seed"] == 0
  assert meta["parameters"]["count_effect"] == 1.3
  cache = tmp_path / "cache"
  c = slides.load_cohort(_cfg(out, cache, label_columns=("label",)))
  assert len(c.slide_ids) == 12 and c.report["num_cells"] == s["cells"]
  assert c.labelled().sum() == 11 and len(set(c.patient_ids)) == 12
  t = slides.load_cohort(_cfg(out, cache, cells_csv="cells.csv",
                              label_column="diagnosis", negative_label="normal"))
  assert t.task_names == ("lymphocyte_rich",) and t.witness is None
  table = {r["slide_id"]: r for r in _rows(out / "slides.csv")}
  assert list(table["P000_S1"]) == ["slide_id", "patient_id", "label", "diagnosis"]
  pats = _rows(out / "patients.csv")
  assert [int(p["num_cells"]) for p in pats] == [len(c.cells[c.slide_ids.index(
      p["slide_id"])]) for p in pats]


def test_composition_is_deterministic(tmp_path):
  kw = dict(COMP, patients=6, new_patients=2)
  mc.make_cohort(str(tmp_path / "a"), new_out=str(tmp_path / "an"), seed=3, **kw)
  mc.make_cohort(str(tmp_path / "b"), new_out=str(tmp_path / "bn"), seed=3, **kw)
  mc.make_cohort(str(tmp_path / "c"), seed=4, **kw)
  assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
  assert _digest(tmp_path / "an") == _digest(tmp_path / "bn")
  assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
  # New patients depend on the seed and their own arguments only.
  mc.make_cohort(None, new_out=str(tmp_path / "only"), seed=3,
                 **dict(kw, patients=None))
  assert _digest(tmp_path / "only") == _digest(tmp_path / "an")


def _patient_colour_ratio(root):
  """Variance of per-patient mean colour over its value under random patients."""
  by = {}
  for r in _rows(root / "cells.csv"):
    img = np.asarray(Image.open(root / r["path"]).convert("RGB"), float)
    by.setdefault(r["slide_id"], []).append(img.mean((0, 1)))
  means = np.asarray([np.mean(v, 0) for v in by.values()])
  within = np.mean([np.var(v, 0, ddof=1).mean() / len(v) for v in by.values()])
  return means.var(0, ddof=1).mean() / within


def test_composition_nuisance_differs_between_patients(tmp_path):
  kw = dict(COMP, patients=12, min_cells=6, max_cells=12)
  mc.make_cohort(str(tmp_path / "a"), **kw)
  mc.make_cohort(str(tmp_path / "b"), stain=0, brightness=0, blur=0, zoom=0, **kw)
  on, off = _patient_colour_ratio(tmp_path / "a"), _patient_colour_ratio(tmp_path / "b")
  assert on > 5 and off < 2.5, (on, off)
  pats = _rows(tmp_path / "a" / "patients.csv")
  for k in ("gain_r", "brightness", "blur_sigma", "zoom"):
    assert np.std([float(p[k]) for p in pats]) > 0.01, k
  assert {p["zoom"] for p in _rows(tmp_path / "b" / "patients.csv")} == {"1.0"}


def test_composition_pbc(tmp_path, pbc_root):
  out = tmp_path / "c"
  s = mc.make_cohort(str(out), kind="composition", source="pbc", pbc_root=pbc_root,
                     patients=60, min_cells=10, max_cells=30, image_size=16,
                     composition_fractions=(0.3, 0.7), count_effect=1.5,
                     num_workers=2)
  assert s["positive_patients"] == 20 and s["negative_patients"] == 40
  pats = _rows(out / "patients.csv")
  y = np.asarray([p["label"] == "1" for p in pats])
  drawn = np.asarray([float(p["eosinophil_fraction_drawn"]) for p in pats])
  assert abs(drawn[~y].mean() - 0.3) < 0.06 and abs(drawn[y].mean() - 0.7) < 0.06
  realised = s["first_class_fraction"]
  assert realised["positive"] - realised["negative"] > 0.25
  n = np.asarray([int(p["num_cells"]) for p in pats])
  assert n[y].mean() > n[~y].mean() and n.min() >= 10 and n.max() <= 30
  rows = _rows(out / "cells.csv")
  assert len({r["source"] for r in rows}) == len(rows) == s["cells"]  # no reuse
  assert {r["cell_type"] for r in rows} == set(mc.PBC_NORMAL)
  c = slides.load_cohort(_cfg(out, tmp_path / "cache"))
  assert c.report["num_cells"] == s["cells"] and np.nansum(c.labels) == 20
  assert 0 <= s["baseline_auc"]["mean_colour_best_channel"] <= 1


def test_count_distributions():
  n, p0, p1 = mc._count_distributions(10, 80, 0.7, 1.3)
  assert n[0] == 10 and n[-1] == 80
  assert np.isclose((p1 @ n) / (p0 @ n), 1.3)
  _, q0, q1 = mc._count_distributions(10, 80, 0.7, 1.0)
  assert np.array_equal(q0, q1)
  with pytest.raises(mc.CohortSpecError, match="count_effect"):
    mc._count_distributions(10, 12, 0.7, 3.0)


def test_composition_new_patients_separate_call(tmp_path, pbc_root):
  # A cohort, then new patients in another call with other arguments: no
  # source cell in common (the new-patient reserve is fixed by the seed).
  kw = dict(kind="composition", source="pbc", pbc_root=pbc_root, image_size=16,
            min_cells=10, max_cells=20, num_workers=2)
  mc.make_cohort(str(tmp_path / "a"), patients=30, **kw)
  s = mc.make_cohort(str(tmp_path / "b"), patients=5, new_out=str(tmp_path / "n"),
                     new_patients=6, **kw)
  new = _sources(tmp_path / "n" / "truth_cells.csv")
  assert len(new) == s["new"]["cells"] > 0
  assert not new & _sources(tmp_path / "a" / "cells.csv")
  assert not new & _sources(tmp_path / "b" / "cells.csv")
  assert not (tmp_path / "n" / "slides.csv").exists()
  assert (tmp_path / "n" / "truth_patients.csv").exists()
  n = slides.load_cohort(_cfg(tmp_path / "n", tmp_path / "cache"), require_labels=False)
  assert len(n.slide_ids) == 6 and not n.labelled().any()


def test_composition_errors(tmp_path, make_folder):
  with pytest.raises(mc.CohortSpecError, match="lymphocyte,neutrophil"):
    mc.make_cohort(str(tmp_path / "a"), composition_classes="eosinophil,neutrophil",
                   **dict(COMP, patients=4))
  with pytest.raises(mc.CohortSpecError, match="only for --kind composition"):
    mc.make_cohort(str(tmp_path / "b"), source="synthetic", stain=0.1)
  with pytest.raises(mc.CohortSpecError, match="one slide per patient"):
    mc.make_cohort(str(tmp_path / "c"), second_slide_fraction=0.2, **COMP)
  root = make_folder({c: 20 for c in mc.PBC_NORMAL}, name="pbc")
  with pytest.raises(mc.CohortSpecError, match="eosinophil: .* needed, 18 available"):
    mc.make_cohort(str(tmp_path / "d"), **dict(COMP, source="pbc", pbc_root=root,
                                               patients=10))
  assert not (tmp_path / "d").exists()  # nothing written


# --- first-run friction ------------------------------------------------------


def test_missing_pbc_data_points_to_synthetic(tmp_path, capsys):
  for kind in mc.KINDS:
    rc = mc.main(["--out", str(tmp_path / kind), "--kind", kind,
                  "--pbc_root", str(tmp_path / "nowhere")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--source synthetic" in err and "needs no shared data" in err
    assert not (tmp_path / kind).exists()


def test_help_describes_every_flag(capsys):
  parser = mc._parser()
  undocumented = [a.option_strings for a in parser._actions if not a.help]
  assert not undocumented
  with pytest.raises(SystemExit):
    mc.main(["--help"])
  text = capsys.readouterr().out
  for a in parser._actions:
    assert a.option_strings[-1] in text
