"""Cross-validation results: metric tables (per fold, mean ± std), the
out-of-fold predictions CSV, one ROC plot with every fold, attention galleries.

Example:
  >>> import numpy as np
  >>> m = task_metrics(np.array([[0.], [1.], [1.], [0.]]),
  ...                  np.array([[.2], [.7], [.4], [.1]]), [0.3], ("label",))
  >>> m["label"]["auc"], m["label"]["balanced_accuracy"]
  (1.0, 1.0)
"""

from __future__ import annotations

import csv
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from slamjax import collapse  # noqa: E402
from slamjax import evaluate  # noqa: E402
from slamjax import report  # noqa: E402
from slamjax import workdir as workdir_lib  # noqa: E402

METRICS = ("auc", "balanced_accuracy", "brier", "f1", "sensitivity", "specificity")


def task_metrics(labels: np.ndarray, probs: np.ndarray, thresholds, task_names) -> dict:
  """Per task: AUC, balanced accuracy, Brier score, F1, sensitivity,
  specificity at the threshold chosen on the training slides, and whether
  that threshold calls every slide one class."""
  out = {}
  for t, name in enumerate(task_names):
    m = evaluate.bag_metrics(labels[:, t], probs[:, t], thresholds[t])
    m["balanced_accuracy"] = float(np.nanmean([m["sensitivity"], m["specificity"]]))
    y, p = labels[:, t], probs[:, t]
    m["brier"] = float(np.mean((p - y) ** 2)) if len(y) else float("nan")
    m["threshold"] = float(thresholds[t])
    # All held-out slides on one side of the threshold: the slides' class
    # balance says nothing then, whatever the AUC.
    m["balanced_accuracy_best"] = _best_balanced_accuracy(y, p)
    m["degenerate_threshold"] = bool(len(p)) and bool(
        thresholds[t] > p.max() or thresholds[t] <= p.min())
    out[name] = m
  return out


def _best_balanced_accuracy(y, p) -> float:
  """Balanced accuracy at the best threshold in hindsight (what the AUC allows)."""
  from sklearn.metrics import roc_curve
  if len(np.unique(y)) < 2:
    return float("nan")
  fpr, tpr, _ = roc_curve(y, p)
  return float(np.max((tpr + 1 - fpr) / 2))


def threshold_lines(cohort, records: list[dict]) -> list[str]:
  """Per head and task: balanced accuracy of the pooled out-of-fold calls at
  the chosen thresholds, against the best single threshold in hindsight on
  the same pooled predictions. The per-fold hindsight optimum is optimistic
  when a fold holds few slides; pooled, it is what the ranking allows."""
  from sklearn.metrics import balanced_accuracy_score
  index = {s: i for i, s in enumerate(cohort.slide_ids)}
  lines = []
  for head in records[0]["heads"]:
    for t, task in enumerate(cohort.task_names):
      y, p, called = [], [], []
      for r in records:
        h = r["heads"][head]
        for j, sid in enumerate(r["test_slides"]):
          y.append(int(cohort.labels[index[sid], t]))
          p.append(h["prob"][j][t])
          called.append(h["prob"][j][t] >= h["thresholds"][t])
      if len(set(y)) < 2:
        continue
      chosen = balanced_accuracy_score(y, called)
      best = _best_balanced_accuracy(np.asarray(y), np.asarray(p))
      lines.append(f"- {head}, {task}: balanced accuracy {chosen:.3f} at the chosen "
                   f"thresholds; {best:.3f} at the best single threshold in hindsight "
                   f"(gap {best - chosen:.3f}), both over all {len(y)} out-of-fold "
                   "predictions")
  return lines


def baseline_lines(records: dict, task_names) -> list[str]:
  """One line per baseline: did SLAM-AGS (its first head) beat it on mean AUC,
  with the per-fold paired differences."""
  main = records["slam_ags"]
  head = next(iter(main[0]["heads"]))
  lines = []
  for method, recs in records.items():
    if method == "slam_ags":
      continue
    other = next(iter(recs[0]["heads"]))
    for task in task_names:
      a = np.array([r["heads"][head]["metrics"][task]["auc"] for r in main])
      b = np.array([r["heads"][other]["metrics"][task]["auc"] for r in recs])
      d = a - b
      verdict = "beat" if np.nanmean(d) > 0 else "did not beat"
      t = f" ({task})" if len(task_names) > 1 else ""
      lines.append(
          f"- SLAM-AGS {verdict} `{method}`{t}: mean AUC {np.nanmean(a):.3f} vs "
          f"{np.nanmean(b):.3f}, paired difference {np.nanmean(d):+.3f} (per fold "
          + ", ".join(f"{x:+.3f}" for x in d) + f"; ahead in {int((d > 0).sum())} of {len(d)})")
  return lines


