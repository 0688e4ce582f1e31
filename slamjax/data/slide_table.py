"""The slide table (``slides.csv``): one reader for every runner.

The slides runner (image cohorts, :mod:`slamjax.data.slides`) and the features
runner (per-slide feature files, :mod:`slamjax.features.dataset`) read the
same file with the same rules (``docs/slides.md``, "The slide table"):

* ``slide_id`` (required): one row per slide, compared in Unicode NFC.
* Labels, two forms: 0/1 columns (``label_columns``, or every column but the
  reserved ``slide_id``, ``patient_id``, ``split`` and ``fold`` when empty),
  one binary task each; values 0/1, true/false or yes/no (any case, also
  ``1.0``/``0.0``). Or one categorical column (``label_column``) with
  ``negative_label`` its normal value: every other value becomes a
  one-vs-rest task, named by the value, tasks sorted.
* An empty label (or NA, N/A, NaN, None, null) means unlabeled: the slide keeps
  NaN labels. A row labels all tasks or none.
* ``patient_id`` (optional; default: the slide id) groups slides: slides of
  one patient share their ``split`` and ``fold``.
* ``split`` (optional): train, val or test (also training, valid,
  validation, testing; any case). ``fold`` (optional): an integer >= 0.

Every problem raises :class:`DataError` naming the file, line, slide or
column, and what would be valid.

Example:
  >>> import os, tempfile
  >>> path = os.path.join(tempfile.mkdtemp(), "slides.csv")
  >>> with open(path, "w") as f:
  ...   _ = f.write("slide_id,patient_id,tumor,split\\n"
  ...               "a,p1,yes,Training\\nb,p1,0,train\\nc,p2,,test\\n")
  >>> t = parse(path)
  >>> t.slide_ids, t.task_names, t.labels[:, 0].tolist()
  (['a', 'b', 'c'], ('tumor',), [1.0, 0.0, nan])
  >>> t.patient_ids, t.splits, t.labelled().tolist()
  (['p1', 'p1', 'p2'], ['train', 'train', 'test'], [True, True, False])
  >>> try:
  ...   parse(path, label_columns=("grade",))
  ... except DataError as e:
  ...   print(str(e)[len(path):])
  : label column(s) ['grade'] named in config.data.label_columns are not in the CSV; ...
"""

from __future__ import annotations

import csv
import dataclasses
import unicodedata
from typing import Sequence

import numpy as np

from slamjax.config.values import names as config_names

RESERVED_COLUMNS = ("slide_id", "patient_id", "split", "fold")
SPLITS = ("train", "val", "test")
# config.data.unlisted: what a slide folder (or feature file) missing from
# the table is: an error naming it, or ignored.
UNLISTED = ("error", "ignore")
SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val",
                 "testing": "test"}
# Cell values that mean "no label" (compared lower-cased).
MISSING = frozenset({"", "na", "n/a", "nan", "none", "null"})
_TRUE = frozenset({"true", "yes"})
_FALSE = frozenset({"false", "no"})
_SHOW = 8  # offending items named in one message


class DataError(ValueError):
  """A slide table, cohort or feature folder is unusable; the message names
  the file, line or slide."""


def listing(items: Sequence[str], n: int = _SHOW) -> str:
  """The first ``n`` items joined by '; ', then how many more.

  >>> listing(["a", "b", "c"], 2)
  'a; b ... and 1 more'
  """
  items = list(items)
  more = f" ... and {len(items) - n} more" if len(items) > n else ""
  return "; ".join(items[:n]) + more


def nfc(name: str) -> str:
  """Slide ids and file or folder names are compared in Unicode NFC: macOS
  stores names decomposed (e + combining accent), spreadsheets composed."""
  return unicodedata.normalize("NFC", name)


