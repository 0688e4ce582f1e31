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


def _np_similarity_repel(z1, z2, zo, t, tb):
  # SupCon written out per anchor: negative-bag views are each other's
  # positives; the denominator runs over every other view, zo included.
  z = _unit(np.concatenate([z1, z2]).astype(np.float64))
  o = _unit(zo.astype(np.float64))
  m = len(z)
  out = 0.0
  for i in range(m):
    others = [z[i] @ z[k] / t for k in range(m) if k != i] + [z[i] @ x / t for x in o]
    log_denom = np.log(np.sum(np.exp(others)))
    out += np.mean([z[i] @ z[p] / t - log_denom for p in range(m) if p != i])
  return -(t / tb) * out / m


@pytest.mark.parametrize("n,d,m,t", [(4, 8, 6, 0.07), (3, 2, 1, 0.5)])
def test_similarity_repel_matches_numpy(n, d, m, t):
  rng = np.random.default_rng(n + m)
  z1, z2, zo = rng.normal(size=(n, d)), rng.normal(size=(n, d)), rng.normal(size=(m, d))
  np.testing.assert_allclose(losses.similarity_repel_loss(z1, z2, zo, t, 0.07),
                             _np_similarity_repel(z1, z2, zo, t, 0.07), rtol=1e-5)


def test_similarity_repel_does_not_reward_collapse():
  # A constant representation costs log(2B - 1 + M) (times t / t_b), more than
  # negative-bag cells clustered away from the positive-bag ones.
  n, m = 4, 6
  const = np.ones((n, 3))
  np.testing.assert_allclose(
      losses.similarity_repel_loss(const, const, np.ones((m, 3))), np.log(2 * n - 1 + m),
      rtol=1e-5)
  neg = np.tile([[1.0, 0.0, 0.0]], (n, 1))
  pos = np.tile([[-1.0, 0.0, 0.0]], (m, 1))
  assert losses.similarity_repel_loss(neg, neg, pos) < np.log(2 * n - 1 + m) - 0.5
  # Without repulsion the collapsed state is the minimum.
  assert abs(float(losses.similarity_loss(const, const))) < 1e-5


def test_variance_hinge_matches_numpy_and_bounds():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(64, 8))
  zn = _unit(z) * np.sqrt(8)
  want = np.mean(np.maximum(0.0, 1.0 - np.sqrt(zn.var(0) + 1e-4)))
  np.testing.assert_allclose(losses.variance_hinge(z, 1.0), want, rtol=1e-5)
  # Collapsed: every per-dimension std is ~0, so the hinge is ~target.
  np.testing.assert_allclose(losses.variance_hinge(np.ones((16, 8)), 0.7), 0.7 - 0.01,
                             rtol=1e-5)
  # Scale-free: the losses only see directions, so neither may the floor.
  np.testing.assert_allclose(losses.variance_hinge(100 * z), losses.variance_hinge(z),
                             rtol=1e-5)
  assert float(losses.variance_hinge(z, 0.0)) == 0.0


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_bag_label_bce_matches_numpy(label):
  logits = np.array([[-3.0], [0.0], [0.5], [4.0]], np.float32)
  p = 1.0 / (1.0 + np.exp(-logits[:, 0].astype(np.float64)))
  want = -np.mean(label * np.log(p) + (1 - label) * np.log(1 - p))
  np.testing.assert_allclose(losses.bag_label_bce(logits, label), want, rtol=1e-5)
