r"""Feature-bag datasets: one file of instance features per slide + a CSV of labels.

This reads the per-slide layout that CLAM and TRIDENT write (HDF5 with a
``features`` array and usually ``coords``), plain ``.npy``/``.npz`` arrays and
the HDF5 files of :mod:`slamjax.features.export`::

  root/
    slide_001.h5    # "features" [N, D]; optional "coords" [N, 2],
                    # "cell_ids" [N] (strings), "witness" [N] (0/1)
    slide_002.npz   # the same names as arrays
    slide_003.npy   # just the [N, D] features
    slides.csv      # slide_id,label[,more label columns][,split]

A file's slide id is its name without the extension. Bags may have any
number of instances (>= 1). Nothing is ever unpickled: ``.npy``/``.npz`` are
read with ``allow_pickle=False``. Every problem raises
:class:`FeatureDataError` naming the file or slide.

Example:
  >>> import os, tempfile
  >>> import numpy as np
  >>> root = tempfile.mkdtemp()
  >>> for i in range(4):
  ...   np.save(os.path.join(root, f"s{i}.npy"), np.full((3 + i, 8), i, np.float32))
  >>> with open(os.path.join(root, "slides.csv"), "w") as f:
  ...   _ = f.write("slide_id,label,split\ns0,0,train\ns1,1,train\ns2,0,test\ns3,1,test\n")
  >>> ds = load_feature_folder(root)
  >>> ds.num_slides, ds.dim, [len(x) for x in ds.features], ds.labels[:, 0].tolist()
  (4, 8, [3, 4, 5, 6], [0.0, 1.0, 0.0, 1.0])
  >>> {k: v.tolist() for k, v in ds.split_indices().items()}
  {'train': [0, 1], 'test': [2, 3]}
"""

from __future__ import annotations

import csv
import dataclasses
import os
import zipfile
from typing import Sequence

import numpy as np

EXTENSIONS = (".h5", ".hdf5", ".npy", ".npz")
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val",
                  "valid": "val", "validation": "val", "test": "test",
                  "testing": "test"}
_TRUE = {"1", "1.0", "true", "yes"}
_FALSE = {"0", "0.0", "false", "no"}
_MAX_LISTED = 10


class FeatureDataError(ValueError):
  """A feature folder or its CSV is unusable; the message names the file/slide."""


def _listing(items: Sequence[str]) -> str:
  items = list(items)
  shown = ", ".join(items[:_MAX_LISTED])
  return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