def read_table(path: str, what: str) -> tuple[list[str], list[tuple[int, dict]]]:
  """Reads a CSV -> (columns, [(line number, {column: stripped value})]).

  Blank lines are skipped; ``what`` ("slide table", "cell table") starts
  every message.
  """
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if not header or not any(h.strip() for h in header):
        raise DataError(f"{what} {path} is empty; it needs a header row")
      header = [h.strip() for h in header]
      if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        sep = "semicolons" if ";" in header[0] else "tabs"
        raise DataError(
            f"{what} {path}: its header {header[0]!r} is one column; the values "
            f"look separated by {sep}. Save it with commas between the values "
            "(spreadsheet programs: 'CSV UTF-8 (comma delimited)')")
      dup = sorted({h for h in header if header.count(h) > 1})
      if dup:
        raise DataError(f"{what} {path}: column(s) {dup} appear more than once")
      rows = []
      for row in reader:
        if not any(v.strip() for v in row):
          continue  # blank line
        if len(row) != len(header):
          raise DataError(
              f"{what} {path} line {reader.line_num}: {len(row)} values but the "
              f"header has {len(header)} columns {header}")
        rows.append((reader.line_num, {h: v.strip() for h, v in zip(header, row)}))
  except UnicodeDecodeError as e:
    raise DataError(f"{what} {path} is not UTF-8 text ({e})") from None
  except csv.Error as e:
    raise DataError(f"{what} {path}: not a valid CSV ({e})") from None
  except OSError as e:
    raise DataError(f"Cannot read {what} {path}: {e.strerror or e}") from None
  return header, rows


@dataclasses.dataclass
class SlideTable:
  """A parsed slide table; every list is indexed by slide, in CSV order.

  Attributes:
    slide_ids: NFC-normalised slide ids.
    lines: the CSV line of every slide (None without a CSV).
    task_names: one per 0/1 column, or per non-negative category (sorted).
    labels: float32 ``[num_slides, num_tasks]``; NaN rows = unlabeled slides.
    patient_ids: per slide (= slide_id when there is no patient_id column).
    splits: per slide 'train'/'val'/'test' from a ``split`` column, else None.
    folds: int64 per slide from a ``fold`` column, else None.
  """
  slide_ids: list[str]
  lines: list[int | None]
  task_names: tuple[str, ...]
  labels: np.ndarray
  patient_ids: list[str]
  splits: list[str] | None
  folds: np.ndarray | None

  def labelled(self) -> np.ndarray:
    """bool ``[num_slides]``: True where the slide has labels."""
    if self.labels.shape[1] == 0:
      return np.zeros(len(self.slide_ids), bool)
    return ~np.isnan(self.labels).any(axis=1)


# ---------------------------------------------------------------------------
# Labels.


def _binary(v: str) -> float | None:
  """0.0/1.0 for a 0/1-like value, else None (missing values are not asked)."""
  low = v.lower()
  if low in _TRUE:
    return 1.0
  if low in _FALSE:
    return 0.0
  try:
    x = float(v)
  except ValueError:
    return None
  return x if x in (0.0, 1.0) else None


def _is_number(v: str) -> bool:
  try:
    float(v)
    return True
  except ValueError:
    return False


def _binary_labels(path, rows, columns, header, require_labels):
  """0/1 columns -> (task_names, labels [n, t])."""
  missing = [c for c in columns if c not in header]
  if missing:
    if require_labels:
      raise DataError(
          f"{path}: label column(s) {missing} named in config.data.label_columns "
          f"are not in the CSV; its columns are {header}")
    # Predicting on a table without labels: every slide is unlabeled.
    return tuple(columns), np.full((len(rows), len(columns)), np.nan, np.float32)
  labels = np.full((len(rows), len(columns)), np.nan, np.float32)
  bad: dict[str, list[str]] = {}
  for i, (line, row) in enumerate(rows):
    for t, c in enumerate(columns):
      v = row[c]
      if v.lower() in MISSING:
        continue
      x = _binary(v)
      if x is None:
        bad.setdefault(c, []).append(f"line {line} (slide {row['slide_id']!r}): {v!r}")
        continue
      labels[i, t] = x
  if bad:
    msgs = []
    for c, items in bad.items():
      hint = ""
      words = {r[c] for _, r in rows if r[c].lower() not in MISSING
               and _binary(r[c]) is None and not _is_number(r[c])}
      if words:  # text values: most likely a diagnosis column
        hint = (f" If {c!r} is a categorical column, set config.data.label_column="
                f"{c!r} and config.data.negative_label to its normal value; or list "
                "only the 0/1 columns in config.data.label_columns.")
      msgs.append(f"column {c!r} has values outside {{0, 1}} at {listing(items)}.{hint}")
    raise DataError(f"{path}: " + " ".join(msgs) +
                    " Valid label values: 0, 1, true, false, yes, no (any case), or "
                    "empty for an unlabeled slide.")
  return tuple(columns), labels


