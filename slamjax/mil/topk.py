"""Top-k MIL (Campanella et al., Nature Medicine 2019) over padded bags.

A cell classifier scores every cell; the bag logit of a task is the mean of
its k highest cell logits among the real cells (all of them when a bag has
fewer than k). The selection is not differentiated, so the loss trains only
the selected cells: the top-k rule (k=1 is the paper's max rule). Cells are
ranked by their largest logit over tasks.

Example:
  >>> import jax, jax.numpy as jnp
  >>> head = TopKMIL(hidden_dim=8, k=2)
  >>> x, m = jnp.ones((2, 5, 3)), jnp.arange(5)[None].repeat(2, 0) < 4
  >>> params = head.init(jax.random.key(0), x, m)
  >>> out = head.apply(params, x, m)
  >>> out["logits"].shape, out["attention"].shape, float(out["attention"][0, 4])
  ((2, 1), (2, 5), 0.0)
  >>> logits = jnp.array([[[1.0], [5.0], [3.0], [9.0]]])  # [B, N, T]; cell 3 padding
  >>> top_k_pool(logits, jnp.array([[True, True, True, False]]), 2).tolist()
  [[4.0]]
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from slamjax.mil import masked
from slamjax.mil import spec as spec_lib


def top_k_pool(cell_logits: jax.Array, mask: jax.Array, k: int) -> jax.Array:
  """[B, N, T] cell logits -> [B, T]: mean of the k largest real-cell logits.

  Bags with fewer than k real cells average those they have. Gradients reach
  the selected cells only.
  """
  s = jnp.swapaxes(cell_logits, 1, 2)  # [B, T, N]: top-k along cells
  vals, _, valid = masked.masked_top_k(s, mask[:, None, :], k)
  count = jnp.maximum(jnp.sum(valid, -1), 1)
  return jnp.sum(jnp.where(valid, vals, 0.0), -1) / count


class TopKMIL(nn.Module):
  """Cell classifier Dense -> ReLU -> dropout -> Dense(num_tasks), top-k pooled.

  Returns ``logits`` [B, T], ``attention`` [B, N] (masked softmax of each
  cell's largest logit over tasks: ranks cells by score, 0 on padding),
  ``attention_rows`` [B, 1, N], ``attention_logits`` [B, N] (that largest
  logit, 0 on padding), ``cell_logits`` [B, N, T] and, with several tasks,
  ``task_attention`` [B, T, N] (a masked softmax per task).
  """
  hidden_dim: int = 128
  num_tasks: int = 1
  k: int = 1
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, mask, train: bool = False):
    if self.k < 1:
      raise ValueError(f"mil.topk.k={self.k}; must be >= 1")
    h = nn.relu(nn.Dense(self.hidden_dim, name="reduce")(x))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    cell = nn.Dense(self.num_tasks, name="classifier")(h)  # [B, N, T]
    score = jnp.max(cell, -1)
    attn = masked.masked_softmax(score, mask)
    out = {"logits": top_k_pool(cell, mask, self.k), "attention": attn,
           "attention_rows": attn[:, None],
           "attention_logits": jnp.where(mask, score, 0.0),
           "cell_logits": jnp.where(mask[..., None], cell, 0.0)}
    if self.num_tasks > 1:
      out["task_attention"] = masked.masked_softmax(jnp.swapaxes(cell, 1, 2), mask[:, None])
    return out


def build(cfg, num_tasks, num_base=None):
  """The head of ``cfg`` (a resolved ``config.mil``)."""
  return TopKMIL(hidden_dim=cfg.hidden_dim, num_tasks=num_tasks, k=int(cfg.topk.k),
                 dropout=cfg.dropout)


SPEC = spec_lib.HeadSpec(build=build)
