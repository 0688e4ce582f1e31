"""Results a person can look at: JSON, a markdown table and attention plots."""

from __future__ import annotations

import json
import math
import os

import matplotlib.pyplot as plt  # headless runs fall back to Agg by themselves
import numpy as np


def _fmt(v) -> str:
  if isinstance(v, float):
    return "nan" if math.isnan(v) else f"{v:.3f}"
  return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  """Rows of dicts -> a markdown table with the given columns.

  Example:
    >>> print(markdown_table([{"a": 1, "b": 0.5}], ["a", "b"]))
    | a | b |
    |---|---|
    | 1 | 0.500 |
  """
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
  return "\n".join(lines)


# Display names of the metrics in the per-head tables.
_BAG = {"f1": "F1", "auc": "AUC", "sensitivity": "sensitivity", "specificity": "specificity"}


def metrics_row(bag: dict, retrieval: dict | None = None, **labels) -> dict:
  """One row of :func:`metrics_table`: ``labels`` (e.g. head, task) first,
  then bag F1/AUC/sensitivity/specificity and, if given, top-K retrieval.

  Example:
    >>> r = metrics_row({"f1": 1.0, "auc": 1.0, "sensitivity": 1.0, "specificity": 1.0},
    ...                 {"k": 2, "witnesses_found_at_k": 3, "num_witnesses": 4,
    ...                  "precision_at_k": 0.75, "recall_at_k": 0.75,
    ...                  "average_precision": 0.9}, head="abmil")
    >>> r["head"], r["found@2"], r["AP"]
    ('abmil', '3 / 4', 0.9)
  """
  row = dict(labels, **{name: bag[key] for key, name in _BAG.items()})
  if retrieval:
    k = retrieval["k"]
    row.update({f"found@{k}": f"{retrieval['witnesses_found_at_k']} / "
                              f"{retrieval['num_witnesses']}",
                f"precision@{k}": retrieval["precision_at_k"],
                f"recall@{k}": retrieval["recall_at_k"],
                "AP": retrieval["average_precision"]})
  return row


def metrics_table(rows: list[dict]) -> str:
  """Markdown table of :func:`metrics_row` rows (columns in first-seen order;
  a row without retrieval leaves those cells empty)."""
  columns = list(dict.fromkeys(c for r in rows for c in r))
  return markdown_table(rows, columns)


def head_rows(heads: dict) -> tuple[list[dict], list[dict]]:
  """(one row per head, one row per head and task) of ``results["heads"]``."""
  per_head, per_task = [], []
  for name, h in heads.items():
    per_head.append(metrics_row(h["bag"], h.get("retrieval"), head=name))
    if "seconds" in h:  # training + prediction, compilation included
      per_head[-1]["time (s)"] = f"{h['seconds']:.1f}"
    for task, t in h.get("tasks", {}).items():
      per_task.append(metrics_row(t["bag"], t.get("retrieval"), head=name, task=task))
  return per_head, per_task


def fmt_seconds(seconds: float) -> str:
  """Wall times as a person reads them.

  >>> fmt_seconds(23.7), fmt_seconds(327.0), fmt_seconds(4000)
  ('23.7 s', '5 min 27 s', '1 h 06 min')
  """
  if seconds < 60:
    return f"{seconds:.1f} s"
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


def write_results(workdir: str, results: dict, intro: list[str],
                  title: str = "slamjax results", splits: dict | None = None,
                  task_note: str = "") -> str:
  """Writes ``metrics.json`` and ``results.md``; returns the markdown.

  The markdown: ``title``, ``intro`` lines, then per split (``splits``:
  split -> {head: results}, default ``{"test": results["heads"]}``) one row
  per MIL head and one per head and task, then the optional
  ``linear_probe``, ``skipped_files`` and ``timing_s`` of ``results``.
  """
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  md = [f"# {title}", "", *intro, ""]
  for split, heads in (splits or {"test": results["heads"]}).items():
    per_head, per_task = head_rows(heads)
    md += [f"## Bag classification ({split} split), one row per MIL head", "",
           metrics_table(per_head), ""]
    if per_task:
      md += [f"## Per task ({split} split)", "", *([task_note, ""] if task_note else []),
             metrics_table(per_task), ""]
  if "linear_probe" in results:
    md += ["## Cell-level linear probes (test cells)", "",
           markdown_table([results["linear_probe"]], list(results["linear_probe"])), ""]
  skipped = results.get("skipped_files") or []
  if skipped:
    md += [f"## Skipped files ({len(skipped)}, `data.skip_bad_files`)", "",
           *[f"- `{p}`" for p in skipped], ""]
  if "timing_s" in results:
    t = results["timing_s"]
    md += ["## Wall time", "", markdown_table([{k: fmt_seconds(v) for k, v in t.items()}],
                                              list(t)), ""]
  text = "\n".join(md)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text)
  return text