def _categorical_labels(path, rows, column, negative, header, require_labels):
  """One categorical column -> one-vs-rest tasks of its non-negative values."""
  if column not in header:
    if require_labels:
      raise DataError(f"{path}: config.data.label_column={column!r} is not a "
                      f"column of the CSV; its columns are {header}")
    return (), np.zeros((len(rows), 0), np.float32)
  values = [row[column] for _, row in rows]
  present = sorted({v for v in values if v.lower() not in MISSING})
  if not present and not require_labels:
    return (), np.zeros((len(rows), 0), np.float32)
  if not negative:
    raise DataError(
        f"{path}: config.data.label_column={column!r} needs config.data."
        f"negative_label, the value of a normal slide; the column holds {present}")
  if negative not in present:
    raise DataError(
        f"{path}: config.data.negative_label={negative!r} never occurs in column "
        f"{column!r}; its values are {present} (values are compared exactly, "
        "case-sensitively)")
  tasks = tuple(v for v in present if v != negative)
  if not tasks and require_labels:
    raise DataError(f"{path}: column {column!r} holds only the negative value "
                    f"{negative!r}; training needs slides of another value")
  labels = np.full((len(rows), len(tasks)), np.nan, np.float32)
  for i, v in enumerate(values):
    if v.lower() not in MISSING:
      labels[i] = [float(v == t) for t in tasks]
  return tasks, labels


# ---------------------------------------------------------------------------
# Patients, splits, folds.


def _split_values(path, rows, allowed, note):
  """Canonical split per row; a value outside ``allowed`` is an error."""
  out, bad = [], []
  for line, r in rows:
    raw = r["split"]
    s = SPLIT_ALIASES.get(raw.lower(), raw.lower())
    if s not in allowed:
      known = f" (= {s!r})" if s in SPLITS and s != raw else ""
      bad.append(f"line {line} (slide {r['slide_id']!r}): {raw!r}{known}")
    out.append(s)
  if bad:
    aliases = sorted(a for a, s in SPLIT_ALIASES.items() if s in allowed)
    raise DataError(f"{path}: column 'split' must be one of {list(allowed)} (any "
                    f"case; also {', '.join(aliases)}); got {listing(bad)}"
                    + (f". {note}" if note else ""))
  return out


def _fold_values(path, rows):
  vals, bad = [], []
  for line, r in rows:
    try:
      x = float(r["fold"])
      ok = x.is_integer() and x >= 0
    except ValueError:
      ok = False
    if not ok:
      bad.append(f"line {line} (slide {r['slide_id']!r}): {r['fold']!r}")
    else:
      vals.append(int(x))
  if bad:
    raise DataError(f"{path}: column 'fold' must hold integers >= 0; got "
                    f"{listing(bad)}")
  return vals


def _check_patient_consistent(path, column, patients, values, sids):
  """All slides of a patient in one split/fold, else held-out data leaks."""
  seen: dict[str, tuple] = {}
  bad = []
  for p, v, s in zip(patients, values, sids):
    if p in seen and seen[p][0] != v:
      bad.append(f"patient {p!r}: slide {seen[p][1]!r} has {column} {seen[p][0]!r}, "
                 f"slide {s!r} has {column} {v!r}")
    seen.setdefault(p, (v, s))
  if bad:
    raise DataError(f"{path}: slides of one patient must share the {column} "
                    f"(else a held-out patient leaks into training): {listing(bad)}")


# ---------------------------------------------------------------------------
# The table.


