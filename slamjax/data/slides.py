"""Slide cohorts: one folder of cell images per slide plus a slide table.

Layout (``config.data.source = 'slides'``)::

    root/
      slides.csv                 # slide_id, label columns, [patient_id, split, fold]
      P001_S1/**/*.jpg|png|...   # the cells of slide P001_S1, at any depth
      P002_S1/...

or, for layouts that are not one folder per slide, a cell table
(``data.cells_csv``) with columns ``slide_id,path[,witness]`` (paths relative
to ``root`` or absolute); its optional 0/1 ``witness`` column marks the cells
that make a slide positive (for retrieval metrics only; nothing needs it).

The slide table (columns, labels, unlabeled slides, ``patient_id``,
``split``, ``fold``) is read by :mod:`slamjax.data.slide_table`, with the
rules the features runner uses too. The slides runner has no validation
split: ``split`` holds train or test. Unlabeled slides are left out of
training and metrics and still predicted.

Images of any size, aspect or mode become RGB, centre-cropped and resized to
``data.image_size`` (``image_cache.decode_cell``). Decoded cells are cached on
disk as a uint8 memmap keyed by the file list, sizes, mtimes and image size
(``image_cache.load_images``), so a rerun does not decode again and RAM does
not bound the cohort. ``Cohort.images`` has one row per distinct file, in
sorted absolute-path order; ``Cohort.cells[i]`` indexes the rows of slide i.

Every problem with the input raises ``CohortError`` (one class with
``slide_table.DataError`` and the features runner's ``FeatureDataError``)
naming the file, row (line of the CSV) or value, and what would be valid.

Example:
  >>> import os, pathlib, tempfile, ml_collections
  >>> from PIL import Image
  >>> root = tempfile.mkdtemp()
  >>> for sid, n in (("s1", 2), ("s2", 3)):
  ...   os.makedirs(f"{root}/{sid}/field1")
  ...   for i in range(n):
  ...     Image.linear_gradient("L").resize((30, 20)).save(f"{root}/{sid}/field1/{i}.png")
  >>> _ = pathlib.Path(f"{root}/slides.csv").write_text("slide_id,label\\ns1,0\\ns2,1\\n")
  >>> cfg = ml_collections.ConfigDict(dict(
  ...     source="slides", root=root, csv="slides.csv", cells_csv="",
  ...     label_columns=(), label_column="", negative_label="", image_size=8,
  ...     unlisted="error", skip_bad_files=False, cache_dir=f"{root}/.cache",
  ...     num_workers=1))
  >>> cohort = load_cohort(cfg)
  >>> cohort.slide_ids, cohort.task_names, cohort.labels[:, 0].tolist()
  (('s1', 's2'), ('label',), [0.0, 1.0])
  >>> cohort.images.shape, [c.tolist() for c in cohort.cells]
  ((5, 8, 8, 3), [[0, 1], [2, 3, 4]])
  >>> cohort.cell_paths[2]
  's2/field1/0.png'
  >>> cohort.summary()
  '2 slides (2 labelled, 0 unlabeled), 5 cells (2-3 per slide, median 2); label: 1 pos / 1 neg; decoded 5 cells'
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from slamjax.data import folder
from slamjax.data import image_cache
from slamjax.data import slide_table

RESERVED_COLUMNS = slide_table.RESERVED_COLUMNS
SPLITS = ("train", "test")  # the split values the slides runner uses
# Said after a bad split value: 'val' is valid in the table, not here.
_SPLIT_NOTE = ("The slides runner has no validation split (inner folds of the "
               "training slides choose the training length): mark those slides "
               "'train' or 'test'")
# A slide whose sampled cells have a median pixel standard deviation below
# this (of 255) holds blank fields or images that decode wrongly.
_UNIFORM_STD = 3.0
_UNIFORM_SAMPLE = 16  # cells per slide looked at


# One error class for every runner's input, so one `except` catches all.
CohortError = slide_table.DataError
_fmt = slide_table.listing
_nfc = slide_table.nfc


@dataclasses.dataclass(frozen=True)
class Cohort:
  """A loaded slide cohort (see the module docstring).

  Attributes:
    root: the cohort folder.
    slide_ids: slide ids, in CSV order (sorted folder order without a CSV).
    cells: per slide, int64 indices into ``images`` (sorted path order).
    images: uint8 ``[N, S, S, 3]`` memmap from the disk cache. Rows of files
      skipped with ``skip_bad_files`` are zero and in no slide's ``cells``.
    cell_paths: per image row, its path relative to ``root`` ('/'-separated)
      when under ``root``, else absolute.
    task_names: one binary task per 0/1 column, or per non-negative category.
    labels: float32 ``[num_slides, num_tasks]``; NaN rows = unlabeled slides.
    patient_ids: per slide (= slide_id when there is no patient_id column).
    splits: per slide 'train'/'test' from a ``split`` column, else None.
    folds: int64 per slide from a ``fold`` column, else None.
    witness: per slide, bool per cell of ``cells``, when the cell table has
      a ``witness`` column; else None.
    report: num_slides, num_cells, decoded, cache_hit, cache_path,
      decode_seconds, skipped_files (paths), skipped_reasons ({path: why}),
      unlisted_folders, ignored_files (non-image files; first 20),
      num_ignored_files, uniform_slides (slides whose images are nearly
      uniform; see ``uniform_slides``).
  """
  root: str
  slide_ids: tuple[str, ...]
  cells: list[np.ndarray]
  images: np.ndarray
  cell_paths: tuple[str, ...]
  task_names: tuple[str, ...]
  labels: np.ndarray
  patient_ids: tuple[str, ...]
  splits: tuple[str, ...] | None
  folds: np.ndarray | None
  witness: list[np.ndarray] | None
  report: dict

  def __len__(self) -> int:
    return len(self.slide_ids)

  def labelled(self) -> np.ndarray:
    """bool ``[num_slides]``: True where the slide has labels."""
    if self.labels.shape[1] == 0:
      return np.zeros(len(self.slide_ids), bool)
    return ~np.isnan(self.labels).any(axis=1)

  def summary(self) -> str:
    """One line: slides, cells per slide, per-task pos/neg, cache status."""
    lab = self.labelled()
    sizes = np.asarray([len(c) for c in self.cells])
    parts = [f"{len(self.slide_ids)} slides ({int(lab.sum())} labelled, "
             f"{int((~lab).sum())} unlabeled), {int(sizes.sum())} cells "
             f"({sizes.min()}-{sizes.max()} per slide, median "
             f"{int(np.median(sizes))})"]
    for t, name in enumerate(self.task_names):
      y = self.labels[lab, t]
      parts.append(f"{name}: {int((y == 1).sum())} pos / {int((y == 0).sum())} neg")
    if self.witness is not None:
      parts.append(f"{int(sum(w.sum() for w in self.witness))} witness cells")
    if self.report.get("skipped_files"):
      parts.append(f"{len(self.report['skipped_files'])} bad files skipped")
    n = self.report.get("num_ignored_files", 0)
    if n:  # a stray export or notes file the user may have meant as a cell
      shown = self.report.get("ignored_files", [])[:3]
      parts.append(f"{n} non-image file(s) ignored: " + ", ".join(shown)
                   + (", ..." if n > len(shown) else ""))
    uniform = self.report.get("uniform_slides") or []
    if uniform:
      parts.append(f"{len(uniform)} slide(s) with nearly uniform images: "
                   + ", ".join(uniform[:3]) + (", ..." if len(uniform) > 3 else ""))
    parts.append("cache hit" if self.report.get("cache_hit")
                 else f"decoded {self.report.get('decoded', 0)} cells")
    return "; ".join(parts)


def uniform_slides(images: np.ndarray, cells: Sequence[np.ndarray],
                   slide_ids: Sequence[str]) -> list[str]:
  """Slides whose images are nearly uniform: the median, over up to
  ``_UNIFORM_SAMPLE`` evenly spaced cells, of each cell's pixel standard
  deviation is below ``_UNIFORM_STD`` (of 255).

  Example:
    >>> imgs = np.zeros((4, 8, 8, 3), np.uint8); imgs[2:, ::2] = 200
    >>> uniform_slides(imgs, [np.array([0, 1]), np.array([2, 3])], ["a", "b"])
    ['a']
  """
  out = []
  for sid, idx in zip(slide_ids, cells):
    if not len(idx):
      continue
    take = np.asarray(idx)[np.linspace(0, len(idx) - 1, min(len(idx), _UNIFORM_SAMPLE)
                                       ).astype(int)]
    std = np.asarray(images[np.sort(take)], np.float32).reshape(len(take), -1).std(1)
    if np.median(std) < _UNIFORM_STD:
      out.append(sid)
  return out


def _near_miss(sid: str, names) -> str:
  """Why a folder almost named ``sid`` did not match it ('' if none did)."""
  for name in names:
    n = _nfc(name)
    if n != sid and n.strip() == sid:
      where = ("trailing" if n.rstrip() == sid else "leading"
               if n.lstrip() == sid else "leading and trailing")
      return (f"; folder {name!r} differs only by {where} space(s): rename it to "
              f"{sid!r}")
  for name in names:
    if _nfc(name).lower() == sid.lower():
      return f"; folder {name!r} differs only in upper/lower case"
  return ""


def _is_hidden(name: str) -> bool:
  return name.startswith(".") or name.startswith("__")


def _resolve(root: str, path: str) -> str:
  path = os.path.expanduser(path)
  return os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))


def _display(root: str, abspath: str) -> str:
  """Path relative to ``root`` when under it ('/'-separated), else absolute."""
  rel = os.path.relpath(abspath, root)
  if rel == os.pardir or rel.startswith(os.pardir + os.sep):
    return abspath
  return rel.replace(os.sep, "/")


def _list_images(root: str, slide_dir: str) -> tuple[list[str], list[str]]:
  """(sorted absolute image paths, other non-hidden files) under slide_dir."""
  images, others = [], []
  for dirpath, dirnames, filenames in os.walk(slide_dir):
    dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
    for fn in filenames:
      if _is_hidden(fn):
        continue
      p = os.path.join(dirpath, fn)
      (images if fn.lower().endswith(folder.IMAGE_EXTENSIONS) else others).append(p)
  return sorted(images), sorted(others)


# ---------------------------------------------------------------------------
# Cells of each slide.


def _cells_from_folders(root, table, csv_path, unlisted, report):
  """Folder layout: {slide_id: [abs image paths]} for the table's slides."""
  folders = sorted(d for d in os.listdir(root)
                   if not _is_hidden(d) and os.path.isdir(os.path.join(root, d)))
  folder_of: dict[str, str] = {}  # NFC slide id -> folder name on disk
  for d in folders:
    if _nfc(d) in folder_of:
      raise CohortError(f"Folders {folder_of[_nfc(d)]!r} and {d!r} in {root} are one "
                        "name written in two Unicode forms; merge or rename them")
    folder_of[_nfc(d)] = d
  where = csv_path or "the slide table"
  if table is not None:
    missing = [f"line {line}: {sid!r} (expected folder {os.path.join(root, sid)}"
               f"{_near_miss(sid, folders)})"
               for sid, line in zip(table.slide_ids, table.lines)
               if sid not in folder_of]
    if missing:
      raise CohortError(f"{where}: slide row(s) with no folder: {_fmt(missing)}. "
                        f"Folders in {root}: {_fmt(folders, 12) or 'none'}")
    listed = set(table.slide_ids)
    extra = [d for d in folders if _nfc(d) not in listed]
    if extra and unlisted != "ignore":
      raise CohortError(
          f"Folder(s) in {root} with no row in {where}: {_fmt(extra)}. Add a row "
          "per slide (leave the labels empty for an unlabeled slide) or set "
          "config.data.unlisted='ignore'")
    report["unlisted_folders"] = extra
    slide_ids = table.slide_ids
  else:
    if not folders:
      raise CohortError(f"{root} holds no slide folders (expected "
                        "root/<slide_id>/**/<images>)")
    slide_ids = list(folder_of)
  by_slide, others, empty = {}, [], []
  for sid in slide_ids:
    images, other = _list_images(root, os.path.join(root, folder_of[sid]))
    others += other
    if not images:
      empty.append(f"{os.path.join(root, folder_of[sid])}"
                   + (f" ({len(other)} non-image file(s))" if other else ""))
    by_slide[sid] = images
  if empty:
    raise CohortError(
        f"Empty slide(s), no image files ({', '.join(folder.IMAGE_EXTENSIONS)}) "
        f"in: {_fmt(empty)}")
  report["ignored_files"] = [_display(root, p) for p in others[:20]]
  report["num_ignored_files"] = len(others)
  return slide_ids, by_slide, None


