"""Honest model selection on the training slides: every choice (MIL epoch
count, fusion with slide features, threshold) comes from predictions on
training slides that the model making them did not fit.

Inner cross-validation (patient-grouped, stratified, ``eval.inner_folds``)
splits a fold's training slides. Each head is trained on the inner training
slides and scores the inner held-out ones at a few epoch counts (the
snapshots of one run, so this costs one run per inner fold); the count with
the lowest out-of-fold BCE wins and the head is retrained on all training
slides for that many epochs. With ``mil.slide_features`` the head's
out-of-fold logit is fused with those features by stacking (:class:`Fusion`).
The threshold maximises Youden's J on the out-of-fold probabilities of the
final predictor, never on the fitted model's own training predictions, which
are near 0 and 1 once a head fits its training bags.

Example (a linear separation, the threshold from out-of-fold predictions):
  >>> import numpy as np
  >>> rng = np.random.default_rng(0)
  >>> y = np.array([0, 1] * 20)
  >>> x = (y + rng.normal(0, .8, 40))[:, None]
  >>> fit = fit_logreg(x, y, inner_folds(y[:, None], None, 4, seed=0))
  >>> p = fit.predict(x)
  >>> round(float(((p >= fit.threshold) == y).mean()), 2) >= 0.7
  True
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Sequence

import numpy as np

from slamjax.config.values import names as names_of
from slamjax.data import slides as slides_lib
from slamjax.mil import multihead
from slamjax.slides import folds as folds_lib
from slamjax.slides import slide_features

# Candidate epoch counts, as fractions of mil.epochs.
EPOCH_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)
_CS = np.logspace(-3, 2, 11)  # inverse L2 strengths tried by the logistic regressions


def inner_folds(labels: np.ndarray, patients: Sequence[str] | None, k: int, seed: int,
                where: str = "the training slides") -> np.ndarray:
  """Inner fold index per training slide (patient-grouped, stratified).

  Raises:
    CohortError: naming ``where`` when a class has fewer slides or patients
      than ``k``.
  """
  patients = [str(i) for i in range(len(labels))] if patients is None else patients
  try:
    return folds_lib.assign_folds(labels, patients, k, seed)
  except slides_lib.CohortError as e:
    raise slides_lib.CohortError(
        f"{where}: too few slides for {k} inner folds ({e}). Thresholds and epoch "
        "counts are chosen by inner cross-validation on the training slides: lower "
        "config.eval.inner_folds (at least 2), use fewer outer folds "
        "(config.eval.folds), or add labelled slides.") from None


def run_inner_folds(labels: np.ndarray, patients, k: int, run_seed: int,
                    where: str = "the training slides") -> np.ndarray:
  """The inner folds every model of a run uses on the same training slides
  (heads, fusion and slide-feature baselines alike): :func:`inner_folds`
  seeded from the run's ``config.seed``."""
  return inner_folds(labels, patients, k, run_seed + 17, where)


def choose_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
  """The cut maximising Youden's J, placed midway between the last score
  called positive and the next one below (0.5 for a single class).

  >>> round(choose_threshold(np.array([0, 0, 1, 1]), np.array([.1, .3, .35, .9])), 4)
  0.325
  """
  from sklearn.metrics import roc_curve
  labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
  if len(np.unique(labels)) < 2:
    return 0.5
  fpr, tpr, thr = roc_curve(labels, probs)
  best = int(np.argmax(tpr - fpr))
  hi = min(float(thr[best]), 1.0)
  below = probs[probs < hi]
  return float((hi + below.max()) / 2) if len(below) else hi


def bce(labels: np.ndarray, probs: np.ndarray) -> float:
  """Mean binary cross-entropy over known labels."""
  p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
  y = np.asarray(labels, np.float64)
  known = np.isfinite(y)
  v = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  return float(v[known].mean())


def logit(p: np.ndarray) -> np.ndarray:
  p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
  return np.log(p / (1 - p))


