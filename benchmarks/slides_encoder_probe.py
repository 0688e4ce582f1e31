r"""How well a slides run's encoders tell cell types apart, on a cohort whose
cell table names them (``make_cohort`` writes ``cells.csv`` with ``cell_type``).

For each fold's SLAM-AGS encoder: embeds every cell (projection and backbone
features), fits a logistic probe of ``--positive`` vs ``--negative`` cell
type on the cells of the fold's training slides and reports its AUC on the
cells of the held-out slides. Cell types are never used by the slides
runner; this only measures what its embeddings make linearly available.

  python benchmarks/slides_encoder_probe.py --workdir /tmp/comp_run \
      --cells /tmp/comp_cohort/cells.csv --positive eosinophil --negative neutrophil
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os

import ml_collections
import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="a finished configs/slides.py run")
  ap.add_argument("--cells", required=True, help="cell table with slide_id,path,cell_type")
  ap.add_argument("--positive", default="eosinophil")
  ap.add_argument("--negative", default="neutrophil")
  ap.add_argument("--folds", type=int, default=2, help="how many folds to probe")
  args = ap.parse_args()
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import roc_auc_score
  from slamjax import embed
  from slamjax import encoder
  from slamjax import sharding
  from slamjax.data import slides as slides_lib
  from slamjax.slides import folds as folds_lib

  with open(os.path.join(args.workdir, "config.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  cohort = slides_lib.load_cohort(cfg.data)
  with open(args.cells, newline="") as f:
    kind = {r["path"]: r["cell_type"] for r in csv.DictReader(f)}
  types = np.array([kind.get(p, "") for p in cohort.cell_paths])
  folds = folds_lib.cohort_folds(cohort, cfg.eval.folds, cfg.seed)[:args.folds]
  mesh = sharding.make_mesh(cfg.mesh.data)
  for fold in folds:
    fold_dir = os.path.join(args.workdir, "folds", "slam_ags", fold["name"])
    for output in ("projection", "backbone"):
      c = copy.deepcopy(cfg)
      c.embed.output = output
      model, state = encoder.load(c, fold_dir, mesh)
      res = {}
      for split in ("train", "test"):
        cells = np.concatenate([cohort.cells[i] for i in fold[split]])
        cells = cells[np.isin(types[cells], (args.positive, args.negative))]
        x = np.concatenate(embed.embed_groups(c, model, state, cohort.images, [cells], mesh))
        res[split] = (x, (types[cells] == args.positive).astype(int))
      (xt, yt), (xe, ye) = res["train"], res["test"]
      mu, sd = xt.mean(0), xt.std(0) + 1e-6
      lr = LogisticRegression(C=0.1, max_iter=3000).fit((xt - mu) / sd, yt)
      auc = roc_auc_score(ye, lr.predict_proba((xe - mu) / sd)[:, 1])
      print(f"{fold['name']} {output} ({xt.shape[1]}-d): {args.positive} vs {args.negative} "
            f"cell AUC {auc:.3f} ({len(yt)} train / {len(ye)} held-out cells)", flush=True)


if __name__ == "__main__":
  main()
