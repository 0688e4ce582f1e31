r"""What each slide-level choice contributes, on the encoders of a finished slides run.

Reloads every fold's SLAM-AGS encoder from a workdir of ``configs/slides.py``,
embeds the fold's slides once, and refits the MIL stage in variants that
differ in one choice each (same folds, same embeddings):

* ``as run``: the run's own config;
* ``no slide features``: ``mil.slide_features=()``;
* ``cell count only``: ``mil.slide_features=("log_count",)``;
* ``no class balance``: ``mil.class_balance=False`` (with ``--all``: it
  trains every head again);
* ``slide features alone``: the fusion's logistic regression without the
  MIL logit;
* ``training thresholds``: the head fitted for ``mil.epochs`` on all
  training slides, its threshold chosen on its own training predictions
  (slamjax before inner cross-validation).

  python benchmarks/slides_ablation.py --workdir /tmp/comp_run --out /tmp/ablation

Prints one row per variant: mean ± std over folds of held-out AUC, balanced
accuracy, the balanced accuracy the ranking allows in hindsight, and how many
folds' thresholds called every held-out slide one class.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import ml_collections
import numpy as np


def _metrics(y, p, thr):
  from sklearn.metrics import roc_auc_score, roc_curve
  pred = p >= thr
  sens, spec = pred[y == 1].mean(), (~pred[y == 0]).mean()
  fpr, tpr, _ = roc_curve(y, p)
  return {"auc": roc_auc_score(y, p), "ba": (sens + spec) / 2,
          "ba_best": float(np.max((tpr + 1 - fpr) / 2)),
          "degenerate": float(thr > p.max() or thr <= p.min())}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="a finished configs/slides.py run")
  ap.add_argument("--out", required=True, help="where the variants' MIL runs go")
  ap.add_argument("--all", action="store_true", help="also the variants that retrain heads")
  args = ap.parse_args()
  from slamjax import encoder
  from slamjax import sharding
  from slamjax.data import slides as slides_lib
  from slamjax.mil import multihead
  from slamjax.mil import standardize
  from slamjax.mil import train as mil_train
  from slamjax.slides import fold_run
  from slamjax.slides import folds as folds_lib
  from slamjax.slides import model_selection as ms

  with open(os.path.join(args.workdir, "config.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  cohort = slides_lib.load_cohort(cfg.data)
  folds = folds_lib.cohort_folds(cohort, cfg.eval.folds, cfg.seed)
  mesh = sharding.make_mesh(cfg.mesh.data)
  # Variants that change only what follows the heads reuse the run's own
  # inner-CV records and heads (fold folder), so they cost seconds.
  variants = {"as run": {}, "no slide features": {"slide_features": ()},
              "cell count only": {"slide_features": ("log_count",)},
              "slide features alone": "features", "training thresholds": None}
  if args.all:
    variants["no class balance"] = {"class_balance": False}
  rows = {v: [] for v in variants}
  for fold in folds:
    fold_dir = os.path.join(args.workdir, "folds", "slam_ags", fold["name"])
    model, state = encoder.load(cfg, fold_dir, mesh)
    sets = {"train": fold["train"], "test": fold["test"]}
    emb = {k: fold_run.embed_slides(cfg, model, state, cohort, v, mesh) for k, v in sets.items()}
    mu, sd = standardize.fit(emb["train"])
    emb = {k: standardize.apply(v, mu, sd) for k, v in emb.items()}
    y_tr, y_te = cohort.labels[fold["train"]], cohort.labels[fold["test"]][:, 0]
    patients = [cohort.patient_ids[i] for i in fold["train"]]
    for name, over in variants.items():
      c = copy.deepcopy(cfg)
      work = os.path.join(args.out, name.replace(" ", "_"), fold["name"])
      if over == "features":
        names = cfg.mil.slide_features or ("log_count", "pixel_stats")
        c.mil.slide_features = names
        feats = fold_run.slide_feature_sets(c, cohort, sets)
        lr = ms.fit_logreg(feats["train"], y_tr[:, 0], ms.run_inner_folds(
            y_tr, patients, c.eval.inner_folds, c.seed))
        p, thr = lr.predict(feats["test"]), lr.threshold
      elif over is None:
        head_cfg = multihead.head_config(c.mil, multihead.head_names(c.mil)[0])
        st = mil_train.fit(head_cfg, emb["train"], y_tr[:, 0], work, c.seed, verbose=False)
        thr = ms.choose_threshold(y_tr[:, 0],
                                  mil_train.predict(head_cfg, st, emb["train"])["prob"][:, 0])
        p = mil_train.predict(head_cfg, st, emb["test"])["prob"][:, 0]
      else:
        for k, v in over.items():
          c.mil[k] = v
        if "class_balance" not in over:
          work = fold_dir
        feats = fold_run.slide_feature_sets(c, cohort, sets)
        f = ms.fit_heads(c, emb["train"], y_tr, patients, work, feats.get("train"),
                         verbose=False)[0]
        p = ms.predict_head(f.cfg, f.state, emb["test"], feats.get("test"), f.fusion)["prob"][:, 0]
        thr = f.thresholds[0]
      rows[name].append(_metrics(y_te, p, thr))
      print(f"{fold['name']} {name}: " + ", ".join(
          f"{k} {v:.3f}" for k, v in rows[name][-1].items()), flush=True)
  print("\n| variant | AUC | balanced accuracy | BA at best threshold | degenerate folds |")
  print("|---|---|---|---|---|")
  for name, rs in rows.items():
    ms_ = lambda k: f"{np.mean([r[k] for r in rs]):.3f} ± {np.std([r[k] for r in rs]):.3f}"
    print(f"| {name} | {ms_('auc')} | {ms_('ba')} | {ms_('ba_best')} | "
          f"{int(sum(r['degenerate'] for r in rs))}/{len(rs)} |")


if __name__ == "__main__":
  main()
