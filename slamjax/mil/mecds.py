"""MECDS-style multi-task head: task tokens, task-isolated self-attention,
dynamic feature routing, asymmetric knowledge distillation, task extension.

No MECDS code is public; this follows the paper. Choices made where the
paper is ambiguous:

* Instances are projected by ``Dense(D) + GELU``; T learnable task tokens;
  L pre-LN layers ``Z <- Z + TISA(LN Z)``, ``Z <- Z + DFR(LN Z)``.
* TISA: a task token attends to itself and to the valid instances, never to
  another task token; instances attend to instances only (the instance stream
  is task-agnostic). Computed in the equivalent split form: instance
  self-attention with a padding mask (N x N per head, the only O(N^2) part;
  ``instance_attention="none"`` drops it for huge bags) plus a per-task
  cross-attention over ``{tau_t} U instances`` (T x N scores).
* DFR replaces the FFN: per-task routers ``g_t`` (D -> D/4 -> 1, GELU), a
  softmax over tasks, top-p selection (p = 0.5, the crossing element kept)
  and per-task experts ``E_t`` (D -> 4D -> D) weighted by the
  un-renormalised probabilities (so the router gets gradients). Experts are
  evaluated densely and masked. Task token t always uses its own expert with
  weight 1. The last layer's instance routing is skipped: no task token reads
  the instance stream after the last layer, so it could not affect outputs.
* Heads: ``head_t(LN_t(tau_t))``, one logit per (binary) task.
* Task parameters (token, routers, experts, head LayerNorm and head) live
  in task-group submodules: the base group's are stacked on a task axis
  (``base_tasks``; one vectorised einsum per layer for all base tasks, which
  keeps compilation small), each extension task has its own ``task_{k}``, so
  freezing is by path. Shared: ``proj`` and ``layer_{l}``.

Training (``slamjax.mil.train.fit``): a teacher phase with class-balanced
resampling (:func:`balanced_weights`, the doc's max-over-tasks slide weight)
and plain BCE, then a student phase with natural sampling and
``sum_t BCE_t + kd_weight * AKD_t`` toward the frozen teacher
(:func:`akd_loss`). The student starts from the teacher's parameters by
default (``mecds.student_init="teacher"``; the paper does not say): on our
toy tasks a fresh student (``"fresh"``) needed about twice the epochs to
match and was less stable, since early on AKD mostly pushes positive bags up.

Extension-safe routing. A softmax over tasks couples them: a new router would
change the old tasks' routes and so their outputs. Tasks therefore come in a
base group (the first ``num_base`` tasks, trained jointly, softmax + top-p
routing among themselves) and extension tasks added later. Extension task k
never writes to the shared instance stream: in every layer l its router is a
sigmoid gate on the layer's (frozen) instance stream Z_l, and its gated
expert outputs accumulate in a private view ``Z_l + Delta_k`` of the
instances, which only task k's token attends to (keys/values through the
frozen shared projections). The
old tasks' computation is thus untouched, and :func:`slamjax.mil.train.extend`
trains only ``task_{k}`` with every other parameter frozen; old-task
predictions are computed with ``only_base=True`` (the pre-extension program),
which makes them bitwise identical.

Example:
  >>> import jax, jax.numpy as jnp
  >>> head = MECDS(hidden_dim=8, num_tasks=2, num_layers=1, num_heads=2)
  >>> x, m = jnp.ones((2, 5, 3)), jnp.ones((2, 5), bool)
  >>> params = head.init(jax.random.key(0), x, m)
  >>> out = head.apply(params, x, m)
  >>> out["logits"].shape, out["task_attention"].shape
  ((2, 2), (2, 2, 5))
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from slamjax.mil import masked
from slamjax.mil import spec as spec_lib


_stacked = lambda batch_axes: nn.initializers.lecun_normal(
    in_axis=-2, out_axis=-1, batch_axis=batch_axes)


class TaskGroup(nn.Module):
  """Everything owned by a group of ``size`` tasks, stacked on a task axis:
  tokens, routers (of the first ``num_routers`` layers), experts and heads.

  The base group is one TaskGroup; each extension task is a TaskGroup of
  size 1, so every task's computation is a dense, vectorised einsum.
  """
  size: int
  dim: int
  num_layers: int
  num_routers: int
  zero_experts: bool = False
  mlp_ratio: int = 4
  dropout: float = 0.0

  def setup(self):
    g, d, n_r = self.size, self.dim, self.num_routers
    rh, eh, layers = max(1, d // 4), self.mlp_ratio * d, self.num_layers
    zeros = nn.initializers.zeros
    self.token = self.param("token", nn.initializers.normal(0.02), (g, d))
    if n_r > 0:
      self.r_w1 = self.param("router_w1", _stacked((0, 1)), (n_r, g, d, rh))
      self.r_b1 = self.param("router_b1", zeros, (n_r, g, rh))
      self.r_w2 = self.param("router_w2", _stacked((0,)), (n_r, g, rh))
      self.r_b2 = self.param("router_b2", zeros, (n_r, g))
    self.e_w1 = self.param("expert_w1", _stacked((0, 1)), (layers, g, d, eh))
    self.e_b1 = self.param("expert_b1", zeros, (layers, g, eh))
    self.e_w2 = self.param("expert_w2", zeros if self.zero_experts else _stacked((0, 1)),
                           (layers, g, eh, d))
    self.e_b2 = self.param("expert_b2", zeros, (layers, g, d))
    self.ln_scale = self.param("head_ln_scale", nn.initializers.ones, (g, d))
    self.ln_bias = self.param("head_ln_bias", zeros, (g, d))
    self.head_w = self.param("head_w", _stacked((0,)), (g, d))
    self.head_b = self.param("head_b", zeros, (g,))
    self.drop = nn.Dropout(self.dropout)

  def tokens(self):
    return self.token

  def route(self, layer: int, z):
    """Router logits [B, N, g] of instances z [B, N, D]."""
    h = nn.gelu(jnp.einsum("bnd,gde->bnge", z, self.r_w1[layer]) + self.r_b1[layer])
    return jnp.einsum("bnge,ge->bng", h, self.r_w2[layer]) + self.r_b2[layer]

  def expert_all(self, layer: int, z, train: bool = False):
    """Every expert on every instance: [B, N, g, D]."""
    h = nn.gelu(jnp.einsum("bnd,gdf->bngf", z, self.e_w1[layer]) + self.e_b1[layer])
    out = jnp.einsum("bngf,gfd->bngd", h, self.e_w2[layer]) + self.e_b2[layer]
    return self.drop(out, deterministic=not train)

  def expert_own(self, layer: int, tok, train: bool = False):
    """Task token t [B, g, D] through its own expert t."""
    h = nn.gelu(jnp.einsum("bgd,gdf->bgf", tok, self.e_w1[layer]) + self.e_b1[layer])
    out = jnp.einsum("bgf,gfd->bgd", h, self.e_w2[layer]) + self.e_b2[layer]
    return self.drop(out, deterministic=not train)

  def readout(self, tok):
    """Head logits [B, g] from the final task tokens [B, g, D] (LN, linear)."""
    mu = jnp.mean(tok, -1, keepdims=True)
    var = jnp.mean(jnp.square(tok - mu), -1, keepdims=True)
    tn = (tok - mu) * jax.lax.rsqrt(var + 1e-6) * self.ln_scale + self.ln_bias
    return jnp.einsum("bgd,gd->bg", tn, self.head_w) + self.head_b


class SharedLayer(nn.Module):
  """LayerNorms and the attention projections shared by all tokens."""
  dim: int
  num_heads: int
  dropout: float = 0.0

  def setup(self):
    self.ln1, self.ln2 = nn.LayerNorm(), nn.LayerNorm()
    self.q, self.k, self.v = nn.Dense(self.dim), nn.Dense(self.dim), nn.Dense(self.dim)
    self.o = nn.Dense(self.dim)
    self.drop = nn.Dropout(self.dropout)

  def _heads(self, x):
    return x.reshape(x.shape[:-1] + (self.num_heads, self.dim // self.num_heads))

  def keys_values(self, zn):
    return self._heads(self.k(zn)), self._heads(self.v(zn))

  def _out(self, o, train):
    return self.drop(self.o(o.reshape(o.shape[:-2] + (self.dim,))), deterministic=not train)

  def instance_attend(self, zn, k, v, mask, train: bool = False):
    """Instance self-attention [B, N, D] (padding excluded as keys)."""
    q = self._heads(self.q(zn))
    s = jnp.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    a = masked.masked_softmax(s, mask[:, None, None, :])
    return self._out(jnp.einsum("bhnm,bmhd->bnhd", a, v), train)

  def token_attend(self, tn, k, v, mask, train: bool = False):
    """Task tokens tn [B, t, D] over {own token} U instances.

    Returns the update [B, t, D] and the attention on instances [B, H, t, N].
    """
    q, kt, vt = self._heads(self.q(tn)), self._heads(self.k(tn)), self._heads(self.v(tn))
    scale = 1.0 / math.sqrt(q.shape[-1])
    s_self = jnp.einsum("bthd,bthd->bht", q, kt)[..., None] * scale
    s_inst = jnp.einsum("bthd,bnhd->bhtn", q, k) * scale
    m = jnp.concatenate([jnp.ones(s_self.shape, bool),
                         jnp.broadcast_to(mask[:, None, None, :], s_inst.shape)], -1)
    a = masked.masked_softmax(jnp.concatenate([s_self, s_inst], -1), m)
    o = (jnp.einsum("bht,bthd->bthd", a[..., 0], vt)
         + jnp.einsum("bhtn,bnhd->bthd", a[..., 1:], v))
    return self._out(o, train), a[..., 1:]


class MECDS(nn.Module):
  """Multi-task MIL head; ``logits`` [B, num_tasks], one binary logit per task.

  ``num_base`` (default all) tasks form the jointly routed base group
  (parameters ``base_tasks``, stacked on a task axis); tasks
  ``num_base..num_tasks-1`` are extension tasks (``task_{k}``; module
  docstring). Shared parameters: ``proj`` and ``layer_{l}``.
  """
  hidden_dim: int = 128
  num_tasks: int = 1
  num_base: int | None = None
  num_layers: int = 2
  num_heads: int = 8
  top_p: float = 0.5
  instance_attention: str = "full"
  dropout: float = 0.0

  @property
  def base(self) -> int:
    return self.num_tasks if self.num_base is None else self.num_base

  @nn.compact
  def __call__(self, x, mask, train: bool = False, only_base: bool = False):
    d, nb = self.hidden_dim, self.base
    if d % self.num_heads:
      raise ValueError(f"MECDS hidden_dim {d} is not divisible by num_heads {self.num_heads}")
    if self.instance_attention not in ("full", "none"):
      raise ValueError(f"mecds.instance_attention={self.instance_attention!r}; "
                       "valid: full, none")
    group = lambda size, routers, name, zero: TaskGroup(
        size, d, self.num_layers, routers, zero, dropout=self.dropout, name=name)
    # Base routing is skipped in the last layer (nothing reads it); an
    # extension task routes into its private view in every layer, and its
    # experts start at 0 (an adapter: the new task starts from the frozen
    # features and adds private ones only as training asks for them).
    base = group(nb, self.num_layers - 1, "base_tasks", False)
    ext = {} if only_base else {k: group(1, self.num_layers, f"task_{k}", True)
                                for k in range(nb, self.num_tasks)}
    layers = [SharedLayer(d, self.num_heads, self.dropout, name=f"layer_{l}")
              for l in range(self.num_layers)]
    z = nn.gelu(nn.Dense(d, name="proj")(x))                        # [B, N, D]
    bsz = z.shape[0]
    tok = jnp.broadcast_to(base.tokens(), (bsz, nb, d))
    ext_tok = {k: jnp.broadcast_to(g.tokens(), (bsz, 1, d)) for k, g in ext.items()}
    delta = {k: None for k in ext}
    last = self.num_layers - 1
    attn_layers = []
    for l, layer in enumerate(layers):
      zn = layer.ln1(z)
      k_i, v_i = layer.keys_values(zn)
      upd, attn = layer.token_attend(layer.ln1(tok), k_i, v_i, mask, train)
      ext_attn = []
      if ext:
        zn2 = layer.ln2(z)
      for k, g in ext.items():
        # private view: the frozen stream plus this task's gated expert outputs
        add = nn.sigmoid(g.route(l, zn2)) * g.expert_all(l, zn2, train)[:, :, 0]
        delta[k] = add if delta[k] is None else delta[k] + add
        kk, vk = layer.keys_values(layer.ln1(z + delta[k]))
        u_k, a_k = layer.token_attend(layer.ln1(ext_tok[k]), kk, vk, mask, train)
        ext_tok[k] = ext_tok[k] + u_k
        ext_attn.append(a_k)
      attn_layers.append(jnp.concatenate([attn] + ext_attn, axis=2))  # [B, H, T', N]
      tok = tok + upd
      if l < last:
        u = z + (layer.instance_attend(zn, k_i, v_i, mask, train)
                 if self.instance_attention == "full" else 0.0)
        un = layer.ln2(u)
        e = base.expert_all(l, un, train)                           # [B, N, nb, D]
        if nb > 1:
          p = jax.nn.softmax(base.route(l, un), -1)                 # [B, N, nb]
          z_next = u + jnp.einsum("bnt,bntd->bnd", p * masked.top_p_mask(p, self.top_p), e)
        else:  # one base task: the softmax over one task is 1
          z_next = u + e[:, :, 0]
        z = z_next
      tok = tok + base.expert_own(l, layer.ln2(tok), train)
      for k, g in ext.items():
        ext_tok[k] = ext_tok[k] + g.expert_own(l, layer.ln2(ext_tok[k]), train)
    logits = jnp.concatenate([base.readout(tok)] + [g.readout(ext_tok[k])
                                                    for k, g in ext.items()], -1)
    # Attention of each task token on the instances (its own-token share
    # removed, renormalised). Cells are ranked by the first layer's, which
    # sees the cells themselves; deeper layers attend to instances already
    # mixed by self-attention (on the toy task their top cell is rarely the
    # witness). All layers are returned in ``task_attention_layers``.
    stack = jnp.stack(attn_layers, 1)                               # [B, L, H, T', N]
    stack = stack / jnp.maximum(jnp.sum(stack, -1, keepdims=True), 1e-12)
    rows = stack[:, 0]                                              # [B, H, T', N]
    task_attn = jnp.mean(rows, axis=1)                              # [B, T', N]
    return {"logits": logits, "task_attention": task_attn,
            "task_attention_layers": jnp.mean(stack, axis=2),
            "attention": jnp.mean(task_attn, axis=1),
            "attention_rows": rows.reshape(bsz, -1, rows.shape[-1])}


@functools.lru_cache(maxsize=None)
def _group_init(group: TaskGroup):
  return jax.jit(lambda key: group.init(key, method=TaskGroup.tokens)["params"])


def init_extension_params(model: MECDS, key) -> dict:
  """Fresh parameters of one extension task (``task_{k}``'s subtree).

  Initialises the TaskGroup alone: much cheaper to compile than a whole-model
  init. Same structure as the group that ``model`` builds for task k.
  """
  group = TaskGroup(1, model.hidden_dim, model.num_layers, model.num_layers, True,
                    dropout=model.dropout)
  return _group_init(group)(key)


def akd_loss(student_logits, teacher_logits, label, label_known, temperature: float = 2.0,
             gamma_pos: float = 1.0, gamma_neg: float = 4.0, alpha: float = 0.2):
  """Asymmetric knowledge distillation per bag [B] (sum over known tasks).

  The doc's recommended reading (7.2): with p = sigma(z_s / T) (student) and
  q = sigma(z_t / T) (teacher), the soft BCE toward the teacher
  ``l = -(q log p + (1 - q) log(1 - p))`` is weighted by
  ``w+ = (1 - p)^gamma+`` on ground-truth positives and
  ``w- = max(q - alpha, 0)^gamma-`` on negatives, both under stop_gradient,
  times T^2. Choices: p in w+ is the student's; "positive" is the ground
  truth; sigmoid one-vs-rest; alpha gates the weight only; weights detached.
  """
  zs, zt = student_logits / temperature, jax.lax.stop_gradient(teacher_logits) / temperature
  p, q = jax.nn.sigmoid(zs), jax.nn.sigmoid(zt)
  w_pos = jax.lax.stop_gradient((1.0 - p) ** gamma_pos)
  w_neg = jax.lax.stop_gradient(jnp.maximum(q - alpha, 0.0) ** gamma_neg)
  soft_bce = -(q * jax.nn.log_sigmoid(zs) + (1.0 - q) * jax.nn.log_sigmoid(-zs))
  y = jnp.where(label_known, label, 0.0)
  per_task = temperature ** 2 * (y * w_pos + (1.0 - y) * w_neg) * soft_bce
  return jnp.sum(jnp.where(label_known, per_task, 0.0), -1)


def balanced_weights(labels):
  """Class-balanced resampling weight of each bag (teacher phase).

  w_i = max over the tasks bag i is labelled for of 1 / freq_t(y_it), where
  freq_t(v) is the fraction of bags labelled for task t whose label is v.
  Bags with no known label get the mean weight.
  """
  import numpy as np
  y = np.asarray(labels, np.float64)
  y = y[:, None] if y.ndim == 1 else y
  w = np.zeros(len(y))
  for t in range(y.shape[1]):
    known = np.isfinite(y[:, t])
    if not known.any():
      continue
    pos = y[known, t] > 0.5
    freq = {True: pos.mean(), False: 1.0 - pos.mean()}
    wt = np.zeros(len(y))
    wt[known] = [1.0 / max(freq[bool(v)], 1e-12) for v in pos]
    w = np.maximum(w, wt)
  w[w == 0] = w[w > 0].mean() if (w > 0).any() else 1.0
  return w


def build(cfg, num_tasks, num_base=None):
  """The head of ``cfg`` (a resolved ``config.mil``)."""
  m = cfg.mecds
  return MECDS(hidden_dim=cfg.hidden_dim, num_tasks=num_tasks, num_base=num_base,
               num_layers=m.num_layers, num_heads=m.num_heads, top_p=m.top_p,
               instance_attention=m.instance_attention, dropout=cfg.dropout)


def aux(cfg, model, out, batch, label_known, ctx):
  """AKD to the teacher (``ctx.teacher_params``) in the student phase."""
  teacher = ctx.teacher_params
  if teacher is None:  # teacher phase: plain supervised loss
    return None, {}
  m = cfg.mecds
  t_logits = model.apply(teacher, batch["x"], batch["mask"])["logits"]
  akd = akd_loss(out["logits"], t_logits, batch["label"], label_known,
                 m.akd_temperature, m.gamma_pos, m.gamma_neg, m.alpha)
  return ctx.kd_scale * m.kd_weight * akd, {"mecds_akd": akd}


SPEC = spec_lib.HeadSpec(build=build, aux_loss=aux, phases=("teacher", "student"),
                         extensible=True)