def _cells_from_table(root, cells_path, table, csv_path, unlisted, report,
                      skip_bad_files):
  """Cell table: {slide_id: [abs paths]} and {slide_id: {abs path: witness}}."""
  header, rows = slide_table.read_table(cells_path, "cell table")
  need = [c for c in ("slide_id", "path") if c not in header]
  if need:
    raise CohortError(f"cell table {cells_path}: missing column(s) {need}; it needs "
                      f"'slide_id' and 'path' (and optionally 'witness'); its "
                      f"columns are {header}")
  if not rows:
    raise CohortError(f"cell table {cells_path} has a header but no rows")
  for _, r in rows:
    r["slide_id"] = _nfc(r["slide_id"])
  has_witness = "witness" in header
  by_slide: dict[str, dict[str, bool]] = {}
  owner: dict[str, tuple[str, int]] = {}
  errors, bad_witness, missing = [], [], []
  for line, r in rows:
    sid, p = r["slide_id"], r["path"]
    if not sid or not p:
      errors.append(f"line {line}: empty {'slide_id' if not sid else 'path'}")
      continue
    ap = _resolve(root, p)
    w = False
    if has_witness:
      if r["witness"] not in ("0", "1", "0.0", "1.0"):
        bad_witness.append(f"line {line} ({p}): {r['witness']!r}")
        continue
      w = float(r["witness"]) == 1.0
    if ap in owner:
      prev_sid, prev_line = owner[ap]
      errors.append(f"line {line}: {p} is already listed at line {prev_line}"
                    + (f" for slide {prev_sid!r}" if prev_sid != sid else ""))
      continue
    owner[ap] = (sid, line)
    if not os.path.isfile(ap):
      missing.append(f"line {line}: {p}")
    by_slide.setdefault(sid, {})[ap] = w
  if bad_witness:
    raise CohortError(f"cell table {cells_path}: column 'witness' must be 0 or 1; "
                      f"got {_fmt(bad_witness)}")
  if errors:
    raise CohortError(f"cell table {cells_path}: {_fmt(errors)} (each cell is "
                      "listed once, in one slide)")
  if missing:
    if not skip_bad_files:
      raise CohortError(f"cell table {cells_path}: file(s) not found: "
                        f"{_fmt(missing)} (paths are relative to {root} or "
                        "absolute); or set config.data.skip_bad_files=True")
    for line, r in rows:
      ap = _resolve(root, r["path"])
      if r["path"] and not os.path.isfile(ap):
        report["skipped_files"].append(_display(root, ap))
        report["skipped_reasons"][_display(root, ap)] = "file not found"
        by_slide.get(r["slide_id"], {}).pop(ap, None)

  if table is not None:
    where = csv_path
    no_cells = [f"line {line}: {sid!r}" for sid, line in
                zip(table.slide_ids, table.lines) if sid not in by_slide]
    if no_cells:
      raise CohortError(f"{where}: slide row(s) with no cells in cell table "
                        f"{cells_path}: {_fmt(no_cells)}")
    extra = sorted(s for s in by_slide if s not in set(table.slide_ids))
    if extra and unlisted != "ignore":
      raise CohortError(
          f"cell table {cells_path}: slide(s) with no row in {where}: "
          f"{_fmt([repr(x) for x in extra])}. Add a row per slide or set "
          "config.data.unlisted='ignore'")
    report["unlisted_folders"] = extra
    slide_ids = table.slide_ids
  else:
    slide_ids = sorted(by_slide)
  empty = [s for s in slide_ids if not by_slide[s]]
  if empty:
    raise CohortError(f"cell table {cells_path}: slide(s) left with no cells after "
                      f"skipping missing files: {_fmt([repr(x) for x in empty])}")
  paths = {s: sorted(by_slide[s]) for s in slide_ids}
  witness = ({s: by_slide[s] for s in slide_ids} if has_witness else None)
  return slide_ids, paths, witness