def slide_call(slide_id: str, probs, thresholds, task_names=None, labels=None) -> str:
  """A gallery row's label: the slide, then per task the predicted class (and
  the true label when known), the probability and the threshold.

  Example:
    >>> print(slide_call("P01", [0.73], [0.41], labels=[0.0]))
    P01
    called positive, label negative
    p=0.73, threshold 0.41
    >>> print(slide_call("P02", [0.2, 0.9], [0.5, 0.5], ["blast", "ly"]))
    P02
    blast: called negative, p=0.20 / thr 0.50
    ly: called positive, p=0.90 / thr 0.50
  """
  probs, thresholds = np.ravel(probs), np.ravel(thresholds)
  labels = None if labels is None else np.ravel(np.asarray(labels, float))
  if labels is not None and len(labels) != len(probs):  # a table without labels
    labels = None
  word = lambda x: "positive" if x else "negative"  # noqa: E731

  def called(t):
    known = labels is not None and not np.isnan(labels[t])
    return (f"called {word(probs[t] >= thresholds[t])}"
            + (f", label {word(labels[t] == 1)}" if known else ""))

  if len(probs) == 1 and (task_names is None or len(task_names) <= 1):
    return "\n".join([str(slide_id), called(0),
                      f"p={probs[0]:.2f}, threshold {thresholds[0]:.2f}"])
  names = task_names or [f"task {t}" for t in range(len(probs))]
  return "\n".join([str(slide_id)] + [
      f"{name}: {called(t)}, p={probs[t]:.2f} / thr {thresholds[t]:.2f}"
      for t, name in enumerate(names)])


def plot_attention(path: str, images: list[np.ndarray], attention: list[np.ndarray],
                   witness: list[np.ndarray] | None = None, titles=(), top: int = 8, *,
                   title: str | None = None) -> None:
  """One row per bag (slide): its top-``top`` cells by attention.

  ``witness`` (a bool array per row, or None): cells known to be witnesses
  get a red frame, and the title says so; without any witness label there is
  no frame and no legend. ``titles`` label the rows (see :func:`slide_call`),
  ``title`` the figure (default: "... per test bag" with witness labels,
  else "... per slide").
  """
  rows = len(images)
  known = witness is not None and any(w is not None and np.any(w) for w in witness)
  fig, axes = plt.subplots(rows, top, figsize=(1.6 * top, 1.9 * rows + 0.4), squeeze=False)
  for r in range(rows):
    order = np.argsort(-attention[r], kind="stable")[:top]
    for c in range(top):
      ax = axes[r, c]
      ax.set_xticks([]); ax.set_yticks([])
      if c >= len(order):
        ax.axis("off")
        continue
      i = order[c]
      ax.imshow(images[r][i])
      hit = known and witness[r] is not None and bool(witness[r][i])
      for s in ax.spines.values():
        s.set_edgecolor("red" if hit else "0.7")
        s.set_linewidth(3 if hit else 1)
      ax.set_title(f"#{c + 1} a={attention[r][i]:.3f}", fontsize=7,
                   color="red" if hit else "black")
    if r < len(titles):
      axes[r, 0].set_ylabel(titles[r], fontsize=7)
  title = title or ("Top-attention cells per test bag" if known
                     else "Top-attention cells per slide")
  fig.suptitle(title + (" (red frame = true witness)" if known else ""))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_pretrain_curves(path: str, history: list[dict]) -> None:
  """Both task losses (NT-Xent with its collapse level log(2B-1)) and the
  gradient cosine over pretraining steps."""
  if not history:
    return
  steps = [h["step"] for h in history]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
  axes[0].plot(steps, [h["loss_simclr"] for h in history], label="SimCLR (positive bags)")
  if "ntxent_uniform" in history[-1]:  # NT-Xent of a collapsed projection
    axes[0].axhline(history[-1]["ntxent_uniform"], color="C3", ls="--", lw=1,
                    label="log(2B-1): collapsed")
  axes[0].set_ylabel("NT-Xent loss")
  axes[1].plot(steps, [h["loss_sim"] for h in history], color="C1",
               label="similarity (negative bags)")
  axes[1].set_ylabel("similarity loss")
  if "grad_cos" in history[0]:
    axes[2].plot(steps, [h["grad_cos"] for h in history], color="C2")
    axes[2].axhline(0, color="0.5", lw=0.8)
  axes[2].set_ylabel("cos(g_simclr, g_sim)")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend(); axes[1].legend()
  fig.suptitle("Pretraining: task losses and gradient agreement")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