def parse(path: str, label_columns: Sequence[str] | str = (), label_column: str = "",
          negative_label: str = "", require_labels: bool = True,
          splits: Sequence[str] = SPLITS, split_note: str = "") -> SlideTable:
  """Reads and checks a slide table (module docstring).

  Args:
    path: the CSV.
    label_columns: the 0/1 label columns (a sequence or comma-separated);
      empty: every non-reserved column (unless ``label_column`` is set).
    label_column: one categorical column instead of 0/1 columns.
    negative_label: its normal value.
    require_labels: False for prediction: label columns may be absent and
      every slide may be unlabeled.
    splits: the ``split`` values the caller can use.
    split_note: said after a bad ``split`` value (why a value is not usable).

  Returns:
    A :class:`SlideTable`.

  Raises:
    DataError: naming the file, line, slide or column.
  """
  header, rows = read_table(path, "slide table")
  if "slide_id" not in header:
    raise DataError(f"{path}: no 'slide_id' column; its columns are {header}. "
                    "The first row must be a header naming the columns.")
  for _, r in rows:
    r["slide_id"] = nfc(r["slide_id"])
  if not rows:
    raise DataError(f"{path} has a header but no slide rows")
  empty = [f"line {line}" for line, r in rows if not r["slide_id"]]
  if empty:
    raise DataError(f"{path}: empty slide_id at {listing(empty)}")
  first: dict[str, int] = {}
  dups = []
  for line, r in rows:
    sid = r["slide_id"]
    if sid in first:
      dups.append(f"{sid!r} at lines {first[sid]} and {line}")
    else:
      first[sid] = line
  if dups:
    raise DataError(f"{path}: duplicate slide_id {listing(dups)}; each slide needs "
                    "one row")

  label_columns = config_names(label_columns)
  label_column = label_column or ""
  if label_columns and label_column:
    raise DataError(
        f"Set either config.data.label_columns (0/1 columns, now {label_columns}) "
        f"or config.data.label_column (one categorical column, now {label_column!r}), "
        "not both")
  if label_column:
    if label_column in RESERVED_COLUMNS:
      raise DataError(f"config.data.label_column={label_column!r} is a reserved "
                      f"column; reserved: {list(RESERVED_COLUMNS)}")
    tasks, labels = _categorical_labels(path, rows, label_column, negative_label or "",
                                        header, require_labels)
    columns = (label_column,)
  else:
    reserved = [c for c in label_columns if c in RESERVED_COLUMNS]
    if reserved:
      raise DataError(f"config.data.label_columns names reserved column(s) "
                      f"{reserved}; reserved: {list(RESERVED_COLUMNS)}")
    columns = label_columns or tuple(c for c in header if c not in RESERVED_COLUMNS)
    tasks, labels = _binary_labels(path, rows, columns, header, require_labels)

  if labels.shape[1] > 1:  # all tasks or none, so "unlabeled" is unambiguous
    partial = np.isnan(labels).any(1) & ~np.isnan(labels).all(1)
    if partial.any():
      items = [f"line {rows[i][0]} (slide {rows[i][1]['slide_id']!r})"
               for i in np.flatnonzero(partial)]
      raise DataError(
          f"{path}: some but not all label columns {list(columns)} are empty at "
          f"{listing(items)}; label every task of a slide, or leave all empty to "
          "mark it unlabeled")
  if require_labels:
    if not tasks:
      raise DataError(
          f"{path}: no label columns (columns: {header}); add a 0/1 column, or "
          "name a categorical one in config.data.label_column")
    if np.isnan(labels).all():
      raise DataError(f"{path}: every slide is unlabeled (label columns "
                      f"{list(columns)} are empty); training needs labelled slides")

  sids = [r["slide_id"] for _, r in rows]
  lines = [line for line, _ in rows]
  if "patient_id" in header:
    empty = [f"line {line} (slide {r['slide_id']!r})" for line, r in rows
             if not r["patient_id"]]
    if empty:
      raise DataError(f"{path}: empty patient_id at {listing(empty)}")
    patients = [r["patient_id"] for _, r in rows]
  else:
    patients = list(sids)

  split_vals = None
  if "split" in header:
    split_vals = _split_values(path, rows, tuple(splits), split_note)
    _check_patient_consistent(path, "split", patients, split_vals, sids)
  folds = None
  if "fold" in header:
    vals = _fold_values(path, rows)
    _check_patient_consistent(path, "fold", patients, vals, sids)
    folds = np.asarray(vals, np.int64)
  return SlideTable(sids, lines, tuple(tasks), labels, patients, split_vals, folds)


def unlabeled(slide_ids: Sequence[str], label_columns: Sequence[str] | str = (),
              label_column: str = "") -> SlideTable:
  """No slide table: every slide unlabeled (for prediction).

  >>> t = unlabeled(["a", "b"], ("tumor",))
  >>> t.task_names, t.labels.shape, t.labelled().tolist()
  (('tumor',), (2, 1), [False, False])
  """
  tasks = () if label_column else config_names(label_columns)
  n = len(slide_ids)
  return SlideTable(list(slide_ids), [None] * n, tasks,
                    np.full((n, len(tasks)), np.nan, np.float32), list(slide_ids),
                    None, None)
