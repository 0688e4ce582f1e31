"""Collapse detection from the logged pretraining metrics.

A projection has *collapsed* when every cell maps to nearly the same
direction: embeddings taken from it then carry almost no information, and
the MIL heads' attention goes flat. Two logged metrics show it (both are in
``pretrain_metrics.jsonl``):

* ``embed_std``: the spread of the positive-bag cells' normalised SimCLR
  projections, ``mean_d std_d(z / |z|) * sqrt(D)``: about 1 for directions
  spread over the sphere, 0 for a constant projection. Collapsed when below
  ``pretrain.collapse_spread``.
* ``loss_simclr`` (NT-Xent over 2B views): with every similarity equal, each
  anchor's partner is one of 2B - 1 equally likely views, so NT-Xent is
  exactly log(2B - 1) (logged as ``ntxent_uniform``). Collapsed when within
  ``pretrain.collapse_margin`` of it.

A logged step counts as collapsed when either holds; a run, when
``pretrain.collapse_patience`` consecutive logged steps do (or its last
logged steps all do, if it logged fewer). The patience keeps a healthy run
from being flagged while its NT-Xent falls through log(2B-1) on the way
down, or while a weak SimCLR hovers around it: in small CPU runs both
happen at isolated logged steps, while a collapse holds at every step from
its start. During pretraining :class:`Monitor` prints one multi-line
warning when a run first counts as collapsed (one line with
``compact=True``) and writes
``workdir/pretrain_collapse.json`` (:func:`summarize`'s dict) at the end.

Example:
  >>> h = [{"step": 5 * i, "embed_std": s, "loss_simclr": 3.0}
  ...      for i, s in enumerate([0.4, 0.04, 0.3, 0.02, 0.02, 0.01], 1)]
  >>> s = summarize(h, batch_pos=32)
  >>> s["collapsed"], s["first_step"], round(s["ntxent_uniform"], 3)
  (True, 20, 4.143)
"""

from __future__ import annotations

import math
import os

from slamjax import workdir as workdir_lib
from typing import Iterable, Sequence

FILENAME = workdir_lib.COLLAPSE
DEFAULT_SPREAD = 0.05
DEFAULT_MARGIN = 0.05
DEFAULT_PATIENCE = 3


def ntxent_uniform(batch_pos: int) -> float:
  """NT-Xent at uniform similarity, log(2B - 1), for B positive-bag cells."""
  return math.log(2 * int(batch_pos) - 1)


def _finite(x) -> bool:
  return x is not None and math.isfinite(float(x))


def reasons(metrics: dict, batch_pos: int | None = None,
            spread: float = DEFAULT_SPREAD, margin: float = DEFAULT_MARGIN) -> list[str]:
  """Which collapse criteria one logged metric dict meets ([] = not collapsed).

  ``batch_pos`` None reads log(2B-1) from the logged ``ntxent_uniform``.
  """
  out = []
  s = metrics.get("embed_std")
  if _finite(s) and float(s) < spread:
    out.append("spread")
  uniform = (ntxent_uniform(batch_pos) if batch_pos is not None
             else metrics.get("ntxent_uniform"))
  loss = metrics.get("loss_simclr")
  if _finite(loss) and _finite(uniform) and abs(float(loss) - float(uniform)) < margin:
    out.append("ntxent")
  return out


def _first_streak(flags: Sequence[bool], patience: int) -> int | None:
  """Index where ``patience`` consecutive True flags start (or, when fewer
  remain, where the trailing all-True run covering every flag starts)."""
  patience = max(1, int(patience))
  run = 0
  for i, f in enumerate(flags):
    run = run + 1 if f else 0
    if run >= patience:
      return i - patience + 1
  if flags and run == len(flags):  # shorter than patience, all collapsed
    return 0
  return None


