"""Tables and plots of the variants study, from its per-run records only.

Reads ``<results_dir>/runs/*.json`` (written by :mod:`slamjax.study.run`) and
writes next to them:

* ``results.md``: per metric, methods x witness rates, each cell
  ``mean ± std over seeds [95% CI]``; the CI is a bootstrap over test bags
  (bag AUC/F1) or held-out test cells (probe AUCs), resampled within each
  seed and averaged over seeds. A ``†k`` marks k seeds whose pretraining
  was still collapsed at its end, a ``‡k`` k seeds that were flagged and
  recovered (:func:`collapse_state`). Then the paired differences to SimCLR
  (same test bags and cells, same resamples) and the collapse / gradient
  diagnostics.
* ``results.csv``: one row per run, feature type and MIL head.
* plots: ``auc_vs_witness_rate.png``, ``f1_vs_witness_rate.png``,
  ``probe_auc_vs_witness_rate.png``, ``spread_curves.png``,
  ``ntxent_curves.png``, ``gradient_conflict.png``.

Example::

  python -m slamjax.study.report docs/results/slam_variants
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np

from slamjax import collapse
from slamjax import embed
from slamjax.study import methods as methods_lib

FEATURES = embed.OUTPUTS  # the two feature types every run records
_CELL_RESAMPLES = 300  # probe CIs: fewer resamples (1,200 test cells per run)


# ---------------------------------------------------------------- statistics

def auc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
  """ROC AUC of every row: labels ``y`` and scores ``s`` are [B, n] (ties averaged)."""
  from scipy.stats import rankdata
  y = np.atleast_2d(y).astype(bool)
  s = np.atleast_2d(s)
  ranks = rankdata(s, axis=1)
  n_pos = y.sum(1)
  n_neg = y.shape[1] - n_pos
  u = (ranks * y).sum(1) - n_pos * (n_pos + 1) / 2
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def f1_rows(y: np.ndarray, s: np.ndarray, threshold: float = 0.5) -> np.ndarray:
  """F1 of ``s >= threshold`` for every row of [B, n] labels / scores."""
  y = np.atleast_2d(y).astype(bool)
  pred = np.atleast_2d(s) >= threshold
  tp = (pred & y).sum(1)
  denom = 2 * tp + (pred & ~y).sum(1) + (~pred & y).sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 0, 2 * tp / denom, np.nan)


def resample_index(n: int, b: int, key: tuple) -> np.ndarray:
  """[b, n] bootstrap indices, a pure function of ``key``: every method of a
  (seed, witness rate) gets the same resamples, so differences are paired."""
  return np.random.default_rng([n, b, *key]).integers(0, n, (b, n))


METRICS = {"auc": auc_rows, "f1": f1_rows}


class Stats:
  """Point values and bootstrap replicates per run, cached (the report is
  rebuilt after every run)."""

  def __init__(self, recs, bootstrap: int):
    self.recs, self.b = recs, bootstrap
    self._cache = {}

  def _bag(self, r, feat, head, metric):
    key = ("bag", r["id"], feat, head, metric)
    if key not in self._cache:
      m = (r.get("mil") or {}).get(feat, {}).get(run_head(r, feat, head))
      if not m:
        self._cache[key] = None
      else:
        y, p = np.asarray(m["labels"]), np.asarray(m["probs"], float)
        idx = resample_index(len(y), self.b,
                             (r["seed"], int(round(r["witness_rate"] * 1e5)), 1))
        fn = METRICS[metric]
        self._cache[key] = (float(fn(y, p)[0]), fn(y[idx], p[idx]))
    return self._cache[key]

  def _probe(self, r, feat, kind):
    key = ("probe", r["id"], feat, kind)
    if key not in self._cache:
      pr = r.get("probe") or {}
      if feat not in pr:
        self._cache[key] = None
      else:
        y, s = np.asarray(pr["labels"]), np.asarray(pr[feat][kind], float)
        b = min(self.b, _CELL_RESAMPLES)
        idx = resample_index(len(y), b, (r["seed"], 2))  # cells: per seed
        self._cache[key] = (float(auc_rows(y, s)[0]), auc_rows(y[idx], s[idx]))
    return self._cache[key]

  def retrieval(self, method, rate, feat, head, key, ref=None) -> dict | None:
    """Seed mean and std of a retrieval measure (``recall_at_k``,
    ``average_precision``), or of its paired difference to ``ref``; runs
    record only bag-level means, so there is no bootstrap CI."""
    def get(m):
      out = {}
      for r in self.recs:
        if r["method"] == m and r["witness_rate"] == rate:
          h = (r.get("mil") or {}).get(feat, {}).get(run_head(r, feat, head))
          if h and key in h.get("retrieval", {}):
            out[r["seed"]] = float(h["retrieval"][key])
      return out
    a = get(method)
    if ref is not None:
      b = get(ref)
      a = {s: a[s] - b[s] for s in set(a) & set(b)}
    if not a:
      return None
    v = np.asarray(list(a.values()))
    return {"mean": float(v.mean()), "n": len(v),
            "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan")}

  def value(self, r, what: tuple):
    """(point, replicates) of ``what`` = ("bag", feat, head, metric) or
    ("probe", feat, "linear"|"knn")."""
    return self._bag(r, *what[1:]) if what[0] == "bag" else self._probe(r, *what[1:])

  def cell(self, method, rate, what) -> dict | None:
    """Seed mean, std, CI of the seed mean, collapsed count, n."""
    sel = [r for r in self.recs if r["method"] == method and r["witness_rate"] == rate]
    vals = [(r, self.value(r, what)) for r in sel]
    vals = [(r, v) for r, v in vals if v is not None]
    if not vals:
      return None
    pts = np.asarray([v[0] for _, v in vals])
    reps = np.nanmean(np.stack([v[1] for _, v in vals]), 0)
    lo, hi = np.nanpercentile(reps, [2.5, 97.5])
    return {"mean": float(np.nanmean(pts)),
            "std": float(np.nanstd(pts, ddof=1)) if len(pts) > 1 else float("nan"),
            "lo": float(lo), "hi": float(hi), "n": len(pts),
            "collapsed": sum(collapse_state(r) == "end" for r, _ in vals),
            "recovered": sum(collapse_state(r) == "recovered" for r, _ in vals)}

  def diff(self, method, ref, rate, what) -> dict | None:
    """Paired difference method - ref over the seeds both have."""
    by_seed = lambda m: {r["seed"]: r for r in self.recs
                         if r["method"] == m and r["witness_rate"] == rate}
    a, b = by_seed(method), by_seed(ref)
    seeds = sorted(set(a) & set(b))
    pts, reps = [], []
    for s in seeds:
      va, vb = self.value(a[s], what), self.value(b[s], what)
      if va is None or vb is None:
        continue
      pts.append(va[0] - vb[0])
      reps.append(va[1] - vb[1])
    if not pts:
      return None
    lo, hi = np.nanpercentile(np.nanmean(np.stack(reps), 0), [2.5, 97.5])
    return {"mean": float(np.mean(pts)), "lo": float(lo), "hi": float(hi), "n": len(pts)}


# ------------------------------------------------------------------- helpers

METHOD_HEAD = "method"  # "the head each method's runs read" (record field "head")


def run_head(rec, feat: str, head: str) -> str:
  """``head``, or with :data:`METHOD_HEAD` the head the run's method reads."""
  if head != METHOD_HEAD:
    return head
  trained = (rec.get("mil") or {}).get(feat, {})
  return rec.get("head") or ("abmil" if "abmil" in trained else next(iter(trained), ""))