@dataclasses.dataclass
class LogReg:
  """A standardised, L2-regularised logistic regression (one task), as
  plain arrays so that it is saved as JSON."""
  mean: np.ndarray
  scale: np.ndarray
  coef: np.ndarray
  intercept: float
  C: float
  threshold: float = 0.5
  oof: np.ndarray | None = None  # out-of-fold probabilities on the training rows

  def predict(self, x: np.ndarray) -> np.ndarray:
    z = (np.asarray(x, np.float64) - self.mean) / self.scale
    return 1 / (1 + np.exp(-(z @ self.coef + self.intercept)))

  def to_json(self) -> dict:
    return {"mean": self.mean.tolist(), "scale": self.scale.tolist(),
            "coef": self.coef.tolist(), "intercept": self.intercept, "C": self.C,
            "threshold": self.threshold}

  @classmethod
  def from_json(cls, d: dict) -> "LogReg":
    return cls(np.asarray(d["mean"]), np.asarray(d["scale"]), np.asarray(d["coef"]),
               float(d["intercept"]), float(d["C"]), float(d["threshold"]))


def _fit_lr(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> LogReg:
  """C chosen by log loss over ``folds`` (class-balanced), then refit on all rows."""
  from sklearn.linear_model import LogisticRegression
  mean, scale = x.mean(0), x.std(0) + 1e-6
  z = (x - mean) / scale
  splits = [(np.flatnonzero(folds != f), np.flatnonzero(folds == f))
            for f in np.unique(folds)]
  splits = [(a, b) for a, b in splits if len(np.unique(y[a])) == 2]
  make = lambda c: LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
  best_c = 1.0
  if splits:
    losses = []
    for c in _CS:
      p = np.full(len(y), np.nan)
      for a, b in splits:
        p[b] = make(c).fit(z[a], y[a]).predict_proba(z[b])[:, 1]
      losses.append(bce(y[np.isfinite(p)], p[np.isfinite(p)]))
    best_c = float(_CS[int(np.argmin(losses))])
  m = make(best_c).fit(z, y)
  return LogReg(mean, scale, m.coef_[0].astype(np.float64), float(m.intercept_[0]), best_c)


def fit_logreg(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> LogReg:
  """A logistic regression on ``x`` whose threshold comes from out-of-fold
  probabilities over ``folds`` (each inner model chooses its own C on the
  remaining folds)."""
  x, y = np.asarray(x, np.float64), np.asarray(y).astype(np.int64)
  oof = np.full(len(y), np.nan)
  for f in np.unique(folds):
    tr, te = folds != f, folds == f
    if len(np.unique(y[tr])) < 2:
      continue
    oof[te] = _fit_lr(x[tr], y[tr], folds[tr]).predict(x[te])
  model = _fit_lr(x, y, folds)
  ok = np.isfinite(oof)
  model.threshold = choose_threshold(y[ok], oof[ok])
  model.oof = oof
  return model


@dataclasses.dataclass
class Fusion:
  """Stacked fusion of a head's logit with slide features, for one task.

  A block of several features (``pixel_stats``) is first reduced to the
  logit of its own logistic regression, whose training-slide values are
  out-of-fold; a single feature (``log_count``) enters as it is. A small
  logistic regression (``meta``) then combines the head's logit with these
  few inputs, so a wide, noisy block cannot drown the head. Its threshold
  and out-of-fold probabilities give the fused model's.
  """
  blocks: list  # per feature block: (start, stop, LogReg or None)
  meta: LogReg

  def inputs(self, head_prob: np.ndarray, feats: np.ndarray) -> np.ndarray:
    cols = [logit(head_prob)[:, None]]
    for a, b, red in self.blocks:
      cols.append(feats[:, a:b] if red is None else logit(red.predict(feats[:, a:b]))[:, None])
    return np.concatenate(cols, 1)

  def predict(self, head_prob: np.ndarray, feats: np.ndarray) -> np.ndarray:
    return self.meta.predict(self.inputs(head_prob, feats))

  def to_json(self) -> dict:
    return {"blocks": [[a, b, None if r is None else r.to_json()] for a, b, r in self.blocks],
            "meta": self.meta.to_json()}

  @classmethod
  def from_json(cls, d: dict) -> "Fusion":
    return cls([(a, b, None if r is None else LogReg.from_json(r)) for a, b, r in d["blocks"]],
               LogReg.from_json(d["meta"]))


def fit_fusion(head_oof: np.ndarray, feats: np.ndarray, widths: Sequence[int],
               y: np.ndarray, folds: np.ndarray) -> Fusion:
  """A :class:`Fusion` of one task from the head's out-of-fold probabilities
  ``head_oof`` [n] and ``feats`` [n, sum(widths)] on the training slides."""
  blocks, cols, a = [], [logit(head_oof)[:, None]], 0
  for w in widths:
    x = feats[:, a:a + w]
    if w == 1:
      blocks.append((a, a + w, None))
      cols.append(x)
    else:
      red = fit_logreg(x, y, folds)
      blocks.append((a, a + w, red))
      cols.append(logit(red.oof)[:, None])
    a += w
  return Fusion(blocks, fit_logreg(np.concatenate(cols, 1), y, folds))


def epoch_candidates(mil_cfg) -> tuple[int, ...]:
  """Epoch counts compared by the inner folds; only ``mil.epochs`` itself
  when a schedule or AEM decay makes shorter runs differ from snapshots."""
  e = int(mil_cfg.epochs)
  if mil_cfg.get("schedule", "constant") != "constant" or \
      mil_cfg.get("aem_schedule", "constant") != "constant" or (
          "head" in mil_cfg and multihead.is_nonparametric(mil_cfg)):
    return (e,)
  return tuple(sorted({max(1, round(e * f)) for f in EPOCH_FRACTIONS}))


def _with_epochs(head_cfg, epochs: int):
  d = head_cfg.to_dict()
  d["epochs"] = int(epochs)
  if d.get("mecds", {}).get("teacher_epochs"):
    d["mecds"]["teacher_epochs"] = int(epochs)
  return multihead.options.resolve(d)


def _labels_for_mil(y: np.ndarray) -> np.ndarray:
  return y[:, 0] if y.shape[1] == 1 else y


def _inner_run(head_cfg, cands, emb, y, folds, f, seed, folder) -> dict:
  """Held-out probabilities of inner fold ``f`` at every candidate epoch count,
  from one run (each fit resumes the previous checkpoint). Recorded in
  ``folder/oof.npz``; an unfinished run is restarted, since its latest
  checkpoint may be past the candidates still to score."""
  done = os.path.join(folder, "oof.npz")
  if os.path.exists(done):
    with np.load(done, allow_pickle=False) as z:
      return {e: z[f"e{e}"] for e in cands}
  if os.path.exists(folder):
    shutil.rmtree(folder)
  tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
  bags_tr, bags_te = [emb[i] for i in tr], [emb[i] for i in te]
  out = {}
  for e in cands:
    c = _with_epochs(head_cfg, e)
    st = multihead.fit_head(c, bags_tr, _labels_for_mil(y[tr]), folder, seed, verbose=False)
    out[e] = multihead.predict_head(c, st, bags_te)["prob"]
  tmp = os.path.join(folder, "oof.tmp.npz")
  np.savez(tmp, **{f"e{e}": v for e, v in out.items()})
  os.replace(tmp, done)
  return out


@dataclasses.dataclass
class HeadFit:
  """One head chosen and fitted on a fold's training slides."""
  name: str
  epochs: int
  oof_prob: np.ndarray  # [n_train, T], inner out-of-fold, before fusion
  inner_bce: dict  # epochs -> out-of-fold BCE
  state: object
  cfg: object
  fusion: list | None  # per task: a Fusion with the slide features, or None
  thresholds: list  # per task
  final_oof: np.ndarray  # [n_train, T]: the out-of-fold probabilities thresholds came from


def fit_heads(cfg, emb: Sequence[np.ndarray], y: np.ndarray, patients, workdir: str,
              feats: np.ndarray | None = None, where: str = "the training slides",
              verbose: bool = True) -> list[HeadFit]:
  """Chooses epochs, fusion and thresholds of every head of ``cfg.mil.heads``
  by inner CV on the training slides ``emb`` / ``y`` [n, T], then fits each
  head on all of them (``workdir/mil_<head>``; inner runs under
  ``workdir/inner/<k>/``, resumable)."""
  y = np.asarray(y, np.float32)
  k = int(cfg.eval.inner_folds)
  folds = run_inner_folds(y, patients, k, cfg.seed, where)
  fits = []
  for name in multihead.head_names(cfg.mil):
    head_cfg = multihead.head_config(cfg.mil, name)
    cands = epoch_candidates(head_cfg)
    oof = {e: np.full(y.shape, np.nan, np.float32) for e in cands}
    for f in range(k):
      te = np.flatnonzero(folds == f)
      inner = _inner_run(head_cfg, cands, emb, y, folds, f, cfg.seed,
                         os.path.join(workdir, "inner", str(f), f"mil_{name}"))
      for e in cands:
        oof[e][te] = inner[e]
    losses = {e: bce(y, oof[e]) for e in cands}
    best = min(cands, key=lambda e: (round(losses[e], 6), e))
    final_cfg = _with_epochs(head_cfg, best)
    state = multihead.fit_head(final_cfg, list(emb), _labels_for_mil(y),
                               os.path.join(workdir, f"mil_{name}"), cfg.seed, verbose)
    fusion, thresholds, final_oof = None, [], oof[best].copy()
    if feats is not None and feats.shape[1]:
      widths = slide_features.widths(names_of(cfg.mil.slide_features))
      fusion = []
      for t in range(y.shape[1]):
        fu = fit_fusion(oof[best][:, t], feats, widths, y[:, t], folds)
        fusion.append(fu)
        thresholds.append(fu.meta.threshold)
        final_oof[:, t] = fu.meta.oof
    else:
      thresholds = [choose_threshold(y[:, t], oof[best][:, t]) for t in range(y.shape[1])]
    if verbose:
      print(f"mil/{name}: {best} epochs chosen by {k}-fold inner CV (out-of-fold BCE "
            + ", ".join(f"{e}: {v:.3f}" for e, v in losses.items()) + "); thresholds "
            + ", ".join(f"{t:.3f}" for t in thresholds)
            + (" after fusion with slide features" if fusion else ""), flush=True)
    fits.append(HeadFit(name, best, oof[best], losses, state, final_cfg, fusion,
                        thresholds, final_oof))
  return fits


def predict_head(fit_or_cfg, state, bags, feats: np.ndarray | None, fusion) -> dict:
  """A fitted head's output on ``bags``, its probabilities fused with
  ``feats`` when the head was fitted with slide features."""
  out = multihead.predict_head(fit_or_cfg, state, bags)
  if fusion:
    prob = np.stack([fu.predict(out["prob"][:, t], feats) for t, fu in enumerate(fusion)],
                    1).astype(np.float32)
    out = dict(out, mil_prob=out["prob"], prob=prob)
  return out


def degenerate(threshold: float, probs: np.ndarray) -> bool:
  """True when ``threshold`` puts every one of ``probs`` in one class."""
  probs = np.asarray(probs)
  return bool(len(probs)) and bool(threshold > probs.max() or threshold <= probs.min())


def load_fitted(cfg, workdir: str, info: dict, bags) -> list[tuple]:
  """``(name, head cfg, state, fusion)`` of every head recorded in
  ``info`` (model.json of ``workdir``); ``bags`` only give the shapes."""
  out = []
  dummy = np.zeros((len(bags), len(info["task_names"])), np.float32)
  for name in info["heads"]:
    c = _with_epochs(multihead.head_config(cfg.mil, name), info["epochs"][name])
    # The checkpoint (or .npz) is complete, so this restores it without training.
    st = multihead.fit_head(c, bags, _labels_for_mil(dummy),
                            os.path.join(workdir, f"mil_{name}"), cfg.seed, verbose=False)
    fusion = [Fusion.from_json(d) for d in info.get("fusion", {}).get(name, [])] or None
    out.append((name, c, st, fusion))
  return out
