"""Writes a slide cohort of real image folders, for tests and demos.

Two kinds of cohort (``kind``):

* ``witness`` (the default): each patient gets one slide (some get two,
  sharing ``patient_id``, so that patient grouping matters). A negative
  slide holds normal cells only; a positive slide holds normal cells plus
  witness cells of one abnormal class at a per-patient rate drawn from
  ``witness_rate`` (at least one witness). Labels are balanced (half the
  patients positive). One obvious cell decides the label: an easy cohort.
* ``composition``: closer to a real cohort. Every patient (one slide each)
  holds the same two normal classes (``composition_classes``; PBC default
  eosinophils and neutrophils) plus a few cells of the other normal classes
  (``other_fraction``). Positives differ only in proportion: the first class
  is on average 40% of the two in negatives and 60% in positives
  (``composition_fractions``), with a Beta spread per patient
  (``composition_concentration``), so that single patients are ambiguous.
  Every patient gets its own stain (per-channel gain, brightness offset),
  blur and zoom, applied to all its cells, so that simple pixel statistics
  do not give the label away. Labels are 2:1 negative:positive; cells per
  patient vary (``min_cells``..``max_cells``) and positives have
  ``count_effect`` times more cells on average, with a spread wide enough
  that the count alone is only weakly predictive. ``patients.csv`` holds
  each patient's truth (fraction, cells per class, nuisance), and
  ``cohort.json`` what the simple baselines reach (``baseline_auc``).

Sources:

* ``pbc``: real cells from ``../shared/data/pbc`` (see its README). Witness
  kind: normal cells are lymphocytes and neutrophils, witnesses immature
  granulocytes (``ig``) or erythroblasts. Composition kind: the normal
  classes (basophil, eosinophil, lymphocyte, monocyte, neutrophil). No cell
  is used twice (across patients, slides or the ``new_out`` cohort) unless
  ``reuse=True``: if the pool is too small, the witness kind caps the cell
  counts (and the summary says so), the composition kind stops with an
  error that says what to change.
* ``synthetic``: cells drawn by ``slamjax.data.synthetic``; needs no shared
  data. Witness kind: ``normal`` versus ``blast`` witnesses. Composition
  kind: ``lymphocyte`` (the generator's ``normal``), ``neutrophil``,
  ``erythroblast`` and ``blast`` (no eosinophils, monocytes, basophils or
  ``ig``); default ``lymphocyte,neutrophil``. Every cell is unique unless
  ``reuse=True`` (then a pool of ``pool_size`` cells per class is rendered
  once and files repeat, which is fast for big cohorts).

New patients (``new_out``): ``new_patients`` further patients (one slide
each) go to a separate folder with no ``slides.csv``, their truth in
``truth_slides.csv`` and ``truth_cells.csv`` there (for predict demos).
``new_reserve`` sets a fraction of every source class aside, chosen by the
seed and the class alone: cohorts (``out``) draw only from the rest and new
patients only from that reserve, so new patients made in a later, separate
call share no source cell with a cohort made earlier with the same seed and
a ``new_reserve`` at least as large. The composition kind reserves 10% by
default, and its new patients depend on the seed and the new-patient
arguments only (``out`` may then be left out). The witness kind reserves
nothing by default, so that its cohorts stay as earlier versions wrote them;
its new patients then avoid the cells of the cohort written in the same
call only, and the summary counts (``shared_with_cohort_without_new_out``)
and ``shared_cells.csv`` lists the cells that they share with the cohort
these arguments write without ``new_out``.

Written (``out``)::

    slides.csv    slide_id, patient_id, label (0/1) [, diagnosis]
    cells.csv     slide_id, path, [witness (0/1),] cell_type, source: truth
    patients.csv  composition kind: per-patient truth
    cohort.json   the summary returned by make_cohort, with its parameters
    <slide_id>/[run_x/][field_k/]cNNNN.jpg|png   (mixed formats and depths)

``diagnosis`` (with ``diagnosis=True``) is a categorical column: ``normal``
or the witness class (composition kind: ``<first class>_rich``), for
``data.label_column='diagnosis'``, ``data.negative_label='normal'``.
``unlabeled=k`` leaves the labels of k slides empty.

Commands::

    # 60-patient PBC cohort plus 10 new patients to predict
    python -m slamjax.data.make_cohort --out /tmp/pbc60 --source pbc \\
        --new_out /tmp/pbc60_new --new_patients 10
    # 150 patients that differ by composition, with per-patient stain,
    # blur and zoom; 10 new patients made later share no cell with them
    python -m slamjax.data.make_cohort --kind composition --out /tmp/comp
    python -m slamjax.data.make_cohort --kind composition \\
        --new_out /tmp/comp_new --new_patients 10
    # a 200,000-cell cohort at 64 px for the memory check (files repeat)
    python -m slamjax.data.make_cohort --out /tmp/big --source pbc --reuse \\
        --patients 1100 --min_cells 120 --max_cells 250 --image_size 64 \\
        --second_slide_fraction 0

Example:
  >>> import tempfile
  >>> s = make_cohort(tempfile.mkdtemp(), source="synthetic", patients=4,
  ...                 min_cells=3, max_cells=6, image_size=24)
  >>> s["patients"], s["positive_patients"], s["reused_cells"]
  (4, 2, 0)
  >>> s = make_cohort(tempfile.mkdtemp(), kind="composition", source="synthetic",
  ...                 patients=6, min_cells=4, max_cells=8, image_size=24)
  >>> s["patients"], s["positive_patients"], s["cells_per_class"].keys()
  (6, 2, dict_keys(['lymphocyte', 'neutrophil']))
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import json
import os
import shutil
import sys
import time
import zlib

import numpy as np
from PIL import Image, ImageFilter

from slamjax.data import synthetic

DEFAULT_PBC_ROOT = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data",
    "pbc"))

KINDS = ("witness", "composition")
# (normal classes, witness classes) of each source, for the witness kind.
SOURCES = {
    "pbc": (("lymphocyte", "neutrophil"), ("ig", "erythroblast")),
    "synthetic": (("normal",), ("blast",)),
}
# Composition kind: the classes each source offers, its normal classes (the
# "other" cells come from these) and its default pair (first: the class that
# positives have more of). PBC: eosinophils and neutrophils are its two
# largest normal classes (3111 and 3328 cells), enough for 150 patients
# without reusing a cell; lymphocytes (1214) would allow about a third.
PBC_CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte",
               "monocyte", "neutrophil")
PBC_NORMAL = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
# Synthetic: composition class name -> the generator's morphology.
SYNTHETIC_CLASSES = {"lymphocyte": "normal", "neutrophil": "neutrophil",
                     "erythroblast": "erythroblast", "blast": "blast"}
SYNTHETIC_NORMAL = ("lymphocyte", "neutrophil")
COMPOSITION_DEFAULT = {"pbc": ("eosinophil", "neutrophil"),
                       "synthetic": ("lymphocyte", "neutrophil")}
# Defaults that differ between the kinds (None in make_cohort's signature).
KIND_DEFAULTS = {
    "witness": dict(patients=60, min_cells=20, max_cells=300,
                    positive_fraction=0.5, second_slide_fraction=0.2,
                    new_reserve=0.0),
    "composition": dict(patients=150, min_cells=10, max_cells=80,
                        positive_fraction=1 / 3, second_slide_fraction=0.0,
                        new_reserve=0.1),
}
# Composition-only arguments and their defaults.
COMPOSITION_ARGS = dict(
    composition_classes=None, composition_fractions=(0.4, 0.6),
    composition_concentration=20.0, other_fraction=0.1, count_effect=1.3,
    count_spread=0.7, stain=0.08, brightness=0.04, blur=1.5, zoom=0.1)
_MARKER = "cohort.json"


class CohortSpecError(ValueError):
  """Impossible generator arguments (e.g. more cells than the pool holds)."""


def _log_counts(u: np.ndarray, lo: int, hi: float) -> np.ndarray:
  """Cell counts log-uniform in [lo, hi] from uniforms u (many small slides)."""
  return np.maximum(lo, np.rint(np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo))))
                    ).astype(int)


class _Pool:
  """Source cells of one class, handed out without repeats until reuse."""

  def __init__(self, name, items, rng, reuse):
    self.name, self.items, self.reuse = name, items, reuse
    # Rendered-on-demand pools are unbounded: take them in order.
    self.order = rng.permutation(len(items)) if len(items) < 10**7 else None
    self.next = 0

  def take(self, n: int) -> list[int]:
    if not self.reuse and self.next + n > len(self.items):
      raise CohortSpecError(f"pool of {self.name!r} ran out ({len(self.items)} cells)")
    if n and not len(self.items):
      raise CohortSpecError(f"pool of {self.name!r} is empty")
    # Cycling a permutation spreads repeats evenly; no repeat within a slide
    # while a slide holds fewer cells than the pool.
    if self.order is None:
      out = list(range(self.next, self.next + n))
    else:
      out = [int(self.order[(self.next + k) % len(self.items)]) for k in range(n)]
    self.next += n
    return out

  @property
  def reused(self) -> int:
    return max(0, self.next - len(self.items))


def _missing_pbc(where: str) -> CohortSpecError:
  return CohortSpecError(
      f"PBC data not found: {where}. Pass --pbc_root DIR (the folder with one "
      "sub-folder per cell class; see ../shared/data/pbc/README.md), or use "
      "--source synthetic, which draws cells procedurally and needs no shared data")


def _pbc_items(pbc_root, classes):
  if not os.path.isdir(pbc_root):
    raise _missing_pbc(f"{pbc_root} does not exist")
  items = {}
  for c in classes:
    d = os.path.join(pbc_root, c)
    if not os.path.isdir(d):
      raise _missing_pbc(f"class folder {d} not found")
    items[c] = [os.path.join(d, f) for f in sorted(os.listdir(d))
                if f.lower().endswith((".jpg", ".jpeg", ".png"))]
  return items


def _split(items, reserve: float, seed: int, name: str):
  """(cohort part, new-patient part) of one source class.

  The new-patient part is the last ``round(reserve * n)`` cells of a
  permutation fixed by (seed, class name) alone, so it is the same in every
  call, whatever else is asked, and a larger reserve contains a smaller one.
  """
  if reserve <= 0:
    return items, items[:0] if isinstance(items, list) else None
  n = len(items)
  n_new = int(round(reserve * n))
  if isinstance(items, _SyntheticItems):  # unbounded: split the index range
    return (_SyntheticItems(items.classes, n - n_new, items.offset),
            _SyntheticItems(items.classes, n_new, items.offset + n - n_new))
  perm = np.random.default_rng([seed, 29, zlib.crc32(name.encode())]).permutation(n)
  new = np.zeros(n, bool)
  new[perm[n - n_new:]] = True
  return ([x for x, b in zip(items, new) if not b], [x for x, b in zip(items, new) if b])


def _plan(rng, patients, positive_fraction, second_slide_fraction, witness_rate,
          witness_classes, prefix, allow_second):
  """Patients -> slide specs (no cell counts yet)."""
  n_pos = int(round(patients * positive_fraction))
  positive = np.zeros(patients, bool)
  positive[rng.permutation(patients)[:n_pos]] = True
  # Alternate witness classes over positives for balanced diagnoses.
  wclass = {p: witness_classes[k % len(witness_classes)]
            for k, p in enumerate(rng.permutation(np.flatnonzero(positive)))}
  slides = []
  for p in range(patients):
    rate = float(rng.uniform(*witness_rate)) if positive[p] else 0.0
    n_slides = 2 if allow_second and rng.random() < second_slide_fraction else 1
    for s in range(n_slides):
      slides.append(dict(
          slide_id=f"{prefix}{p:03d}_S{s + 1}", patient_id=f"{prefix}{p:03d}",
          label=int(positive[p]), witness_class=wclass.get(p, ""),
          witness_rate=rate, u=float(rng.random()),
          layout=int(rng.integers(3)), seed=int(rng.integers(2**31))))
  return slides


def _set_counts(slides, lo, hi):
  counts = _log_counts(np.asarray([s["u"] for s in slides]), lo, hi)
  for s, n in zip(slides, counts):
    s["num_cells"] = int(n)
    s["num_witness"] = (min(int(n) - 1, max(1, int(round(s["witness_rate"] * n))))
                        if s["label"] else 0)
    if s["label"] and n == 1:
      s["num_witness"] = 1  # a one-cell positive slide is all witness


def _needs(slides, normal_key):
  need: dict[str, int] = {}
  for s in slides:
    need[normal_key] = need.get(normal_key, 0) + s["num_cells"] - s["num_witness"]
    if s["num_witness"]:
      need[s["witness_class"]] = need.get(s["witness_class"], 0) + s["num_witness"]
  return need


def _encode(img: Image.Image, ext: str) -> bytes:
  buf = io.BytesIO()
  if ext == ".png":
    img.save(buf, format="PNG")
  else:
    img.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def make_cohort(out: str | None, *, kind: str = "witness", source: str = "synthetic",
                patients: int | None = None, seed: int = 0,
                pbc_root: str = DEFAULT_PBC_ROOT, min_cells: int | None = None,
                max_cells: int | None = None, image_size: int | None = None,
                witness_rate=None, positive_fraction: float | None = None,
                second_slide_fraction: float | None = None,
                png_fraction: float = 0.3, diagnosis: bool = False,
                unlabeled: int = 0, reuse: bool = False, pool_size: int = 2000,
                new_out: str | None = None, new_patients: int = 0,
                new_reserve: float | None = None, composition_classes=None,
                composition_fractions=None, composition_concentration=None,
                other_fraction=None, count_effect=None, count_spread=None,
                stain=None, brightness=None, blur=None, zoom=None,
                overwrite: bool = False, num_workers: int = 0,
                verbose: bool = False) -> dict:
  """Writes a cohort to ``out`` (see the module docstring); returns its summary.

  Arguments left as None take the defaults of ``kind`` (``KIND_DEFAULTS``,
  ``COMPOSITION_ARGS``).

  Args:
    out: folder to create (must be absent or empty, or a cohort written
      before, with ``overwrite=True``). May be None for the composition kind
      with ``new_out``: new patients only.
    kind: 'witness' or 'composition' (see the module docstring).
    source: 'pbc' or 'synthetic'.
    patients: number of patients in ``out`` (witness 60, composition 150).
    seed: everything (files, labels, counts) is a function of the arguments.
    pbc_root: the PBC class folders (source='pbc').
    min_cells, max_cells: cells per slide (witness: log-uniform in between,
      20..300; composition: 10..80, see ``count_spread``).
    image_size: side of written images (pbc default: the source's 128 px,
      copied byte for byte where possible; synthetic default 64).
    witness_rate: witness kind: (low, high) of the per-patient witness
      fraction; default (0.02, 0.2).
    positive_fraction: fraction of positive patients (witness 0.5,
      composition 1/3).
    second_slide_fraction: witness kind: chance that a patient gets a second
      slide (default 0.2).
    png_fraction: fraction of files written as PNG (the rest JPEG).
    diagnosis: also write a categorical ``diagnosis`` column.
    unlabeled: number of slides whose labels are left empty.
    reuse: allow a source cell in several slides (big cohorts).
    pool_size: synthetic with reuse: cells rendered per class.
    new_out, new_patients: a second, unlabeled cohort of new patients.
    new_reserve: fraction of every source class kept for new patients only
      (witness 0, composition 0.1; see the module docstring).
    composition_classes: composition kind: the two classes whose proportion
      differs, first the one positives have more of (pbc default
      eosinophil, neutrophil; synthetic lymphocyte, neutrophil).
    composition_fractions: mean fraction of the first class among the two,
      (negatives, positives); default (0.4, 0.6).
    composition_concentration: Beta concentration of the per-patient
      fraction (default 20: standard deviation 0.11 around 0.4 or 0.6).
    other_fraction: share of cells from the source's other normal classes
      (default 0.1; none where the source has no other normal class).
    count_effect: mean cell count of positives over that of negatives
      (default 1.3; 1 = none).
    count_spread: standard deviation of log(cell count) before it is kept
      within [min_cells, max_cells] (default 0.7).
    stain: per-patient colour: standard deviation of log(gain) per RGB
      channel (default 0.08).
    brightness: per-patient brightness offset, standard deviation in [0, 1]
      units (default 0.04).
    blur: per-patient Gaussian blur, sigma uniform in [0, blur] pixels of a
      128-px image (scaled to ``image_size``; default 1.5).
    zoom: per-patient scale uniform in [1 - zoom, 1 + zoom] about the
      centre, image size kept (default 0.1).
    overwrite: replace ``out``/``new_out`` if they hold an earlier cohort.
    num_workers: writer threads (0 = CPU count).
    verbose: print progress.
  """
  t0 = time.time()
  if kind not in KINDS:
    raise CohortSpecError(f"kind={kind!r}; valid: {list(KINDS)}")
  if source not in SOURCES:
    raise CohortSpecError(f"source={source!r}; valid: {sorted(SOURCES)}")
  given = dict(patients=patients, min_cells=min_cells, max_cells=max_cells,
               positive_fraction=positive_fraction,
               second_slide_fraction=second_slide_fraction, new_reserve=new_reserve)
  a = {k: KIND_DEFAULTS[kind][k] if v is None else v for k, v in given.items()}
  comp_given = dict(composition_classes=composition_classes,
                    composition_fractions=composition_fractions,
                    composition_concentration=composition_concentration,
                    other_fraction=other_fraction, count_effect=count_effect,
                    count_spread=count_spread, stain=stain, brightness=brightness,
                    blur=blur, zoom=zoom)
  if kind == "witness":
    wrong = [k for k, v in comp_given.items() if v is not None]
    if wrong:
      raise CohortSpecError(f"{', '.join('--' + k for k in wrong)}: only for "
                            "--kind composition")
    if out is None:
      raise CohortSpecError("--out is required for --kind witness")
  else:
    if witness_rate is not None:
      raise CohortSpecError("--witness_rate: only for --kind witness")
    if a["second_slide_fraction"]:
      raise CohortSpecError("--kind composition writes one slide per patient; "
                            "leave --second_slide_fraction out")
    if out is None and not new_out:
      raise CohortSpecError("pass --out, --new_out or both")
  if not 1 <= a["min_cells"] <= a["max_cells"]:
    raise CohortSpecError(f"need 1 <= min_cells <= max_cells, got {a['min_cells']}, "
                          f"{a['max_cells']}")
  if out is not None and a["patients"] < 2:
    raise CohortSpecError(f"patients must be >= 2, got {a['patients']}")
  if not 0 <= a["new_reserve"] < 1:
    raise CohortSpecError(f"new_reserve must be in [0, 1), got {a['new_reserve']}")
  if not 0 <= a["positive_fraction"] <= 1:
    raise CohortSpecError(f"positive_fraction must be in [0, 1], got "
                          f"{a['positive_fraction']}")
  if source == "pbc" and not os.path.isdir(pbc_root):
    raise _missing_pbc(f"{pbc_root} does not exist")
  new_patients = new_patients if new_out else 0
  common = dict(source=source, seed=seed, pbc_root=pbc_root,
                image_size=image_size, png_fraction=png_fraction,
                diagnosis=diagnosis, unlabeled=unlabeled, reuse=reuse,
                pool_size=pool_size, new_patients=new_patients,
                overwrite=overwrite, num_workers=num_workers, verbose=verbose, t0=t0)
  if kind == "witness":
    return _witness(out, new_out, witness_rate=tuple(witness_rate or (0.02, 0.2)),
                    **a, **common)
  c = {k: COMPOSITION_ARGS[k] if v is None else v for k, v in comp_given.items()}
  return _composition(out, new_out, **a, **c, **common)


def _witness_plan(*, source, seed, pbc_root, patients, new_patients, min_cells,
                  max_cells, witness_rate, positive_fraction,
                  second_slide_fraction, unlabeled, reuse, pool_size,
                  new_reserve, verbose):
  """Slides, pools and each slide's cells (nothing written).

  With ``new_reserve=0`` this is the plan of earlier versions, exactly.
  """
  normal_classes, witness_classes = SOURCES[source]
  rng = np.random.default_rng([seed, 17])
  slides = _plan(rng, patients, positive_fraction, second_slide_fraction,
                 witness_rate, witness_classes, "P", True)
  # With a reserve, new patients do not depend on the cohort's arguments.
  new_rng = np.random.default_rng([seed, 19]) if new_reserve else rng
  new_slides = (_plan(new_rng, new_patients, positive_fraction, 0.0, witness_rate,
                      witness_classes, "N", False) if new_patients else [])
  if unlabeled > len(slides):
    raise CohortSpecError(f"unlabeled={unlabeled} > {len(slides)} slides")
  for i in rng.choice(len(slides), unlabeled, replace=False):
    slides[int(i)]["unlabeled"] = True

  # Source pools, split into the cohort part and the new-patient reserve.
  # Normal classes are merged into one pool (a natural mix).
  if source == "pbc":
    items = _pbc_items(pbc_root, normal_classes + witness_classes)
  else:
    size = pool_size if reuse else 10**9  # rendered on demand: unbounded
    items = {c: _SyntheticItems((c,), size) for c in normal_classes + witness_classes}
  parts = {c: _split(v, new_reserve, seed, c) for c, v in items.items()}
  def pool_items_of(k):
    if source == "pbc":
      d = {"normal": [(c, p) for c in normal_classes for p in parts[c][k]]}
      d.update({c: [(c, p) for p in parts[c][k]] for c in witness_classes})
    else:
      d = {"normal": parts[normal_classes[0]][k]}
      d.update({c: parts[c][k] for c in witness_classes})
    return d
  pool_items = pool_items_of(0)

  # Cap cells per slide so that the pools last without reuse.
  if new_reserve:
    new_items = pool_items_of(1)
    hi, capped = _fit_counts(slides, pool_items, min_cells, max_cells, reuse, verbose)
    if new_slides:
      _fit_counts(new_slides, new_items, min_cells, max_cells, reuse, verbose,
                  " new patients'")
    pool_items.update({"new:" + k: v for k, v in new_items.items()})
  else:
    hi, capped = _fit_counts(slides + new_slides, pool_items, min_cells, max_cells,
                             reuse, verbose)

  pools = {k: _Pool(k, v, np.random.default_rng([seed, 23, i]), reuse)
           for i, (k, v) in enumerate(sorted(
               (k, v) for k, v in pool_items.items() if not k.startswith("new:")))}
  pools.update({k: _Pool(k, v, np.random.default_rng([seed, 24, i]), reuse)
                for i, (k, v) in enumerate(sorted(
                    (k, v) for k, v in pool_items.items() if k.startswith("new:")))})
  cells = {}
  for slide_list, pre in ((slides, ""), (new_slides, "new:" if new_reserve else "")):
    for s in slide_list:
      srng = np.random.default_rng(s["seed"])
      normal = pools[pre + "normal"].take(s["num_cells"] - s["num_witness"])
      cl = [(pre + "normal", i, 0) for i in normal]
      if s["num_witness"]:
        cl += [(pre + s["witness_class"], i, 1)
               for i in pools[pre + s["witness_class"]].take(s["num_witness"])]
      cells[s["slide_id"]] = ([cl[k] for k in srng.permutation(len(cl))], srng)
  return dict(slides=slides, new_slides=new_slides, pool_items=pool_items,
              pools=pools, cells=cells, hi=hi, capped=capped)


def _fit_counts(slide_list, pool_items, min_cells, max_cells, reuse, verbose,
                what=""):
  """Sets the cell counts of slide_list; caps them when the pools are short."""
  hi = float(max_cells)
  _set_counts(slide_list, min_cells, hi)
  def fits(need):
    return all(need[k] <= len(pool_items[k]) for k in need)
  capped = False
  if not reuse and not fits(_needs(slide_list, "normal")):
    lo_hi, up = float(min_cells), hi
    _set_counts(slide_list, min_cells, lo_hi)
    if not fits(_needs(slide_list, "normal")):
      need = _needs(slide_list, "normal")
      raise CohortSpecError(
          f"{len(slide_list)}{what} slides of >= {min_cells} cells need {need} source "
          f"cells but the pools hold { {k: len(v) for k, v in pool_items.items()} }; "
          "use fewer patients, a smaller --min_cells or --reuse")
    for _ in range(40):  # bisect the largest cap that fits
      mid = (lo_hi + up) / 2
      _set_counts(slide_list, min_cells, mid)
      lo_hi, up = (mid, up) if fits(_needs(slide_list, "normal")) else (lo_hi, mid)
    hi, capped = lo_hi, True
    _set_counts(slide_list, min_cells, hi)
    if verbose:
      print(f"make_cohort: capped cells per slide{what} at {int(hi)} so that no "
            "source cell is reused (pass --reuse to allow reuse)", flush=True)
  return hi, capped


def _source_of(source, pbc_root, pool_items, pool_name, item):
  """(cell_type, source id) of one pool item."""
  if source == "pbc":
    cell_type, src = pool_items[pool_name][item]
    return cell_type, os.path.relpath(src, pbc_root).replace(os.sep, "/")
  return pool_items[pool_name].cell(item)


def _witness(out, new_out, *, source, seed, pbc_root, patients, min_cells,
             max_cells, image_size, witness_rate, positive_fraction,
             second_slide_fraction, png_fraction, diagnosis, unlabeled, reuse,
             pool_size, new_patients, new_reserve, overwrite, num_workers,
             verbose, t0):
  if image_size is None:
    image_size = 64 if source == "synthetic" else None
  for d in [out] + ([new_out] if new_out else []):
    _prepare_dir(d, overwrite)
  args = dict(source=source, seed=seed, pbc_root=pbc_root, patients=patients,
              min_cells=min_cells, max_cells=max_cells, witness_rate=witness_rate,
              positive_fraction=positive_fraction,
              second_slide_fraction=second_slide_fraction, unlabeled=unlabeled,
              reuse=reuse, pool_size=pool_size, new_reserve=new_reserve)
  plan = _witness_plan(new_patients=new_patients, verbose=verbose, **args)
  slides, new_slides = plan["slides"], plan["new_slides"]
  pool_items, pools, hi = plan["pool_items"], plan["pools"], plan["hi"]

  jobs, rows_main, rows_new = [], [], []
  for slide_list, root, rows in ((slides, out, rows_main), (new_slides, new_out, rows_new)):
    for s in slide_list:
      cells, srng = plan["cells"][s["slide_id"]]
      n_fields = int(srng.integers(1, 5))
      for j, (pool_name, item, w) in enumerate(cells):
        sub = ("" if s["layout"] == 0 else
               f"field_{j % n_fields}/" if s["layout"] == 1 else
               f"run_{'ab'[j % 2]}/field_{j % n_fields}/")
        r = srng.random()
        ext = ".png" if r < png_fraction else (".JPG" if r > 0.95 else ".jpg")
        rel = f"{s['slide_id']}/{sub}c{j:04d}{ext}"
        cell_type, src = _source_of(source, pbc_root, pool_items, pool_name, item)
        jobs.append((os.path.join(root, rel), pool_name, item, ext.lower()))
        rows.append(dict(slide_id=s["slide_id"], path=rel, witness=w,
                         cell_type=cell_type, source=src))

  writer = _Writer(source, pool_items, image_size, seed)
  _run_jobs(writer.write, jobs, num_workers, verbose, t0)

  columns = ["slide_id", "patient_id", "label"] + (["diagnosis"] if diagnosis else [])
  def slide_row(s):
    empty = s.get("unlabeled", False)
    row = dict(slide_id=s["slide_id"], patient_id=s["patient_id"],
               label="" if empty else s["label"])
    if diagnosis:
      row["diagnosis"] = "" if empty else (s["witness_class"] or "normal")
    return row
  _write_csv(os.path.join(out, "slides.csv"), columns, [slide_row(s) for s in slides])
  cell_cols = ["slide_id", "path", "witness", "cell_type", "source"]
  _write_csv(os.path.join(out, "cells.csv"), cell_cols, rows_main)

  def describe(slide_list, rows):
    n = np.asarray([s["num_cells"] for s in slide_list] or [0])
    pos = [s for s in slide_list if s["label"]]
    return dict(
        patients=len({s["patient_id"] for s in slide_list}),
        slides=len(slide_list), cells=int(n.sum()),
        cells_per_slide=[int(n.min()), int(np.median(n)), int(n.max())],
        positive_patients=len({s["patient_id"] for s in pos}),
        positive_slides=len(pos),
        patients_with_two_slides=sum(
            1 for p in {s["patient_id"] for s in slide_list}
            if sum(s["patient_id"] == p for s in slide_list) > 1),
        unlabeled_slides=sum(bool(s.get("unlabeled")) for s in slide_list),
        witness_cells=int(sum(r["witness"] for r in rows)),
        witness_rate_range=([round(min(s["witness_rate"] for s in pos), 3),
                             round(max(s["witness_rate"] for s in pos), 3)]
                            if pos else None),
        png_files=sum(r["path"].endswith(".png") for r in rows))

  parameters = dict(kind="witness", image_size=image_size, png_fraction=png_fraction,
                    diagnosis=diagnosis, new_patients=new_patients, **args)
  parameters["witness_rate"] = list(witness_rate)
  summary = dict(
      out=os.path.abspath(out), kind="witness", source=source, seed=seed,
      image_size=image_size or 128, **describe(slides, rows_main),
      max_cells_requested=max_cells, max_cells_used=int(hi), capped=plan["capped"],
      reuse=reuse, reused_cells=int(sum(p.reused for p in pools.values())),
      columns=columns, new_reserve=new_reserve, seconds=None)
  if new_slides:
    _write_csv(os.path.join(new_out, "truth_slides.csv"), columns,
               [slide_row(s) for s in new_slides])
    _write_csv(os.path.join(new_out, "truth_cells.csv"), cell_cols, rows_new)
    summary["new"] = dict(out=os.path.abspath(new_out), **describe(new_slides, rows_new))
    if new_reserve:
      summary["new"]["note"] = (
          f"cells from the new-patient reserve ({new_reserve:g} of every class, "
          f"fixed by seed {seed}): shared with no cohort of this seed made with "
          f"new_reserve >= {new_reserve:g}")
    else:
      # No reserve: say which cells a cohort made in another call shares.
      alone = _witness_plan(new_patients=0, verbose=False, **args)
      used = {_source_of(source, pbc_root, alone["pool_items"], pn, it)[1]
              for cl, _ in alone["cells"].values() for pn, it, _ in cl}
      shared = [r for r in rows_new if r["source"] in used]
      if shared:
        _write_csv(os.path.join(new_out, "shared_cells.csv"),
                   ["slide_id", "path", "cell_type", "source"],
                   [{k: r[k] for k in ("slide_id", "path", "cell_type", "source")}
                    for r in shared])
      summary["new"]["shared_with_cohort_without_new_out"] = len(shared)
      summary["new"]["note"] = (
          f"{len(shared)} of these {len(rows_new)} cells are also in the cohort "
          "that these arguments write without --new_out"
          + (" (listed in shared_cells.csv)" if shared else "") + "; none is in "
          "the cohort written with them. To keep "
          "new patients apart from cohorts made in other calls, pass the same "
          "--new_reserve (e.g. 0.1) to every call with this seed, or use --kind "
          "composition")
      if verbose and shared:
        print(f"make_cohort: note: {summary['new']['note']}", file=sys.stderr,
              flush=True)
    with open(os.path.join(new_out, _MARKER), "w") as f:
      json.dump(summary["new"], f, indent=1)
  summary["parameters"] = parameters
  summary["seconds"] = round(time.time() - t0, 2)
  with open(os.path.join(out, _MARKER), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def _count_distributions(lo, hi, spread, effect):
  """Cell-count distributions of negatives and positives over lo..hi.

  Negatives: log(count) normal about log(sqrt(lo * hi)) with sd ``spread``,
  kept within [lo, hi]. Positives: the same tilted by count**beta, beta
  chosen so that their mean is ``effect`` times the negatives' mean.
  """
  n = np.arange(lo, hi + 1)
  if spread <= 0:
    raise CohortSpecError(f"count_spread must be > 0, got {spread}")
  if effect <= 0:
    raise CohortSpecError(f"count_effect must be > 0, got {effect}")
  logw = -0.5 * ((np.log(n) - 0.5 * np.log(lo * hi)) / spread) ** 2 - np.log(n)
  def dist(beta):
    x = logw + beta * np.log(n)
    w = np.exp(x - x.max())
    return w / w.sum()
  p0 = dist(0.0)
  m0 = float(p0 @ n)
  if abs(effect - 1.0) < 1e-9:
    return n, p0, p0
  lo_b, up_b = -60.0, 60.0
  if not float(dist(lo_b) @ n) / m0 < effect < float(dist(up_b) @ n) / m0:
    raise CohortSpecError(
        f"count_effect={effect}: negatives average {m0:.1f} cells in "
        f"[{lo}, {hi}], so positives cannot average {effect:g} times that; widen "
        "--min_cells/--max_cells or use a count_effect nearer 1")
  for _ in range(100):
    mid = (lo_b + up_b) / 2
    lo_b, up_b = (mid, up_b) if float(dist(mid) @ n) / m0 < effect else (lo_b, mid)
  return n, p0, dist(lo_b)


def _auc(scores, labels) -> float | None:
  """Area under the ROC curve (ties count half); None without both labels."""
  s, y = np.asarray(scores, float), np.asarray(labels, bool)
  if y.all() or not y.any():
    return None
  order = np.argsort(s, kind="stable")
  ranks = np.empty(len(s))
  ranks[order] = np.arange(1, len(s) + 1)
  for v in np.unique(s):  # average ranks of ties
    m = s == v
    ranks[m] = ranks[m].mean()
  n1 = y.sum()
  return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(s) - n1)))


def _composition_classes(source, composition_classes):
  """(first, second), the other normal classes and the names a source offers."""
  cls = composition_classes or COMPOSITION_DEFAULT[source]
  if isinstance(cls, str):
    cls = [c.strip() for c in cls.split(",") if c.strip()]
  cls = tuple(cls)
  offered = PBC_CLASSES if source == "pbc" else tuple(SYNTHETIC_CLASSES)
  normal = PBC_NORMAL if source == "pbc" else SYNTHETIC_NORMAL
  if len(cls) != 2 or cls[0] == cls[1]:
    raise CohortSpecError(f"composition_classes needs two different classes, got {cls}")
  bad = [c for c in cls if c not in offered]
  if bad:
    hint = ("; the synthetic generator draws no eosinophils, monocytes, basophils or "
            "immature granulocytes (ig): use e.g. --composition_classes "
            "lymphocyte,neutrophil, or --source pbc" if source == "synthetic" else "")
    raise CohortSpecError(f"composition class(es) {bad} not offered by source "
                          f"{source!r}; it offers {list(offered)}{hint}")
  return cls, tuple(c for c in normal if c not in cls)


def _composition_patients(*, seed, tag, prefix, count, positive_fraction, classes,
                          others, fractions, concentration, other_fraction,
                          counts, nuisance):
  """Per-patient plan: label, cell counts per class, nuisance, layout."""
  rng = np.random.default_rng([seed, 41, tag])
  n_pos = int(round(count * positive_fraction))
  positive = np.zeros(count, bool)
  positive[rng.permutation(count)[:n_pos]] = True
  values, dists = counts[0], counts[1:]
  stain, brightness, blur, zoom = nuisance
  pats = []
  for p in range(count):
    r = np.random.default_rng([seed, 42, tag, p])
    y = int(positive[p])
    n = int(r.choice(values, p=dists[y]))
    mu = fractions[y]
    f = float(r.beta(mu * concentration, (1 - mu) * concentration))
    n_other = int(r.binomial(n, other_fraction)) if others else 0
    n_first = int(r.binomial(n - n_other, f))
    per_class = {classes[0]: n_first, classes[1]: n - n_other - n_first}
    if others:
      per_class.update(zip(others, (int(k) for k in r.multinomial(
          n_other, [1 / len(others)] * len(others)))))
    nz = dict(gain=[float(g) for g in np.exp(r.normal(0.0, stain, 3))],
              offset=float(r.normal(0.0, brightness)),
              blur=float(r.uniform(0.0, blur)),
              zoom=float(r.uniform(1 - zoom, 1 + zoom)))
    pats.append(dict(slide_id=f"{prefix}{p:03d}_S1", patient_id=f"{prefix}{p:03d}",
                     label=y, fraction=f, num_cells=n, per_class=per_class,
                     nuisance=nz, layout=int(r.integers(3)),
                     seed=int(r.integers(2**31))))
  return pats


def _apply_nuisance(img: Image.Image, size: int, nz: dict) -> Image.Image:
  """Zoom about the centre, resize to size, blur, then stain and brightness."""
  w = img.width
  side = w / nz["zoom"]
  arr = np.asarray(img.convert("RGB"))
  pad = int(np.ceil(max(0.0, (side - w) / 2))) + 2  # reflect for zoom < 1
  arr = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
  c = arr.shape[0] / 2
  box = (c - side / 2, c - side / 2, c + side / 2, c + side / 2)
  img = Image.fromarray(arr).resize((size, size), Image.BICUBIC, box=box)
  sigma = nz["blur"] * size / 128
  if sigma > 0.05:
    img = img.filter(ImageFilter.GaussianBlur(sigma))
  x = np.asarray(img, np.float32) * np.asarray(nz["gain"], np.float32) + 255 * nz["offset"]
  return Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))


class _CompositionWriter:
  """Reads (or renders) one source cell, applies its patient's nuisance, writes."""

  def __init__(self, source, pool_items, image_size, seed):
    self.source, self.pool_items = source, pool_items
    self.image_size, self.seed = image_size, seed

  def write(self, job):
    path, key, item, ext, nz = job
    if self.source == "pbc":
      with Image.open(self.pool_items[key][item][1]) as im:
        img = im.convert("RGB")
    else:
      items = self.pool_items[key]
      morph, _ = items.cell(item)
      rng = np.random.default_rng(
          [self.seed, list(synthetic.MORPHOLOGIES).index(morph), items.index(item)])
      arr = synthetic.render_cell(rng, synthetic.MORPHOLOGIES[morph], self.image_size)
      img = Image.fromarray(np.round(arr * 255).astype(np.uint8))
    img = _apply_nuisance(img, self.image_size, nz)
    with open(path, "wb") as f:
      f.write(_encode(img, ext))
    return np.asarray(img, np.float32).mean((0, 1)) / 255


