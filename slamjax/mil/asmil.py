"""ASMIL: attention-stabilised MIL (Ye et al., 2026) over padded bags.

Online model (as the authors' ``ACMIL_MYMHA``): ``h = ReLU(x W_r)``; T FEAT query
tokens, each with its own 8-head attention module (q/k/v/out projections,
dropout 0.1, LayerNorm eps 1e-6, no residual, no FFN) over the instances; at
training time a uniform random subset of ``n_drop`` FEAT tokens is dropped;
then a zero-initialised CLS token attends over the kept FEAT tokens with one
more such module and a linear layer gives the bag logits.

Exact memory-saving form (2.7): the queries are parameters, so the scores are
``S_{t,h,n} = h_n . (W_k^{t,h} q~_{t,h}) / sqrt(d_h) + b_k^{t,h} . q~_{t,h} /
sqrt(d_h)`` without any per-token key tensor, and values are pooled before
their projection, ``sum_n a_n (h_n W_v + b_v) = (sum_n a_n h_n) W_v + b_v``.
Memory is O(N (D + T H)), never O(N T D) nor O(N^2).

Anchor (2.2, 2.6): :func:`kd_loss` distils the online softmax attention toward
the normalised sigmoid (NSF, temperature tau) of an anchor model's logits
``S_bar`` (``ASMIL.scores`` with the anchor's parameters, deterministic, under
stop_gradient). The anchor is an EMA of the online parameters (decay 0.999,
initialised as a copy; the intended method) or, with ``anchor="frozen_random"``,
a separately initialised network that is never updated (what the released code
does, because its EMA update only runs on NaN). The EMA lives in
``MilState.anchor`` and is updated in ``slamjax.mil.train``.

Initialisation: the FEAT queries are N(0, 1e-12) and the CLS token is 0, as
in the reference; the attention projections' biases are torch's
U(+-1/sqrt(D)) (Flax's zero biases would make every score exactly 0 at step
0, so attention would start uniform and could only leave it slowly).

Differences from the reference: the per-token classifiers (``sub_preds``, not
in the loss) are not built; the anchor is a copy of the whole parameter tree,
of which ``scores`` reads only the reduction and FEAT-token attention; the KD
default is a per-row KL (``kd_reduction="kl_per_row"``) instead of the
reference's mean over H*T*N elements, which is available as
``"reference_mean"`` (divided by H*T*n_valid, not the padded length).

Example:
  >>> import jax, jax.numpy as jnp
  >>> head = ASMIL(hidden_dim=16, n_token=4, n_drop=2, num_heads=2)
  >>> x, m = jnp.ones((2, 5, 3)), jnp.ones((2, 5), bool)
  >>> params = head.init(jax.random.key(0), x, m)
  >>> out = head.apply(params, x, m)
  >>> out["logits"].shape, out["attention"].shape, out["attention_logits"].shape
  ((2, 1), (2, 5), (2, 2, 4, 5))
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from slamjax.mil import masked
from slamjax.mil import spec as spec_lib

_stacked = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))


def _torch_bias(fan_in: int):
  """U(+-1/sqrt(fan_in)), torch nn.Linear's bias init. With zero biases the
  near-zero queries would give exactly uniform attention at step 0; the
  reference starts from the q_proj bias (its bug/surprise 5)."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


def _layer_norm(x, scale, bias, eps=1e-6):
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps) * scale + bias


