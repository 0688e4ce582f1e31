"""Jitted, batched embedding extraction with a frozen encoder.

``embed.output`` picks the features: ``'backbone'`` (the pooled ResNet
features) or ``'projection'`` (the projection head's output, as the
reference). With ``model.projection='per_task'``, ``'projection'`` is the
SimCLR head's output: the similarity head is trained to pull cells together
and would carry less information.

Example:
  >>> import numpy as np
  >>> from configs import default
  >>> from slamjax import pretrain, sharding
  >>> cfg = default.get_config("quick")
  >>> mesh = sharding.make_mesh(-1)
  >>> model, tx, _ = pretrain.build(cfg, steps_per_epoch=1)
  >>> state = pretrain.init_state(cfg, model, tx, mesh)
  >>> emb = embed_images(cfg, model, state, np.zeros((5, 40, 40, 3), np.uint8), mesh)
  >>> emb.shape
  (5, 64)
"""

from __future__ import annotations

import jax
import numpy as np

from slamjax import distributed
from slamjax import sharding
from slamjax.data import augment
from slamjax.models import layers

# config.embed.output: the projection head's output, or the pooled backbone's.
OUTPUTS = ("projection", "backbone")


def make_embed_fn(cfg, model, mesh):
  """``fn(params, batch_stats, uint8 images) -> float32 embeddings`` (jitted)."""
  a = cfg.augment
  output = cfg.embed.output
  if output not in OUTPUTS:
    raise ValueError(f"config.embed.output={output!r}; valid: {', '.join(OUTPUTS)}")

  def fn(params, batch_stats, images):
    x = augment.eval_view(images, a.crop_size, a.mean, a.std)
    # task='simclr': the SimCLR head's projection when heads are per task.
    feats, z = model.apply({"params": params, "batch_stats": batch_stats}, x,
                           train=False, task="simclr")
    return z if output == "projection" else feats

  # Replicated output: XLA all-gathers the embeddings, so every process of a
  # multi-process run gets the whole batch, in order.
  return jax.jit(fn, in_shardings=(sharding.replicated(mesh), sharding.replicated(mesh),
                                   sharding.data_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh),
                 compiler_options=layers.compiler_options(model.impl))


def embed_rows(cfg, model, state, source, rows: np.ndarray, mesh, fn=None) -> np.ndarray:
  """Embeds ``source[rows]`` (uint8 images) in batches of ``cfg.embed.batch_size``.

  Each process reads only its own devices' rows of every batch and gets all
  embeddings back, in the order of ``rows``. The last batch is padded (with
  the first row), not dropped.
  """
  fn = fn or make_embed_fn(cfg, model, mesh)
  rows = np.asarray(rows)
  bs = cfg.embed.batch_size
  bs = max(mesh.size, bs - bs % mesh.size)
  out = []
  for start in range(0, len(rows), bs):
    chunk = rows[start:start + bs]
    n = len(chunk)
    chunk = np.concatenate([chunk, np.full(bs - n, chunk[0])])
    emb = fn(state.params, state.batch_stats, sharding.take_batch(mesh, source, chunk))
    out.append(distributed.fetch_replicated(emb)[:n])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def embed_images(cfg, model, state, images: np.ndarray, mesh,
                 fn=None) -> np.ndarray:
  """Embeds every image (uint8 [N,H,W,3]); the last batch is padded, not dropped."""
  return embed_rows(cfg, model, state, images, np.arange(len(images)), mesh, fn)


def embed_groups(cfg, model, state, images, groups, mesh) -> list[np.ndarray]:
  """Embeds ``images[g]`` for every index array ``g`` of ``groups`` (a cell in
  several groups is embedded once); returns one [len(g), D] array per group."""
  if not len(groups):
    return []
  uniq, inverse = np.unique(np.concatenate(groups), return_inverse=True)
  emb = embed_rows(cfg, model, state, images, uniq, mesh)[inverse]
  return np.split(emb, np.cumsum([len(g) for g in groups])[:-1])


def embed_bags(cfg, model, state, pool, bagset, mesh) -> list[np.ndarray]:
  """Embeds every cell of every bag; returns one [n_cells, D] array per bag."""
  return embed_groups(cfg, model, state, pool.images, bagset.cells, mesh)