def _composition(out, new_out, *, source, seed, pbc_root, patients, min_cells,
                 max_cells, image_size, positive_fraction, second_slide_fraction,
                 png_fraction, diagnosis, unlabeled, reuse, pool_size,
                 new_patients, new_reserve, composition_classes,
                 composition_fractions, composition_concentration, other_fraction,
                 count_effect, count_spread, stain, brightness, blur, zoom,
                 overwrite, num_workers, verbose, t0):
  del second_slide_fraction  # always 0 here (checked by make_cohort)
  classes, others = _composition_classes(source, composition_classes)
  fractions = tuple(float(f) for f in composition_fractions)
  if len(fractions) != 2 or not all(0 < f < 1 for f in fractions):
    raise CohortSpecError(f"composition_fractions needs two values in (0, 1), got "
                          f"{composition_fractions}")
  if composition_concentration <= 0:
    raise CohortSpecError(f"composition_concentration must be > 0, got "
                          f"{composition_concentration}")
  if not 0 <= other_fraction < 1:
    raise CohortSpecError(f"other_fraction must be in [0, 1), got {other_fraction}")
  if min(stain, brightness, blur) < 0 or not 0 <= zoom < 1:
    raise CohortSpecError("stain, brightness and blur must be >= 0 and zoom in [0, 1)")
  if new_out and new_patients and not new_reserve:
    raise CohortSpecError("--kind composition draws new patients from the "
                          "new-patient reserve: --new_reserve must be > 0")
  if image_size is None:
    image_size = 64 if source == "synthetic" else 128
  counts = _count_distributions(min_cells, max_cells, count_spread, count_effect)
  all_classes = classes + others
  if source == "pbc":
    items = _pbc_items(pbc_root, all_classes)
    items = {c: [(c, p) for p in v] for c, v in items.items()}
  else:
    size = pool_size if reuse else 10**9
    items = {c: _SyntheticItems((SYNTHETIC_CLASSES[c],), size) for c in all_classes}
  parts = {c: _split(v, new_reserve, seed, c) for c, v in items.items()}

  plan_args = dict(seed=seed, positive_fraction=positive_fraction, classes=classes,
                   others=others, fractions=fractions,
                   concentration=composition_concentration,
                   other_fraction=other_fraction, counts=counts,
                   nuisance=(stain, brightness, blur, zoom))
  groups = []  # (root, patients, pool prefix)
  if out is not None:
    groups.append((out, _composition_patients(tag=0, prefix="P", count=patients,
                                              **plan_args), ""))
  if new_out and new_patients:
    groups.append((new_out, _composition_patients(tag=1, prefix="N", count=new_patients,
                                                  **plan_args), "new:"))
  pool_items, pools = {}, {}
  for k, (pre, tag) in enumerate((("", 47), ("new:", 48))):
    for c in all_classes:
      pool_items[pre + c] = parts[c][k] if parts[c][k] is not None else []
      pools[pre + c] = _Pool(pre + c, pool_items[pre + c], np.random.default_rng(
          [seed, tag, zlib.crc32(c.encode())]), reuse)
  for root, pats, pre in groups:  # enough source cells?
    need = {c: sum(p["per_class"].get(c, 0) for p in pats) for c in all_classes}
    short = {c: (need[c], len(pool_items[pre + c])) for c in all_classes
             if need[c] > len(pool_items[pre + c])}
    if short and not reuse:
      what = "new patients" if pre else "the cohort"
      raise CohortSpecError(
          f"{len(pats)} patients ({what}) need more source cells than the pool "
          "holds: " + ", ".join(
              f"{c}: {n} needed, {h} available" for c, (n, h) in short.items())
          + f" (new_reserve={new_reserve:g} of every class is kept for new "
          "patients); use fewer --patients, a smaller --max_cells or --min_cells, "
          "other --composition_classes, or --reuse (source cells then repeat "
          "across patients)")

  if unlabeled and out is None:
    raise CohortSpecError("--unlabeled needs --out")
  main_pats = groups[0][1] if out is not None else []
  if unlabeled > len(main_pats):
    raise CohortSpecError(f"unlabeled={unlabeled} > {len(main_pats)} slides")
  for i in np.random.default_rng([seed, 53]).choice(len(main_pats), unlabeled,
                                                    replace=False):
    main_pats[int(i)]["unlabeled"] = True
  for d in [root for root, _, _ in groups]:
    _prepare_dir(d, overwrite)

  jobs, rows = [], {}
  for root, pats, pre in groups:
    rows[root] = []
    for s in pats:
      srng = np.random.default_rng(s["seed"])
      cells = [(pre + c, i, c) for c in all_classes
               for i in pools[pre + c].take(s["per_class"].get(c, 0))]
      cells = [cells[k] for k in srng.permutation(len(cells))]
      n_fields = int(srng.integers(1, 5))
      for j, (key, item, cell_type) in enumerate(cells):
        sub = ("" if s["layout"] == 0 else
               f"field_{j % n_fields}/" if s["layout"] == 1 else
               f"run_{'ab'[j % 2]}/field_{j % n_fields}/")
        r = srng.random()
        ext = ".png" if r < png_fraction else (".JPG" if r > 0.95 else ".jpg")
        rel = f"{s['slide_id']}/{sub}c{j:04d}{ext}"
        jobs.append((os.path.join(root, rel), key, item, ext.lower(), s["nuisance"]))
        rows[root].append(dict(slide_id=s["slide_id"], path=rel, cell_type=cell_type,
                               source=_source_of(source, pbc_root, pool_items, key,
                                                 item)[1]))
  writer = _CompositionWriter(source, pool_items, image_size, seed)
  means = _run_jobs(writer.write, jobs, num_workers, verbose, t0)

  columns = ["slide_id", "patient_id", "label"] + (["diagnosis"] if diagnosis else [])
  positive_name = f"{classes[0]}_rich"
  def slide_row(s):
    empty = s.get("unlabeled", False)
    row = dict(slide_id=s["slide_id"], patient_id=s["patient_id"],
               label="" if empty else s["label"])
    if diagnosis:
      row["diagnosis"] = "" if empty else (positive_name if s["label"] else "normal")
    return row
  patient_cols = (["patient_id", "slide_id", "label", "num_cells",
                   f"{classes[0]}_fraction_drawn"]
                  + [f"n_{c}" for c in all_classes]
                  + ["gain_r", "gain_g", "gain_b", "brightness", "blur_sigma", "zoom"])
  def patient_row(s):
    nz = s["nuisance"]
    row = {"patient_id": s["patient_id"], "slide_id": s["slide_id"],
           "label": s["label"], "num_cells": s["num_cells"],
           f"{classes[0]}_fraction_drawn": round(s["fraction"], 4)}
    row.update({f"n_{c}": s["per_class"].get(c, 0) for c in all_classes})
    row.update(gain_r=round(nz["gain"][0], 4), gain_g=round(nz["gain"][1], 4),
               gain_b=round(nz["gain"][2], 4), brightness=round(nz["offset"], 4),
               blur_sigma=round(nz["blur"], 3), zoom=round(nz["zoom"], 4))
    return row

  def describe(root, pats):
    n = np.asarray([s["num_cells"] for s in pats])
    y = np.asarray([s["label"] for s in pats], bool)
    first = np.asarray([s["per_class"][classes[0]] / max(
        1, s["per_class"][classes[0]] + s["per_class"][classes[1]]) for s in pats])
    by_slide: dict[str, list] = {}
    for (path, *_), m in zip(jobs, means):
      rel = os.path.relpath(path, root)
      if not rel.startswith(".."):
        by_slide.setdefault(rel.split(os.sep)[0], []).append(m)
    patient_rgb = np.asarray([np.mean(by_slide[s["slide_id"]], 0)
                              if s["slide_id"] in by_slide else np.zeros(3)
                              for s in pats])
    def rnd(v):
      return None if v is None else round(v, 3)
    channel_auc = [_auc(patient_rgb[:, k], y) for k in range(3)]
    return dict(
        patients=len(pats), slides=len(pats), cells=int(n.sum()),
        cells_per_slide=[int(n.min()), int(np.median(n)), int(n.max())],
        positive_patients=int(y.sum()), negative_patients=int((~y).sum()),
        unlabeled_slides=sum(bool(s.get("unlabeled")) for s in pats),
        mean_cells={"negative": rnd(float(n[~y].mean())) if (~y).any() else None,
                    "positive": rnd(float(n[y].mean())) if y.any() else None},
        cells_per_class={c: int(sum(s["per_class"].get(c, 0) for s in pats))
                         for c in all_classes},
        first_class_fraction={  # realised, of the two composition classes
            "class": classes[0],
            "negative": rnd(float(first[~y].mean())) if (~y).any() else None,
            "positive": rnd(float(first[y].mean())) if y.any() else None},
        baseline_auc=dict(  # what simple per-patient statistics reach
            cell_count=rnd(_auc(n, y)),
            first_class_fraction_oracle=rnd(_auc(first, y)),
            mean_colour_best_channel=rnd(max(
                (max(a, 1 - a) for a in channel_auc if a is not None), default=None))),
        png_files=sum(r["path"].endswith(".png") for r in rows[root]))

  parameters = dict(
      kind="composition", source=source, seed=seed, patients=patients if out else 0,
      new_patients=new_patients, min_cells=min_cells, max_cells=max_cells,
      image_size=image_size, positive_fraction=positive_fraction,
      composition_classes=list(classes), other_classes=list(others),
      composition_fractions=list(fractions),
      composition_concentration=composition_concentration,
      other_fraction=other_fraction, count_effect=count_effect,
      count_spread=count_spread, stain=stain, brightness=brightness, blur=blur,
      zoom=zoom, new_reserve=new_reserve, reuse=reuse, pool_size=pool_size,
      png_fraction=png_fraction, diagnosis=diagnosis, unlabeled=unlabeled,
      pbc_root=pbc_root if source == "pbc" else None)
  cell_cols = ["slide_id", "path", "cell_type", "source"]
  summary = dict(out=os.path.abspath(out) if out else None, kind="composition",
                 source=source, seed=seed, image_size=image_size)
  reused = {pre: int(sum(p.reused for k, p in pools.items()
                         if k.startswith("new:") == bool(pre))) for pre in ("", "new:")}
  for root, pats, pre in groups:
    prefix = "truth_" if pre else ""
    if pre:
      _write_csv(os.path.join(root, "truth_slides.csv"), columns,
                 [slide_row(s) for s in pats])
    else:
      _write_csv(os.path.join(root, "slides.csv"), columns, [slide_row(s) for s in pats])
    _write_csv(os.path.join(root, f"{prefix}cells.csv"), cell_cols, rows[root])
    _write_csv(os.path.join(root, f"{prefix}patients.csv"), patient_cols,
               [patient_row(s) for s in pats])
    d = dict(describe(root, pats), reused_cells=reused[pre])
    if pre:
      summary["new"] = dict(
          out=os.path.abspath(root), kind="composition", source=source, seed=seed,
          image_size=image_size, **d,
          note=(f"cells from the new-patient reserve ({new_reserve:g} of every class, "
                f"fixed by seed {seed}): shared with no cohort of this seed made "
                f"with new_reserve >= {new_reserve:g}"))
    else:
      summary.update(d)
  summary.update(columns=columns, reuse=reuse, parameters=parameters)
  summary["seconds"] = round(time.time() - t0, 2)
  for root, _, pre in groups:
    with open(os.path.join(root, _MARKER), "w") as f:
      json.dump(dict(summary["new"], parameters=parameters) if pre else summary, f,
                indent=1)
  return summary


