"""Class-folder image datasets: ``<root>/<class>/<file>.jpg`` -> ``CellPool``.

Class names come from the sub-folders of ``root`` (sorted) or from a manifest
CSV with ``label`` and ``file`` columns (``file`` relative to ``root``). Files
are listed in a fixed order (class, then path), so the pool and every cell
index are the same on every run. ``cell_ids`` are the paths relative to
``root``, e.g. ``"lymphocyte/LY_1234.jpg"``.

Decoding runs on a thread pool (PIL releases the GIL while decoding and
resizing). Each image is converted to RGB, centre-cropped to a square if it is
not one, and resized to ``image_size`` (antialiased bilinear).

Errors name the offending path: an empty class folder, a class asked for that
does not exist (the message lists the available ones), a file that is not an
image, an image that does not decode. With ``skip_bad_files=True`` the last
two are skipped instead and counted in the ``LoadReport``.

Config (``config.data``) for ``source='folder'``:

* ``root``: dataset folder.
* ``image_size``: side of the square images in the pool (default 64).
* ``classes``: optional class names to load (default: all).
* ``manifest``: optional CSV path (relative to ``root`` or absolute).
* ``dedup``: drop exact duplicate files (same bytes), keeping the first.
* ``skip_bad_files``: skip undecodable/non-image files instead of failing.
* ``max_per_class``: optional cap per class (a seeded random subset).
* ``num_workers``: decode threads (default: CPU count).

Example:
  >>> import os, tempfile, numpy as np
  >>> from PIL import Image
  >>> root = tempfile.mkdtemp()
  >>> for c in ("blast", "normal"):
  ...   os.makedirs(os.path.join(root, c))
  ...   for i in range(3):
  ...     Image.new("RGB", (20, 20), (i, 0, 0)).save(f"{root}/{c}/{i}.png")
  >>> pool, report = load_folder(root, image_size=8)
  >>> pool.images.shape, pool.class_names, pool.cell_ids[0]
  ((6, 8, 8, 3), ('blast', 'normal'), 'blast/0.png')
  >>> report.counts
  {'blast': 3, 'normal': 3}
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import os
from typing import Iterable, Sequence

import numpy as np

from slamjax.data import image_cache
from slamjax.data import pool as pool_lib
from slamjax.data.errors import BadFileError
from slamjax.data.errors import FolderDataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")




@dataclasses.dataclass(frozen=True)
class FileIndex:
  """The files of a dataset, in a fixed order, without pixels.

  Attributes:
    root: dataset folder.
    paths: path of every file relative to ``root`` (also its cell id).
    labels: int32 [N], index into ``class_names``.
    class_names: class of every label.
  """
  root: str
  paths: tuple[str, ...]
  labels: np.ndarray
  class_names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.paths)

  def counts(self) -> dict[str, int]:
    return {c: int((self.labels == i).sum()) for i, c in enumerate(self.class_names)}

  def select(self, keep: np.ndarray) -> "FileIndex":
    keep = np.asarray(keep)
    if keep.dtype == bool:
      keep = np.flatnonzero(keep)
    return FileIndex(self.root, tuple(self.paths[i] for i in keep),
                     self.labels[keep], self.class_names)


@dataclasses.dataclass
class LoadReport:
  """What loading found: counts per class and what was dropped, and why."""
  counts: dict[str, int]
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  duplicates: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  def format(self) -> str:
    total = sum(self.counts.values())
    width = max([len(c) for c in self.counts] + [5])
    lines = [f"{c:<{width}} {n:>7}" for c, n in self.counts.items()]
    lines.append(f"{'total':<{width}} {total:>7}")
    if self.duplicates:
      cross = [(d, k) for d, k in self.duplicates
               if d.split("/")[0] != k.split("/")[0]]
      lines.append(f"dropped {len(self.duplicates)} exact duplicate file(s)"
                   + (f", {len(cross)} of them filed under another class: "
                      + ", ".join(f"{d} (= {k})" for d, k in cross[:5])
                      if cross else ""))
    if self.skipped:
      lines.append(f"skipped {len(self.skipped)} bad file(s): " + "; ".join(
          f"{p}: {why}" for p, why in self.skipped[:5])
                   + (" ..." if len(self.skipped) > 5 else ""))
    return "\n".join(lines)


def _is_hidden(name: str) -> bool:
  return name.startswith(".") or name.startswith("__")


def _check_classes(wanted: Sequence[str] | None, available: Sequence[str],
                   where: str) -> list[str]:
  if wanted is None:
    return list(available)
  wanted = list(wanted)
  missing = [c for c in wanted if c not in available]
  if missing:
    raise FolderDataError(
        f"Class(es) {missing} not found in {where}; available classes: "
        f"{sorted(available)}")
  if len(set(wanted)) != len(wanted):
    raise FolderDataError(f"Class names repeat in {wanted}")
  return wanted


def _has_images(folder_path: str) -> bool:
  for dirpath, dirnames, filenames in os.walk(folder_path):
    dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
    if any(f.lower().endswith(IMAGE_EXTENSIONS) and not _is_hidden(f) for f in filenames):
      return True
  return False


def scan_folder(root: str, *, classes: Sequence[str] | None = None,
                manifest: str | None = None,
                max_per_class: int | None = None, seed: int = 0,
                skip_bad_files: bool = False,
                skipped: list | None = None) -> FileIndex:
  """Lists the image files of a class-folder dataset (no decoding).

  Args:
    root: dataset folder holding one sub-folder per class.
    classes: class names to keep, in this label order (default: all, sorted).
    manifest: CSV with columns ``label`` and ``file`` (relative to ``root``);
      a relative ``manifest`` path is relative to ``root``.
    max_per_class: keep at most this many files per class (seeded subset).
    seed: seed of the ``max_per_class`` subset.
    skip_bad_files: skip files without an image extension instead of raising.
    skipped: a list that receives ``(path, reason)`` of every skipped file.

  Raises:
    FolderDataError: missing root, unknown class, empty class folder or
      non-image file (unless skipped).
  """
  if not os.path.isdir(root):
    raise FolderDataError(f"Dataset folder {root!r} does not exist")
  skipped = [] if skipped is None else skipped
  by_class: dict[str, list[str]] = {}
  if manifest:
    mpath = manifest if os.path.isabs(manifest) else os.path.join(root, manifest)
    if not os.path.isfile(mpath):
      raise FolderDataError(f"Manifest {mpath!r} does not exist")
    with open(mpath, newline="") as f:
      reader = csv.DictReader(f)
      if not {"label", "file"} <= set(reader.fieldnames or ()):
        raise FolderDataError(f"Manifest {mpath!r} needs columns 'label' and "
                              f"'file', has {reader.fieldnames}")
      for row in reader:
        by_class.setdefault(row["label"], []).append(row["file"])
    where = f"manifest {mpath!r}"
  else:
    for name in sorted(os.listdir(root)):
      if not _is_hidden(name) and os.path.isdir(os.path.join(root, name)):
        by_class[name] = []
    where = f"{root!r}"
  names = _check_classes(classes, sorted(by_class), where)
  if classes is None and not manifest:  # an unused empty folder must not block a run
    empty = [n for n in names if not _has_images(os.path.join(root, n))]
    if empty:
      print(f"data: skipping class folder(s) {empty} of {root!r}: no image files "
            "(config.data.classes=a,b loads only the classes named)", flush=True)
      names = [n for n in names if n not in empty]

  paths, labels = [], []
  rng = np.random.default_rng([seed, 7])
  for label, name in enumerate(names):
    if manifest:
      files = sorted(by_class[name])
      for rel in files:
        if not os.path.isfile(os.path.join(root, rel)):
          raise FolderDataError(f"{rel}: listed in {where} but not found in {root!r}")
    else:
      files = []
      for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        rel_dir = os.path.relpath(dirpath, root)
        files += [os.path.join(rel_dir, fn).replace(os.sep, "/")
                  for fn in filenames if not _is_hidden(fn)]
      files.sort()
    good = []
    for rel in files:
      if rel.lower().endswith(IMAGE_EXTENSIONS):
        good.append(rel)
      elif skip_bad_files:
        skipped.append((rel, "not an image file"))
      else:
        raise BadFileError(os.path.join(root, rel), "not an image file (expected "
                           f"one of {', '.join(IMAGE_EXTENSIONS)})")
    if not good:
      raise FolderDataError(
          f"Class folder {os.path.join(root, name)!r} holds no image files"
          + (f" ({len(files)} other file(s))" if files else "")
          + f"; config.data.classes={list(names)} asks for it")
    if max_per_class is not None and len(good) > max_per_class:
      keep = np.sort(rng.choice(len(good), max_per_class, replace=False))
      good = [good[i] for i in keep]
    paths += good
    labels += [label] * len(good)
  return FileIndex(root, tuple(paths), np.asarray(labels, np.int32), tuple(names))


def decode_image(data: bytes, image_size: int | None, name: str = "<bytes>") -> np.ndarray:
  """Decodes image bytes to uint8 [S, S, 3] (square centre crop + resize;
  ``image_size`` None keeps the square's size): ``image_cache.decode_cell``,
  so both pipelines read 16-bit data, transparency and EXIF orientation
  alike. JPEGs are decoded at full scale (no DCT draft), as this pipeline
  always has, so its pools do not change.

  Raises:
    BadFileError: naming ``name`` if the bytes are not a decodable image.
  """
  return image_cache.decode_cell(data, image_size, name, draft=False)


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _map_threads(fn, items: Sequence, num_workers: int | None) -> Iterable:
  workers = num_workers or os.cpu_count() or 1
  if workers <= 1 or len(items) < 64:
    return map(fn, items)
  chunk = max(1, min(256, len(items) // (workers * 8)))
  ex = concurrent.futures.ThreadPoolExecutor(workers)
  try:
    return list(ex.map(fn, items, chunksize=chunk))
  finally:
    ex.shutdown()


def load_folder(root: str, *, image_size: int | None = 64,
                classes: Sequence[str] | None = None,
                manifest: str | None = None, dedup: bool = False,
                skip_bad_files: bool = False,
                max_per_class: int | None = None, seed: int = 0,
                num_workers: int | None = None) -> tuple[pool_lib.CellPool, LoadReport]:
  """Scans and decodes a class-folder dataset into a ``CellPool``.

  Args: see ``scan_folder``; plus ``image_size`` (None keeps the source size,
  which must then be the same for all images), ``dedup`` (drop files whose
  bytes equal an earlier file's; md5) and ``num_workers`` (decode threads).

  Returns:
    (pool, report). Every class requested must keep at least one image.
  """
  skipped: list[tuple[str, str]] = []
  index = scan_folder(root, classes=classes, manifest=manifest,
                      max_per_class=max_per_class, seed=seed,
                      skip_bad_files=skip_bad_files, skipped=skipped)

  def work(i):
    rel = index.paths[i]
    data = _read(os.path.join(root, rel))
    digest = hashlib.md5(data).digest() if dedup else None
    try:
      return decode_image(data, image_size, os.path.join(root, rel)), digest, None
    except BadFileError as e:
      if not skip_bad_files:
        raise
      return None, digest, e.reason

  results = _map_threads(work, range(len(index)), num_workers)
  images, keep, seen, duplicates = [], [], {}, []
  for i, (img, digest, err) in enumerate(results):
    rel = index.paths[i]
    if err is not None:
      skipped.append((rel, err))
      continue
    if dedup:
      if digest in seen:
        duplicates.append((rel, seen[digest]))
        continue
      seen[digest] = rel
    images.append(img)
    keep.append(i)
  index = index.select(np.asarray(keep, np.int64))
  counts = index.counts()
  empty = [c for c, n in counts.items() if n == 0]
  if empty:
    raise FolderDataError(f"No usable images left in class(es) {empty} of "
                          f"{root!r} ({len(skipped)} bad file(s) skipped)")
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise FolderDataError(f"Images in {root!r} have different sizes {sorted(shapes)}; "
                          "set config.data.image_size")
  pool = pool_lib.CellPool(np.stack(images), index.labels, index.class_names,
                           index.paths)
  return pool, LoadReport(counts, skipped, duplicates)


def resolve_root(root: str) -> str:
  """``root`` as given if it exists, else relative to the repository root."""
  if os.path.isabs(root) or os.path.isdir(root):
    return root
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  alt = os.path.normpath(os.path.join(repo, root))
  return alt if os.path.isdir(alt) else root


def pool_from_config(cfg, seed: int) -> pool_lib.CellPool:
  """``SOURCES['folder']``: loads ``cfg`` (``config.data``) and logs counts."""
  root = resolve_root(cfg.root)
  pool, report = load_folder(
      root, image_size=cfg.image_size, classes=cfg.classes, manifest=cfg.manifest,
      dedup=cfg.dedup, skip_bad_files=cfg.skip_bad_files,
      max_per_class=cfg.max_per_class, seed=seed, num_workers=cfg.num_workers)
  print(f"data: loaded {len(pool)} cells of size {pool.images.shape[1]} from "
        f"{root}:\n{report.format()}", flush=True)
  return pool