def summarize(history: Sequence[dict], batch_pos: int | None = None,
              spread: float = DEFAULT_SPREAD, margin: float = DEFAULT_MARGIN,
              patience: int = DEFAULT_PATIENCE) -> dict:
  """Collapse summary of a pretraining metric history.

  ``history`` is the list of logged metric dicts (the lines of
  ``pretrain_metrics.jsonl``), ``batch_pos`` the positive-bag cells per step
  (B; None: read the logged ``ntxent_uniform``). Returns ``collapsed``
  (``patience`` consecutive logged steps met a criterion), ``first_step``
  (the first step of that streak, or None), ``final_spread``,
  ``final_ntxent`` and ``ntxent_uniform`` (log(2B-1)), plus ``reasons``
  (the criteria met at ``first_step``), ``collapsed_steps`` (how many logged
  steps met one), ``collapsed_at_end`` (the last logged step meets one),
  ``final_step``, ``batch_pos`` and the thresholds.
  """
  history = list(history)
  if batch_pos is None:
    logged = [h["ntxent_uniform"] for h in history if _finite(h.get("ntxent_uniform"))]
    uniform = float(logged[-1]) if logged else float("nan")
    batch_pos_out = round((math.exp(uniform) + 1) / 2) if logged else None
  else:
    uniform, batch_pos_out = ntxent_uniform(batch_pos), int(batch_pos)
  why = [reasons(h, batch_pos, spread, margin) for h in history]
  start = _first_streak([bool(r) for r in why], patience)
  last = history[-1] if history else {}
  nan = float("nan")
  return {"collapsed": start is not None,
          "first_step": None if start is None else int(history[start].get("step", start)),
          "final_spread": float(last.get("embed_std", nan)),
          "final_ntxent": float(last.get("loss_simclr", nan)),
          "ntxent_uniform": uniform,
          "reasons": [] if start is None else why[start],
          "collapsed_steps": sum(bool(r) for r in why),
          "collapsed_at_end": bool(why) and bool(why[-1]),
          "final_step": None if not history else int(last.get("step", len(history))),
          "batch_pos": batch_pos_out,
          "spread_threshold": float(spread), "ntxent_margin": float(margin),
          "patience": int(patience)}


def end_state(summary: dict | None) -> str | None:
  """How a :func:`summarize` dict ended: "end" (flagged and still collapsed at
  the last logged step), "recovered" (flagged, but past both thresholds at
  the last logged step) or None (never flagged). A summary written before
  ``collapsed_at_end`` existed counts as "end".

  >>> end_state({"collapsed": True, "collapsed_at_end": False}), end_state(None)
  ('recovered', None)
  """
  if not (summary or {}).get("collapsed"):
    return None
  return "end" if summary.get("collapsed_at_end", True) else "recovered"


def warning_text(step: int, metrics: dict, batch_pos: int, spread: float,
                 margin: float, resumed: bool = False, patience: int = 1,
                 projection: str = "shared") -> str:
  """The console warning: collapsed since ``step``; ``metrics`` the latest.

  ``projection`` (``model.projection``) picks the advice: a shared head is
  pulled together by the similarity loss; per-task heads are not, so there
  SimCLR itself has not spread the cells (yet).
  """
  uniform = ntxent_uniform(batch_pos)
  s, loss = metrics.get("embed_std", float("nan")), metrics.get("loss_simclr", float("nan"))
  when = f"at step {step}" + (f" (held for {patience} logged steps)" if patience > 1 else "") + (
      " (before this resumed run)" if resumed else "")
  why = " and ".join({"spread": "spread below threshold",
                      "ntxent": "NT-Xent at its uniform-similarity value"}[r]
                     for r in reasons(metrics, batch_pos, spread, margin)) or "?"
  return "\n".join([
      "",
      "=" * 78,
      f"WARNING: pretraining collapsed {when}",
      f"  ({why}).",
      "  The projection maps the cells to nearly one direction and SimCLR can no",
      "  longer tell them apart: embeddings from it carry little information and",
      "  MIL attention will be flat.",
      f"  now (step {metrics.get('step', '?')}):",
      f"  spread (embed_std)  {float(s):.4f}  (collapsed below {spread:g}; ~1 = well spread)",
      f"  NT-Xent             {float(loss):.4f}  vs log(2B-1) = {uniform:.4f} "
      f"(B = {batch_pos}; collapsed within {margin:g})",
      f"  gradient cosine     {float(metrics.get('grad_cos', float('nan'))):.3f} "
      "(SimCLR vs similarity task)",
      *(_SHARED_ADVICE if projection == "shared" else _PER_TASK_ADVICE),
      "=" * 78,
  ])


