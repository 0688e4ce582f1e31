"""The whole pipeline: cells -> bags -> SLAM-AGS pretraining -> embeddings ->
MIL head -> bag predictions, witness retrieval, tables and plots.

Everything is resumable: rerunning with the same workdir continues from the
latest pretraining or MIL checkpoint, when its ``fingerprint.json`` (config
and cell pool, :mod:`slamjax.workdir`) matches; otherwise the run stops
before any work and names what differs.

Example (what ``slamjax.main`` runs)::

  from configs import default
  results = train_and_evaluate(default.get_config("quick"), "/tmp/slamjax_quick")
  abmil = results["heads"]["abmil"]  # one entry per head of config.mil.heads
  abmil["bag"]["f1"], abmil["retrieval"]["recall_at_k"]
"""

from __future__ import annotations

import os
import time

import numpy as np

from slamjax import collapse
from slamjax import distributed
from slamjax import embed
from slamjax import encoder
from slamjax import evaluate
from slamjax import launch
from slamjax import progress
from slamjax import report
from slamjax import workdir as workdir_lib
from slamjax.data import augment
from slamjax.data import bags as bags_lib
from slamjax.data import sources
from slamjax.mil import labels as labels_lib
from slamjax.mil import multihead


def make_bag_plan(cfg, pool) -> bags_lib.BagPlan:
  b = cfg.bags
  return bags_lib.BagPlan(
      normal_classes=pool.class_index(b.normal_classes),
      abnormal_classes=pool.class_index(b.abnormal_classes),
      witness_rate=b.witness_rate, bag_size=b.bag_size,
      bags_per_split={k: tuple(v) for k, v in b.bags_per_split.items()},
      split_fractions=dict(b.split_fractions) if b.split_fractions else None,
      normal_proportions=tuple(b.normal_proportions) if b.normal_proportions else None,
      reuse_cells=b.reuse_cells,
      witness_classes_per_bag=b.witness_classes_per_bag)


def bag_tasks(cfg, pool) -> tuple[tuple[str, ...], list[int]] | None:
  """(task names, pool classes) when ``bags.multi_label``: one binary label
  per abnormal class ("the bag holds a cell of this class"); else None."""
  if not cfg.bags.multi_label:
    return None
  names = tuple(cfg.bags.abnormal_classes)
  return names, list(pool.class_index(names))


def prepare_data(cfg, pool=None):
  """(pool, bags): loads the cell pool (unless given) and simulates the bags
  of every split."""
  if pool is None:
    pool = sources.load_pool(cfg.data, cfg.seed)
  plan = make_bag_plan(cfg, pool)
  plan.validate()
  return pool, bags_lib.make_bags(pool.labels, plan, cfg.seed)


def _write_bags(workdir, pool, bags):
  out = {split: {"summary": bs.summary(),
                 "bags": [{"label": int(y), "num_witnesses": int(w.sum()),
                           "cell_ids": [pool.cell_ids[i] for i in c]}
                          for c, y, w in zip(bs.cells, bs.bag_labels, bs.witness)]}
         for split, bs in bags.items()}
  out["pool_counts"] = pool.counts()
  workdir_lib.write_json(os.path.join(workdir, workdir_lib.BAGS), out, indent=None)


