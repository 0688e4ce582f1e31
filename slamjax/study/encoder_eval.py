"""Encoder-only measures of one study run, on backbone and projection features.

After a run's pipeline (:func:`slamjax.pipeline.train_and_evaluate`) the study
restores the final encoder and embeds, in one pass, both its pooled backbone
features and its projection output for:

* **probe cells**: up to ``study.probe_cells_per_class`` normal cells and as
  many witness-class cells of each split (the pipeline's own train/test
  split, recomputed from the seed: no cell crosses it). A logistic-regression
  probe and a cosine kNN classifier are fit on the train-split cells and
  scored on the held-out test-split cells (AUC, witness vs normal). These
  cells do not depend on the witness rate, so the measure isolates the
  encoder from bag sampling and from the MIL head.
* **bag cells**: so that the MIL head can also be trained on the features
  the method's config does not read (``embed.output``): every run measures
  both.

Example (on any features)::

  r = probe_aucs(train_x, train_y, test_x, test_y, knn_k=20)
  r["linear_auc"], r["knn_auc"], len(r["linear_scores"])
"""

from __future__ import annotations

import numpy as np

from slamjax import embed

FEATURES = embed.OUTPUTS


def probe_cells(cfg, pool, cells_per_class: int = 600) -> dict:
  """{split: (pool indices, 0/1 witness-class labels)} of the probe cells."""
  from slamjax import pipeline
  from slamjax.data import bags as bags_lib
  plan = pipeline.make_bag_plan(cfg, pool)
  fractions = plan.split_fractions or {
      s: 1.0 / len(plan.bags_per_split) for s in plan.bags_per_split}
  splits = bags_lib.split_pool(pool.labels, fractions, cfg.seed)
  n = int(cells_per_class)
  rng = np.random.default_rng([cfg.seed, 18])
  out = {}
  for split in ("train", "test"):
    idx = splits[split]
    lab = pool.labels[idx]
    normal = idx[np.isin(lab, plan.normal_classes)]
    abnormal = idx[np.isin(lab, plan.abnormal_classes)]
    normal = np.sort(rng.permutation(normal)[:n])
    abnormal = np.sort(rng.permutation(abnormal)[:n])
    out[split] = (np.concatenate([normal, abnormal]),
                  np.concatenate([np.zeros(len(normal), np.int64),
                                  np.ones(len(abnormal), np.int64)]))
  return out


def _projection(z):
  """The projection a MIL head would read: the SimCLR head's if per task."""
  if isinstance(z, dict):
    return z.get("simclr", next(iter(z.values())))
  if isinstance(z, (tuple, list)):
    return z[0]
  return z


def embed_both(cfg, model, state, images, rows, mesh) -> dict[str, np.ndarray]:
  """{"backbone": [n, Db], "projection": [n, Dp]} of ``images[rows]``, one pass."""
  import jax
  import jax.numpy as jnp
  from slamjax import embed
  from slamjax import sharding
  from slamjax.data import augment
  from slamjax.models import layers
  a = cfg.augment

  def apply(params, batch_stats, x_uint8):
    x = augment.eval_view(x_uint8, a.crop_size, a.mean, a.std)
    out = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return out[0], _projection(out[1])

  # The backbone width, from the model's own output shapes.
  db = jax.eval_shape(apply, state.params, state.batch_stats, jax.ShapeDtypeStruct(
      (2,) + tuple(images.shape[1:]), jnp.uint8))[0].shape[-1]

  def fn(params, batch_stats, x_uint8):  # one array: [backbone | projection]
    feats, z = apply(params, batch_stats, x_uint8)
    return jnp.concatenate([feats.astype(jnp.float32), z.astype(jnp.float32)], -1)

  jitted = jax.jit(fn, in_shardings=(sharding.replicated(mesh), sharding.replicated(mesh),
                                     sharding.data_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh),
                   compiler_options=layers.compiler_options(model.impl))
  both = embed.embed_rows(cfg, model, state, images, np.asarray(rows), mesh, fn=jitted)
  return {"backbone": both[:, :db], "projection": both[:, db:]}


