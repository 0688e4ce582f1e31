r"""The workdir contract: what a run writes there, and when a rerun may reuse it.

Every runner writes ``config.json`` (the config it ran with) and
``fingerprint.json``: what decides its results, in readable form so that a
difference can be named. The fingerprint holds

* ``config``: every config key (dotted) except those that cannot change a
  result (:data:`IGNORED`: log and checkpoint intervals, output and cache
  paths, decode threads, ``resume``), the sections the runner never reads
  (:data:`UNUSED`) and the keys a rerun may change while resuming
  (:data:`FREE`, kept apart under ``free``);
* ``data``: per slide its labels, patient, ``fold``/``split`` column, number
  of cells and a hash of its cells' paths and decoded pixels (slides and
  feature folders); or the cell pool's counts and a hash of its images,
  labels and ids (simulated bags); or the file list with sizes and
  modification times (the study).

A rerun (``config.resume="auto"``, the default) compares the two:

* nothing recorded yet: the run starts;
* the same fingerprint: the run resumes where it stopped;
* a difference: :class:`WorkdirError` before any work (config differences
  before the data is loaded), naming every difference ("labels of 70 slides
  differ", "data.image_size: 24 -> 32", "12 slides added, 3 removed", "cell
  images differ in 5 slides") and the choices: a new ``--workdir``, or
  ``--config.resume=overwrite``, which deletes the run's outputs (once the
  data has loaded) and starts afresh. Results of two runs never mix.

A workdir made before fingerprints existed (results but no
``fingerprint.json``) is checked against its ``config.json`` and, if that
matches, adopted with a warning that its data could not be checked.

Keys a rerun may change (:data:`FREE`), because what is recorded stays valid:

* slides: ``eval.baselines`` (every encoder or slide-feature baseline has
  its own fold folders, and SLAM-AGS folds do not depend on the list; a
  name added runs its folds, one removed is left out of the report),
  ``eval.final_model`` (``final/`` is trained after the folds; raising it to
  True trains it) and ``eval.top_k`` (galleries only);
* pipeline and features: ``mil.heads`` (each head trains in its own
  ``mil_<head>/`` with the same seed on the same embeddings), ``eval.top_k``
  and the exports (metrics are recomputed from the checkpoints every run);
* study: ``study.methods``, ``study.witness_rates``, ``study.seeds`` (one
  record per run; new entries add runs) and ``study.bootstrap`` (tables).

Everything else is result-deciding, ``eval.folds`` included: a different
``k`` reassigns every slide to a fold.

Example:
  >>> from slamjax import config
  >>> cfg = config.load("slides", "quick")
  >>> data = {"kind": "slides", "tasks": ["label"], "slides": {
  ...     "s1": {"label": [0.0], "patient": "p1", "cells": 3, "content": "ab"},
  ...     "s2": {"label": [1.0], "patient": "p2", "cells": 4, "content": "cd"}}}
  >>> old = fingerprint(cfg, data)
  >>> cfg.data.image_size = 32
  >>> cfg.eval.baselines = ("pixel_stats",)  # free: resumes
  >>> data["slides"]["s2"] = dict(data["slides"]["s2"], label=[0.0])
  >>> differences(old, fingerprint(cfg, data))
  ['augment.crop_size: 21 -> 28', 'data.image_size: 24 -> 32', 'labels of 1 slide differ (s2)']
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from typing import Sequence

import numpy as np

from slamjax.config.values import names

CONFIG = "config.json"
FINGERPRINT = "fingerprint.json"
VERSION = 1

# Names of what a run writes, in one place (writers and readers import them).
BAGS = "bags.json"  # pipeline: the cells of every simulated bag
PRETRAIN_CKPT = "pretrain_ckpt"
PRETRAIN_METRICS = "pretrain_metrics.jsonl"
PRETRAIN_CURVES = "pretrain_curves.png"
COLLAPSE = "pretrain_collapse.json"  # slamjax.collapse's summary
PSEUDO_CKPT = "pseudo_ckpt"  # slamjax.pseudo_label
PSEUDO_LABELS = "pseudo_labels.npz"
PSEUDO_ROUNDS = "pseudo_rounds.json"
PSEUDO_METRICS = "pseudo_metrics.jsonl"
STANDARDIZE = "standardize.npz"  # slides: embedding mean/std of the training slides
MODEL = "model.json"  # slides: heads, thresholds, epochs, fusion of a fold/final
RECORD = "record.json"  # slides: a finished fold (its metrics and fingerprint)
MEAN_EMBEDDINGS = "mean_embeddings.npz"  # slides: what the mean_pool baseline reads
RESULTS = "results.md"
METRICS = "metrics.json"

# What each runner writes in its workdir (glob patterns): their presence means
# there are results to protect; resume=overwrite deletes them. The study's
# records live in its results folder (study.results_dir, default
# workdir/results), its runs in workdir/seed*.
OUTPUTS = {
    "slides": ("folds", "final", "results.md", "metrics.json", "oof_predictions.csv",
               "roc.png", "galleries", "unlabeled_predictions.csv"),
    "pipeline": (BAGS, PRETRAIN_CKPT, PRETRAIN_METRICS, PRETRAIN_CURVES, COLLAPSE,
                 PSEUDO_CKPT, PSEUDO_LABELS, PSEUDO_ROUNDS, PSEUDO_METRICS,
                 "tb", "mil_*", "other_*", "features", RESULTS, METRICS),
    "features": ("mil_*", "results.md", "metrics.json"),
    "study": ("runs/*.json", "results.md", "results.csv", "*.png"),
}
# Files of the final model that predict reads beside the encoder and heads.
COMPLETE = "complete.json"
TRAINING_CELLS = "training_cells.npy"  # uint64 pixel hash of every cell it saw

# Keys (or whole sections) that cannot change any result.
IGNORED = ("resume", "data.cache_dir", "data.num_workers", "pretrain.log_every_steps",
           "pretrain.checkpoint_every_steps", "mil.checkpoint_every_epochs",
           "eval.num_plot_bags", "study.shard", "study.results_dir",
           # Where the data is: the data summary says what it is, so a moved
           # cohort still resumes and a different one is named as such.
           "data.root", "data.csv", "data.cells_csv", "data.manifest")
# Sections a runner never reads.
UNUSED = {"pipeline": ("study",),
          "slides": ("study", "bags", "eval.linear_probe", "eval.export_features",
                     "eval.export_attention"),
          "features": ("study", "bags", "pretrain", "augment", "model", "embed")}
# Keys a rerun may change while resuming (see the module docstring for why).
FREE = {
    "slides": ("eval.baselines", "eval.final_model", "eval.top_k"),
    "pipeline": ("mil.heads", "eval.top_k", "eval.linear_probe", "eval.export_features"),
    "features": ("mil.heads", "eval.top_k", "eval.export_attention"),
    "study": ("study.methods", "study.witness_rates", "study.seeds", "study.bootstrap"),
}
# Name lists compared as names ("a,b" on the command line == ("a", "b")).
_NAME_LISTS = ("mil.heads", "mil.slide_features", "eval.baselines",
               "data.label_columns", "study.methods")
_SHOW = 8  # differences (and slide ids) named in one message


class WorkdirError(ValueError):
  """A workdir holds results that the command must not reuse."""


# ---------------------------------------------------------------------------
# Writing.


def write_text(path: str, text: str) -> None:
  """Writes ``text`` atomically: a killed run never leaves half a file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"  # per process: shards may write the same file
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj, indent: int | None = 2) -> None:
  """``obj`` as JSON, atomically (compact with ``indent=None``)."""
  write_text(path, json.dumps(obj, indent=indent,
                              separators=None if indent else (",", ":")))


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def read_collapse(workdir: str) -> dict | None:
  """The collapse summary pretraining wrote in ``workdir``, or None."""
  path = os.path.join(workdir, COLLAPSE)
  return read_json(path) if os.path.exists(path) else None


