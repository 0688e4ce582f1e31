"""Writes a slide cohort of real image folders, for tests and demos.

Each patient gets one slide (some get two, sharing ``patient_id``, so that
patient grouping matters). A negative slide holds normal cells only; a
positive slide holds normal cells plus witness cells of one abnormal class at
a per-patient rate drawn from ``witness_rate`` (at least one witness). Labels
are balanced (half the patients positive).

Sources:

* ``pbc``: real cells from ``../shared/data/pbc`` (see its README): normal
  cells are lymphocytes and neutrophils, witnesses immature granulocytes
  (``ig``) or erythroblasts. No cell is used twice (across patients, slides
  or the ``new_out`` cohort) unless ``reuse=True``: if the pool is too small
  for ``max_cells``, the cell counts are capped (and the summary says so).
* ``synthetic``: cells drawn by ``slamjax.data.synthetic`` (``normal``
  versus ``blast`` witnesses); needs no shared data. Every cell is unique
  unless ``reuse=True`` (then a pool of ``pool_size`` cells per class is
  rendered once and files repeat, which is fast for big cohorts).

Written (``out``)::

    slides.csv    slide_id, patient_id, label (0/1) [, diagnosis]
    cells.csv     slide_id, path, witness (0/1), cell_type, source: ground truth
    cohort.json   the summary returned by make_cohort
    <slide_id>/[run_x/][field_k/]cNNNN.jpg|png   (mixed formats and depths)

``diagnosis`` (with ``diagnosis=True``) is a categorical column: ``normal``
or the witness class, for ``data.label_column='diagnosis'``,
``data.negative_label='normal'``. ``unlabeled=k`` leaves the labels of k
slides empty. With ``new_out``, ``new_patients`` further patients (one slide
each) go to a separate folder with no ``slides.csv``, their truth in
``truth_slides.csv`` and ``truth_cells.csv`` there (for predict demos).

Commands::

    # 60-patient PBC cohort plus 10 new patients to predict
    python -m slamjax.data.make_cohort --out /tmp/pbc60 --source pbc \\
        --new_out /tmp/pbc60_new --new_patients 10
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

import numpy as np
from PIL import Image

from slamjax.data import synthetic

DEFAULT_PBC_ROOT = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data",
    "pbc"))

# (normal classes, witness classes) of each source.
SOURCES = {
    "pbc": (("lymphocyte", "neutrophil"), ("ig", "erythroblast")),
    "synthetic": (("normal",), ("blast",)),
}
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


def _pbc_items(pbc_root, classes):
  items = {}
  for c in classes:
    d = os.path.join(pbc_root, c)
    if not os.path.isdir(d):
      raise CohortSpecError(f"PBC class folder {d} not found; pass --pbc_root "
                            "(see ../shared/data/pbc/README.md)")
    items[c] = [os.path.join(d, f) for f in sorted(os.listdir(d))
                if f.lower().endswith((".jpg", ".jpeg", ".png"))]
  return items


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


def make_cohort(out: str, *, source: str = "synthetic", patients: int = 60,
                seed: int = 0, pbc_root: str = DEFAULT_PBC_ROOT,
                min_cells: int = 20, max_cells: int = 300,
                image_size: int | None = None, witness_rate=(0.02, 0.2),
                positive_fraction: float = 0.5,
                second_slide_fraction: float = 0.2, png_fraction: float = 0.3,
                diagnosis: bool = False, unlabeled: int = 0, reuse: bool = False,
                pool_size: int = 2000, new_out: str | None = None,
                new_patients: int = 0, overwrite: bool = False,
                num_workers: int = 0, verbose: bool = False) -> dict:
  """Writes a cohort to ``out`` (see the module docstring); returns its summary.

  Args:
    out: folder to create (must be absent or empty, or a cohort written
      before, with ``overwrite=True``).
    source: 'pbc' or 'synthetic'.
    patients: number of patients in ``out``.
    seed: everything (files, labels, counts) is a function of the arguments.
    pbc_root: the PBC class folders (source='pbc').
    min_cells, max_cells: cells per slide, log-uniform in between.
    image_size: side of written images (pbc default: the source's 128 px,
      copied byte for byte where possible; synthetic default 64).
    witness_rate: (low, high) of the per-patient witness fraction.
    positive_fraction: fraction of positive patients.
    second_slide_fraction: chance that a patient gets a second slide.
    png_fraction: fraction of files written as PNG (the rest JPEG).
    diagnosis: also write a categorical ``diagnosis`` column.
    unlabeled: number of slides whose labels are left empty.
    reuse: allow a source cell in several slides (big cohorts).
    pool_size: synthetic with reuse: cells rendered per class.
    new_out, new_patients: a second, unlabeled cohort of new patients.
    overwrite: replace ``out``/``new_out`` if they hold an earlier cohort.
    num_workers: writer threads (0 = CPU count).
    verbose: print progress.
  """
  t0 = time.time()
  if source not in SOURCES:
    raise CohortSpecError(f"source={source!r}; valid: {sorted(SOURCES)}")
  if not 1 <= min_cells <= max_cells:
    raise CohortSpecError(f"need 1 <= min_cells <= max_cells, got {min_cells}, {max_cells}")
  if patients < 2:
    raise CohortSpecError(f"patients must be >= 2, got {patients}")
  normal_classes, witness_classes = SOURCES[source]
  if image_size is None:
    image_size = 64 if source == "synthetic" else None
  for d in [out] + ([new_out] if new_out else []):
    _prepare_dir(d, overwrite)

  rng = np.random.default_rng([seed, 17])
  slides = _plan(rng, patients, positive_fraction, second_slide_fraction,
                 witness_rate, witness_classes, "P", True)
  new_slides = (_plan(rng, new_patients, positive_fraction, 0.0, witness_rate,
                      witness_classes, "N", False) if new_out and new_patients else [])
  if unlabeled > len(slides):
    raise CohortSpecError(f"unlabeled={unlabeled} > {len(slides)} slides")
  for i in rng.choice(len(slides), unlabeled, replace=False):
    slides[int(i)]["unlabeled"] = True

  # Source pools. Normal classes are merged into one pool (a natural mix).
  if source == "pbc":
    items = _pbc_items(pbc_root, normal_classes + witness_classes)
    pool_items = {"normal": [(c, p) for c in normal_classes for p in items[c]]}
    pool_items.update({c: [(c, p) for p in items[c]] for c in witness_classes})
  else:
    size = pool_size if reuse else 10**9  # rendered on demand: unbounded
    pool_items = {"normal": _SyntheticItems(normal_classes, size)}
    pool_items.update({c: _SyntheticItems((c,), size) for c in witness_classes})

  # Cap cells per slide so that the pools last without reuse.
  everything = slides + new_slides
  hi = float(max_cells)
  _set_counts(everything, min_cells, hi)
  def fits(need):
    return all(need[k] <= len(pool_items[k]) for k in need)
  capped = False
  if not reuse and not fits(_needs(everything, "normal")):
    lo_hi, up = float(min_cells), hi
    _set_counts(everything, min_cells, lo_hi)
    if not fits(_needs(everything, "normal")):
      need = _needs(everything, "normal")
      raise CohortSpecError(
          f"{len(everything)} slides of >= {min_cells} cells need {need} source "
          f"cells but the pools hold { {k: len(v) for k, v in pool_items.items()} }; "
          "use fewer patients, a smaller --min_cells or --reuse")
    for _ in range(40):  # bisect the largest cap that fits
      mid = (lo_hi + up) / 2
      _set_counts(everything, min_cells, mid)
      lo_hi, up = (mid, up) if fits(_needs(everything, "normal")) else (lo_hi, mid)
    hi, capped = lo_hi, True
    _set_counts(everything, min_cells, hi)
    if verbose:
      print(f"make_cohort: capped cells per slide at {int(hi)} so that no source "
            "cell is reused (pass --reuse to allow reuse)", flush=True)

  pools = {k: _Pool(k, v, np.random.default_rng([seed, 23, i]), reuse)
           for i, (k, v) in enumerate(sorted(pool_items.items()))}
  jobs, rows_main, rows_new = [], [], []
  for slide_list, root, rows in ((slides, out, rows_main), (new_slides, new_out, rows_new)):
    for s in slide_list:
      srng = np.random.default_rng(s["seed"])
      normal = pools["normal"].take(s["num_cells"] - s["num_witness"])
      cells = [("normal", i, 0) for i in normal]
      if s["num_witness"]:
        cells += [(s["witness_class"], i, 1)
                  for i in pools[s["witness_class"]].take(s["num_witness"])]
      cells = [cells[k] for k in srng.permutation(len(cells))]
      n_fields = int(srng.integers(1, 5))
      for j, (pool_name, item, w) in enumerate(cells):
        sub = ("" if s["layout"] == 0 else
               f"field_{j % n_fields}/" if s["layout"] == 1 else
               f"run_{'ab'[j % 2]}/field_{j % n_fields}/")
        r = srng.random()
        ext = ".png" if r < png_fraction else (".JPG" if r > 0.95 else ".jpg")
        rel = f"{s['slide_id']}/{sub}c{j:04d}{ext}"
        cell_type, src = pool_items[pool_name][item] if source == "pbc" else (
            pool_items[pool_name].cell(item))
        jobs.append((os.path.join(root, rel), pool_name, item, ext.lower()))
        rows.append(dict(slide_id=s["slide_id"], path=rel, witness=w,
                         cell_type=cell_type,
                         source=(os.path.relpath(src, pbc_root).replace(os.sep, "/")
                                 if source == "pbc" else src)))

  writer = _Writer(source, pool_items, image_size, seed)
  dirs = sorted({os.path.dirname(p) for p, *_ in jobs})
  for d in dirs:
    os.makedirs(d, exist_ok=True)
  workers = num_workers or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(workers) as ex:
    for k, _ in enumerate(ex.map(writer.write, jobs, chunksize=64)):
      if verbose and (k + 1) % 20000 == 0:
        print(f"make_cohort: wrote {k + 1}/{len(jobs)} files "
              f"({time.time() - t0:.0f} s)", flush=True)

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

  summary = dict(
      out=os.path.abspath(out), source=source, seed=seed,
      image_size=image_size or 128, **describe(slides, rows_main),
      max_cells_requested=max_cells, max_cells_used=int(hi), capped=capped,
      reuse=reuse, reused_cells=int(sum(p.reused for p in pools.values())),
      columns=columns, seconds=None)
  if new_slides:
    _write_csv(os.path.join(new_out, "truth_slides.csv"), columns,
               [slide_row(s) for s in new_slides])
    _write_csv(os.path.join(new_out, "truth_cells.csv"), cell_cols, rows_new)
    summary["new"] = dict(out=os.path.abspath(new_out), **describe(new_slides, rows_new))
    with open(os.path.join(new_out, _MARKER), "w") as f:
      json.dump(summary["new"], f, indent=1)
  summary["seconds"] = round(time.time() - t0, 2)
  with open(os.path.join(out, _MARKER), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


class _SyntheticItems:
  """Lazily rendered synthetic cells: item i of class list -> (class, id)."""

  def __init__(self, classes, size):
    self.classes, self.size = classes, size

  def __len__(self):
    return self.size

  def cell(self, i):
    c = self.classes[i % len(self.classes)]
    return c, f"synthetic/{c}/{i // len(self.classes)}"


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
      cls, sid = self.pool_items[pool_name].cell(item)
      label = list(synthetic.MORPHOLOGIES).index(cls)
      rng = np.random.default_rng([self.seed, label, item])
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


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--source", default="pbc", choices=sorted(SOURCES))
  p.add_argument("--patients", type=int, default=60)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--pbc_root", default=DEFAULT_PBC_ROOT)
  p.add_argument("--min_cells", type=int, default=20)
  p.add_argument("--max_cells", type=int, default=300)
  p.add_argument("--image_size", type=int, default=None)
  p.add_argument("--witness_rate", type=float, nargs=2, default=(0.02, 0.2))
  p.add_argument("--positive_fraction", type=float, default=0.5)
  p.add_argument("--second_slide_fraction", type=float, default=0.2)
  p.add_argument("--png_fraction", type=float, default=0.3)
  p.add_argument("--diagnosis", action="store_true",
                 help="also write a categorical 'diagnosis' column")
  p.add_argument("--unlabeled", type=int, default=0,
                 help="slides whose labels are left empty")
  p.add_argument("--reuse", action="store_true",
                 help="allow source cells in several slides (big cohorts)")
  p.add_argument("--pool_size", type=int, default=2000)
  p.add_argument("--new_out", default=None)
  p.add_argument("--new_patients", type=int, default=10)
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--num_workers", type=int, default=0)
  a = p.parse_args(argv)
  try:
    s = make_cohort(
        a.out, source=a.source, patients=a.patients, seed=a.seed,
        pbc_root=a.pbc_root, min_cells=a.min_cells, max_cells=a.max_cells,
        image_size=a.image_size, witness_rate=tuple(a.witness_rate),
        positive_fraction=a.positive_fraction,
        second_slide_fraction=a.second_slide_fraction, png_fraction=a.png_fraction,
        diagnosis=a.diagnosis, unlabeled=a.unlabeled, reuse=a.reuse,
        pool_size=a.pool_size, new_out=a.new_out,
        new_patients=a.new_patients if a.new_out else 0, overwrite=a.overwrite,
        num_workers=a.num_workers, verbose=True)
  except CohortSpecError as e:
    print(f"make_cohort: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(s, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