# ---------------------------------------------------------------------------


def load_cohort(cfg, *, require_labels: bool = True) -> Cohort:
  """Loads a slide cohort described by ``cfg`` (``config.data``).

  Args:
    cfg: ConfigDict with root, csv, cells_csv, label_columns, label_column,
      negative_label, image_size, unlisted, skip_bad_files, cache_dir,
      num_workers (see the module docstring).
    require_labels: False for prediction: the slide CSV may be missing or ''
      (then every sub-folder of root, or every slide of the cell table, is an
      unlabeled slide) and its label columns may be absent.

  Returns:
    A ``Cohort``; its images come from (and on a miss are decoded into) the
    disk cache.

  Raises:
    CohortError: any problem with the input, before anything is decoded
      (except unreadable images, which are found by decoding).
  """
  root = cfg.root or ""
  if not root:
    raise CohortError("config.data.root is empty; set it to the cohort folder")
  root = os.path.abspath(folder.resolve_root(os.path.expanduser(root)))
  if not os.path.isdir(root):
    raise CohortError(f"Cohort folder {root!r} (config.data.root) does not exist")
  image_size = int(cfg.image_size or 0)
  if image_size <= 0:
    raise CohortError(f"config.data.image_size must be a positive int, got "
                      f"{cfg.image_size!r}")
  unlisted = cfg.unlisted or "error"
  if unlisted not in ("error", "ignore"):
    raise CohortError(f"config.data.unlisted={unlisted!r}; valid: 'error', 'ignore'")
  skip_bad_files = bool(cfg.skip_bad_files)

  csv_name = cfg.csv or ""
  csv_path = _resolve(root, csv_name) if csv_name else ""
  table = None
  if csv_path and os.path.isfile(csv_path):
    table = slide_table.parse(
        csv_path, cfg.label_columns, cfg.label_column or "", cfg.negative_label or "",
        require_labels, splits=SPLITS, split_note=_SPLIT_NOTE)
  elif require_labels:
    raise CohortError(
        f"Slide table {csv_path or '(config.data.csv is empty)'} not found; "
        "training needs a CSV with a slide_id column and label columns "
        f"(config.data.csv, relative to {root} or absolute)")
  else:
    csv_path = ""

  report = {"skipped_files": [], "skipped_reasons": {}, "unlisted_folders": [],
            "ignored_files": [], "num_ignored_files": 0}
  cells_csv = cfg.cells_csv or ""
  if cells_csv:
    cells_path = _resolve(root, cells_csv)
    if not os.path.isfile(cells_path):
      raise CohortError(f"Cell table {cells_path} (config.data.cells_csv) not found")
    slide_ids, paths, witness_map = _cells_from_table(
        root, cells_path, table, csv_path, unlisted, report, skip_bad_files)
  else:
    slide_ids, paths, witness_map = _cells_from_folders(
        root, table, csv_path, unlisted, report)
  if table is None:
    table = slide_table.unlabeled(slide_ids, cfg.label_columns, cfg.label_column)

  # One image row per distinct file, sorted: the cache does not depend on
  # slide order, and reordering the CSV reuses it.
  all_paths = sorted({p for s in slide_ids for p in paths[s]})
  row_of = {p: i for i, p in enumerate(all_paths)}
  try:
    cached = image_cache.load_images(
        all_paths, image_size, cache_dir=cfg.cache_dir or "",
        num_workers=int(cfg.num_workers or 0),
        center_crop=float(cfg.get("center_crop", 1.0) or 1.0))
  except image_cache.CacheError as e:
    raise CohortError(str(e)) from None
  cell_paths = tuple(_display(root, p) for p in all_paths)
  if cached.bad:
    items = [f"{all_paths[i]}: {why}" for i, why in sorted(cached.bad.items())]
    if not skip_bad_files:
      raise CohortError(f"{len(items)} unreadable image(s): {_fmt(items)}. Remove "
                        "them or set config.data.skip_bad_files=True to skip them")
    for i, why in sorted(cached.bad.items()):
      report["skipped_files"].append(cell_paths[i])
      report["skipped_reasons"][cell_paths[i]] = why

  cells, witness, emptied = [], [] if witness_map is not None else None, []
  for s in slide_ids:
    idx = np.asarray([row_of[p] for p in paths[s] if row_of[p] not in cached.bad],
                     np.int64)
    if not len(idx):
      emptied.append(s)
    cells.append(idx)
    if witness is not None:
      witness.append(np.asarray([witness_map[s][all_paths[i]] for i in idx], bool))
  if emptied:
    raise CohortError(f"Slide(s) with no readable image left after skipping bad "
                      f"files: {_fmt([repr(x) for x in emptied])}; skipped: "
                      f"{_fmt(report['skipped_files'])}")

  # Blank fields or a format that decodes wrongly: said once per cohort.
  report["uniform_slides"] = uniform_slides(cached.images, cells, slide_ids)
  if report["uniform_slides"]:
    print(f"data: WARNING: the images of {len(report['uniform_slides'])} slide(s) are "
          f"nearly uniform (pixel std below {_UNIFORM_STD:g} of 255 in most cells): "
          f"{_fmt([repr(x) for x in report['uniform_slides']])}. Open a few of their "
          "files: blank fields, or images that do not decode as expected, carry no "
          "information", flush=True)
  report.update(num_slides=len(slide_ids), num_cells=int(sum(len(c) for c in cells)),
                decoded=cached.decoded, cache_hit=cached.cache_hit,
                cache_path=cached.cache_path, decode_seconds=round(cached.seconds, 3))
  return Cohort(
      root=root, slide_ids=tuple(slide_ids), cells=cells, images=cached.images,
      cell_paths=cell_paths, task_names=tuple(table.task_names),
      labels=np.asarray(table.labels, np.float32), patient_ids=tuple(table.patient_ids),
      splits=tuple(table.splits) if table.splits is not None else None,
      folds=table.folds, witness=witness, report=report)