def write_config(workdir: str, cfg) -> None:
  """``workdir/config.json``: the config the run uses."""
  write_text(os.path.join(workdir, CONFIG), cfg.to_json_best_effort(indent=2))


# ---------------------------------------------------------------------------
# The fingerprint.


def _flatten(node, prefix: str = "") -> dict:
  out = {}
  for k, v in node.items():
    if isinstance(v, dict) and v:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _as_dict(cfg) -> dict:
  """A ConfigDict or a config.json dict as plain JSON values (tuples -> lists)."""
  if hasattr(cfg, "to_json_best_effort"):
    return json.loads(cfg.to_json_best_effort())
  return json.loads(json.dumps(cfg))


_DEFAULTS: dict = {}


def _defaults() -> dict:
  """Every key's base default: a key added to slamjax after a run was
  recorded compares equal when it holds its default."""
  if not _DEFAULTS:
    from slamjax.config import base
    _DEFAULTS.update(_normalise(_flatten(_as_dict(base.get_config()))))
  return _DEFAULTS


def _normalise(flat: dict) -> dict:
  return {k: (list(names(v)) if k in _NAME_LISTS else v) for k, v in flat.items()}


def _dropped(key: str, runner: str) -> bool:
  drop = IGNORED + UNUSED.get(runner, ())
  return any(key == d or key.startswith(d + ".") for d in drop)