class _SyntheticItems:
  """Lazily rendered synthetic cells: item i of class list -> (class, id).

  ``offset`` shifts the index range (the new-patient reserve of a pool).
  """

  def __init__(self, classes, size, offset=0):
    self.classes, self.size, self.offset = classes, size, offset

  def __len__(self):
    return self.size

  def index(self, i):
    return i + self.offset

  def cell(self, i):
    j = self.index(i)
    c = self.classes[j % len(self.classes)]
    return c, f"synthetic/{c}/{j // len(self.classes)}"


class _Writer:
  """Writes one file; caches encoded bytes when files repeat (reuse)."""

  def __init__(self, source, pool_items, image_size, seed):
    self.source, self.pool_items = source, pool_items
    self.image_size, self.seed = image_size, seed
    self.cache: dict = {}

  def _bytes(self, pool_name, item, ext) -> bytes | None:
    key = (pool_name, item, ext)
    if key in self.cache:
      return self.cache[key]
    if self.source == "pbc":
      _, src = self.pool_items[pool_name][item]
      if ext == ".jpg" and self.image_size is None:
        return None  # copy the file byte for byte
      with Image.open(src) as img:
        img = img.convert("RGB")
        if self.image_size and img.size != (self.image_size,) * 2:
          img = img.resize((self.image_size,) * 2, Image.BICUBIC)
        data = _encode(img, ext)
    else:
      items = self.pool_items[pool_name]
      cls, sid = items.cell(item)
      label = list(synthetic.MORPHOLOGIES).index(cls)
      rng = np.random.default_rng([self.seed, label, items.index(item)])
      arr = synthetic.render_cell(rng, synthetic.MORPHOLOGIES[cls], self.image_size)
      data = _encode(Image.fromarray(np.round(arr * 255).astype(np.uint8)), ext)
    if len(self.cache) < 50000:  # repeats only matter with reuse
      self.cache[key] = data
    return data

  def write(self, job):
    path, pool_name, item, ext = job
    data = self._bytes(pool_name, item, ext)
    if data is None:
      shutil.copyfile(self.pool_items[pool_name][item][1], path)
    else:
      with open(path, "wb") as f:
        f.write(data)