def _head_axis(heads) -> tuple[str, str]:
  """(head key for Stats, its name in titles)."""
  if len(heads) == 1:
    return heads[0], heads[0]
  return METHOD_HEAD, "each method's head"


def _fmt_retrieval(c: dict | None, diff: bool = False) -> str:
  if c is None:
    return ""
  s = f"{c['mean']:+.3f}" if diff else f"{c['mean']:.3f}"
  if c["n"] > 1:
    s += f" ± {c['std']:.3f}"
  return s + (f" (n={c['n']})" if c["n"] < 3 else "")

def load_records(results_dir: str) -> list[dict]:
  recs = []
  for path in sorted(glob.glob(os.path.join(results_dir, "runs", "*.json"))):
    with open(path) as f:
      recs.append(json.load(f))
  return recs


def _axes(recs, cfg=None):
  from slamjax import config as config_lib
  preferred = (list(config_lib.names(cfg.study.methods)) if cfg is not None
               else list(methods_lib.METHODS))
  present = {r["method"] for r in recs}
  methods = [m for m in preferred if m in present] + sorted(present - set(preferred))
  rates = sorted({r["witness_rate"] for r in recs}, reverse=True)
  heads = sorted({h for r in recs for f in (r.get("mil") or {}).values() for h in f})
  return methods, rates, heads