def train_and_evaluate(cfg, workdir: str, pool=None, mesh=None) -> dict:
  """Runs or resumes the pipeline; writes results under ``workdir``.

  ``pool``: the cell pool of ``cfg.data`` and ``cfg.seed`` if the caller has
  it already (the study reuses one across runs); else it is loaded.
  ``mesh``: from :func:`slamjax.launch.prepare` (which checked ``cfg``);
  None when called as a library: prepared here.
  """
  if mesh is None:
    mesh = launch.prepare(cfg, workdir)
  # Another run's results in workdir: config differences stop here, before
  # any data is loaded; a different cell pool once it is.
  claim = workdir_lib.Run(workdir, cfg, workdir_lib.OUTPUTS["pipeline"])
  main_process = distributed.is_main_process()  # the only one writing files
  timing = {}
  t0 = time.perf_counter()
  pool, bags = prepare_data(cfg, pool)
  claim.commit(workdir_lib.pool_data(pool), write=main_process)
  os.makedirs(workdir, exist_ok=True)
  if main_process:
    _write_bags(workdir, pool, bags)
  timing["data"] = time.perf_counter() - t0
  print(f"data: {len(pool)} cells {pool.counts()}; " + "; ".join(
      f"{s}: {b.num_bags} bags ({int(b.bag_labels.sum())} positive), "
      f"witnesses/positive bag {sorted(set(b.num_witnesses[b.bag_labels == 1].tolist()))}"
      for s, b in bags.items()), flush=True)

  model, state = encoder.train_or_init(cfg, pool, bags, workdir, mesh, timing)
  if cfg.pretrain.epochs > 0 and main_process:
    history = progress.read_jsonl(os.path.join(workdir, workdir_lib.PRETRAIN_METRICS))
    report.plot_pretrain_curves(os.path.join(workdir, workdir_lib.PRETRAIN_CURVES), history)

  t0 = time.perf_counter()
  emb = {s: embed.embed_bags(cfg, model, state, pool, b, mesh) for s, b in bags.items()}
  timing["embed"] = time.perf_counter() - t0
  print(f"embed: {sum(len(e) for es in emb.values() for e in es)} cells -> "
        f"dim {emb['train'][0].shape[1]} in {timing['embed']:.1f}s", flush=True)
  if not main_process:  # the MIL head, evaluation and reports: process 0 only
    return {}

  if cfg.eval.export_features:  # raw embeddings, HDF5 per bag
    from slamjax.features import export as features_export
    features_export.export_embeddings(workdir, pool, bags, emb)

  test_flat = np.concatenate(emb["test"])
  spread = evaluate.embedding_spread(test_flat[:: max(1, len(test_flat) // 4096)])
  t0 = time.perf_counter()
  train, test = bags["train"], bags["test"]
  tasks = bag_tasks(cfg, pool)
  y_train = labels_lib.multi_labels(train, tasks[1]) if tasks else train.bag_labels
  # Every head on the same embeddings, each in workdir/mil_<head>: a rerun
  # with more heads resumes the trained ones and trains only the new ones.
  runs = multihead.fit_standardized(cfg.mil, emb["train"], y_train, {"test": emb["test"]},
                                    workdir, cfg.seed)
  timing["mil"] = time.perf_counter() - t0
  results = {
      "witness_rate": cfg.bags.witness_rate, "bag_size": cfg.bags.bag_size,
      "surgery": cfg.pretrain.surgery if cfg.pretrain.epochs > 0 else "none (random init)",
      "test_bags": {"num_bags": test.num_bags, "num_positive": int(test.bag_labels.sum())},
      "heads": {r.name: evaluate.head_results(test, r.outputs["test"], cfg.eval.top_k,
                                              tasks, r.seconds) for r in runs},
  }
  results["embedding"] = spread  # collapse measure, test cells before scaling
  c = workdir_lib.read_collapse(workdir) if cfg.pretrain.epochs > 0 else None
  if c is not None:
    results["collapse"] = c
  if tasks:
    results["tasks"] = list(tasks[0])
  pos = np.flatnonzero(test.bag_labels == 1)
  show = list(pos[:cfg.eval.num_plot_bags])
  for r in runs:
    out = r.outputs["test"]
    if cfg.eval.export_features:
      features_export.export_bag_attention(r.workdir, pool, test, "test", out["attention"],
                                           out.get("task_attention"))
    if show:
      probs = [p["prob"] for p in results["heads"][r.name]["per_bag"]]
      report.plot_attention(
          os.path.join(r.workdir, "attention_top_cells.png"),
          [pool.images[test.cells[i]] for i in show], [out["attention"][i] for i in show],
          [test.witness[i] for i in show],
          [f"{r.name}: bag {i} p={probs[i]:.2f}\n{int(test.witness[i].sum())} witnesses"
           for i in show])

  if cfg.eval.linear_probe:
    tr_x, te_x = np.concatenate(emb["train"]), np.concatenate(emb["test"])
    tr_y, te_y = np.concatenate(train.witness), np.concatenate(test.witness)
    tr_c, te_c = train.all_cells(), test.all_cells()
    crop = lambda idx: np.asarray(augment.center_crop(
        pool.images[idx], cfg.augment.crop_size)).reshape(len(idx), -1) / 255.0
    results["linear_probe"] = {
        "raw_pixels_auc": evaluate.linear_probe(crop(tr_c), tr_y, crop(te_c), te_y)["auc"],
        "embedding_auc": evaluate.linear_probe(tr_x, tr_y, te_x, te_y)["auc"]}
  timing["total"] = sum(timing.values())
  results["timing_s"] = {k: round(v, 1) for k, v in timing.items()}

  test = results["test_bags"]
  intro = [f"Witness rate {results['witness_rate']}, bag size {results['bag_size']}, "
           f"pretraining surgery `{results['surgery']}`. Test split: {test['num_bags']} bags "
           f"({test['num_positive']} positive); retrieval ranks the cells of each positive "
           "bag by attention (found = true witnesses among the top K, over all bags)."]
  c = results.get("collapse") or {}
  collapse_end = collapse.end_state(c)
  if collapse_end is not None:
    ended = collapse_end == "end"
    intro.append(
        ("**Warning: pretraining collapsed the projection**" if ended else
         "**Note: pretraining was flagged as collapsed, but ended past both thresholds**")
        + f" (first at step {c['first_step']}; final spread {c['final_spread']:.3f}, "
        f"NT-Xent {c['final_ntxent']:.3f} vs log(2B-1) = {c['ntxent_uniform']:.3f})"
        + (": the embeddings carry little information." if ended else ".")
        + f" See `{workdir_lib.COLLAPSE}`.")
  print(report.write_results(
      workdir, results, intro, task_note=(
          "A task is positive when the bag holds a cell of that class; the head's bag "
          "probability above is the largest task probability.")), flush=True)
  return results