def degenerate_lines(records: dict, task_names) -> list[str]:
  """Fold runs whose threshold called every held-out slide one class."""
  out = []
  for method, recs in records.items():
    for r in recs:
      for head, h in r["heads"].items():
        for task in task_names:
          m = h["metrics"][task]
          if m.get("degenerate_threshold"):
            out.append(f"- {method} {r['fold']} {head}"
                       + (f" ({task})" if len(task_names) > 1 else "")
                       + f": threshold {m['threshold']:.3f} calls every held-out slide "
                       + ("negative" if m["sensitivity"] == 0 else "positive"))
  return out


def collapse_summary(cfg, workdir: str) -> dict | None:
  """Whether pretraining collapsed the projection (None without pretraining)."""
  return workdir_lib.read_collapse(workdir) if cfg.pretrain.epochs > 0 else None


def write_predictions(path: str, slide_ids, task_names, probs: dict, thresholds: dict,
                      extra: dict | None = None) -> None:
  """One row per slide and head: probability, threshold and predicted label per task."""
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["slide_id", *(extra or {}), "head",
                *[f"{k}_{t}" for t in task_names for k in ("prob", "threshold", "predicted")]])
    for head, p in probs.items():
      for j, sid in enumerate(slide_ids):
        row = [sid, *[v[j] for v in (extra or {}).values()], head]
        for t in range(len(task_names)):
          thr = thresholds[head][t]
          row += [f"{float(p[j][t]):.6f}", f"{thr:.6f}", int(p[j][t] >= thr)]
        w.writerow(row)


def _mean_std(values) -> str:
  v = np.asarray([x for x in values if x == x], float)
  if not len(v):
    return "nan"
  return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def summary_rows(records: dict, task_names) -> list[dict]:
  """One row per method, head and task: mean ± std over folds of every metric."""
  rows = []
  for method, recs in records.items():
    for head in recs[0]["heads"]:
      for task in task_names:
        per_fold = [r["heads"][head]["metrics"][task] for r in recs]
        row = {"encoder": method, "head": head}
        if len(task_names) > 1:
          row["task"] = task
        row.update({m: _mean_std([p.get(m, float("nan")) for p in per_fold])
                    for m in METRICS})
        row["BA at best threshold"] = _mean_std(
            [p.get("balanced_accuracy_best", float("nan")) for p in per_fold])
        row["collapsed folds"] = f"{sum(_collapse(r) == 'yes' for r in recs)}/{len(recs)}"
        rows.append(row)
  return rows


def _collapse(rec) -> str:
  """"yes" (collapsed at the end of pretraining), "flagged, ended past the
  thresholds" or "no"."""
  return {"end": "yes", "recovered": "flagged, ended past the thresholds",
          None: "no"}[collapse.end_state(rec.get("collapse"))]


def fold_rows(records: dict, task_names) -> list[dict]:
  rows = []
  for method, recs in records.items():
    for r in recs:
      for head, h in r["heads"].items():
        for task in task_names:
          m = h["metrics"][task]
          row = {"encoder": method, "fold": r["fold"], "head": head}
          if len(task_names) > 1:
            row["task"] = task
          row.update({k: m.get(k, float("nan")) for k in METRICS})
          row["threshold"] = m["threshold"]
          row["collapsed"] = _collapse(r)
          rows.append(row)
  return rows