def fingerprint(cfg, data: dict | None = None) -> dict:
  """What decides a run's results: ``{"version", "id", "runner", "config",
  "free", "data"}``; ``cfg`` a ConfigDict or the dict of a ``config.json``."""
  flat = _normalise(_flatten(_as_dict(cfg)))
  runner = flat.get("runner", "pipeline")
  free = FREE.get(runner, ())
  fp = {"version": VERSION, "runner": runner,
        "config": {k: v for k, v in sorted(flat.items())
                   if not _dropped(k, runner) and k not in free},
        "free": {k: flat[k] for k in free if k in flat},
        # As read back from fingerprint.json (a copy, in JSON types).
        "data": json.loads(json.dumps(data))}
  fp["id"] = fingerprint_id(fp)
  return fp


def fingerprint_id(fp: dict) -> str:
  """A short hash of what decides the results (config and data, not ``free``).
  The data keeps its order: the slides' order in the table decides the folds."""
  text = json.dumps(fp["config"], sort_keys=True) + json.dumps(fp["data"])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fmt(value) -> str:
  return "(absent)" if value is _ABSENT else json.dumps(value)


_ABSENT = object()


def _ids(items: Sequence[str]) -> str:
  items = sorted(items)
  more = f", ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
  return ", ".join(items[:_SHOW]) + more


def _plural(n: int, word: str) -> str:
  return f"{n} {word}{'' if n == 1 else 's'}"


def config_differences(old: dict, new: dict) -> list[str]:
  """``"key: old -> new"`` for every result-deciding key that differs."""
  defaults = _defaults()
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, defaults.get(k, _ABSENT)), new.get(k, defaults.get(k, _ABSENT))
    if a != b:
      out.append(f"{k}: {_fmt(a)} -> {_fmt(b)}")
  return out


# Per-slide fields and how a difference in them is named.
_SLIDE_FIELDS = (("label", "labels of {n} differ ({ids})"),
                 ("patient", "patient_id of {n} differs ({ids})"),
                 ("fold", "the fold column of {n} differs ({ids})"),
                 ("split", "the split column of {n} differs ({ids})"),
                 ("content", "cell images differ in {n} ({ids}): the files changed, or "
                  "decode differently"))


def data_differences(old: dict | None, new: dict | None) -> list[str]:
  """Named differences between two data summaries."""
  if old == new:
    return []
  if old is None or new is None or old.get("kind") != new.get("kind"):
    return [f"data: {(old or {}).get('kind')} -> {(new or {}).get('kind')}"]
  out = []
  if old["kind"] != "slides":  # cells / files: counts, then content
    for k in sorted(set(old) | set(new)):
      if k not in ("kind", "content") and old.get(k) != new.get(k):
        out.append(f"data.{k}: {_fmt(old.get(k, _ABSENT))} -> {_fmt(new.get(k, _ABSENT))}")
    if not out and old.get("content") != new.get("content"):
      out.append("the data's content differs (same counts, other cells or files)")
    return out
  if old.get("tasks") != new.get("tasks"):
    out.append(f"tasks: {_fmt(old.get('tasks'))} -> {_fmt(new.get('tasks'))}")
  a, b = old["slides"], new["slides"]
  added, removed = sorted(set(b) - set(a)), sorted(set(a) - set(b))
  if added or removed:  # "12 slides added (...), 3 removed (...)"
    parts = ([f"{_plural(len(added), 'slide')} added ({_ids(added)})"] if added else []) + (
        [f"{len(removed) if added else _plural(len(removed), 'slide')} removed "
         f"({_ids(removed)})"] if removed else [])
    out.append(", ".join(parts))
  common = [s for s in b if s in a]
  if [s for s in b if s in a] != [s for s in a if s in b]:
    out.append("the slides' order in the slide table differs")
  for field, text in _SLIDE_FIELDS:
    diff = [s for s in common if a[s].get(field) != b[s].get(field)]
    if diff:
      out.append(text.format(n=_plural(len(diff), "slide"), ids=_ids(diff)))
  return out


def differences(old: dict, new: dict) -> list[str]:
  """Everything that differs between two fingerprints, by name; [] = resumable."""
  out = config_differences(old.get("config", {}), new.get("config", {}))
  return out + data_differences(old.get("data"), new.get("data"))


# ---------------------------------------------------------------------------
# Data summaries.