def _label(m: str) -> str:
  return methods_lib.METHODS[m].label if m in methods_lib.METHODS else m


def _fmt(c: dict | None, ci: bool = True) -> str:
  if c is None:
    return ""
  s = f"{c['mean']:.3f}"
  if c["n"] > 1:
    s += f" ± {c['std']:.3f}"
  if ci:
    s += f" [{c['lo']:.2f}, {c['hi']:.2f}]"
  if c["n"] < 3:
    s += f" (n={c['n']})"
  if c["collapsed"]:
    s += f" †{c['collapsed']}"
  if c.get("recovered"):
    s += f" ‡{c['recovered']}"
  return s


def _fmt_diff(d: dict | None) -> str:
  if d is None:
    return ""
  sig = "**" if d["lo"] > 0 or d["hi"] < 0 else ""
  n = f" (n={d['n']})" if d["n"] < 3 else ""
  return f"{sig}{d['mean']:+.3f} [{d['lo']:+.2f}, {d['hi']:+.2f}]{sig}{n}"


def _table(title, methods, rates, cell_fn) -> list[str]:
  lines = [f"### {title}", "", "| method | " + " | ".join(f"WR {r:.1%}" for r in rates)
           + " |", "|---|" + "---|" * len(rates)]
  for m in methods:
    lines.append(f"| {_label(m)} | " + " | ".join(cell_fn(m, r) for r in rates) + " |")
  return lines + [""]


def collapse_state(rec) -> str | None:
  """:func:`slamjax.collapse.end_state` of a run record: "end", "recovered"
  (flagged, e.g. NT-Xent held at log(2B-1) for the first steps, but past both
  thresholds at the end) or None."""
  return collapse.end_state(rec.get("collapse"))


def pretrain_stats(rec) -> dict:
  """Collapse and gradient diagnostics of one run's pretraining history."""
  h = rec.get("pretrain_history") or []
  cos = [x["grad_cos"] for x in h if "grad_cos" in x and math.isfinite(x["grad_cos"])]
  two_task = bool(cos) and any(abs(c) > 0 for c in cos)
  spread = [x["embed_std"] for x in h if "embed_std" in x]
  col = rec.get("collapse") or {}
  b = rec.get("batch_pos")
  return {"collapsed": col.get("collapsed"), "collapse_state": collapse_state(rec),
          "first_collapse_step": col.get("first_step"),
          "first_spread": spread[0] if spread else float("nan"),
          "final_spread": spread[-1] if spread else float("nan"),
          "final_ntxent": h[-1].get("loss_simclr", float("nan")) if h else float("nan"),
          "ntxent_uniform": math.log(2 * b - 1) if b else float("nan"),
          "final_sim": h[-1].get("loss_sim", float("nan")) if h else float("nan"),
          "mean_grad_cos": float(np.mean(cos)) if two_task else float("nan"),
          "conflict_rate": float(np.mean(np.asarray(cos) < 0)) if two_task else float("nan")}


