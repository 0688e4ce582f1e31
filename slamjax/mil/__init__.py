"""Attention-MIL heads on frozen cell embeddings, with padded-bag batching.

Heads (``config.mil.heads`` lists those a run trains, each in its own
folder: :mod:`slamjax.mil.multihead`; registry in :mod:`slamjax.mil.heads`):

* ``abmil``: gated-attention ABMIL (:mod:`slamjax.mil.abmil`);
* ``aem``: ABMIL + the attention-entropy regulariser (:mod:`slamjax.mil.aem`,
  usable with any head through ``mil.aem_weight``);
* ``pamil`` / ``pamil_official``: prototype attention, SLAM-AGS or official
  variant, with ER and clustering losses (:mod:`slamjax.mil.pamil`);
* ``asmil``: FEAT tokens + CLS aggregation, EMA anchor with normalised-sigmoid
  attention distillation, token dropping (:mod:`slamjax.mil.asmil`);
* ``mecds``: multi-task head with task tokens, task-isolated attention,
  dynamic feature routing, asymmetric distillation and task extension
  (:mod:`slamjax.mil.mecds`);
* ``topk``: cell classifier whose bag logit is the mean of its k highest cell
  logits (Campanella et al. 2019; :mod:`slamjax.mil.topk`);
* ``negref``: non-parametric negative-reference scoring, k-NN novelty of each
  cell against the negative training bags' cells, calibrated by a logistic
  regression (:mod:`slamjax.mil.negref`; fitted by ``multihead``, not ``train``).

Training and inference: :mod:`slamjax.mil.train` (``fit``, ``predict``,
``extend``; epochs on device-resident bags: :mod:`slamjax.mil.resident`);
masked primitives: :mod:`slamjax.mil.masked`; padding buckets:
:mod:`slamjax.mil.padding`; config defaults: :mod:`slamjax.mil.options`;
multi-task labels: :mod:`slamjax.mil.labels`; retrieval, multi-task metrics
and attention stability: :mod:`slamjax.mil.diagnostics`. The heads, their
defaults and measured speed: ``docs/mil-heads.md``.
"""
