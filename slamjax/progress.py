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

import math
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


def check_finite(step: int, metrics: dict) -> None:
  """Raises when a logged scalar is NaN/Inf, naming it (as big_vision does)."""
  for k, v in metrics.items():
    if not np.all(np.isfinite(np.asarray(v))):
      raise RuntimeError(f"Non-finite metric {k}={v} at step {step}")


class _NoWriter:
  """Stands in for clu's writer when TensorFlow (TensorBoard) is not installed."""

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
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
  return metric_writers.create_default_writer(
      logdir, just_logging=not distributed.is_main_process(), asynchronous=False)