def _diagnostics(recs, methods, rates) -> list[str]:
  lines = ["| method | WR | collapsed | first collapse step | pretrain spread first → final "
           "| test spread backbone / projection | final NT-Xent (log(2B-1)) | final sim "
           "| mean grad cos | conflict rate | s/run |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  mean = lambda v: np.nanmean(np.asarray(v, float)) if len(v) and not np.all(
      np.isnan(np.asarray(v, float))) else float("nan")
  f = lambda x, d=3: "" if not math.isfinite(x) else f"{x:.{d}f}"
  for m in methods:
    for rate in rates:
      sel = [r for r in recs if r["method"] == m and r["witness_rate"] == rate]
      if not sel:
        continue
      st = [pretrain_stats(r) for r in sel]
      enc = [r.get("encoder") or {} for r in sel]
      n_col = sum(bool(s["collapsed"]) for s in st)
      n_rec = sum(s["collapse_state"] == "recovered" for s in st)
      steps = [s["first_collapse_step"] for s in st if s["first_collapse_step"] is not None]
      pre = [s for s in st if math.isfinite(s["final_spread"])]
      lines.append("| " + " | ".join([
          _label(m), f"{rate:.1%}",
          ((f"**{n_col}/{len(sel)}**" if n_col else f"0/{len(sel)}")
           + (f" ({n_rec} not at end)" if n_rec else "")) if pre else "n/a",
          ", ".join(str(s) for s in steps),
          (f"{mean([s['first_spread'] for s in pre]):.2f} → "
           f"{mean([s['final_spread'] for s in pre]):.3f}") if pre else "",
          f(mean([e.get("backbone", {}).get("spread", np.nan) for e in enc]), 2) + " / "
          + f(mean([e.get("projection", {}).get("spread", np.nan) for e in enc]), 3),
          (f"{mean([s['final_ntxent'] for s in pre]):.3f} "
           f"({mean([s['ntxent_uniform'] for s in pre]):.3f})") if pre else "",
          f(mean([s["final_sim"] for s in pre])),
          f(mean([s["mean_grad_cos"] for s in st])),
          f(mean([s["conflict_rate"] for s in st]), 2),
          f"{np.mean([r.get('seconds', np.nan) for r in sel]):.0f}"]) + " |")
  return lines


# -------------------------------------------------------------------- tables

def markdown(recs, cfg=None, bootstrap: int = 1000) -> str:
  methods, rates, heads = _axes(recs, cfg)
  st = Stats(recs, bootstrap)
  seeds = sorted({r["seed"] for r in recs})
  reads = sorted({r.get("mil_features", "projection") for r in recs})
  head, head_name = _head_axis(heads or ["abmil"])
  n_bags = recs[0].get("bags_per_split", {})
  md = ["# Witness-rate study: results (generated)", "",
        f"{len(recs)} runs recorded (seeds {seeds}; bags per split {n_bags}). Each cell: "
        "mean ± sample std over seeds [95% bootstrap CI of the seed mean: test bags "
        "(bag metrics) or held-out test cells (probe AUCs) resampled within each "
        f"seed, {bootstrap} / {min(bootstrap, _CELL_RESAMPLES)} resamples]; (n=k) when "
        "fewer than 3 seeds; †k: k seeds whose pretraining was still collapsed at its "
        "end; ‡k: k seeds flagged during pretraining but past both thresholds at its "
        "end, which may still be close (final spread and NT-Xent are in the "
        f"diagnostics). MIL head: {', '.join(heads)}; the methods read "
        f"{' / '.join(reads)} features, and every run also trains the head on the "
        "other features. Generated by `python -m slamjax.study.report` from "
        "`runs/*.json`.", ""]
  md += ["## Bag classification (test bags)", ""]
  for feat in FEATURES:
    for metric, name in (("auc", "AUC"), ("f1", "F1 at 0.5")):
      md += _table(f"{head_name} on {feat} features: bag {name}", methods, rates,
                   lambda m, r: _fmt(st.cell(m, r, ("bag", feat, head, metric))))
  k = next((h["retrieval"]["k"] for r in recs for f in (r.get("mil") or {}).values()
            for h in f.values() if "k" in h.get("retrieval", {})), "K")
  md += ["## Witness retrieval (positive test bags, cells ranked by the head)", "",
         f"Recall@{k}: share of a bag's witnesses among its top {k} cells; AP: average "
         "precision of the ranking; means over bags, then mean ± std over seeds.", ""]
  for feat in FEATURES:
    for key, name in (("recall_at_k", f"recall@{k}"), ("average_precision", "AP")):
      md += _table(f"{head_name} on {feat} features: {name}", methods, rates,
                   lambda m, r: _fmt_retrieval(st.retrieval(m, r, feat, head, key)))
  md += ["## Encoder only: witness vs normal on held-out cells", ""]
  for feat in FEATURES:
    for kind, name in (("linear", "linear-probe AUC"), ("knn", "kNN AUC")):
      md += _table(f"{feat} features: {name}", methods, rates,
                   lambda m, r: _fmt(st.cell(m, r, ("probe", feat, kind))))
  if "simclr" in methods:
    md += ["## Difference to SimCLR (paired: same test bags / cells and resamples)", "",
           "Mean over seeds of (method − SimCLR) [95% CI]; **bold** where the CI "
           "excludes 0.", ""]
    others = [m for m in methods if m != "simclr"]
    for what, name in ((("bag", "projection", head, "auc"), "bag AUC, projection"),
                       (("bag", "backbone", head, "auc"), "bag AUC, backbone"),
                       (("probe", "projection", "linear"), "linear-probe AUC, projection"),
                       (("probe", "backbone", "linear"), "linear-probe AUC, backbone"),
                       (("probe", "backbone", "knn"), "kNN AUC, backbone")):
      md += _table(f"Δ {name}", others, rates,
                   lambda m, r: _fmt_diff(st.diff(m, "simclr", r, what)))
    for key, name in (("recall_at_k", "recall@K"), ("average_precision", "AP")):
      md += _table(f"Δ witness {name}, projection (mean ± std over seeds)", others,
                   rates, lambda m, r: _fmt_retrieval(st.retrieval(
                       m, r, "projection", head, key, ref="simclr"), diff=True))
  md += ["## Collapse and gradient diagnostics", "",
         "Pretraining spread: sqrt(D) x mean per-dimension std of the normalised "
         "projection of the positive-bag batch (logged every few steps); test spread: "
         "the same on held-out test cells after pretraining (0 = collapsed, 1 = "
         "isotropic). NT-Xent at log(2B-1) means the projection no longer tells "
         "views apart. Grad cos: cos(g_SimCLR, g_sim) on the whole parameter "
         "vector; conflict rate: fraction of logged steps with cos < 0. Means over "
         "seeds.", ""]
  md += _diagnostics(recs, methods, rates) + [""]
  return "\n".join(md)


