"""AEM: attention-entropy maximisation (Zhang et al., MICCAI 2025).

A regulariser for any head that outputs ``attention_rows`` [B, R, N] (softmax
distributions over the valid instances): ``L = CE + lambda * L_AEM`` with
``L_AEM = mean_r sum_n a_rn log a_rn`` (minus the entropy, nats; summed over
instances, averaged over rows: heads, tokens or classes, as the reference
does for its multi-head and DSMIL branches). The top-k variant keeps the k
largest weights of each row, renormalises them and takes their neg-entropy;
rows with fewer than k valid instances use all of them.

``lambda`` is constant or decays with a cosine to 0 over training (the paper's
v3 "cosine weight annealing"; the public code does not show which way it
runs, so decaying to 0 is our reading).

Example:
  >>> import jax.numpy as jnp
  >>> rows = jnp.array([[[0.5, 0.5, 0.0]]]); m = jnp.array([[True, True, False]])
  >>> round(float(aem_loss(rows, m)[0]), 4)  # -log 2
  -0.6931
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax.scipy.special import xlogy

from slamjax.mil import masked


def aem_loss(rows, mask, top_k: int = 0):
  """Neg-entropy per bag [B] of attention rows [B, R, N] over valid instances."""
  m = jnp.broadcast_to(mask[:, None, :], rows.shape)
  if top_k <= 0:
    return jnp.mean(masked.masked_neg_entropy(rows, m), -1)
  v, _, ok = masked.masked_top_k(rows, m, top_k)
  v = jnp.where(ok, v, 0.0)
  v = v / jnp.maximum(jnp.sum(v, -1, keepdims=True), 1e-30)
  return jnp.mean(jnp.sum(xlogy(v, v), -1), -1)


def aem_weight(weight: float, schedule: str, step, total_steps: int):
  """lambda_t: ``"constant"`` or ``"cosine"`` (lambda_0 (1 + cos(pi t / T)) / 2)."""
  if schedule == "constant":
    return jnp.asarray(weight, jnp.float32)
  if schedule == "cosine":
    frac = jnp.clip(step / max(total_steps, 1), 0.0, 1.0)
    return weight * 0.5 * (1.0 + jnp.cos(math.pi * frac))
  raise ValueError(f"mil.aem_schedule={schedule!r}; valid: constant, cosine")
