"""Masked primitives against numpy references, and the AEM / AKD losses."""

import jax
import jax.numpy as jnp
import numpy as np

from slamjax.mil import aem, masked, mecds

S = np.array([[0.3, -1.2, 2.0, 5.0, 7.0], [1.0, 1.0, -3.0, 9.0, 9.0]], np.float32)
M = np.array([[True, True, True, False, False], [True, True, True, True, False]])


def _np_softmax(s, m):
  e = np.where(m, np.exp(s - s[m].max()), 0.0)
  return e / e.sum()


def test_softmax_family_matches_numpy():
  a = np.asarray(masked.masked_softmax(S, M))
  la = np.asarray(masked.masked_log_softmax(S, M))
  nsf = np.asarray(masked.masked_nsf(S, M, temperature=0.5))
  for i in range(2):
    ref = _np_softmax(S[i], M[i])
    np.testing.assert_allclose(a[i], ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(la[i][M[i]], np.log(ref[M[i]]), rtol=1e-6, atol=1e-6)
    assert (a[i][~M[i]] == 0).all() and (la[i][~M[i]] == 0).all()
    g = np.where(M[i], 1 / (1 + np.exp(-S[i] / 0.5)), 0.0)
    np.testing.assert_allclose(nsf[i], g / (g.sum() + 1e-8), rtol=1e-6)
  ent = np.asarray(masked.masked_neg_entropy(jnp.asarray(a), M))
  np.testing.assert_allclose(ent, [np.sum(p[p > 0] * np.log(p[p > 0])) for p in a], rtol=1e-5)


def test_max_mean():
  np.testing.assert_array_equal(masked.masked_max(S, M), [2.0, 9.0])
  np.testing.assert_allclose(masked.masked_mean(S, M), [1.1 / 3, 8.0 / 4], rtol=1e-6)


def test_top_k_with_fewer_valid_than_k():
  vals, idx, ok = masked.masked_top_k(S, M, 4)
  np.testing.assert_array_equal(ok, [[True, True, True, False], [True, True, True, True]])
  np.testing.assert_array_equal(idx[0, :3], [2, 0, 1])
  assert float(vals[0, 3]) == 0.0 and np.isfinite(np.asarray(vals)).all()
  # gradients reach only the selected valid entries
  g = jax.grad(lambda s: masked.masked_top_k(s, M, 4)[0].sum())(jnp.asarray(S))
  np.testing.assert_array_equal(g, M.astype(np.float32))


def test_rank_orders_valid_entries_and_puts_padding_last():
  r = np.asarray(masked.masked_rank(S, M))
  for i in range(len(S)):
    n = int(M[i].sum())
    assert sorted(r[i][M[i]].tolist()) == list(range(n))  # valid entries rank first
    assert (r[i][~M[i]] >= n).all()
    valid = np.flatnonzero(M[i])
    assert list(valid[np.argsort(r[i][valid])]) == list(valid[np.argsort(-S[i][valid],
                                                                          kind="stable")])


def test_top_p_mask():
  p = jnp.array([[0.6, 0.3, 0.1], [0.35, 0.4, 0.25], [0.5, 0.5, 0.0], [0.2, 0.2, 0.6]])
  np.testing.assert_array_equal(masked.top_p_mask(p, 0.5), [
      [True, False, False], [True, True, False], [True, False, False], [False, False, True]])


def test_aem_full_and_top_k():
  rows = masked.masked_softmax(S, M)[:, None]
  full = aem.aem_loss(rows, M)
  np.testing.assert_allclose(full, masked.masked_neg_entropy(rows[:, 0], M), rtol=1e-6)
  top = np.asarray(aem.aem_loss(rows, M, top_k=2))
  r0 = np.sort(np.asarray(rows[0, 0]))[::-1][:2]
  r0 = r0 / r0.sum()
  np.testing.assert_allclose(top[0], np.sum(r0 * np.log(r0)), rtol=1e-5)
  np.testing.assert_allclose(aem.aem_weight(0.1, "cosine", 50, 100), 0.05, rtol=1e-6)


def test_akd_weights():
  zs = jnp.array([[2.0, -1.0, 0.5]])
  zt = jnp.array([[3.0, -4.0, 1.0]])
  y = jnp.array([[1.0, 0.0, 0.0]])
  known = jnp.array([[True, True, False]])
  got = float(mecds.akd_loss(zs, zt, y, known)[0])
  sig = lambda v: 1 / (1 + np.exp(-v))
  p, q = sig(np.array([2.0, -1.0]) / 2), sig(np.array([3.0, -4.0]) / 2)
  bce = -(q * np.log(p) + (1 - q) * np.log(1 - p))
  w = np.array([(1 - p[0]) ** 1, max(q[1] - 0.2, 0.0) ** 4])  # q[1] < 0.2: weight 0
  np.testing.assert_allclose(got, 4 * np.sum(w * bce), rtol=1e-5)


def test_balanced_weights():
  w = mecds.balanced_weights(np.array([[1, np.nan], [0, 1], [0, 0], [0, np.nan]]))
  np.testing.assert_allclose(w, [4.0, 2.0, 2.0, 4 / 3])