def cell_digests(images) -> np.ndarray:
  """uint64 hash of every image row (decoded pixels), read in chunks."""
  out = np.empty(len(images), np.uint64)
  for start in range(0, len(images), 4096):
    chunk = np.ascontiguousarray(images[start:start + 4096])
    for i, row in enumerate(chunk):
      out[start + i] = int.from_bytes(
          hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")
  return out


def _labels(row) -> list:
  return [None if np.isnan(x) else float(x) for x in row]


def slides_data(cohort, digests: np.ndarray | None = None) -> dict:
  """A slide cohort's summary: per slide labels, patient, fold/split, number
  of cells and a hash of the cells' paths and decoded pixels."""
  if digests is None:
    digests = cell_digests(cohort.images)
  slides = {}
  for i, sid in enumerate(cohort.slide_ids):
    cells = cohort.cells[i]
    h = hashlib.sha256()
    for c in cells:
      h.update(f"{cohort.cell_paths[c]}\0{int(digests[c]):016x}\n".encode())
    entry = {"label": _labels(cohort.labels[i]), "patient": cohort.patient_ids[i],
             "cells": int(len(cells)), "content": h.hexdigest()[:16]}
    if cohort.folds is not None:
      entry["fold"] = int(cohort.folds[i])
    if cohort.splits is not None:
      entry["split"] = cohort.splits[i]
    slides[sid] = entry
  return {"kind": "slides", "tasks": list(cohort.task_names), "slides": slides}


def features_data(ds) -> dict:
  """A feature folder's summary, per slide as :func:`slides_data`."""
  slides = {}
  for i, sid in enumerate(ds.slide_ids):
    h = hashlib.sha256(np.ascontiguousarray(ds.features[i]).tobytes())
    for extra in (ds.coords[i], ds.cell_ids[i], ds.witness[i]):
      h.update(b"|" + (b"" if extra is None else np.asarray(extra).tobytes()))
    entry = {"label": _labels(ds.labels[i]), "cells": int(len(ds.features[i])),
             "content": h.hexdigest()[:16]}
    if ds.splits is not None:
      entry["split"] = str(ds.splits[i])
    patient = getattr(ds, "patient_ids", None)
    if patient is not None and patient[i] != sid:  # only with a patient_id column
      entry["patient"] = patient[i]
    slides[sid] = entry
  return {"kind": "slides", "tasks": list(ds.label_columns), "slides": slides}


def pool_data(pool) -> dict:
  """A cell pool's summary: counts per class and a hash of images, labels, ids."""
  h = hashlib.sha256(cell_digests(pool.images).tobytes())
  h.update(np.asarray(pool.labels, np.int64).tobytes())
  h.update("\n".join(map(str, pool.cell_ids)).encode())
  return {"kind": "cells", "cells": int(len(pool.images)), "classes": pool.counts(),
          "content": h.hexdigest()[:16]}


def files_data(root: str) -> dict:
  """Every file under ``root``: relative path, size and modification time."""
  h = hashlib.sha256()
  n = 0
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for fn in sorted(filenames):
      p = os.path.join(dirpath, fn)
      st = os.stat(p)
      h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
      n += 1
  return {"kind": "files", "files": n, "content": h.hexdigest()[:16]}


# ---------------------------------------------------------------------------
# A run's claim on its workdir.


def mismatch_message(workdir: str, diffs: Sequence[str], what: str = "another run") -> str:
  shown = list(diffs[:_SHOW]) + ([f"... and {len(diffs) - _SHOW} more"]
                                 if len(diffs) > _SHOW else [])
  return (f"{workdir} holds the results of {what}: " + "; ".join(shown)
          + ". Nothing in it was changed.\n  Choose a new --workdir, or add "
          "--config.resume=overwrite to discard its results and start afresh.")


class Run:
  """One run's claim on a workdir: checks the config before the data is
  loaded (``Run(...)``) and the data once it is (:meth:`commit`).

  Args:
    workdir: where ``config.json`` and ``fingerprint.json`` go.
    cfg: the run's config (``cfg.resume``: "auto" or "overwrite").
    outputs: glob patterns (relative to ``workdir``, or absolute) of what the
      run writes; their presence means there are results to protect, and
      ``overwrite`` deletes them.
    log: where the legacy-workdir warning goes.
  """

  # config.resume: "auto" resumes a matching run and refuses another one;
  # "overwrite" deletes another run's results first.
  MODES = ("auto", "overwrite")

  def __init__(self, workdir: str, cfg, outputs: Sequence[str], log=print):
    self.workdir, self.cfg, self.log = workdir, cfg, log
    self.outputs = tuple(outputs)
    self.overwrite = cfg.get("resume", "auto") == "overwrite"
    # Results first: fingerprint.json is written before any of them, so a
    # process that sees results also sees the fingerprint.
    self.has_results = bool(self._existing())
    path = os.path.join(workdir, FINGERPRINT)
    self.stored = read_json(path) if os.path.exists(path) else None
    self.legacy = self.has_results and self.stored is None
    if self.overwrite or not self.has_results:
      return
    if self.legacy:
      self.stored = self._legacy_fingerprint()
    if self.stored is not None:
      diffs = config_differences(self.stored["config"], fingerprint(cfg)["config"])
      if diffs:
        raise WorkdirError(mismatch_message(workdir, diffs))

  def _existing(self) -> list[str]:
    found = []
    for pattern in self.outputs:
      found += glob.glob(os.path.join(self.workdir, pattern))
    return sorted(set(found))

  def _legacy_fingerprint(self) -> dict | None:
    path = os.path.join(self.workdir, CONFIG)
    return fingerprint(read_json(path)) if os.path.exists(path) else None

  def commit(self, data: dict | None = None, write: bool = True) -> dict:
    """Checks ``data`` against the recorded run, deletes the old outputs on
    ``overwrite``, and records ``config.json`` and ``fingerprint.json``
    (when ``write``; other processes of a multi-process run only check).
    Returns the run's fingerprint (its ``id`` goes into records)."""
    fp = fingerprint(self.cfg, data)
    if self.has_results and not self.overwrite:
      if self.legacy:
        self.log(f"workdir: WARNING: {self.workdir} holds results made before slamjax "
                 "recorded fingerprints: " + ("its config.json matches this config; "
                                              if self.stored else "it has no config.json; ")
                 + "its data could not be checked and is recorded as it is now.")
      else:
        diffs = differences(self.stored, fp)
        if diffs:
          raise WorkdirError(mismatch_message(self.workdir, diffs))
    if not write:
      return fp
    if self.overwrite and self.has_results:
      removed = self._existing()
      for p in removed:
        if os.path.isdir(p) and not os.path.islink(p):
          shutil.rmtree(p)
        else:
          os.remove(p)
      self.log(f"workdir: resume=overwrite: removed {len(removed)} result file(s)/folder(s) "
               f"of the previous run in {self.workdir}")
    write_json(os.path.join(self.workdir, FINGERPRINT), fp)
    write_config(self.workdir, self.cfg)
    return fp


def check_record(path: str, record: dict, fp_id: str) -> None:
  """A recorded fold (or run) must come from this fingerprint (records
  written before fingerprints carry none and pass)."""
  rec_id = record.get("fingerprint")
  if rec_id is not None and rec_id != fp_id:
    raise WorkdirError(
        f"{path} was recorded by another run (fingerprint {rec_id}, this run {fp_id}); "
        "it was copied in or left over. Remove it, use a new --workdir, or add "
        "--config.resume=overwrite.")


def check_final(workdir: str, final: str = "final") -> dict:
  """The fingerprint of ``workdir/final``, after checking that the model
  there matches its own records: ``complete.json``, ``config.json`` and the
  run's ``fingerprint.json``. Raises :class:`WorkdirError` otherwise."""
  d = os.path.join(workdir, final)
  path = os.path.join(d, FINGERPRINT)
  again = (f"Rerun the slides command on {workdir} (it checks the workdir and "
           "records the final model's fingerprint), or train in a new --workdir.")
  if not os.path.exists(path):
    raise WorkdirError(f"{d} has no {FINGERPRINT}: it was made before slamjax recorded "
                       f"what a model was trained on, so it cannot be checked. {again}")
  fp = read_json(path)
  complete = read_json(os.path.join(d, COMPLETE))
  if complete.get("fingerprint") != fp.get("id") or fingerprint_id(fp) != fp.get("id"):
    raise WorkdirError(f"{d} was changed after it was completed (complete.json names "
                       f"fingerprint {complete.get('fingerprint')}, {FINGERPRINT} "
                       f"{fp.get('id')}). {again}")
  diffs = config_differences(fp["config"], fingerprint(read_json(
      os.path.join(d, CONFIG)))["config"])
  if diffs:
    raise WorkdirError(f"{d}/config.json does not describe the model trained there "
                       "(trained -> config.json): " + "; ".join(diffs) + f". {again}")
  run_path = os.path.join(workdir, FINGERPRINT)
  if os.path.exists(run_path):
    run_fp = read_json(run_path)
    if run_fp.get("id") != fp["id"]:
      raise WorkdirError(f"{d} is not the final model of the run recorded in {workdir} "
                         "(final model -> run): " + "; ".join(differences(fp, run_fp))
                         + f". {again}")
  return fp
