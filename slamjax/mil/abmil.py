"""Gated-attention ABMIL (Ilse et al., 2018) over padded bags.

Example:
  >>> import jax, jax.numpy as jnp
  >>> head = GatedABMIL(hidden_dim=8, attention_dim=4)
  >>> x, m = jnp.ones((2, 5, 3)), jnp.ones((2, 5), bool)
  >>> params = head.init(jax.random.key(0), x, m)
  >>> out = head.apply(params, x, m)
  >>> out["logits"].shape, out["attention"].shape
  ((2, 1), (2, 5))
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from slamjax.mil import masked
from slamjax.mil import spec as spec_lib


class GatedABMIL(nn.Module):
  """h = ReLU(W x); a = softmax_n(w^T (tanh(V h) * sigmoid(U h))); y = c^T sum a h.

  Returns ``logits`` [B, num_tasks], ``attention`` [B, N] (0 on padding),
  ``attention_logits`` [B, N] and ``attention_rows`` [B, 1, N] (the softmax
  distributions that regularisers such as AEM act on).
  """
  hidden_dim: int = 128
  attention_dim: int = 64
  num_tasks: int = 1
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, mask, train: bool = False):
    h = nn.relu(nn.Dense(self.hidden_dim, name="reduce")(x))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    v = jnp.tanh(nn.Dense(self.attention_dim, name="attn_v")(h))
    u = nn.sigmoid(nn.Dense(self.attention_dim, name="attn_u")(h))
    scores = nn.Dense(1, name="attn_w")(v * u)[..., 0]
    attn = masked.masked_softmax(scores, mask)
    bag = jnp.einsum("bn,bnd->bd", attn, h)
    logits = nn.Dense(self.num_tasks, name="classifier")(bag)
    return {"logits": logits, "attention": attn, "attention_rows": attn[:, None],
            "attention_logits": jnp.where(mask, scores, 0.0)}


def build(cfg, num_tasks, num_base=None):
  """The head of ``cfg`` (a resolved ``config.mil``)."""
  return GatedABMIL(hidden_dim=cfg.hidden_dim, attention_dim=cfg.attention_dim,
                    num_tasks=num_tasks, dropout=cfg.dropout)


SPEC = spec_lib.HeadSpec(build=build)
