r"""Writes slamjax embeddings and attention in formats other tools read.

* :func:`export_embeddings`: one HDF5 file per bag in the CLAM/TRIDENT layout
  (``features`` [N, D] float32, ``coords`` [N, 2] when the cells have them)
  plus ``cell_ids`` [N] (utf-8), ``witness`` [N] (uint8, simulated bags) and
  ``classes`` [N] (pool class of every cell, names in the ``class_names``
  attribute), and a ``slides.csv`` (slide_id, label, split). The folder is a
  valid ``data.source="features"`` input (:mod:`slamjax.features.dataset`).
* :func:`export_attention`: one CSV per slide: ``instance`` (row of the
  feature file), ``x``/``y`` when coords are known, ``cell_id``/``witness``
  when known, then ``attention`` (one column per head/class,
  ``attention_<name>``, when a head gives several).

Example:
  >>> import os, pathlib, tempfile
  >>> import numpy as np
  >>> d = tempfile.mkdtemp()
  >>> paths = export_attention(d, ["s1"], [np.array([0.25, 0.75])],
  ...                          coords=[np.array([[0, 0], [256, 0]])])
  >>> print(pathlib.Path(paths[0]).read_text().strip())
  instance,x,y,attention
  0,0,0,0.25
  1,256,0,0.75
"""

from __future__ import annotations

import csv
import json
import os
from typing import Sequence

import numpy as np


def bag_slide_ids(split: str, num_bags: int) -> list[str]:
  """Slide ids of simulated bags: ``<split>_<index:04d>``."""
  return [f"{split}_{i:04d}" for i in range(num_bags)]


def _label_columns(labels: np.ndarray) -> list[str]:
  labels = np.asarray(labels)
  return ["label"] if labels.ndim == 1 else [f"label_{j}" for j in range(labels.shape[1])]


def write_feature_file(path: str, features: np.ndarray, *, coords=None,
                       cell_ids=None, witness=None, classes=None,
                       attrs: dict | None = None) -> None:
  """One slide's HDF5 file in the CLAM/TRIDENT layout (+ slamjax extras)."""
  import h5py  # lazy: only exports and .h5 inputs need it
  with h5py.File(path, "w") as f:
    f.create_dataset("features", data=np.asarray(features, np.float32))
    if coords is not None:
      f.create_dataset("coords", data=np.asarray(coords))
    if cell_ids is not None:
      f.create_dataset("cell_ids", data=np.asarray(cell_ids, dtype=object),
                       dtype=h5py.string_dtype("utf-8"))
    if witness is not None:
      f.create_dataset("witness", data=np.asarray(witness, np.uint8))
    if classes is not None:
      f.create_dataset("classes", data=np.asarray(classes, np.int32))
    for k, v in (attrs or {}).items():
      f.attrs[k] = v


def write_slides_csv(path: str, slide_ids: Sequence[str], labels, splits=None,
                     columns: Sequence[str] | None = None) -> None:
  """``slide_id,<label columns>[,split]`` with 0/1 labels."""
  labels = np.asarray(labels)
  columns = list(columns or _label_columns(labels))
  lab2 = labels.reshape(len(labels), -1)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["slide_id", *columns] + (["split"] if splits is not None else []))
    for i, sid in enumerate(slide_ids):
      w.writerow([sid, *[int(v) for v in lab2[i]]]
                 + ([splits[i]] if splits is not None else []))


def export_embeddings(workdir: str, pool, bags, emb, subdir: str = "features") -> str:
  """Writes every simulated bag's cell embeddings as a feature folder.

  Args:
    workdir: run directory; files go to ``workdir/<subdir>/``.
    pool: the ``CellPool`` (cell ids, classes; ``coords`` if it has them).
    bags: split -> ``BagSet``.
    emb: split -> per-bag [n_cells, D] embeddings (the raw ``embed_bags``
      output; ``data.standardize`` standardises them again when read).

  Returns:
    The folder, usable as ``--config.data.root`` with
    ``configs/features_folder.py``. Slide ids are ``<split>_<index>``.
  """
  out = os.path.join(workdir, subdir)
  os.makedirs(out, exist_ok=True)
  coords = getattr(pool, "coords", None)
  ids, labels, splits = [], [], []
  for split, bs in bags.items():
    if len(emb[split]) != bs.num_bags:
      raise ValueError(f"export_embeddings: split {split!r} has {bs.num_bags} bags "
                       f"but {len(emb[split])} embedding arrays")
    names = bag_slide_ids(split, bs.num_bags)
    for i, sid in enumerate(names):
      cells = np.asarray(bs.cells[i])
      e = np.asarray(emb[split][i], np.float32)
      if len(e) != len(cells):
        raise ValueError(f"export_embeddings: bag {sid} has {len(cells)} cells but "
                         f"{len(e)} embeddings")
      label = np.asarray(bs.bag_labels[i])
      write_feature_file(
          os.path.join(out, f"{sid}.h5"), e,
          coords=None if coords is None else np.asarray(coords)[cells],
          cell_ids=[pool.cell_ids[c] for c in cells],
          witness=bs.witness[i],
          classes=np.asarray(pool.labels)[cells],
          attrs={"slide_id": sid, "split": split, "source": "slamjax",
                 "label": json.dumps(label.tolist()),
                 "class_names": json.dumps(list(pool.class_names))})
      ids.append(sid)
      labels.append(label)
      splits.append(split)
  write_slides_csv(os.path.join(out, "slides.csv"), ids, np.asarray(labels), splits)
  return out