@dataclasses.dataclass
class FeatureDataset:
  """Slides in CSV order; every list is indexed by slide.

  Attributes:
    slide_ids: the CSV's ``slide_id`` column.
    files: the feature file of every slide.
    features: float32 [N_i, D] per slide (bags of any length N_i >= 1).
    coords: [N_i, 2] per slide, or None where the file has no coords.
    cell_ids: [N_i] strings per slide, or None.
    witness: [N_i] bool instance labels per slide, or None (enables
      attention-retrieval metrics).
    labels: float32 [num_slides, num_tasks] 0/1 bag labels.
    label_columns: the CSV column of every task.
    splits: the CSV's ``split`` per slide (train/val/test), or None.
  """
  slide_ids: list[str]
  files: list[str]
  features: list[np.ndarray]
  coords: list[np.ndarray | None]
  cell_ids: list[np.ndarray | None]
  witness: list[np.ndarray | None]
  labels: np.ndarray
  label_columns: tuple[str, ...]
  splits: np.ndarray | None = None

  @property
  def num_slides(self) -> int:
    return len(self.slide_ids)

  @property
  def dim(self) -> int:
    return int(self.features[0].shape[1])

  def split_indices(self, test_fraction: float = 0.3, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """Slide indices per split, in CSV order.

    Uses the CSV's ``split`` column when there is one; otherwise a random
    split, stratified by the first label column, with ``test_fraction`` of
    every class (at least one slide of a class with >= 2 slides) in test.
    """
    if self.splits is not None:
      out = {s: np.flatnonzero(self.splits == s) for s in SPLITS}
      out = {s: v for s, v in out.items() if len(v) or s != "val"}
    else:
      if not 0.0 < test_fraction < 1.0:
        raise FeatureDataError(
            f"config.data.test_fraction={test_fraction} must be in (0, 1) when "
            "the CSV has no 'split' column")
      rng = np.random.default_rng(seed)
      test = []
      for y in np.unique(self.labels[:, 0]):
        idx = np.flatnonzero(self.labels[:, 0] == y)
        k = int(round(test_fraction * len(idx)))
        k = min(max(k, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        test.extend(rng.permutation(idx)[:k].tolist())
      is_test = np.zeros(self.num_slides, bool)
      is_test[test] = True
      out = {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}
    for s in ("train", "test"):
      if not len(out[s]):
        raise FeatureDataError(
            f"no slide in the '{s}' split ({self.num_slides} slides); "
            + ("give some slides split='train' and some split='test' in the CSV"
               if self.splits is not None else "add slides or change test_fraction"))
    return out


def read_manifest(path: str, label_columns: Sequence[str] | str | None = None):
  """Reads the slide CSV.

  Args:
    path: CSV with a ``slide_id`` column, label columns and optional ``split``.
    label_columns: the label columns (a sequence or a comma-separated
      string); None or empty: every column except ``slide_id`` and ``split``.

  Returns:
    (slide_ids, float32 labels [S, T], label column names, splits or None).
  """
  if isinstance(label_columns, str):
    label_columns = [c.strip() for c in label_columns.split(",") if c.strip()]
  if not os.path.isfile(path):
    raise FeatureDataError(f"slide CSV {path} does not exist")
  with open(path, newline="", encoding="utf-8-sig") as f:
    rows = list(csv.reader(f))
  rows = [r for r in rows if any(c.strip() for c in r)]
  if not rows:
    raise FeatureDataError(f"slide CSV {path} is empty; it needs a header "
                           "'slide_id,<label column(s)>[,split]' and one row per slide")
  header = [c.strip() for c in rows[0]]
  dup = sorted({c for c in header if header.count(c) > 1})
  if dup:
    raise FeatureDataError(f"slide CSV {path}: duplicate column(s) {dup}")
  if "slide_id" not in header:
    raise FeatureDataError(f"slide CSV {path} has no 'slide_id' column; its "
                           f"columns are {header}")
  others = [c for c in header if c not in ("slide_id", "split")]
  if label_columns:
    missing = [c for c in label_columns if c not in header or c in ("slide_id", "split")]
    if missing:
      raise FeatureDataError(f"slide CSV {path}: label column(s) {missing} not "
                             f"found; label columns available: {others}")
    label_columns = list(label_columns)
  else:
    label_columns = others
  if not label_columns:
    raise FeatureDataError(f"slide CSV {path} has no label column; its columns "
                           f"are {header} (need slide_id, >= 1 label column, optional split)")
  col = {c: header.index(c) for c in header}
  slide_ids, labels, splits, seen = [], [], [], {}
  for line, r in enumerate(rows[1:], start=2):
    r = [c.strip() for c in r]
    if len(r) != len(header):
      raise FeatureDataError(f"slide CSV {path} line {line}: {len(r)} fields, "
                             f"the header has {len(header)}")
    sid = r[col["slide_id"]]
    if not sid:
      raise FeatureDataError(f"slide CSV {path} line {line}: empty slide_id")
    if sid in seen:
      raise FeatureDataError(f"slide CSV {path}: slide_id {sid!r} appears twice "
                             f"(lines {seen[sid]} and {line})")
    seen[sid] = line
    ys = []
    for c in label_columns:
      v = r[col[c]].lower()
      if v in _TRUE:
        ys.append(1.0)
      elif v in _FALSE:
        ys.append(0.0)
      else:
        raise FeatureDataError(
            f"slide CSV {path} line {line}: slide {sid!r} has {c}={r[col[c]]!r}; "
            "labels must be 0 or 1 (one 0/1 column per task: one-hot a "
            "categorical column into several)")
    if "split" in col:
      s = _SPLIT_ALIASES.get(r[col["split"]].lower())
      if s is None:
        raise FeatureDataError(
            f"slide CSV {path} line {line}: slide {sid!r} has split="
            f"{r[col['split']]!r}; valid: {list(SPLITS)}")
      splits.append(s)
    slide_ids.append(sid)
    labels.append(ys)
  if not slide_ids:
    raise FeatureDataError(f"slide CSV {path} has a header but no slides")
  return (slide_ids, np.asarray(labels, np.float32), tuple(label_columns),
          np.asarray(splits) if "split" in col else None)


def _h5py():
  try:
    import h5py  # lazy: only needed for .h5/.hdf5 files
  except ImportError as e:  # pragma: no cover - h5py is installed with slamjax
    raise ImportError("reading .h5 feature files needs h5py: pip install h5py") from e
  return h5py


def read_feature_file(path: str) -> dict[str, np.ndarray]:
  """Arrays of one file: ``features`` and, when present, ``coords``,
  ``cell_ids``, ``witness``. Raises FeatureDataError naming the file."""
  name = os.path.basename(path)
  ext = os.path.splitext(path)[1].lower()
  out = {}
  try:
    if ext in (".h5", ".hdf5"):
      h5py = _h5py()
      with h5py.File(path, "r") as f:
        if not isinstance(f.get("features"), h5py.Dataset):
          raise FeatureDataError(f"{path}: no 'features' dataset; it has "
                                 f"{sorted(f.keys())}")
        out["features"] = f["features"][()]
        for k in ("coords", "witness"):
          if isinstance(f.get(k), h5py.Dataset):
            out[k] = f[k][()]
        if isinstance(f.get("cell_ids"), h5py.Dataset):
          ds = f["cell_ids"]
          out["cell_ids"] = np.asarray(
              ds.asstr()[()] if ds.dtype.kind in "OS" else ds[()]).astype(str)
    elif ext == ".npy":
      out["features"] = np.load(path, allow_pickle=False)
    elif ext == ".npz":
      with np.load(path, allow_pickle=False) as z:
        if "features" not in z.files:
          raise FeatureDataError(f"{path}: no 'features' array; it has {sorted(z.files)}")
        for k in ("features", "coords", "witness", "cell_ids"):
          if k in z.files:
            out[k] = z[k]
    else:
      raise FeatureDataError(f"{path}: unsupported extension; use one of {EXTENSIONS}")
  except FeatureDataError:
    raise
  except ValueError as e:
    if "allow_pickle" in str(e):
      raise FeatureDataError(
          f"{path}: holds pickled Python objects, which slamjax never loads "
          "(allow_pickle=False); save plain numeric arrays instead") from e
    raise FeatureDataError(f"{path}: unreadable ({e})") from e
  except (OSError, zipfile.BadZipFile, EOFError) as e:
    raise FeatureDataError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
  return _check_arrays(name, path, out)


def _check_arrays(name, path, out):
  x = np.asarray(out["features"])
  if x.ndim == 3 and x.shape[0] == 1:  # [1, N, D], as some extractors write
    x = x[0]
  if x.ndim != 2:
    raise FeatureDataError(f"{path}: 'features' must be [N, D], got shape {x.shape}")
  if x.dtype.kind not in "fiub":
    raise FeatureDataError(f"{path}: 'features' has non-numeric dtype {x.dtype}")
  if x.shape[0] == 0:
    raise FeatureDataError(f"{path}: empty bag (0 instances); every slide "
                           "needs >= 1 instance")
  if x.shape[1] == 0:
    raise FeatureDataError(f"{path}: 'features' has 0 dimensions, shape {x.shape}")
  if x.dtype.kind == "f":
    nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
    if nan or inf:
      raise FeatureDataError(
          f"{path}: {nan + inf} non-finite values in 'features' ({nan} NaN, "
          f"{inf} infinite, of {x.size}; {int((~np.isfinite(x)).any(1).sum())} "
          f"of {x.shape[0]} instances affected)")
  x = x.astype(np.float32)
  if not np.isfinite(x).all():
    raise FeatureDataError(f"{path}: {int((~np.isfinite(x)).sum())} values "
                           "overflow float32")
  out["features"] = x
  n = x.shape[0]
  if "coords" in out:
    c = np.asarray(out["coords"])
    if c.ndim == 3 and c.shape[0] == 1:
      c = c[0]
    if c.shape != (n, 2):
      raise FeatureDataError(f"{path}: 'coords' must be [{n}, 2] to match "
                             f"{n} feature rows, got {c.shape}")
    out["coords"] = c
  for k in ("witness", "cell_ids"):
    if k in out:
      v = np.asarray(out[k])
      if v.ndim == 2 and 1 in v.shape:  # [N, 1] or [1, N]
        v = v.reshape(-1)
      if v.shape != (n,):
        raise FeatureDataError(f"{path}: '{k}' must have {n} entries to match the "
                               f"feature rows, got shape {v.shape}")
      out[k] = v
  if "witness" in out:
    w = out["witness"]
    if not np.isin(w, (0, 1)).all():
      raise FeatureDataError(f"{path}: 'witness' must be 0/1 per instance")
    out["witness"] = w.astype(bool)
  if "cell_ids" in out:
    out["cell_ids"] = out["cell_ids"].astype(str)
  return out


def list_feature_files(root: str) -> dict[str, str]:
  """slide id -> file for every supported feature file directly under root."""
  if not os.path.isdir(root):
    raise FeatureDataError(f"feature folder {root} does not exist")
  found: dict[str, list[str]] = {}
  for fn in sorted(os.listdir(root)):
    stem, ext = os.path.splitext(fn)
    if ext.lower() in EXTENSIONS and os.path.isfile(os.path.join(root, fn)):
      found.setdefault(stem, []).append(fn)
  twice = {s: fs for s, fs in found.items() if len(fs) > 1}
  if twice:
    raise FeatureDataError(
        f"feature folder {root}: slide(s) with more than one feature file: "
        + _listing([" and ".join(fs) for fs in twice.values()]) + "; keep one per slide")
  return {s: os.path.join(root, fs[0]) for s, fs in found.items()}


def _no_files_hint(root: str) -> str:
  subs = [d for d in ("h5_files", "features") if os.path.isdir(os.path.join(root, d))]
  pt = [f for f in os.listdir(root) if f.endswith(".pt")]
  hint = ""
  if subs:
    hint += f"; did you mean {os.path.join(root, subs[0])}?"
  if pt:
    hint += ("; .pt files are not read (they are pickles): use the .h5 files "
             "CLAM/TRIDENT write alongside them")
  return hint


def load_feature_folder(root: str, manifest: str = "slides.csv",
                        label_columns: Sequence[str] | str | None = None,
                        unlisted_files: str = "error") -> FeatureDataset:
  """Loads every slide of the CSV from ``root``, checking the whole folder.

  Args:
    root: folder of per-slide feature files (``.h5``/``.hdf5``/``.npy``/``.npz``).
    manifest: the slide CSV; a relative path that does not exist from the
      current directory is looked up under ``root``.
    label_columns: see :func:`read_manifest`.
    unlisted_files: "error" (default) or "ignore" for feature files whose
      slide is not in the CSV.

  Raises:
    FeatureDataError: a slide in the CSV has no feature file or the reverse,
      feature dimensions differ, a file holds NaN/Inf values (with counts),
      a bag is empty, a file is malformed, or the CSV columns are wrong. All
      problem files are listed together.
  """
  if unlisted_files not in ("error", "ignore"):
    raise FeatureDataError(f"config.data.unlisted={unlisted_files!r}; "
                           "valid: 'error', 'ignore'")
  if not root:
    raise FeatureDataError("config.data.root is not set: pass the feature folder, "
                           "e.g. --config.data.root=/path/to/features")
  if not os.path.isdir(root):
    raise FeatureDataError(f"feature folder {root} does not exist")
  path = manifest
  if not os.path.isabs(path) and not os.path.isfile(path):
    path = os.path.join(root, manifest)
  slide_ids, labels, columns, splits = read_manifest(path, label_columns)
  files = list_feature_files(root)
  missing = [s for s in slide_ids if s not in files]
  if missing:
    raise FeatureDataError(
        f"{len(missing)} slide(s) in {path} have no feature file "
        f"({'/'.join(EXTENSIONS)}) in {root}: {_listing(missing)}"
        + (_no_files_hint(root) if not files else ""))
  listed = set(slide_ids)
  extra = [os.path.basename(f) for s, f in files.items() if s not in listed]
  if extra and unlisted_files == "error":
    raise FeatureDataError(
        f"{len(extra)} feature file(s) in {root} have no row in {path}: "
        f"{_listing(extra)}; add them to the CSV, remove them, or set "
        "--config.data.unlisted=ignore")
  arrays, problems = [], []
  for s in slide_ids:
    try:
      arrays.append(read_feature_file(files[s]))
    except FeatureDataError as e:
      problems.append(str(e))
  if problems:
    raise FeatureDataError(f"{len(problems)} unusable feature file(s):\n  "
                           + "\n  ".join(problems))
  dims = np.array([a["features"].shape[1] for a in arrays])
  if len(set(dims.tolist())) > 1:
    values, counts = np.unique(dims, return_counts=True)
    common = int(values[np.argmax(counts)])
    ref = os.path.basename(files[slide_ids[int(np.flatnonzero(dims == common)[0])]])
    odd = [f"{os.path.basename(files[s])} (D={d})" for s, d in zip(slide_ids, dims)
           if d != common]
    raise FeatureDataError(
        f"feature dimensions differ across slides in {root}: {int(counts.max())} "
        f"file(s) have D={common} (e.g. {ref}), but {_listing(odd)}")
  return FeatureDataset(
      slide_ids=list(slide_ids), files=[files[s] for s in slide_ids],
      features=[a["features"] for a in arrays],
      coords=[a.get("coords") for a in arrays],
      cell_ids=[a.get("cell_ids") for a in arrays],
      witness=[a.get("witness") for a in arrays],
      labels=labels, label_columns=columns, splits=splits)
