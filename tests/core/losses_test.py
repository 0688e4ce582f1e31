"""Losses against independent numpy computations on fixed inputs."""

import numpy as np
import pytest

from slamjax import losses


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_nt_xent(z1, z2, t):
  z = _unit(np.concatenate([z1, z2]).astype(np.float64))
  n = len(z1)
  total = 0.0
  for i in range(2 * n):
    j = (i + n) % (2 * n)
    sims = np.array([z[i] @ z[k] / t for k in range(2 * n) if k != i])
    total += -(z[i] @ z[j] / t - np.log(np.sum(np.exp(sims))))
  return total / (2 * n)


def _np_similarity(z1, z2, t, tb):
  # The reference SupCon form without denominator, written out per pair.
  z = _unit(np.concatenate([z1, z2]).astype(np.float64))
  m = len(z)
  out = 0.0
  for i in range(m):
    row_max = max(z[i] @ z[k] / t for k in range(m))
    out += np.mean([z[i] @ z[p] / t - row_max for p in range(m) if p != i])
  return -(t / tb) * out / m


@pytest.mark.parametrize("n,d,t", [(4, 8, 0.07), (7, 3, 0.5)])
def test_nt_xent_matches_numpy(n, d, t):
  rng = np.random.default_rng(n)
  z1, z2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
  np.testing.assert_allclose(losses.nt_xent(z1, z2, t), _np_nt_xent(z1, z2, t),
                             rtol=1e-5)


@pytest.mark.parametrize("n,d", [(4, 8), (5, 2)])
def test_similarity_matches_numpy(n, d):
  rng = np.random.default_rng(n)
  z1, z2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
  np.testing.assert_allclose(losses.similarity_loss(z1, z2, 0.07, 0.07),
                             _np_similarity(z1, z2, 0.07, 0.07), rtol=1e-5)
  # Its closed form: mean over pairs of (1 - cos) / base temperature.
  z = _unit(np.concatenate([z1, z2]))
  c = z @ z.T
  m = len(z)
  closed = (1 - c[~np.eye(m, dtype=bool)]).mean() / 0.07
  np.testing.assert_allclose(losses.similarity_loss(z1, z2), closed, rtol=1e-5)


def test_similarity_zero_when_collapsed_and_nt_xent_prefers_aligned_views():
  z = np.tile(np.array([[1.0, 2.0, 3.0]]), (6, 1))
  assert abs(float(losses.similarity_loss(z[:3], z[3:]))) < 1e-5
  rng = np.random.default_rng(0)
  a = rng.normal(size=(8, 16))
  assert losses.nt_xent(a, a) < losses.nt_xent(a, rng.normal(size=(8, 16)))


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_bag_label_bce_matches_numpy(label):
  logits = np.array([[-3.0], [0.0], [0.5], [4.0]], np.float32)
  p = 1.0 / (1.0 + np.exp(-logits[:, 0].astype(np.float64)))
  want = -np.mean(label * np.log(p) + (1 - label) * np.log(1 - p))
  np.testing.assert_allclose(losses.bag_label_bce(logits, label), want, rtol=1e-5)