def _run_jobs(fn, jobs, num_workers, verbose, t0) -> list:
  """Runs fn over jobs in threads (after creating their folders); its results."""
  for d in sorted({os.path.dirname(p) for p, *_ in jobs}):
    os.makedirs(d, exist_ok=True)
  workers = num_workers or os.cpu_count() or 1
  results = []
  with concurrent.futures.ThreadPoolExecutor(workers) as ex:
    for k, res in enumerate(ex.map(fn, jobs, chunksize=64)):
      results.append(res)
      if verbose and (k + 1) % 20000 == 0:
        print(f"make_cohort: wrote {k + 1}/{len(jobs)} files "
              f"({time.time() - t0:.0f} s)", flush=True)
  return results


def _write_csv(path, columns, rows):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, columns)
    w.writeheader()
    w.writerows(rows)


def _prepare_dir(d, overwrite):
  if os.path.isdir(d) and os.listdir(d):
    if not overwrite:
      raise CohortSpecError(f"{d} exists and is not empty; pass --overwrite to "
                            "replace a cohort written by make_cohort")
    if not os.path.isfile(os.path.join(d, _MARKER)):
      raise CohortSpecError(f"{d} is not empty and has no {_MARKER}: not a cohort "
                            "written by make_cohort, so it is not replaced")
    shutil.rmtree(d)
  os.makedirs(d, exist_ok=True)


