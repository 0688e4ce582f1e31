"""Progress lines (step, rate, ETA) and TensorBoard writers for long loops.

In multi-process runs only process 0 prints progress lines and writes
summaries (the others would repeat them).

Example:
  >>> p = Progress("demo", total=10, every=5, start=0)
  >>> p.update(5, {"loss": 1.0})  # doctest: +ELLIPSIS
  demo    5/10 ( 50%) ... loss=1
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
  """Prints ``name step/total (pct) rate ETA metrics`` every ``every`` steps."""

  def __init__(self, name: str, total: int, every: int, start: int = 0,
               unit: str = "steps"):
    self.name, self.total, self.every, self.unit = name, total, max(1, every), unit
    self.t0, self.s0 = time.perf_counter(), start

  def update(self, step: int, metrics: dict | None = None, force: bool = False):
    if not force and step % self.every and step != self.total:
      return
    if not distributed.is_main_process():
      return
    dt = time.perf_counter() - self.t0
    rate = (step - self.s0) / dt if dt > 0 else float("nan")
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    parts = [f"{self.name} {step:4d}/{self.total} ({100 * step / max(self.total, 1):3.0f}%)",
             f"{rate:.2f} {self.unit}/s", f"ETA {_fmt_time(eta)}"]
    for k, v in (metrics or {}).items():
      if np.ndim(v) == 0:
        parts.append(f"{k}={float(v):.4g}")
    print("  ".join(parts), flush=True)


def check_finite(step: int, metrics: dict) -> None:
  """Raises when a logged scalar is NaN/Inf, naming it (as big_vision does)."""
  for k, v in metrics.items():
    if not np.all(np.isfinite(np.asarray(v))):
      raise RuntimeError(f"Non-finite metric {k}={v} at step {step}")


def create_writer(logdir: str):
  """clu writer: TensorBoard event files (+ logging) on process 0 only."""
  from clu import metric_writers
  return metric_writers.create_default_writer(
      logdir, just_logging=not distributed.is_main_process(), asynchronous=False)
