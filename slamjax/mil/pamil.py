"""PAMIL: prototype attention MIL (Liu et al., MICCAI 2024) over padded bags.

Two variants:

* ``"slamags"`` (default), the copy in Ace95/SLAM-AGS: random trainable
  prototypes, L2-normalised instance/prototype/bag features, weight-normed
  bag classifiers, ER = KL(softmax(proto logits).detach() || softmax(bag
  logits)), clustering losses ``1 - mean max softmax`` with weights 0.005.
* ``"official"`` (Jiashuai-Liu/PAMIL): no normalisation, prototypes frozen
  (k-means initialisable on the host, see :func:`kmeans_prototypes`), ER =
  sum_c sigma(z^p_c)(log sigma(z^p_c) - log sigma(z^i_c)) without detach,
  weights er 0.5, clst 0.5, proto_clst 0.2 (the reference's negative weights on
  ``mean max`` written as positive weights on ``1 - mean max``: same gradient).

Deliberate fixes of reference bugs, in both variants: the bag loss is
cross-entropy on logits (not on probabilities); the prototype score pi is
divided by ``max |pi|`` instead of ``max pi`` (no sign flip when max pi < 0);
the optional CLAM-style instance loss uses each class's own attention row
(the reference uses the last row for every class) and handles bags with fewer
than ``k_sample`` valid instances by dropping padded picks. The prototype push
(needs instance labels) is not implemented.

Classes: a single binary task is modelled as the references do, with C = 2
class branches (normal, abnormal) and a softmax; the head outputs the logit
difference z_1 - z_0, whose sigmoid is exactly the softmax probability of the
abnormal class, and ranks cells by the abnormal branch's attention. With T > 1
tasks (multi-label) there is one sigmoid branch per task, as in the reference's
multi-label variant, and cells are ranked by the mean of the task branches.

Example:
  >>> import jax, jax.numpy as jnp
  >>> head = PAMIL(hidden_dim=8, attention_dim=4, num_protos=3)
  >>> x, m = jnp.ones((2, 5, 6)), jnp.ones((2, 5), bool)
  >>> params = head.init(jax.random.key(0), x, m)
  >>> out = head.apply(params, x, m)
  >>> out["logits"].shape, out["attention"].shape, out["attention_rows"].shape
  ((2, 1), (2, 5), (2, 2, 5))
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from slamjax.mil import masked
from slamjax.mil import options
from slamjax.mil import spec as spec_lib

VARIANTS = ("slamags", "official")
# (er, clst, proto_clst) loss weights of each variant.
VARIANT_WEIGHTS = {"slamags": (0.1, 0.005, 0.005), "official": (0.5, 0.5, 0.2)}


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / max(||x||, eps) (torch F.normalize); finite gradient at x = 0."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis, keepdims=True), eps * eps))


class PAMIL(nn.Module):
  """Prototype attention: S = sigma(h' W_b) tanh(p' W_a)^T, A = softmax_n(S W_c).

  Outputs (besides the common ``logits``/``attention``/``attention_rows``):
  ``class_logits`` and ``proto_class_logits`` [B, C] (pre-fusion, for the ER
  loss), ``proto_sim`` [B, N, P] (for the clustering losses) and, with
  ``inst_pred``, ``inst_logits`` [B, C, N, 2].
  """
  hidden_dim: int = 512
  attention_dim: int = 256
  num_tasks: int = 1
  num_protos: int = 10
  variant: str = "slamags"
  proto_pred: bool = True
  proto_weight: float = 0.5
  inst_pred: bool = False
  dropout: float = 0.0

  @property
  def num_classes(self) -> int:
    return 2 if self.num_tasks == 1 else self.num_tasks

  @nn.compact
  def __call__(self, x, mask, train: bool = False):
    if self.variant not in VARIANTS:
      raise ValueError(f"PAMIL variant {self.variant!r}; valid: {VARIANTS}")
    norm = self.variant == "slamags"
    c = self.num_classes
    proto = self.param("proto", nn.initializers.normal(1.0), (self.num_protos, x.shape[-1]))
    fc = nn.Dense(self.hidden_dim, name="fc")
    drop = nn.Dropout(self.dropout, deterministic=not train)
    h = drop(nn.relu(fc(x)))                           # [B, N, H]
    p = drop(nn.relu(fc(proto)))                       # [P, H]
    if norm:
      h, p = l2_normalize(h), l2_normalize(p)
    a = jnp.tanh(nn.Dense(self.attention_dim, name="attn_a")(p))   # [P, A]
    b = nn.sigmoid(nn.Dense(self.attention_dim, name="attn_b")(h))  # [B, N, A]
    a, b = drop(a), drop(b)
    sim = jnp.einsum("bna,pa->bnp", b, a)              # proto_A [B, N, P]
    raw = jnp.swapaxes(nn.Dense(c, name="attn_c")(sim), 1, 2)  # [B, C, N]
    attn = masked.masked_softmax(raw, mask[:, None])
    bag = jnp.einsum("bcn,bnd->bcd", attn, h)          # [B, C, H]
    if norm:
      bag = l2_normalize(bag)
      v = self.param("cls_v", nn.initializers.lecun_normal(), (c, self.hidden_dim))
      g = self.param("cls_g", lambda _: jnp.linalg.norm(v, axis=-1))
      w = g[:, None] * l2_normalize(v)                 # weight norm (dim 0)
    else:
      w = self.param("cls_w", nn.initializers.lecun_normal(), (c, self.hidden_dim))
    cls_b = self.param("cls_b", nn.initializers.zeros, (c,))
    class_logits = jnp.einsum("bcd,cd->bc", bag, w) + cls_b
    out = {"class_logits": class_logits, "proto_sim": sim,
           "attention_rows": attn, "attention_logits": jnp.where(mask[:, None], raw, 0.0)}
    fused = class_logits
    if self.proto_pred:
      pi = masked.masked_max(sim, mask[..., None], axis=1)   # [B, P]
      pi = pi / (jnp.max(jnp.abs(pi), axis=-1, keepdims=True) + 1e-12)
      rho = jax.nn.softmax(pi, axis=-1)
      proto_logits = nn.Dense(c, name="proto_classifier")(rho @ p)
      out["proto_class_logits"] = proto_logits
      fused = (1 - self.proto_weight) * class_logits + self.proto_weight * proto_logits
    if self.inst_pred:
      inst = [nn.Dense(2, name=f"inst_classifier_{k}")(h) for k in range(c)]
      out["inst_logits"] = jnp.stack(inst, axis=1)      # [B, C, N, 2]
    if self.num_tasks == 1:
      out["logits"] = fused[:, 1:] - fused[:, :1]
      out["attention"] = attn[:, 1]
      out["task_attention"] = attn[:, 1:]
    else:
      out["logits"] = fused
      out["attention"] = jnp.mean(attn, axis=1)
      out["task_attention"] = attn
    return out


def _bernoulli_kl(p_logit, q_logit):
  """KL(Bern(sigma(p)) || Bern(sigma(q))), elementwise."""
  p = jax.nn.sigmoid(p_logit)
  return (p * (jax.nn.log_sigmoid(p_logit) - jax.nn.log_sigmoid(q_logit))
          + (1 - p) * (jax.nn.log_sigmoid(-p_logit) - jax.nn.log_sigmoid(-q_logit)))


def er_loss(out, variant: str, num_tasks: int) -> jax.Array:
  """Branch-consistency loss per bag [B] (0 without the prototype branch)."""
  if "proto_class_logits" not in out:
    return jnp.zeros(out["class_logits"].shape[:1])
  zi, zp = out["class_logits"], out["proto_class_logits"]
  if variant == "official":  # unnormalised sigmoid "KL", gradients into both
    return jnp.sum(jax.nn.sigmoid(zp) * (jax.nn.log_sigmoid(zp) - jax.nn.log_sigmoid(zi)), -1)
  zp = jax.lax.stop_gradient(zp)
  if num_tasks == 1:  # softmax over the 2 classes
    pp = jax.nn.softmax(zp, -1)
    return jnp.sum(pp * (jax.nn.log_softmax(zp, -1) - jax.nn.log_softmax(zi, -1)), -1)
  return jnp.sum(_bernoulli_kl(zp, zi), -1)


def clustering_losses(sim, mask):
  """(L_clst, L_proto_clst) per bag, as ``1 - mean max softmax_p(S)``."""
  sp = jax.nn.softmax(sim, axis=-1)                    # over prototypes
  clst = 1.0 - masked.masked_mean(jnp.max(sp, -1), mask)
  proto_clst = 1.0 - jnp.mean(masked.masked_max(sp, mask[..., None], axis=1), -1)
  return clst, proto_clst


def instance_loss(out, mask, class_targets, class_known, k: int):
  """CLAM-style instance loss per bag [B], mean over known classes.

  For class c present: top-k of A_c are positives, bottom-k negatives; absent:
  top-k are negatives. k_eff = min(k, n_valid); padded picks are dropped.
  """
  attn, logits = out["attention_rows"], out["inst_logits"]       # [B,C,N], [B,C,N,2]
  m = jnp.broadcast_to(mask[:, None], attn.shape)
  _, top_i, top_ok = masked.masked_top_k(attn, m, k)
  _, bot_i, bot_ok = masked.masked_top_k(-attn, m, k)
  take = lambda i: jnp.take_along_axis(logits, i[..., None], axis=2)   # [B,C,k,2]
  ce_pos = optax.softmax_cross_entropy_with_integer_labels(take(top_i), jnp.ones_like(top_i))
  ce_top_neg = optax.softmax_cross_entropy_with_integer_labels(take(top_i), jnp.zeros_like(top_i))
  ce_bot = optax.softmax_cross_entropy_with_integer_labels(take(bot_i), jnp.zeros_like(bot_i))
  present = class_targets[..., None] > 0.5
  top_ce = jnp.where(present, ce_pos, ce_top_neg)
  n_top = jnp.sum(top_ok, -1)
  sum_pos = jnp.sum(jnp.where(top_ok, top_ce, 0.0), -1) + jnp.where(
      present[..., 0], jnp.sum(jnp.where(bot_ok, ce_bot, 0.0), -1), 0.0)
  count = n_top + jnp.where(present[..., 0], jnp.sum(bot_ok, -1), 0)
  per_class = sum_pos / jnp.maximum(count, 1)
  known = class_known.astype(per_class.dtype)
  return jnp.sum(per_class * known, -1) / jnp.maximum(jnp.sum(known, -1), 1.0)


def class_targets(label, label_known, num_tasks: int):
  """Per-class presence targets [B, C] and known flags from task labels [B, T]."""
  if num_tasks == 1:
    y = label[:, :1]
    return jnp.concatenate([1.0 - y, y], -1), jnp.repeat(label_known[:, :1], 2, -1)
  return label, label_known


def aux_loss(pcfg, out, batch, label_known, num_tasks: int):
  """Weighted ER + clustering (+ instance) terms per bag, and their values."""
  er_w, clst_w, pclst_w = resolve_weights(pcfg)
  mask = batch["mask"]
  er = er_loss(out, pcfg.variant, num_tasks)
  clst, pclst = clustering_losses(out["proto_sim"], mask)
  total = er_w * er + clst_w * clst + pclst_w * pclst
  terms = {"pamil_er": er, "pamil_clst": clst, "pamil_proto_clst": pclst}
  if pcfg.inst_weight > 0:
    tgt, known = class_targets(jnp.where(label_known, batch["label"], 0.0), label_known,
                               num_tasks)
    inst = instance_loss(out, mask, tgt, known, pcfg.k_sample)
    total = total + pcfg.inst_weight * inst
    terms["pamil_inst"] = inst
  return total, terms


def resolve_weights(pcfg):
  er, clst, pclst = VARIANT_WEIGHTS[pcfg.variant]
  pick = lambda v, d: d if v is None else v
  return (pick(pcfg.er_weight, er), pick(pcfg.clst_weight, clst),
          pick(pcfg.proto_clst_weight, pclst))


def kmeans_prototypes(bags, num_protos: int, seed: int, per_bag: int = 8,
                      iters: int = 25, max_points: int = 20000) -> np.ndarray:
  """Host k-means prototypes as in the official code (two-level, simplified).

  The reference clusters each slide into min(N, 8) centres, then clusters all
  centres into P prototypes. Here each bag contributes up to ``per_bag``
  k-means centres (random restarts skipped), then the pooled centres are
  clustered into ``num_protos``. Lloyd iterations from k-means++ seeds.
  """
  rng = np.random.default_rng(seed)

  def lloyd(x, k):
    k = min(k, len(x))
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):  # k-means++ seeding
      d = np.min(((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), 1)
      centres.append(x[rng.choice(len(x), p=d / d.sum()) if d.sum() > 0 else rng.integers(len(x))])
    c = np.asarray(centres, np.float64)
    for _ in range(iters):
      assign = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
      for j in range(k):
        if (assign == j).any():
          c[j] = x[assign == j].mean(0)
    return c

  centres = []
  for b in bags:
    b = np.asarray(b, np.float64)
    if len(b) > 2000:
      b = b[rng.choice(len(b), 2000, replace=False)]
    centres.append(lloyd(b, per_bag))
  pooled = np.concatenate(centres)
  if len(pooled) > max_points:
    pooled = pooled[rng.choice(len(pooled), max_points, replace=False)]
  out = lloyd(pooled, num_protos)
  if len(out) < num_protos:  # fewer distinct points than prototypes
    out = np.concatenate([out, out[rng.integers(len(out), size=num_protos - len(out))]])
  return out.astype(np.float32)


def _variant_cfg(cfg, variant=None):
  p = cfg.pamil
  if variant is not None:
    p = dict(p.to_dict() if hasattr(p, "to_dict") else p, variant=variant)
    p = options.resolve({"pamil": p}).pamil
  return p


def make_spec(variant=None) -> spec_lib.HeadSpec:
  """The spec of PAMIL (``variant`` None: ``mil.pamil.variant``; or forced)."""
  def build(cfg, num_tasks, num_base=None):
    p = _variant_cfg(cfg, variant)
    return PAMIL(hidden_dim=cfg.hidden_dim, attention_dim=cfg.attention_dim,
                 num_tasks=num_tasks, num_protos=p.num_protos, variant=p.variant,
                 proto_pred=p.proto_pred, proto_weight=p.proto_weight,
                 inst_pred=p.inst_weight > 0, dropout=cfg.dropout)

  def aux(cfg, model, out, batch, label_known, ctx):
    return aux_loss(_variant_cfg(cfg, variant), out, batch, label_known, model.num_tasks)

  def frozen(cfg):
    p = _variant_cfg(cfg, variant)
    freeze = p.freeze_protos if p.freeze_protos is not None else p.variant == "official"
    return (lambda path: path[-1] == "proto") if freeze else None

  def init_params(cfg, params, bags, seed):
    p = _variant_cfg(cfg, variant)
    how = p.proto_init or ("kmeans" if p.variant == "official" else "random")
    if how == "random":
      return params
    if how != "kmeans":
      raise ValueError(f"mil.pamil.proto_init={how!r}; valid: random, kmeans")
    protos = kmeans_prototypes(bags, p.num_protos, seed)
    inner = dict(params["params"], proto=jnp.asarray(protos))
    return dict(params, params=inner)

  return spec_lib.HeadSpec(build=build, aux_loss=aux, frozen=frozen, init_params=init_params)