def write_csv(path: str, recs) -> None:
  cols = ["method", "witness_rate", "seed", "features", "read_by_method", "head", "f1",
          "auc", "sensitivity", "specificity", "recall_at_k", "average_precision",
          "linear_auc", "knn_auc", "spread", "mean_cosine", "effective_rank", "collapsed",
          "collapse_state", "first_collapse_step", "first_spread", "final_spread", "final_ntxent",
          "ntxent_uniform", "final_sim", "mean_grad_cos", "conflict_rate", "seconds"]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, cols, extrasaction="ignore")
    w.writeheader()
    for r in recs:
      st = pretrain_stats(r)
      for feat, heads in (r.get("mil") or {}).items():
        enc = (r.get("encoder") or {}).get(feat, {})
        for head, h in heads.items():
          w.writerow({"method": r["method"], "witness_rate": r["witness_rate"],
                      "seed": r["seed"], "features": feat,
                      "read_by_method": feat == r.get("mil_features"), "head": head,
                      **h["bag"], **h["retrieval"], **enc, **st,
                      "seconds": r.get("seconds")})


# --------------------------------------------------------------------- plots

def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _rate_axis(ax, rates):
  ax.set_xscale("log")
  ax.set_xticks([100 * r for r in rates], [f"{100 * r:g}" for r in rates])
  ax.set_xlabel("witness rate (%)")
  ax.grid(alpha=0.3)