def _head_names(names, h: int) -> list[str]:
  return list(names) if names is not None and len(names) == h else [str(j) for j in range(h)]


def export_attention(out_dir: str, slide_ids: Sequence[str], attention, *,
                     class_attention=None, coords=None, cell_ids=None,
                     witness=None, names: Sequence[str] | None = None) -> list[str]:
  """Writes ``out_dir/<slide_id>.csv`` per slide; returns the paths.

  Args:
    out_dir: folder for the CSVs (created).
    slide_ids: one id per slide (file names).
    attention: per slide, [N] attention (column ``attention``) or [N, H]
      (columns ``attention_<name>``).
    class_attention: optional per-slide [N, C] attention per task/class
      (entries may be None) -> ``attention_<name>`` after ``attention``.
    coords: optional per-slide [N, 2] (entries may be None) -> ``x``, ``y``.
    cell_ids: optional per-slide [N] ids -> ``cell_id``.
    witness: optional per-slide [N] 0/1 instance labels -> ``witness``.
    names: column suffixes for the H or C columns (default ``0, 1, ...``).
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i, sid in enumerate(slide_ids):
    a = np.asarray(attention[i], np.float64)
    n = a.shape[0]
    a2 = a.reshape(n, -1)
    if a.ndim == 1:
      acols = ["attention"]
    else:
      acols = [f"attention_{h}" for h in _head_names(names, a2.shape[1])]
    ca = None if class_attention is None else class_attention[i]
    if ca is not None:
      ca = np.asarray(ca, np.float64)
      ca = ca[:, None] if ca.ndim == 1 else ca
      if ca.ndim != 2 or ca.shape[0] != n:
        raise ValueError(f"export_attention: slide {sid} has {n} attention values "
                         f"but class attention of shape {ca.shape} (need [{n}, C])")
      acols += [f"attention_{h}" for h in _head_names(names, ca.shape[1])]
      a2 = np.concatenate([a2, ca], 1)
    cols, data = ["instance"], [np.arange(n)]
    c = None if coords is None else coords[i]
    if c is not None:
      c = np.asarray(c)
      if c.shape != (n, 2):
        raise ValueError(f"export_attention: slide {sid} has {n} attention values "
                         f"but coords of shape {c.shape}")
      cols += ["x", "y"]
      data += [c[:, 0], c[:, 1]]
    for name, per in (("cell_id", cell_ids), ("witness", witness)):
      v = None if per is None else per[i]
      if v is not None:
        v = np.asarray(v)
        if len(v) != n:
          raise ValueError(f"export_attention: slide {sid} has {n} attention "
                           f"values but {len(v)} {name} entries")
        cols.append(name)
        data.append(v.astype(int) if name == "witness" else v)
    cols += acols
    data += [a2[:, h] for h in range(a2.shape[1])]
    path = os.path.join(out_dir, f"{sid}.csv")
    with open(path, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(cols)
      for r in range(n):
        w.writerow([_fmt(d[r]) for d in data])
    paths.append(path)
  return paths


def _fmt(v):
  if isinstance(v, (float, np.floating)):
    return repr(float(v))  # exact round trip
  if isinstance(v, np.integer):
    return int(v)
  return v


def export_bag_attention(workdir: str, pool, bagset, split: str, attention,
                         task_attention=None, subdir: str = "attention") -> list[str]:
  """:func:`export_attention` for simulated bags of one split (ids as
  :func:`export_embeddings` names them, with cell ids and witness flags).

  ``attention``/``task_attention`` are ``mil.train.predict``'s outputs of that
  split (per bag [N] and, for heads with per-task attention, [T, N])."""
  coords = getattr(pool, "coords", None)
  return export_attention(
      os.path.join(workdir, subdir), bag_slide_ids(split, bagset.num_bags), attention,
      class_attention=None if task_attention is None else [
          None if t is None else np.asarray(t).T for t in task_attention],
      coords=None if coords is None else [np.asarray(coords)[c] for c in bagset.cells],
      cell_ids=[[pool.cell_ids[c] for c in cells] for cells in bagset.cells],
      witness=bagset.witness)