def _auc(y, s) -> float:
  from sklearn.metrics import roc_auc_score
  return float(roc_auc_score(y, s))


def probe_aucs(train_x, train_y, test_x, test_y, knn_k: int = 20) -> dict:
  """Linear-probe and kNN AUC (witness vs normal) and the test-cell scores."""
  from sklearn.neighbors import KNeighborsClassifier
  from slamjax import evaluate
  lin = evaluate.linear_probe(train_x, train_y, test_x, test_y)
  train_x = np.nan_to_num(np.asarray(train_x, np.float64))
  test_x = np.nan_to_num(np.asarray(test_x, np.float64))
  norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  knn = KNeighborsClassifier(n_neighbors=min(knn_k, len(train_y)), metric="cosine")
  knn.fit(norm(train_x), train_y)
  s_knn = knn.predict_proba(norm(test_x))[:, 1]
  return {"linear_auc": lin["auc"], "knn_auc": _auc(test_y, s_knn),
          "linear_scores": lin["scores"], "knn_scores": s_knn}


def evaluate_encoder(cfg, workdir, pool, bagsets, mesh, cells_per_class: int = 600,
                     knn_k: int = 20) -> dict:
  """Encoder measures of a finished run, plus bag-cell embeddings.

  Returns ``{"features": {feat: {linear_auc, knn_auc, spread, mean_cosine,
  effective_rank}}, "probe": {"labels": [...], feat: {"linear": [...],
  "knn": [...]}}, "bag_embeddings": {feat: {split: [per-bag arrays]}}}``
  (the last one is not JSON: the caller uses it and drops it).
  """
  from slamjax import evaluate
  from slamjax import encoder
  model, state = encoder.load(cfg, workdir, mesh)
  probes = probe_cells(cfg, pool, cells_per_class)
  bag_rows = {s: np.concatenate(b.cells) for s, b in bagsets.items()}
  rows = np.unique(np.concatenate([probes["train"][0], probes["test"][0]]
                                  + list(bag_rows.values())))
  emb = embed_both(cfg, model, state, pool.images, rows, mesh)
  where = lambda idx: np.searchsorted(rows, idx)
  feats, scores = {}, {"labels": probes["test"][1].tolist()}
  bag_emb = {}
  for f in FEATURES:
    e = emb[f]
    tr, te = where(probes["train"][0]), where(probes["test"][0])
    r = probe_aucs(e[tr], probes["train"][1], e[te], probes["test"][1], knn_k)
    feats[f] = {"linear_auc": r["linear_auc"], "knn_auc": r["knn_auc"],
                **evaluate.embedding_spread(e[te])}
    scores[f] = {"linear": np.round(r["linear_scores"], 4).tolist(),
                 "knn": np.round(r["knn_scores"], 4).tolist()}
    bag_emb[f] = {s: np.split(e[where(bag_rows[s])],
                              np.cumsum([len(c) for c in b.cells])[:-1])
                  for s, b in bagsets.items()}
  return {"features": feats, "probe": scores, "bag_embeddings": bag_emb}


def mil_on_features(cfg, bag_emb: dict, bagsets, workdir: str) -> dict:
  """Trains the MIL heads of ``cfg.mil`` on given bag embeddings (as the
  pipeline does: standardised with training-bag statistics); head results."""
  from slamjax import evaluate
  from slamjax.mil import multihead
  train, test = bagsets["train"], bagsets["test"]
  runs = multihead.fit_standardized(cfg.mil, bag_emb["train"], train.bag_labels,
                                    {"test": bag_emb["test"]}, workdir, cfg.seed,
                                    verbose=False)
  return {r.name: evaluate.head_results(test, r.outputs["test"], cfg.eval.top_k, None,
                                        r.seconds) for r in runs}