def _plot_vs_rate(path, st, methods, rates, panels, ylabel, chance=0.5):
  plt = _plt()
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
  for ax, (title, what) in zip(axes[0], panels):
    for i, m in enumerate(methods):
      cells = [(r, st.cell(m, r, what)) for r in rates]
      cells = [(r, c) for r, c in cells if c is not None]
      if not cells:
        continue
      x = np.asarray([100 * r for r, _ in cells]) * (1 + 0.025 * (i - len(methods) / 2))
      mu = np.asarray([c["mean"] for _, c in cells])
      err = np.abs(np.asarray([[c["lo"], c["hi"]] for _, c in cells]).T - mu)
      ax.errorbar(x, mu, yerr=err, marker="o" if not methods_lib.METHODS.get(
          m, methods_lib.METHODS["simclr"]).variant else "s", capsize=2, lw=1,
          ls="-" if m != "simclr" else "--", label=_label(m), color=f"C{i % 10}")
      for xi, (_, c) in zip(x, cells):
        if c["collapsed"] or c["recovered"]:
          ax.annotate("†" if c["collapsed"] else "‡", (xi, c["mean"]), fontsize=9,
                      color=f"C{i % 10}")
    if chance is not None:
      ax.axhline(chance, color="k", lw=0.6, ls=":")
    _rate_axis(ax, rates)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
  if axes[0][-1].get_legend_handles_labels()[0]:
    axes[0][-1].legend(fontsize=7, loc="best")
  fig.suptitle("mean over seeds, bars: 95% bootstrap CI of the seed mean; † = a "
               "seed collapsed, ‡ = a seed flagged, not collapsed at the end", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_curves(path, recs, methods, rates, key, title, ylabel, log=False, hline=None):
  plt = _plt()
  seed = min(r["seed"] for r in recs)
  fig, axes = plt.subplots(1, len(rates), figsize=(4.3 * len(rates), 3.8), squeeze=False)
  for j, rate in enumerate(rates):
    ax = axes[0][j]
    for i, m in enumerate(methods):
      for r in recs:
        if r["method"] == m and r["witness_rate"] == rate and r["seed"] == seed:
          h = [x for x in r.get("pretrain_history") or [] if key in x]
          if not h or (key == "grad_cos" and not any(abs(x[key]) > 0 for x in h)):
            continue
          ax.plot([x["step"] for x in h], [x[key] for x in h], lw=1, color=f"C{i % 10}",
                  label=_label(m))
          if hline == "uniform" and r.get("batch_pos"):
            ax.axhline(math.log(2 * r["batch_pos"] - 1), color="k", lw=0.6, ls=":")
    if hline == 0:
      ax.axhline(0, color="k", lw=0.6)
    if log:
      ax.set_yscale("log")
    ax.set_title(f"WR {rate:.1%}: {title}", fontsize=9)
    ax.set_xlabel("pretraining step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  if axes[0][-1].get_legend_handles_labels()[0]:
    axes[0][-1].legend(fontsize=6)
  fig.suptitle(f"seed {seed}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(results_dir: str, cfg=None) -> list[dict]:
  """Rebuilds the tables and plots from the records; returns the records.

  The files are written to a temporary folder and then moved into place
  one by one, so that study processes running side by side (``study.shard``)
  never leave a half-written table or plot.
  """
  recs = load_records(results_dir)
  if not recs:
    return recs
  out = tempfile.mkdtemp(prefix=".report-", dir=results_dir)
  try:
    _write_files(out, recs, cfg)
    for name in os.listdir(out):
      os.replace(os.path.join(out, name), os.path.join(results_dir, name))
  finally:
    shutil.rmtree(out, ignore_errors=True)
  return recs


def _write_files(results_dir: str, recs, cfg) -> None:
  b = int(cfg.study.get("bootstrap", 1000)) if cfg is not None else 1000
  methods, rates, heads = _axes(recs, cfg)
  with open(os.path.join(results_dir, "results.md"), "w") as f:
    f.write(markdown(recs, cfg, b))
  write_csv(os.path.join(results_dir, "results.csv"), recs)
  st = Stats(recs, b)
  head, head_name = _head_axis(heads or ["abmil"])
  _plot_vs_rate(os.path.join(results_dir, "auc_vs_witness_rate.png"), st, methods, rates,
                [(f"{head_name} on {f} features", ("bag", f, head, "auc")) for f in FEATURES],
                "bag AUC (test)")
  _plot_vs_rate(os.path.join(results_dir, "f1_vs_witness_rate.png"), st, methods, rates,
                [(f"{head_name} on {f} features", ("bag", f, head, "f1")) for f in FEATURES],
                "bag F1 (test)", chance=None)
  _plot_vs_rate(os.path.join(results_dir, "probe_auc_vs_witness_rate.png"), st, methods,
                rates, [(f"{k} probe, {f}", ("probe", f, k)) for k in ("linear", "knn")
                        for f in FEATURES], "cell AUC, witness vs normal (held out)")
  _plot_curves(os.path.join(results_dir, "spread_curves.png"), recs, methods, rates,
               "embed_std", "projection spread", "spread (0 = collapsed)")
  _plot_curves(os.path.join(results_dir, "ntxent_curves.png"), recs, methods, rates,
               "loss_simclr", "NT-Xent (dotted: log(2B-1))", "NT-Xent", hline="uniform")
  _plot_curves(os.path.join(results_dir, "gradient_conflict.png"), recs, methods, rates,
               "grad_cos", "cos(g_SimCLR, g_sim)", "cosine", hline=0)
  return recs


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit("usage: python -m slamjax.study.report RESULTS_DIR")
  write_report(sys.argv[1])
