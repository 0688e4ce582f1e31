r"""Feature-bag datasets: one file of instance features per slide + a CSV of labels.

This reads the per-slide layout that CLAM and TRIDENT write (HDF5 with a
``features`` array and usually ``coords``), plain ``.npy``/``.npz`` arrays and
the HDF5 files of :mod:`slamjax.features.export`::

  root/
    slide_001.h5    # "features" [N, D]; optional "coords" [N, 2],
                    # "cell_ids" [N] (strings), "witness" [N] (0/1)
    slide_002.npz   # the same names as arrays
    slide_003.npy   # just the [N, D] features
    slides.csv      # slide_id, label columns[, patient_id, split, fold]

A file's slide id is its name without the extension (compared in Unicode
NFC). Bags may have any number of instances (>= 1). Nothing is ever
unpickled: ``.npy``/``.npz`` are read with ``allow_pickle=False``.

The slide table has the rules of the slides runner
(:mod:`slamjax.data.slide_table`): 0/1 (or true/false, yes/no) label
columns or one categorical column, ``patient_id``, ``split`` (train/val/test)
and ``fold``. A slide with empty labels is unlabeled: it is left out of the
splits that train and score, and listed under ``'unlabeled'`` by
:meth:`FeatureDataset.split_indices` (the features runner predicts it).

Every problem raises :class:`FeatureDataError` (the one input error class of
every runner, ``slide_table.DataError``) naming the file or slide.

Example:
  >>> import os, tempfile
  >>> import numpy as np
  >>> root = tempfile.mkdtemp()
  >>> for i in range(5):
  ...   np.save(os.path.join(root, f"s{i}.npy"), np.full((3 + i, 8), i, np.float32))
  >>> with open(os.path.join(root, "slides.csv"), "w") as f:
  ...   _ = f.write("slide_id,label,split\ns0,0,train\ns1,1,train\ns2,0,test\n"
  ...               "s3,1,test\ns4,,test\n")
  >>> ds = load_feature_folder(root)
  >>> ds.num_slides, ds.dim, [len(x) for x in ds.features], ds.labels[:, 0].tolist()
  (5, 8, [3, 4, 5, 6, 7], [0.0, 1.0, 0.0, 1.0, nan])
  >>> {k: v.tolist() for k, v in ds.split_indices().items()}
  {'train': [0, 1], 'test': [2, 3], 'unlabeled': [4]}
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Sequence

import numpy as np

from slamjax.data import slide_table

EXTENSIONS = (".h5", ".hdf5", ".npy", ".npz")
SPLITS = slide_table.SPLITS
_MAX_LISTED = 10

# One error class for every runner's input, so one `except` catches all.
FeatureDataError = slide_table.DataError


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
    labels: float32 [num_slides, num_tasks] 0/1 bag labels; NaN rows are
      unlabeled slides.
    label_columns: the name of every task: its CSV column, or the category
      of a categorical column.
    splits: the CSV's ``split`` per slide (train/val/test), or None.
    patient_ids: per slide (the slide id without a ``patient_id`` column);
      None counts as the slide ids.
    folds: the CSV's ``fold`` per slide (int64), or None; read and checked,
      not used by the features runner (it has one split).
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
  patient_ids: list[str] | None = None
  folds: np.ndarray | None = None

  @property
  def num_slides(self) -> int:
    return len(self.slide_ids)

  @property
  def dim(self) -> int:
    return int(self.features[0].shape[1])

  def labelled(self) -> np.ndarray:
    """bool ``[num_slides]``: True where the slide has labels."""
    return ~np.isnan(self.labels).any(axis=1)

  def split_indices(self, test_fraction: float = 0.3, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """Slide indices per split, in CSV order.

    Labelled slides only. Uses the CSV's ``split`` column when there is one;
    otherwise a random split of patients, stratified by the first label
    column (a patient is positive when one of its slides is), with
    ``test_fraction`` of every class (at least one patient of a class with
    >= 2 patients) in test; a patient's slides stay together. Unlabeled
    slides, if any, are under ``'unlabeled'``: predicted, never trained on
    or scored.
    """
    lab = self.labelled()
    if self.splits is not None:
      out = {s: np.flatnonzero(lab & (self.splits == s)) for s in SPLITS}
      out = {s: v for s, v in out.items() if len(v) or s != "val"}
    else:
      if not 0.0 < test_fraction < 1.0:
        raise FeatureDataError(
            f"config.data.test_fraction={test_fraction} must be in (0, 1) when "
            "the CSV has no 'split' column")
      # Draw patients, not slides: one patient's slides on both sides leak.
      patients = self.patient_ids or self.slide_ids
      groups: dict[str, list[int]] = {}
      for i in np.flatnonzero(lab):
        groups.setdefault(patients[i], []).append(int(i))
      members = list(groups.values())
      y = np.asarray([self.labels[m, 0].max() for m in members])
      rng = np.random.default_rng(seed)
      test = []
      for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = int(round(test_fraction * len(idx)))
        k = min(max(k, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        test.extend(rng.permutation(idx)[:k].tolist())
      is_test = np.zeros(self.num_slides, bool)
      for g in test:
        is_test[members[g]] = True
      out = {"train": np.flatnonzero(lab & ~is_test), "test": np.flatnonzero(is_test)}
    for s in ("train", "test"):
      if not len(out[s]):
        raise FeatureDataError(
            f"no labelled slide in the '{s}' split ({int(lab.sum())} labelled slides); "
            + ("give some labelled slides split='train' and some split='test' in the CSV"
               if self.splits is not None else "add slides or change test_fraction"))
    if not lab.all():
      out["unlabeled"] = np.flatnonzero(~lab)
    return out


def read_manifest(path: str, label_columns: Sequence[str] | str | None = None,
                  label_column: str = "", negative_label: str = ""
                  ) -> slide_table.SlideTable:
  """Reads the slide table with the rules of every runner
  (:mod:`slamjax.data.slide_table`).

  Args:
    path: CSV with a ``slide_id`` column, label columns and optional
      ``patient_id``, ``split`` (train/val/test) and ``fold``.
    label_columns: the 0/1 label columns (a sequence or a comma-separated
      string); None or empty: every column but the reserved ones.
    label_column: one categorical column instead (``config.data.label_column``).
    negative_label: its normal value (``config.data.negative_label``).

  Returns:
    A :class:`slamjax.data.slide_table.SlideTable`.
  """
  if not os.path.isfile(path):
    raise FeatureDataError(
        f"slide table {path} not found (config.data.manifest: a relative path is "
        "looked up in the current directory, then in config.data.root)")
  return slide_table.parse(path, label_columns or (), label_column or "",
                           negative_label or "")


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
  """slide id (the file name without extension, in NFC) -> file for every
  supported feature file directly under root."""
  if not os.path.isdir(root):
    raise FeatureDataError(f"feature folder {root} does not exist")
  found: dict[str, list[str]] = {}
  for fn in sorted(os.listdir(root)):
    stem, ext = os.path.splitext(fn)
    if ext.lower() in EXTENSIONS and os.path.isfile(os.path.join(root, fn)):
      found.setdefault(slide_table.nfc(stem), []).append(fn)
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
                        unlisted_files: str = "error", label_column: str = "",
                        negative_label: str = "") -> FeatureDataset:
  """Loads every slide of the CSV from ``root``, checking the whole folder.

  Args:
    root: folder of per-slide feature files (``.h5``/``.hdf5``/``.npy``/``.npz``).
    manifest: the slide CSV; a relative path that does not exist from the
      current directory is looked up under ``root``.
    label_columns: see :func:`read_manifest`.
    unlisted_files: "error" (default) or "ignore" for feature files whose
      slide is not in the CSV.
    label_column, negative_label: one categorical column and its normal
      value, instead of 0/1 columns (see :func:`read_manifest`).

  Raises:
    FeatureDataError: a slide in the CSV has no feature file or the reverse,
      feature dimensions differ, a file holds NaN/Inf values (with counts),
      a bag is empty, a file is malformed, or the CSV columns are wrong. All
      problem files are listed together.
  """
  if unlisted_files not in slide_table.UNLISTED:
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
  table = read_manifest(path, label_columns, label_column, negative_label)
  slide_ids = table.slide_ids
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
      labels=table.labels, label_columns=table.task_names,
      splits=None if table.splits is None else np.asarray(table.splits),
      patient_ids=list(table.patient_ids), folds=table.folds)