def compact_text(step: int, metrics: dict, batch_pos: int, spread: float,
                 margin: float, resumed: bool = False) -> str:
  """The one-line form of :func:`warning_text` (later folds, smoke runs).

  >>> print(compact_text(5, {"embed_std": 0.01, "loss_simclr": 3.4}, 16, 0.05, 0.05))
  ... # doctest: +NORMALIZE_WHITESPACE
  pretrain: WARNING: collapsed at step 5 (spread 0.0100, NT-Xent 3.4000 vs
  log(2B-1) 3.4340); embeddings from it carry little information
  """
  s = float(metrics.get("embed_std", float("nan")))
  loss = float(metrics.get("loss_simclr", float("nan")))
  return (f"pretrain: WARNING: collapsed at step {step}"
          + (" (before this resumed run)" if resumed else "")
          + f" (spread {s:.4f}, NT-Xent {loss:.4f} vs log(2B-1) "
          f"{ntxent_uniform(batch_pos):.4f}); embeddings from it carry little information")


_SHARED_ADVICE = (
    "  The reference similarity loss has no repulsion; on a projection shared",
    "  with SimCLR it pulls every cell together, and surgery does not stop it.",
    "  Try: --config.model.projection=per_task (one head per task, the default;",
    "  with --config.pretrain.similarity=repel too), a variance floor",
    "  (--config.pretrain.variance_weight=25), a smaller similarity weight",
    "  (--config.pretrain.task_weights=1.0,0.1), a lower --config.pretrain.lr,",
    "  or MIL on backbone features (--config.embed.output=backbone).")
_PER_TASK_ADVICE = (
    "  The SimCLR head is its own (model.projection=per_task), so the similarity",
    "  loss cannot pull it together: SimCLR has not spread these cells. Early in",
    "  a run that is often a slow start; the end-of-run line says whether it",
    "  lasted. Try: a lower --config.pretrain.lr, more warm-up",
    "  (--config.pretrain.warmup_epochs), a larger --config.pretrain.batch_size,",
    "  or MIL on backbone features (--config.embed.output=backbone).")


class Monitor:
  """Watches the logged metrics of one pretraining run; warns once.

  ``history`` holds the steps logged before a resume: if those already
  count as collapsed, the warning is printed at once (marked as before the
  resume). ``compact=True`` prints the one-line :func:`compact_text`
  instead of the box (smoke runs, where a collapse is expected and the box
  on every fold buries the rest).
  """

  def __init__(self, batch_pos: int, spread: float = DEFAULT_SPREAD,
               margin: float = DEFAULT_MARGIN, patience: int = DEFAULT_PATIENCE,
               history: Iterable[dict] = (), echo: bool = True,
               projection: str = "shared", compact: bool = False):
    self.batch_pos, self.spread, self.margin = batch_pos, spread, margin
    self.projection, self.compact = projection, compact
    self.patience, self.echo = max(1, int(patience)), echo
    self.history = list(history)
    self.warned = False
    self.streak = 0
    for h in self.history:
      self.streak = self.streak + 1 if reasons(h, batch_pos, spread, margin) else 0
      if self.streak >= self.patience and not self.warned:
        self._warn(h, resumed=True)

  def _warn(self, metrics, resumed=False) -> None:
    self.warned = True
    if self.echo:
      first = self.history[len(self.history) - self.streak].get("step")
      if self.compact:
        print(compact_text(first, metrics, self.batch_pos, self.spread, self.margin,
                           resumed), flush=True)
        return
      print(warning_text(first, metrics, self.batch_pos, self.spread, self.margin,
                         resumed, self.patience, self.projection), flush=True)

  def update(self, step: int, metrics: dict) -> bool:
    """Records one logged step; returns whether it meets a collapse criterion."""
    self.history.append({"step": step, **metrics})
    collapsed = bool(reasons(metrics, self.batch_pos, self.spread, self.margin))
    self.streak = self.streak + 1 if collapsed else 0
    if self.streak >= self.patience and not self.warned:
      self._warn(self.history[-1])
    return collapsed

  def summary(self) -> dict:
    return summarize(self.history, self.batch_pos, self.spread, self.margin, self.patience)

  def write(self, workdir: str) -> dict:
    """Writes ``workdir/pretrain_collapse.json``; returns the summary."""
    out = self.summary()
    workdir_lib.write_json(os.path.join(workdir, FILENAME), out)
    return out