class ASMIL(nn.Module):
  """Online ASMIL; ``scores`` gives the attention logits alone (anchor path)."""
  hidden_dim: int = 128
  num_tasks: int = 1
  n_token: int = 16
  n_drop: int = 10
  num_heads: int = 8
  dropout: float = 0.1

  def setup(self):
    t, d = self.n_token, self.hidden_dim
    if d % self.num_heads:
      raise ValueError(f"ASMIL hidden_dim {d} is not divisible by num_heads {self.num_heads}")
    if not 0 <= self.n_drop < t:
      raise ValueError(f"ASMIL needs 0 <= n_drop < n_token, got {self.n_drop}, {t}")
    self.reduce = nn.Dense(d, use_bias=False, name="reduce")
    self.query = self.param("query", nn.initializers.normal(1e-6), (t, d))
    zeros, ones, bias = nn.initializers.zeros, nn.initializers.ones, _torch_bias(d)
    self.wq, self.bq = self.param("wq", _stacked, (t, d, d)), self.param("bq", bias, (t, d))
    self.wk, self.bk = self.param("wk", _stacked, (t, d, d)), self.param("bk", bias, (t, d))
    self.wv, self.bv = self.param("wv", _stacked, (t, d, d)), self.param("bv", bias, (t, d))
    self.wo, self.bo = self.param("wo", _stacked, (t, d, d)), self.param("bo", bias, (t, d))
    self.ln_scale = self.param("ln_scale", ones, (t, d))
    self.ln_bias = self.param("ln_bias", zeros, (t, d))
    self.cls = self.param("cls_token", zeros, (d,))
    self.bag_q = nn.Dense(d, bias_init=bias, name="bag_q")
    self.bag_k = nn.Dense(d, bias_init=bias, name="bag_k")
    self.bag_v = nn.Dense(d, bias_init=bias, name="bag_v")
    self.bag_o = nn.Dense(d, bias_init=bias, name="bag_o")
    self.bag_ln = nn.LayerNorm(epsilon=1e-6, name="bag_ln")
    self.classifier = nn.Dense(self.num_tasks, name="classifier")
    self.drop = nn.Dropout(self.dropout)

  def _features(self, x):
    return nn.relu(self.reduce(x))

  def _scores(self, h, mask):
    """S [B, H, T, N] from features h [B, N, D] (no per-token key tensor)."""
    t, d, nh = self.n_token, self.hidden_dim, self.num_heads
    dh = d // nh
    q = (jnp.einsum("td,tde->te", self.query, self.wq) + self.bq).reshape(t, nh, dh)
    kq = jnp.einsum("tdhe,the->thd", self.wk.reshape(t, d, nh, dh), q) / math.sqrt(dh)
    kb = jnp.einsum("the,the->th", self.bk.reshape(t, nh, dh), q) / math.sqrt(dh)
    s = jnp.einsum("bnd,thd->bhtn", h, kq) + kb.T[None, :, :, None]
    return jnp.where(mask[:, None, None, :], s, 0.0)

  def scores(self, x, mask):
    """Attention logits S [B, H, T, N] (0 on padding): all the anchor needs."""
    return self._scores(self._features(x), mask)

  def __call__(self, x, mask, train: bool = False):
    t, d, nh = self.n_token, self.hidden_dim, self.num_heads
    dh = d // nh
    h = self._features(x)
    s = self._scores(h, mask)
    attn = masked.masked_softmax(s, mask[:, None, None, :])          # [B, H, T, N]
    pooled = jnp.einsum("bhtn,bnd->bthd", attn, h)                   # [B, T, H, D]
    v = jnp.einsum("bthd,tdhe->bthe", pooled, self.wv.reshape(t, d, nh, dh))
    v = v.reshape(v.shape[0], t, d) + self.bv
    feat = jnp.einsum("btd,tde->bte", v, self.wo) + self.bo
    feat = self.drop(feat, deterministic=not train)
    feat = _layer_norm(feat, self.ln_scale, self.ln_bias)            # [B, T, D]

    keep = jnp.ones(feat.shape[:2], bool)
    if train and self.n_drop > 0:
      keys = jax.random.split(self.make_rng("token_drop"), feat.shape[0])
      keep = jax.vmap(lambda k: jax.random.permutation(k, t) >= self.n_drop)(keys)
    # Stage 2: CLS token over the kept FEAT tokens (one 8-head module).
    q = self.bag_q(self.cls).reshape(nh, dh)
    k = self.bag_k(feat).reshape(-1, t, nh, dh)
    vv = self.bag_v(feat).reshape(-1, t, nh, dh)
    a2 = masked.masked_softmax(jnp.einsum("he,bthe->bht", q, k) / math.sqrt(dh),
                               keep[:, None, :])
    z = jnp.einsum("bht,bthe->bhe", a2, vv).reshape(-1, d)
    z = self.bag_ln(self.drop(self.bag_o(z), deterministic=not train))
    logits = self.classifier(z)
    mean_attn = jnp.mean(attn, axis=(1, 2))
    return {"logits": logits, "attention": mean_attn,
            "attention_rows": attn.reshape(attn.shape[0], nh * t, -1),
            "attention_logits": s, "token_keep": keep}


def kd_loss(online_logits, anchor_logits, mask, temperature: float,
            reduction: str = "kl_per_row") -> jax.Array:
  """Anchor -> online attention distillation per bag [B].

  ``online_logits``/``anchor_logits`` are S and S_bar [B, H, T, N]; the target
  is NSF(S_bar / tau) under stop_gradient.

  * ``"kl_per_row"``: KL(a_bar || softmax(S)) summed over valid n, mean over
    (h, t). Same gradient as the reference's cross-entropy.
  * ``"reference_mean"``: the reference's -sum a_bar log softmax(S) divided by
    H * T * n_valid.
  """
  m = mask[:, None, None, :]
  target = jax.lax.stop_gradient(masked.masked_nsf(anchor_logits, m, temperature))
  log_a = masked.masked_log_softmax(online_logits, m)
  ce = -jnp.sum(jnp.where(m, target * log_a, 0.0), -1)              # [B, H, T]
  if reduction == "kl_per_row":
    return jnp.mean(ce + masked.masked_neg_entropy(target, m), axis=(1, 2))
  if reduction == "reference_mean":
    n_valid = jnp.sum(mask, -1).astype(ce.dtype)
    return jnp.sum(ce, axis=(1, 2)) / (ce.shape[1] * ce.shape[2] * n_valid)
  raise ValueError(f"asmil.kd_reduction={reduction!r}; valid: kl_per_row, reference_mean")


def ema_update(anchor, params, decay: float):
  """theta_bar <- d theta_bar + (1 - d) theta, leaf by leaf."""
  return jax.tree.map(lambda a, p: decay * a + (1.0 - decay) * p, anchor, params)


def build(cfg, num_tasks, num_base=None):
  """The head of ``cfg`` (a resolved ``config.mil``)."""
  a = cfg.asmil
  return ASMIL(hidden_dim=cfg.hidden_dim, num_tasks=num_tasks, n_token=a.n_token,
               n_drop=a.n_drop, num_heads=a.num_heads, dropout=a.dropout)


def aux(cfg, model, out, batch, label_known, ctx):
  """KL of the online attention to the anchor model's (``ctx.anchor_params``)."""
  a = cfg.asmil
  anchor_logits = model.apply(ctx.anchor_params, batch["x"], batch["mask"],
                              method=ASMIL.scores)
  kd = kd_loss(out["attention_logits"], anchor_logits, batch["mask"],
               a.temperature, a.kd_reduction)
  return a.kd_weight * kd, {"asmil_kd": kd}


SPEC = spec_lib.HeadSpec(build=build, aux_loss=aux, anchor=True)