def write_oof(path: str, cohort, records: list[dict]) -> None:
  """Out-of-fold predictions: every labelled slide once, from the fold that held it out."""
  index = {s: i for i, s in enumerate(cohort.slide_ids)}
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    names = cohort.task_names
    w.writerow(["slide_id", "patient_id", "fold", "head",
                *[f"{k}_{t}" for t in names for k in ("label", "prob", "threshold",
                                                      "predicted")]])
    for r in records:
      for head, h in r["heads"].items():
        for j, sid in enumerate(r["test_slides"]):
          i = index[sid]
          row = [sid, cohort.patient_ids[i], r["fold"], head]
          for t in range(len(names)):
            p, thr = h["prob"][j][t], h["thresholds"][t]
            row += [int(cohort.labels[i, t]), f"{p:.6f}", f"{thr:.6f}", int(p >= thr)]
          w.writerow(row)


def plot_roc(path: str, cohort, records: list[dict], head: str) -> None:
  """One panel per task, one ROC curve per fold (held-out slides)."""
  from sklearn.metrics import roc_curve
  names = cohort.task_names
  index = {s: i for i, s in enumerate(cohort.slide_ids)}
  fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
  for t, name in enumerate(names):
    ax = axes[0, t]
    aucs = []
    for r in records:
      y = np.array([cohort.labels[index[s], t] for s in r["test_slides"]])
      p = np.array([row[t] for row in r["heads"][head]["prob"]])
      auc = r["heads"][head]["metrics"][name]["auc"]
      if len(np.unique(y)) < 2:
        continue
      fpr, tpr, _ = roc_curve(y, p)
      ax.plot(fpr, tpr, lw=1.2, label=f"{r['fold']} (AUC {auc:.2f})")
      aucs.append(auc)
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"{name}: {head}, AUC {np.mean(aucs):.2f} ± {np.std(aucs):.2f}"
                 if aucs else name, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def gallery_slides(labels: np.ndarray, probs, n: int) -> list[int]:
  """Which held-out slides a fold's gallery shows: half positive, half
  negative (the top cells of a slide called negative are worth seeing too),
  filled from the other class when one runs short; each class by decreasing
  probability.

  Example:
    >>> gallery_slides(np.array([[1.], [0.], [1.], [0.]]), [[.6], [.1], [.9], [.7]], 2)
    [2, 3]
  """
  p = np.max(np.asarray(probs, float).reshape(len(labels), -1), axis=1)
  pos = np.nan_to_num(np.asarray(labels, float)).max(axis=1) == 1
  by_p = lambda idx: sorted(idx, key=lambda j: -p[j])  # noqa: E731
  pos_idx, neg_idx = by_p(np.flatnonzero(pos)), by_p(np.flatnonzero(~pos))
  k_pos = min(len(pos_idx), max((n + 1) // 2, n - len(neg_idx)))
  k_neg = min(len(neg_idx), n - k_pos)
  return [int(j) for j in pos_idx[:k_pos] + neg_idx[:k_neg]]


def plot_galleries(out_dir: str, cohort, records: list[dict], head: str, per_fold: int,
                   top: int = 8) -> None:
  """Top-attention cells of held-out slides, positive and negative ones
  (:func:`gallery_slides`), one PNG per fold; each row says the predicted
  class, the probability and the threshold. Red frames and their legend only
  where the cohort has witness labels."""
  os.makedirs(out_dir, exist_ok=True)
  index = {s: i for i, s in enumerate(cohort.slide_ids)}
  for r in records:
    h = r["heads"][head]
    test = [index[s] for s in r["test_slides"]]
    show = gallery_slides(cohort.labels[test], h["prob"], per_fold)
    if not show:
      continue
    slides = [test[j] for j in show]
    att = [np.asarray(h["attention"][j]) for j in show]
    images = [cohort.images[cohort.cells[i]] for i in slides]
    witness = ([cohort.witness[i] for i in slides] if cohort.witness is not None
               else None)
    titles = [report.slide_call(cohort.slide_ids[i], h["prob"][j], h["thresholds"],
                                cohort.task_names, cohort.labels[i])
              for i, j in zip(slides, show)]
    report.plot_attention(
        os.path.join(out_dir, f"{r['method']}_{r['fold']}.png"), images, att, witness,
        titles, top=top,
        title=f"Held-out slides of {r['fold']} ({r['method']}, {head}): top-attention cells")


def final_collapse_line(cfg, final_dir: str) -> str | None:
  """One line when the final model's pretraining was flagged as collapsed
  (results.md, and predict's report and console); None otherwise."""
  c = collapse_summary(cfg, final_dir)
  state = collapse.end_state(c)
  if state is None:
    return None
  detail = (f"final spread {c.get('final_spread', float('nan')):.3f}, NT-Xent "
            f"{c.get('final_ntxent', float('nan')):.3f} vs log(2B-1) = "
            f"{c.get('ntxent_uniform', float('nan')):.3f}; `final/{workdir_lib.COLLAPSE}`")
  if state == "end":
    return (f"**Warning: the final model's pretraining ended collapsed** ({detail}): its "
            "embeddings carry little information about the cells, and so do its "
            "predictions.")
  return ("Note: the final model's pretraining was flagged as collapsed but ended past "
          f"both thresholds ({detail}).")


def write_cv_report(cfg, cohort, folds, records: dict, workdir: str, timing: dict,
                    skipped=()) -> dict:
  """Writes metrics.json, results.md, oof_predictions.csv, roc.png and the
  galleries; returns the summary dict."""
  names = cohort.task_names
  main = records["slam_ags"]
  head = next(iter(main[0]["heads"]))  # the first head of config.mil.heads
  summary = summary_rows(records, names)
  results = {"num_slides": len(cohort.slide_ids), "num_cells": int(len(cohort.images)),
             "tasks": list(names), "folds": [f["name"] for f in folds],
             "summary": summary, "per_fold": fold_rows(records, names),
             "timing_s": {k: round(v, 1) for k, v in timing.items()},
             "skipped_files": list(skipped)}
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(results, f, indent=2)
  write_oof(os.path.join(workdir, "oof_predictions.csv"), cohort, main)
  plot_roc(os.path.join(workdir, "roc.png"), cohort, main, head)
  plot_galleries(os.path.join(workdir, "galleries"), cohort, main, head,
                 cfg.eval.num_plot_bags, top=min(8, cfg.eval.top_k))
  md = ["# slamjax results: your own slides", "",
        cohort.summary(), "",
        f"{len(folds)} fold(s), grouped by patient; MIL epochs and thresholds (Youden's "
        f"J) chosen by {cfg.eval.inner_folds}-fold inner cross-validation on each fold's "
        "training slides; metrics on its held-out slides, mean ± std over folds. "
        "'BA at best threshold' is the balanced accuracy the held-out ranking allows "
        "in hindsight; Brier is the mean squared error of the probabilities.", "",
        "## Cross-validation", "", report.markdown_table(summary, list(summary[0])), ""]
  md += ["Thresholds against hindsight, pooled over the folds (the per-fold "
         "hindsight column above is optimistic with few slides per fold):", "",
         *threshold_lines(cohort, main), ""]
  lines = baseline_lines(records, names)
  if lines:
    md += ["## Against the baselines (same folds)", "", *lines, ""]
  degen = degenerate_lines(records, names)
  if degen:
    md += [f"**Warning: {len(degen)} threshold(s) called every held-out slide of a fold "
           "one class** (sensitivity or specificity 0):", "", *degen, ""]
    print("slides: WARNING: degenerate thresholds:\n" + "\n".join(degen), flush=True)
  collapsed = [r for recs in records.values() for r in recs if _collapse(r) == "yes"]
  if collapsed:
    md += [f"**Warning: pretraining collapsed the projection in {len(collapsed)} fold "
           "run(s)** (marked above); their embeddings carry little information. "
           "See docs/slides.md for the variants that avoid it.", ""]
  final_line = (final_collapse_line(cfg, os.path.join(workdir, "final"))
                if cfg.eval.final_model else None)
  md += [final_line, ""] if final_line else []
  fr = results["per_fold"]
  md += ["## Per fold", "", report.markdown_table(fr, list(fr[0])), "",
         "Files: `oof_predictions.csv` (out-of-fold predictions), `roc.png`, "
         "`galleries/` (top-attention cells of held-out slides)"
         + (", `final/` (the model for `python -m slamjax.predict`)"
            if cfg.eval.final_model else "") + ".", ""]
  if skipped:
    md += [f"## Skipped files ({len(skipped)}, `data.skip_bad_files`)", "",
           *[f"- `{p}`" for p in skipped], ""]
  md += ["## Wall time", "", report.markdown_table(
      [{k: report.fmt_seconds(v) for k, v in timing.items()}], list(timing)), ""]
  text = "\n".join(md)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text)
  print(text, flush=True)
  return results