def _fraction(text: str) -> float:
  """'0.33' or '1/3' -> float (argparse type)."""
  try:
    if "/" in text:
      num, den = text.split("/")
      return float(num) / float(den)
    return float(text)
  except (ValueError, ZeroDivisionError):
    raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None


_DESCRIPTION = """\
Writes a slide cohort for the slides runner: one folder of cell images per
slide, slides.csv (slide_id, patient_id, label) and the truth beside it.
Cells are real PBC cells (--source pbc, from --pbc_root) or drawn
procedurally (--source synthetic, needs no shared data).

  --kind witness      positives hold a few obvious abnormal cells (easy)
  --kind composition  positives differ by the proportion of two normal
                      classes, under per-patient stain, blur and zoom, with
                      2:1 labels and more cells in positives (closer to a
                      real cohort)

Examples:
  python -m slamjax.data.make_cohort --out /tmp/cohort --new_out /tmp/new
  python -m slamjax.data.make_cohort --kind composition --out /tmp/comp
  python -m slamjax.data.make_cohort --out /tmp/syn --source synthetic"""


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m slamjax.data.make_cohort",
      description=_DESCRIPTION,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Defaults given per kind ('witness ..., composition ...') depend on "
             "--kind.\nThe module docstring of slamjax/data/make_cohort.py "
             "describes the files written.")
  g = p.add_argument_group("output")
  g.add_argument("--out", default=None,
                 help="folder for the cohort (slide folders, slides.csv, cells.csv, "
                      "cohort.json); must be absent or empty unless --overwrite. "
                      "Required, except with --kind composition and --new_out "
                      "(new patients only)")
  g.add_argument("--overwrite", action="store_true",
                 help="replace --out/--new_out if they hold a cohort written by "
                      "make_cohort (never another folder)")
  g.add_argument("--image_size", type=int, default=None,
                 help="side of the written images in pixels (default: pbc 128, the "
                      "source size, copied byte for byte where possible; synthetic 64)")
  g.add_argument("--png_fraction", type=float, default=0.3,
                 help="fraction of files written as PNG, the rest JPEG (default 0.3)")
  g.add_argument("--num_workers", type=int, default=0,
                 help="writer threads (default 0 = one per CPU)")
  g = p.add_argument_group("cohort")
  g.add_argument("--kind", default="witness", choices=KINDS,
                 help="witness (default): positives hold a few obvious abnormal "
                      "cells; composition: positives differ by a shift in the "
                      "proportion of two normal classes, with per-patient stain, "
                      "blur and zoom (closer to a real cohort)")
  g.add_argument("--source", default="pbc", choices=sorted(SOURCES),
                 help="pbc (default): real cells from --pbc_root; synthetic: "
                      "procedurally drawn cells, needs no shared data")
  g.add_argument("--pbc_root", default=DEFAULT_PBC_ROOT,
                 help=f"PBC class folders, for --source pbc (default {DEFAULT_PBC_ROOT})")
  g.add_argument("--seed", type=int, default=0,
                 help="random seed: the output is a function of the arguments "
                      "(default 0)")
  g.add_argument("--patients", type=int, default=None,
                 help="patients in --out (default witness 60, composition 150)")
  g.add_argument("--min_cells", type=int, default=None,
                 help="fewest cells per slide (default witness 20, composition 10)")
  g.add_argument("--max_cells", type=int, default=None,
                 help="most cells per slide (default witness 300, composition 80; "
                      "the witness kind caps it if the PBC pool runs short)")
  g.add_argument("--positive_fraction", type=_fraction, default=None,
                 help="fraction of positive patients, e.g. 0.5 or 1/3 (default "
                      "witness 0.5, composition 1/3: 2 negatives per positive)")
  g.add_argument("--diagnosis", action="store_true",
                 help="also write a categorical 'diagnosis' column ('normal' or the "
                      "witness class; composition: '<first class>_rich')")
  g.add_argument("--unlabeled", type=int, default=0,
                 help="slides whose labels are left empty (default 0)")
  g.add_argument("--reuse", action="store_true",
                 help="allow a source cell in several slides (big cohorts); without "
                      "it no source cell is used twice")
  g.add_argument("--pool_size", type=int, default=2000,
                 help="--source synthetic with --reuse: cells rendered once per class "
                      "(default 2000)")
  g = p.add_argument_group("new patients")
  g.add_argument("--new_out", default=None,
                 help="folder for further, unlabeled patients (truth in "
                      "truth_slides.csv there), e.g. for slamjax.predict")
  g.add_argument("--new_patients", type=int, default=10,
                 help="patients in --new_out (default 10)")
  g.add_argument("--new_reserve", type=float, default=None,
                 help="fraction of every source class kept for new patients, fixed "
                      "by the seed: new patients made in a separate call then share "
                      "no source cell with cohorts of the same seed (default "
                      "composition 0.1; witness 0, which keeps its cohorts as "
                      "earlier versions wrote them: the output then lists the cells "
                      "shared)")
  g = p.add_argument_group("--kind witness")
  g.add_argument("--witness_rate", type=float, nargs=2, default=None,
                 metavar=("LOW", "HIGH"),
                 help="range of the per-patient fraction of witness cells in "
                      "positives (default 0.02 0.2)")
  g.add_argument("--second_slide_fraction", type=float, default=None,
                 help="chance that a patient gets a second slide (default 0.2)")
  g = p.add_argument_group("--kind composition")
  g.add_argument("--composition_classes", default=None, metavar="A,B",
                 help="the two classes whose proportion differs, first the one "
                      "positives have more of (default pbc eosinophil,neutrophil: "
                      "the two largest normal PBC classes; synthetic "
                      "lymphocyte,neutrophil)")
  g.add_argument("--composition_fractions", type=float, nargs=2, default=None,
                 metavar=("NEG", "POS"),
                 help="mean fraction of the first class among the two, in negatives "
                      "and in positives (default 0.4 0.6)")
  g.add_argument("--composition_concentration", type=float, default=None,
                 help="Beta concentration of each patient's fraction; smaller = more "
                      "spread and more ambiguous patients (default 20: sd 0.11)")
  g.add_argument("--other_fraction", type=float, default=None,
                 help="share of cells from the source's other normal classes "
                      "(default 0.1; pbc: basophils, lymphocytes, monocytes)")
  g.add_argument("--count_effect", type=float, default=None,
                 help="positives' mean cell count over negatives' (default 1.3; "
                      "1 = none): disease can change how many cells a smear yields")
  g.add_argument("--count_spread", type=float, default=None,
                 help="sd of log(cell count) within [--min_cells, --max_cells]: "
                      "wide, so that the count alone predicts little (default 0.7)")
  g.add_argument("--stain", type=float, default=None,
                 help="per-patient stain: sd of the log gain of each RGB channel "
                      "(default 0.08; 0 = none)")
  g.add_argument("--brightness", type=float, default=None,
                 help="per-patient brightness offset, sd in units of the full "
                      "range (default 0.04)")
  g.add_argument("--blur", type=float, default=None,
                 help="per-patient Gaussian blur: sigma uniform in [0, BLUR] pixels "
                      "at 128 px, scaled with --image_size (default 1.5)")
  g.add_argument("--zoom", type=float, default=None,
                 help="per-patient scale uniform in [1-ZOOM, 1+ZOOM] about the "
                      "centre, image size kept (default 0.1)")
  return p


def main(argv=None) -> int:
  a = _parser().parse_args(argv)
  try:
    s = make_cohort(
        a.out, kind=a.kind, source=a.source, patients=a.patients, seed=a.seed,
        pbc_root=a.pbc_root, min_cells=a.min_cells, max_cells=a.max_cells,
        image_size=a.image_size, witness_rate=a.witness_rate,
        positive_fraction=a.positive_fraction,
        second_slide_fraction=a.second_slide_fraction, png_fraction=a.png_fraction,
        diagnosis=a.diagnosis, unlabeled=a.unlabeled, reuse=a.reuse,
        pool_size=a.pool_size, new_out=a.new_out,
        new_patients=a.new_patients if a.new_out else 0,
        new_reserve=a.new_reserve, composition_classes=a.composition_classes,
        composition_fractions=a.composition_fractions,
        composition_concentration=a.composition_concentration,
        other_fraction=a.other_fraction, count_effect=a.count_effect,
        count_spread=a.count_spread, stain=a.stain, brightness=a.brightness,
        blur=a.blur, zoom=a.zoom, overwrite=a.overwrite,
        num_workers=a.num_workers, verbose=True)
  except CohortSpecError as e:
    print(f"make_cohort: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(s, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
