"""Pretraining losses: NT-Xent (SimCLR) and the slide-negative similarity loss.

Both take projections of two views, ``z1`` and ``z2`` of shape [B, D]; they
are L2-normalised inside. Definitions follow the reference code (see
``docs`` in the repository README): SimCLR's NT-Xent over the 2B views, and
the SupCon-form similarity loss without a softmax denominator, where every
pair of slide-negative embeddings is a positive pair.

Two variants against collapse (not in the reference): the similarity loss
with a softmax denominator that also holds other cells
(:func:`similarity_repel_loss`), and a VICReg-style variance floor
(:func:`variance_hinge`).

Example:
  >>> import jax.numpy as jnp
  >>> z = jnp.eye(4)
  >>> float(similarity_loss(z, z)) > 0, float(nt_xent(z, z)) < float(nt_xent(z, z[::-1]))
  (True, True)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _normalize(z: jax.Array) -> jax.Array:
  z = z.astype(jnp.float32)
  return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float = 0.07) -> jax.Array:
  """SimCLR NT-Xent: mean over the 2B anchors of -log p(partner view).

  For anchor i with partner j(i): l_i = -log exp(s_ij / t) / sum_{k != i}
  exp(s_ik / t), with s the cosine similarity.
  """
  z = _normalize(jnp.concatenate([z1, z2], axis=0))
  n = z1.shape[0]
  logits = z @ z.T / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  partner = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(logp[jnp.arange(2 * n), partner])


def pseudo_supcon(z1: jax.Array, z2: jax.Array, positive: jax.Array,
                  temperature: float = 0.07) -> jax.Array:
  """Supervised contrastive loss whose only pulling class is the pseudo-positives.

  Over the 2B views, anchor i's positives are its partner view and, when
  ``positive[i]``, every other view of a pseudo-positive cell; l_i is minus
  the mean log-softmax (denominator: all views but i) over those positives.
  Cells not pseudo-positive (negative-bag cells, unlabeled cells) keep only
  their partner, as in NT-Xent: pulling all negatives together is what
  collapses the published recipe. With no positive it equals :func:`nt_xent`.

  >>> import jax.numpy as jnp
  >>> z = jnp.eye(4)
  >>> none = jnp.zeros(4, bool)
  >>> bool(jnp.allclose(pseudo_supcon(z, z, none), nt_xent(z, z)))
  True
  """
  z = _normalize(jnp.concatenate([z1, z2], axis=0))
  n = z1.shape[0]
  eye = jnp.eye(2 * n, dtype=bool)
  logits = jnp.where(eye, -jnp.inf, z @ z.T / temperature)
  logp = jax.nn.log_softmax(logits, axis=-1)
  pos = jnp.concatenate([positive, positive]).astype(bool)
  partner = jnp.roll(eye, n, axis=1)  # row i: view (i + n) mod 2n
  pairs = (partner | (pos[:, None] & pos[None, :])) & ~eye
  return -jnp.mean(jnp.sum(jnp.where(pairs, logp, 0.0), -1) / jnp.sum(pairs, -1))


def similarity_loss(z1: jax.Array, z2: jax.Array, temperature: float = 0.07,
                    base_temperature: float = 0.07) -> jax.Array:
  """WeakSupCon similarity loss on slide-negative cells.

  L = -(t / t_b) * mean_i mean_{p != i} (s_ip / t - max_k s_ik / t), over all
  2B views, which for unit vectors equals mean_{i != p} (1 - s_ip) / t_b: a
  pure attraction that pulls every negative-bag embedding together.
  """
  z = _normalize(jnp.concatenate([z1, z2], axis=0))
  m = z.shape[0]
  logits = z @ z.T / temperature
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
  off_diag = 1.0 - jnp.eye(m, dtype=logits.dtype)
  mean_pos = jnp.sum(logits * off_diag, axis=1) / jnp.maximum(m - 1, 1)
  return -(temperature / base_temperature) * jnp.mean(mean_pos)


def similarity_repel_loss(z1: jax.Array, z2: jax.Array, z_other: jax.Array,
                          temperature: float = 0.07,
                          base_temperature: float = 0.07) -> jax.Array:
  """Similarity loss with repulsion: SupCon with ``z_other`` as negatives.

  The 2B views of slide-negative cells (``z1``, ``z2``) are the anchors and
  each other's positives; the softmax denominator of anchor i runs over
  every other view, slide-negative and ``z_other`` (e.g. the views of the
  batch's positive-bag cells) alike:

    L = -(t / t_b) mean_i mean_{p != i} [s_ip / t - log sum_{k != i} exp(s_ik / t)]

  with k over the 2B negative-bag views and the rows of ``z_other``. So
  negative-bag cells attract each other and repel ``z_other``; a constant
  representation is no longer a minimiser (it costs log(2B - 1 + M), M the
  rows of ``z_other``).
  """
  z = _normalize(jnp.concatenate([z1, z2], axis=0))
  o = _normalize(z_other)
  m = z.shape[0]
  self_mask = jnp.eye(m, dtype=bool)
  logits = jnp.where(self_mask, -jnp.inf, z @ z.T / temperature)
  log_denom = jax.nn.logsumexp(
      jnp.concatenate([logits, z @ o.T / temperature], axis=1), axis=1, keepdims=True)
  log_prob = jnp.where(self_mask, 0.0, logits - log_denom)
  mean_pos = jnp.sum(log_prob, axis=1) / jnp.maximum(m - 1, 1)
  return -(temperature / base_temperature) * jnp.mean(mean_pos)


def variance_hinge(z: jax.Array, target: float = 1.0, eps: float = 1e-4) -> jax.Array:
  """VICReg-style variance floor on the L2-normalised projections.

  ``mean_d relu(target - sqrt(var_d + eps))`` of ``z / |z| * sqrt(D)`` over
  the batch (rows of ``z``). The scaling makes the per-dimension std 1 for
  directions spread uniformly over the sphere and 0 for a collapsed
  (constant) projection: the same scale as the logged ``embed_std``. On
  normalised vectors (the losses only see directions) the floor cannot be
  met by inflating the norm.

  Example:
    >>> round(float(variance_hinge(jnp.ones((4, 3)))), 2)  # collapsed: 1 - 0.01
    0.99
  """
  zn = _normalize(z) * jnp.sqrt(z.shape[-1])
  std = jnp.sqrt(jnp.var(zn, axis=0) + eps)
  return jnp.mean(jax.nn.relu(target - std))


def bag_label_bce(logits: jax.Array, label: float) -> jax.Array:
  """Mean sigmoid BCE of per-cell logits ``[B, 1]`` against one bag label.

  The weakly supervised (single-instance) baseline: every cell inherits the
  label of its bag.

  Example:
    >>> round(float(bag_label_bce(jnp.zeros((3, 1)), 1.0)), 4)  # log 2
    0.6931
  """
  return jnp.mean(optax.sigmoid_binary_cross_entropy(
      logits[:, 0].astype(jnp.float32), jnp.full(logits.shape[:1], label)))
