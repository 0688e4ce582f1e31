"""Tables and plots of the witness-rate study from its per-run records.

Reads ``<results_dir>/runs/*.json`` (written by :mod:`slamjax.study`) and
writes, next to them: ``results.md`` (mean +- std over seeds of bag F1, AUC
and top-K retrieval per method, witness rate and MIL head), ``results.csv``
(one row per run and head) and the plots ``f1_vs_witness_rate.png``,
``retrieval_vs_witness_rate.png``, ``pretrain_losses.png``,
``gradient_conflict.png`` and ``embedding_spread.png``.

Example::

  python -m slamjax.study_report docs/results/witness_study
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import sys

import matplotlib.pyplot as plt
import numpy as np

from slamjax import study

METRICS = (("F1", ("bag", "f1")), ("AUC", ("bag", "auc")),
           ("recall@K", ("retrieval", "recall_at_k")),
           ("AP", ("retrieval", "average_precision")))


def load_records(results_dir: str) -> list[dict]:
  recs = []
  for path in sorted(glob.glob(os.path.join(results_dir, "runs", "*.json"))):
    with open(path) as f:
      recs.append(json.load(f))
  return recs


def _ordered(values, preferred) -> list:
  present = set(values)
  return [v for v in preferred if v in present] + sorted(present - set(preferred))


def _color(methods, m) -> str:
  """One colour per method, the same in every panel and plot."""
  return f"C{methods.index(m) % 10}"


def _axes(recs, cfg=None):
  s = cfg.study if cfg is not None else None
  # Without a config (command-line report): the order methods are defined in.
  preferred = list(s.methods) if s is not None else list(study.METHODS)
  methods = _ordered([r["method"] for r in recs], preferred)
  rates = sorted({r["witness_rate"] for r in recs}, reverse=True)
  heads = _ordered([h for r in recs for h in r["heads"]], [])
  return methods, rates, heads


def _values(recs, method, rate, head, path) -> np.ndarray:
  out = []
  for r in recs:
    if r["method"] == method and r["witness_rate"] == rate and head in r["heads"]:
      v = r["heads"][head]
      for p in path:
        v = v[p]
      out.append(float(v))
  return np.asarray(out)


def _cell(v: np.ndarray) -> str:
  if v.size == 0:
    return ""
  if v.size == 1:
    return f"{v[0]:.3f} (n=1)"
  return f"{np.nanmean(v):.3f} ± {np.nanstd(v, ddof=1):.3f}"


def summary_tables(recs, cfg=None) -> str:
  """Markdown: per head and metric, methods x witness rates (mean ± std)."""
  methods, rates, heads = _axes(recs, cfg)
  lines = []
  for head in heads:
    for label, path in METRICS:
      lines += [f"### {head}: {label}", "",
                "| method | " + " | ".join(f"WR {r:.1%}" for r in rates) + " |",
                "|---|" + "---|" * len(rates)]
      for m in methods:
        lines.append(f"| {m} | " + " | ".join(
            _cell(_values(recs, m, r, head, path)) for r in rates) + " |")
      lines.append("")
  return "\n".join(lines)


def _pretrain_stats(rec) -> dict:
  h = rec.get("pretrain_history") or []
  cos = [x["grad_cos"] for x in h if "grad_cos" in x and math.isfinite(x["grad_cos"])]
  last = h[-1] if h else {}
  return {"final_loss_simclr": last.get("loss_simclr", float("nan")),
          "final_loss_sim": last.get("loss_sim", float("nan")),
          "conflict_rate": float(np.mean(np.asarray(cos) < 0)) if cos else float("nan"),
          "mean_grad_cos": float(np.mean(cos)) if cos else float("nan")}


def write_csv(path: str, recs) -> None:
  cols = ["method", "witness_rate", "seed", "head", "f1", "auc", "sensitivity",
          "specificity", "witnesses_found_at_k", "num_witnesses", "k", "recall_at_k",
          "precision_at_k", "average_precision", "probe_auc", "raw_pixels_auc",
          "spread", "mean_cosine", "effective_rank", "final_loss_simclr",
          "final_loss_sim", "conflict_rate", "mean_grad_cos", "seconds"]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, cols, extrasaction="ignore")
    w.writeheader()
    for r in recs:
      probe = r.get("linear_probe") or {}
      for head, h in r["heads"].items():
        w.writerow({"method": r["method"], "witness_rate": r["witness_rate"],
                    "seed": r["seed"], "head": head, **h["bag"], **h["retrieval"],
                    "probe_auc": probe.get("embedding_auc"),
                    "raw_pixels_auc": probe.get("raw_pixels_auc"),
                    **(r.get("embedding") or {}), **_pretrain_stats(r),
                    "seconds": r.get("seconds")})


def _legend(ax, **kw) -> None:
  if ax.get_legend_handles_labels()[0]:  # no lines yet, e.g. random_init only
    ax.legend(**kw)


def _plot_vs_rate(path, recs, metric_path, ylabel, cfg=None) -> None:
  methods, rates, heads = _axes(recs, cfg)
  fig, axes = plt.subplots(1, len(heads), figsize=(5.5 * len(heads), 4), squeeze=False)
  for ax, head in zip(axes[0], heads):
    for m in methods:
      pts = [(r, _values(recs, m, r, head, metric_path)) for r in rates]
      pts = [(r, v) for r, v in pts if v.size]
      if not pts:
        continue
      x = [100 * r for r, _ in pts]
      mu = [np.nanmean(v) for _, v in pts]
      sd = [np.nanstd(v) for _, v in pts]
      ax.errorbar(x, mu, yerr=sd, marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ax.set_xticks([100 * r for r in rates], [f"{100 * r:g}" for r in rates])
    ax.set_xlabel("witness rate (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(head)
    ax.grid(alpha=0.3)
  _legend(axes[0][-1], fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _seed0(recs):
  """First-seed runs with a SimCLR + similarity history (not bag_label)."""
  s = min(r["seed"] for r in recs)
  return [r for r in recs if r["seed"] == s and r.get("pretrain_history")
          and r["method"] != "bag_label"]


def _plot_losses(path, recs, cfg=None) -> None:
  methods, rates, _ = _axes(recs, cfg)
  sel = _seed0(recs)
  fig, axes = plt.subplots(2, len(rates), figsize=(4.5 * len(rates), 6.5), squeeze=False)
  for j, rate in enumerate(rates):
    for m in methods:
      for r in sel:
        if r["method"] == m and r["witness_rate"] == rate:
          h = r["pretrain_history"]
          steps = [x["step"] for x in h]
          color = _color(methods, m)
          axes[0][j].plot(steps, [x["loss_simclr"] for x in h], label=m, color=color)
          axes[1][j].plot(steps, [x["loss_sim"] for x in h], label=m, color=color)
    axes[0][j].set_title(f"WR {rate:.1%}: NT-Xent (positive bags)")
    axes[1][j].set_title(f"WR {rate:.1%}: similarity (negative bags)")
    axes[1][j].set_xlabel("step")
    axes[1][j].set_yscale("log")
  _legend(axes[0][-1], fontsize=7)
  fig.suptitle("Pretraining losses (first seed). Both are computed for every method; "
               "a method optimises only the tasks it weights.", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_conflict(path, recs, cfg=None) -> None:
  methods, rates, _ = _axes(recs, cfg)
  sel = _seed0(recs)
  fig, axes = plt.subplots(2, len(rates), figsize=(4.5 * len(rates), 6.5), squeeze=False)
  for j, rate in enumerate(rates):
    for m in methods:
      for r in sel:
        if r["method"] == m and r["witness_rate"] == rate:
          h = [x for x in r["pretrain_history"] if "grad_cos" in x]
          cos = np.asarray([x["grad_cos"] for x in h], float)
          if not cos.size or not np.any(cos):  # single-task runs log 0
            continue
          steps = [x["step"] for x in h]
          color = _color(methods, m)
          axes[0][j].plot(steps, cos, label=m, lw=1, color=color)
          running = np.cumsum(cos < 0) / np.arange(1, cos.size + 1)
          axes[1][j].plot(steps, running, label=m, lw=1, color=color)
    axes[0][j].axhline(0, color="k", lw=0.7)
    axes[0][j].set_title(f"WR {rate:.1%}: cos(g_SimCLR, g_sim)")
    axes[1][j].set_title(f"WR {rate:.1%}: conflict rate so far (cos < 0)")
    axes[1][j].set_ylim(-0.05, 1.05)
    axes[1][j].set_xlabel("step")
  _legend(axes[0][-1], fontsize=7)
  fig.suptitle("Task-gradient conflict during pretraining (first seed; two-task "
               "methods only; slam_ags_backbone repeats slam_ags's pretraining)",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_spread(path, recs, cfg=None) -> None:
  methods, rates, _ = _axes(recs, cfg)
  fig, ax = plt.subplots(figsize=(6, 4))
  for m in methods:
    pts = [(r, [x["embedding"]["spread"] for x in recs if x["method"] == m
                and x["witness_rate"] == r and x.get("embedding")]) for r in rates]
    pts = [(r, v) for r, v in pts if v]
    if pts:
      ax.errorbar([100 * r for r, _ in pts], [np.mean(v) for _, v in pts],
                  yerr=[np.std(v) for _, v in pts], marker="o", capsize=3, label=m)
  ax.set_xscale("log")
  ax.set_xticks([100 * r for r in rates], [f"{100 * r:g}" for r in rates])
  ax.set_xlabel("witness rate (%)")
  ax.set_ylabel("spread of normalised test embeddings\n(0 = collapsed, 1 = isotropic)")
  _legend(ax, fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _diagnostics_table(recs, cfg=None) -> str:
  methods, rates, _ = _axes(recs, cfg)
  lines = ["| method | WR | probe AUC | spread | eff. rank | final NT-Xent | "
           "final sim | conflict rate | mean cos | s/run |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for m in methods:
    for rate in rates:
      sel = [r for r in recs if r["method"] == m and r["witness_rate"] == rate]
      if not sel:
        continue
      st = [_pretrain_stats(r) for r in sel]
      mean = lambda vals: (f"{np.nanmean(vals):.3f}"
                           if vals and not np.all(np.isnan(vals)) else "")
      lines.append("| " + " | ".join([
          m, f"{rate:.1%}",
          mean([(r.get("linear_probe") or {}).get("embedding_auc", np.nan) for r in sel]),
          mean([(r.get("embedding") or {}).get("spread", np.nan) for r in sel]),
          mean([(r.get("embedding") or {}).get("effective_rank", np.nan) for r in sel]),
          mean([s["final_loss_simclr"] for s in st]), mean([s["final_loss_sim"] for s in st]),
          mean([s["conflict_rate"] for s in st]), mean([s["mean_grad_cos"] for s in st]),
          f"{np.mean([r.get('seconds', np.nan) for r in sel]):.0f}"]) + " |")
  return "\n".join(lines)


def write_report(results_dir: str, cfg=None) -> list[dict]:
  """Rebuilds the tables and plots from the records; returns the records."""
  recs = load_records(results_dir)
  if not recs:
    return recs
  seeds = sorted({r["seed"] for r in recs})
  k = next(iter(recs[0]["heads"].values()))["retrieval"]["k"]
  md = ["# Witness-rate study: results", "",
        f"{len(recs)} runs recorded (seeds {seeds}). Mean ± sample std over seeds; "
        f"retrieval: top-{k} cells by attention in each positive test bag "
        "(recall@K = witnesses found / witnesses, AP = average precision of the "
        "attention ranking). Generated by `python -m slamjax.study_report` from "
        "`runs/*.json`; the study command and its config are in `README.md` and "
        "`study_config.json` beside this file.", "",
        summary_tables(recs, cfg), "## Pretraining and embedding diagnostics", "",
        "probe AUC: cell-level logistic regression (abnormal vs normal) on the "
        "embeddings of test cells; spread: see `slamjax.evaluate.embedding_spread`; "
        "conflict rate: fraction of logged steps with cos(g_SimCLR, g_sim) < 0.", "",
        _diagnostics_table(recs, cfg), ""]
  with open(os.path.join(results_dir, "results.md"), "w") as f:
    f.write("\n".join(md))
  write_csv(os.path.join(results_dir, "results.csv"), recs)
  _plot_vs_rate(os.path.join(results_dir, "f1_vs_witness_rate.png"), recs,
                ("bag", "f1"), "bag F1 (test)", cfg)
  _plot_vs_rate(os.path.join(results_dir, "retrieval_vs_witness_rate.png"), recs,
                ("retrieval", "recall_at_k"), f"witness recall@{k} (attention)", cfg)
  _plot_losses(os.path.join(results_dir, "pretrain_losses.png"), recs, cfg)
  _plot_conflict(os.path.join(results_dir, "gradient_conflict.png"), recs, cfg)
  _plot_spread(os.path.join(results_dir, "embedding_spread.png"), recs, cfg)
  return recs


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit("usage: python -m slamjax.study_report RESULTS_DIR")
  write_report(sys.argv[1])
