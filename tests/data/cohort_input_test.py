"""Slide-cohort input from real-world tools: Unicode forms of slide names,
stray spaces, semicolon CSVs, blank images, non-image files."""

import os
import unicodedata

import ml_collections
import numpy as np
import pytest
from PIL import Image

from slamjax.data import slides
from slamjax.data.slides import CohortError


def _cfg(root, **kw):
  d = dict(source="slides", root=str(root), csv="slides.csv", cells_csv="",
           label_columns=(), label_column="", negative_label="", image_size=8,
           unlisted="error", skip_bad_files=False,
           cache_dir=str(root) + "_cache", num_workers=1)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def _cells(folder, n, uniform=False):
  os.makedirs(folder, exist_ok=True)
  for i in range(n):
    if uniform:
      img = Image.new("RGB", (12, 12), (128, 128, 128))
    else:
      img = Image.linear_gradient("L").resize((12, 12)).rotate(30 * i).convert("RGB")
    img.save(os.path.join(folder, f"{i}.png"))


def test_slide_names_match_after_nfc_normalisation(tmp_path):
  nfd, nfc = unicodedata.normalize("NFD", "Zoë_1"), unicodedata.normalize("NFC", "Zoë_1")
  assert nfd != nfc
  _cells(tmp_path / nfd, 2)  # macOS writes the folder decomposed
  _cells(tmp_path / "b", 2)
  (tmp_path / "slides.csv").write_text(f"slide_id,label\n{nfc},1\nb,0\n", encoding="utf-8")
  c = slides.load_cohort(_cfg(tmp_path))
  assert c.slide_ids == (nfc, "b") and [len(x) for x in c.cells] == [2, 2]
  # And in the other direction, with the cell table.
  (tmp_path / "cells.csv").write_text(
      f"slide_id,path\n{nfd},{nfd}/0.png\nb,b/0.png\n", encoding="utf-8")
  c = slides.load_cohort(_cfg(tmp_path, cells_csv="cells.csv"))
  assert c.slide_ids == (nfc, "b")
  # Without a CSV the slide ids are NFC too.
  os.remove(tmp_path / "slides.csv")
  c = slides.load_cohort(_cfg(tmp_path), require_labels=False)
  assert set(c.slide_ids) == {nfc, "b"}


def test_trailing_space_and_case_mismatch_are_named(tmp_path):
  _cells(tmp_path / "P01 ", 2)
  _cells(tmp_path / "p02", 2)
  (tmp_path / "slides.csv").write_text("slide_id,label\nP01,1\nP02,0\n")
  with pytest.raises(CohortError) as e:
    slides.load_cohort(_cfg(tmp_path))
  msg = str(e.value)
  assert ("folder 'P01 ' differs only by trailing space(s): rename it to 'P01'" in msg
          and "folder 'p02' differs only in upper/lower case" in msg), msg


@pytest.mark.parametrize("sep,word", [(";", "semicolons"), ("\t", "tabs")])
def test_semicolon_csv_gets_a_comma_hint(tmp_path, sep, word):
  _cells(tmp_path / "a", 1)
  (tmp_path / "slides.csv").write_text(f"slide_id{sep}label\na{sep}1\n")
  with pytest.raises(CohortError, match=rf"values look separated by {word}\. Save it "
                     "with commas"):
    slides.load_cohort(_cfg(tmp_path))


def test_uniform_slides_warned_once_and_in_the_summary(tmp_path, capsys):
  _cells(tmp_path / "blank", 3, uniform=True)
  _cells(tmp_path / "blank2", 3, uniform=True)
  _cells(tmp_path / "ok", 3)
  (tmp_path / "slides.csv").write_text("slide_id,label\nblank,1\nblank2,1\nok,0\n")
  c = slides.load_cohort(_cfg(tmp_path))
  out = capsys.readouterr().out
  assert out.count("WARNING") == 1, out
  assert "the images of 2 slide(s) are nearly uniform" in out and "'blank'; 'blank2'" in out
  assert c.report["uniform_slides"] == ["blank", "blank2"]
  assert "2 slide(s) with nearly uniform images: blank, blank2" in c.summary()
  # A large slide is judged on a sample of its cells.
  imgs = np.zeros((100, 4, 4, 3), np.uint8)
  assert slides.uniform_slides(imgs, [np.arange(100)], ["s"]) == ["s"]
  imgs[:, ::2] = 255
  assert slides.uniform_slides(imgs, [np.arange(100)], ["s"]) == []


def test_non_image_files_are_named_in_the_summary(tmp_path):
  _cells(tmp_path / "a", 2)
  _cells(tmp_path / "b", 2)
  (tmp_path / "a" / "notes.txt").write_text("x")
  (tmp_path / "b" / "export.csv").write_text("x")
  (tmp_path / "slides.csv").write_text("slide_id,label\na,1\nb,0\n")
  c = slides.load_cohort(_cfg(tmp_path))
  assert "2 non-image file(s) ignored: a/notes.txt, b/export.csv" in c.summary()
