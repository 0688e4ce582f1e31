"""Progress lines (step, rate, ETA) and TensorBoard writers for long loops.

In multi-process runs only process 0 prints progress lines and writes
summaries (the others would repeat them).

Example:
  >>> p = Progress("demo", total=10, every=5, start=0)
  >>> p.update(5, {"loss": 1.0})  # doctest: +ELLIPSIS
  demo    5/10 ( 50%)  first 5 steps in 0m00s (with compilation)  loss=1
  >>> p.update(10)  # doctest: +ELLIPSIS
  demo   10/10 (100%)  ... steps/s  ETA 0m00s
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from slamjax import distributed


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """Prints ``name step/total (pct) rate ETA metrics`` every ``every`` steps.

  The rate (and so the ETA) is measured from the first printed line on, so
  the compilation of the first step does not inflate the ETA; the first line
  says that it includes compilation.
  """

  def __init__(self, name: str, total: int, every: int, start: int = 0,
               unit: str = "steps"):
    self.name, self.total, self.every, self.unit = name, total, max(1, every), unit
    self.t0, self.s0 = time.perf_counter(), start
    self._first = True

  def start(self, what: str = "compiling the step") -> None:
    """Says what the silence before the first line is."""
    if distributed.is_main_process() and self.s0 < self.total:
      print(f"{self.name}: {what} (the first line follows after it) ...", flush=True)

  def update(self, step: int, metrics: dict | None = None, force: bool = False):
    if not force and step % self.every and step != self.total:
      return
    if not distributed.is_main_process():
      return
    now = time.perf_counter()
    if self._first:  # includes compilation: report it, measure the rate from here
      self._first = False
      timing = [f"first {step - self.s0} {self.unit} in {_fmt_time(now - self.t0)} "
                "(with compilation)"]
      self.t0, self.s0 = now, step
    else:
      rate = (step - self.s0) / (now - self.t0) if now > self.t0 else float("nan")
      eta = (self.total - step) / rate if rate > 0 else float("inf")
      timing = [f"{rate:.2f} {self.unit}/s", f"ETA {_fmt_time(eta)}"]
    parts = [f"{self.name} {step:4d}/{self.total} ({100 * step / max(self.total, 1):3.0f}%)",
             *timing]
    for k, v in (metrics or {}).items():
      if np.ndim(v) == 0:
        parts.append(f"{k}={float(v):.4g}")
    print("  ".join(parts), flush=True)


class RunProgress:
  """Overall progress of a run made of long units (the folds of each method,
  then the final model): one line as each starts, with the elapsed time and
  an ETA from the units this process has run (resumed units do not count).

  ``start(detail)`` announces fold k of n; ``start_final(detail)`` the final
  model (counted as one more unit in the ETA when ``final``); ``skip()``
  counts a fold finished by an earlier run. A unit ends at the next
  ``start``/``skip``/``start_final`` or at ``done()``.

  Example:
    >>> t = iter([0.0, 0.0, 0.0, 600.0, 900.0]).__next__
    >>> p = RunProgress(3, final=True, clock=t)
    >>> p.skip()
    >>> p.start("slam_ags fold1: 40 training, 10 held-out slides")
    slides: fold 2 of 3 (slam_ags fold1: 40 training, 10 held-out slides); elapsed 0m00s, ETA after this fold
    >>> p.start("slam_ags fold2")
    slides: fold 3 of 3 (slam_ags fold2); elapsed 10m00s, ETA 20m00s (with the final model)
    >>> p.start_final("training on all 50 labelled slides")
    slides: final model (training on all 50 labelled slides); elapsed 15m00s, ETA 7m30s
  """

  def __init__(self, total: int, final: bool = False, name: str = "slides",
               clock=time.perf_counter):
    self.total, self.final, self.name, self.clock = int(total), bool(final), name, clock
    self.t0 = clock()
    self.k = 0  # folds started or skipped
    self._unit_t0 = None  # start of the running unit
    self._times: list[float] = []  # durations of the units run here

  def _end_unit(self, now: float) -> None:
    if self._unit_t0 is not None:
      self._times.append(now - self._unit_t0)
      self._unit_t0 = None

  def _eta(self, remaining: int) -> str:
    if not self._times:
      return "ETA after this fold"
    return f"ETA {_fmt_time(remaining * float(np.mean(self._times)))}"

  def _say(self, now: float, what: str, remaining: int, extra: str = "") -> None:
    if distributed.is_main_process():
      print(f"{self.name}: {what}; elapsed {_fmt_time(now - self.t0)}, "
            f"{self._eta(remaining)}{extra}", flush=True)
    self._unit_t0 = now

  def skip(self) -> None:
    self._end_unit(self.clock())
    self.k += 1

  def start(self, detail: str = "") -> None:
    now = self.clock()
    self._end_unit(now)
    self.k += 1
    remaining = self.total - self.k + 1 + int(self.final)
    self._say(now, f"fold {self.k} of {self.total}" + (f" ({detail})" if detail else ""),
              remaining, " (with the final model)" if self.final and self._times else "")

  def start_final(self, detail: str = "") -> None:
    now = self.clock()
    self._end_unit(now)
    self._say(now, "final model" + (f" ({detail})" if detail else ""), 1)

  def done(self) -> None:
    self._end_unit(self.clock())


def check_finite(step: int, metrics: dict) -> None:
  """Raises when a logged scalar is NaN/Inf, naming it (as big_vision does)."""
  for k, v in metrics.items():
    if not np.all(np.isfinite(np.asarray(v))):
      raise RuntimeError(f"Non-finite metric {k}={v} at step {step}")


class JsonlWriter:
  """A clu-style metric writer: one JSON line per ``write_scalars`` call.

  Each line is ``{step_key: step, **fields, **scalars}``. Opening the writer
  drops the lines with the same ``fields`` logged after ``resume_step``: a
  resumed run redoes those steps, so the file never holds a step twice.

  Example:
    >>> import json, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "m.jsonl")
    >>> w = JsonlWriter(path); w.write_scalars(1, {"loss": 2.0}); w.write_scalars(2, {"loss": 1.0})
    >>> w = JsonlWriter(path, resume_step=1)  # resumed from step 1
    >>> [r["step"] for r in read_jsonl(path)]
    [1]
  """

  def __init__(self, path: str, resume_step: int = 0, step_key: str = "step",
               fields: dict | None = None):
    self.path, self.step_key, self.fields = path, step_key, dict(fields or {})
    if os.path.exists(path):
      with open(path) as f:
        lines = [l for l in f if l.strip()]
      redo = lambda r: (r.get(step_key, 0) > resume_step
                        and all(r.get(k) == v for k, v in self.fields.items()))
      keep = [l for l in lines if not redo(json.loads(l))]
      if len(keep) != len(lines):
        with open(path, "w") as f:
          f.writelines(keep)

  def write_scalars(self, step: int, scalars) -> None:
    rec = {self.step_key: int(step), **self.fields,
           **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")

  def write_hparams(self, hparams) -> None:
    del hparams  # config.json holds them

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSONL metrics file ([] if it does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


class IntervalMeans:
  """Means of the step metrics between two log points, as clu ``Average``s
  merged on device (one jitted call a step, no host transfer until
  :meth:`pop`).

  Example:
    >>> import jax.numpy as jnp
    >>> m = IntervalMeans()
    >>> m.add({"loss": jnp.float32(1.0)}); m.add({"loss": jnp.float32(3.0)})
    >>> float(m.pop()["loss"])
    2.0
  """

  def __init__(self):
    import jax
    from clu import metrics as clu_metrics
    avg = clu_metrics.Average.from_model_output
    self._start = jax.jit(lambda m: {k: avg(v) for k, v in m.items()})
    self._merge = jax.jit(lambda acc, m: {k: acc[k].merge(avg(v)) for k, v in m.items()})
    self._compute = jax.jit(lambda acc: {k: a.compute() for k, a in acc.items()})
    self._acc = None

  def add(self, metrics: dict) -> None:
    self._acc = self._start(metrics) if self._acc is None else self._merge(self._acc, metrics)

  def pop(self) -> dict:
    """The means since the last ``pop`` (arrays, as the step returned them)."""
    out, self._acc = self._compute(self._acc), None
    return out


class _NoWriter:
  """Stands in for clu's writer when TensorFlow (TensorBoard) is not installed."""

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(logdir: str):
  """clu writer: TensorBoard event files (+ logging) on process 0 only.

  Without TensorFlow (a core install, ``pip install slamjax``) summaries are
  off; ``pip install 'slamjax[tensorboard]'`` turns them on.
  """
  try:
    from clu import metric_writers  # imports TensorFlow
  except ImportError:
    return _NoWriter()
  from slamjax import runtime
  runtime.hide_accelerators_from_tensorflow()
  return metric_writers.create_default_writer(
      logdir, just_logging=not distributed.is_main_process(), asynchronous=False)


def with_jsonl(writer, jsonl: JsonlWriter | None):
  """One writer for both: clu's ``MultiWriter`` of ``writer`` and ``jsonl``
  (``jsonl`` alone without TensorBoard; ``writer`` alone if ``jsonl`` is None)."""
  if jsonl is None:
    return writer
  if isinstance(writer, _NoWriter):
    return jsonl
  from clu import metric_writers
  return metric_writers.MultiWriter([writer, jsonl])


def report_progress(total: int, writer, every: int):
  """clu's ``ReportProgress`` (steps/s and uptime to ``writer``, progress
  notes to the log) when clu's periodic actions can be imported (they need
  TensorFlow); else ``None``."""
  try:
    from clu import periodic_actions
  except ImportError:
    return None
  return periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                         every_steps=every, every_secs=None)
