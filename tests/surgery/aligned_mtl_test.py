"""Aligned-MTL's rank cut-off in float32 (its formula: methods_test)."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamjax import surgery

EPS32 = float(np.finfo(np.float32).eps)


@functools.lru_cache(maxsize=None)
def _update(t):
  tx = surgery.aligned_mtl(num_tasks=t)
  return tx, jax.jit(tx.update)


def _out(j):
  tx, update = _update(len(j))
  params = {"w": jnp.zeros(j.shape[1])}
  out, _ = update({"w": jnp.asarray(j, jnp.float32)}, tx.init(params), params)
  return np.asarray(out["w"], np.float64)


def _reference(j, rtol):
  """float64 Aligned-MTL of the float32 input, with the documented rule:
  drop lambda_k <= rtol * (sum_t |v_tk| ||g_t||)^2."""
  j = np.asarray(j, np.float64)
  lam, v = np.linalg.eigh(j @ j.T)
  n = np.linalg.norm(j, axis=1)
  keep = lam > rtol * (np.abs(v).T @ n) ** 2
  b = np.sqrt(lam[keep].min()) * (v[:, keep] / np.sqrt(lam[keep])) @ v[:, keep].T
  return b.sum(1) @ j, int(keep.sum())


def _check_invariance(j, want, tol):
  scale = np.max(np.abs(want))
  t = len(j)
  for perm in itertools.islice(itertools.permutations(range(t)), 1, None):
    np.testing.assert_allclose(_out(j[list(perm)]), want, rtol=0,
                               atol=tol * scale, err_msg=str(perm))
  for a in (3.7, 1e-3 / 3):
    np.testing.assert_allclose(_out((j * a).astype(np.float32)) / a, want,
                               rtol=0, atol=tol * scale, err_msg=str(a))


# delta: relative perturbation of a task parallel to another (0: parallel up
# to float32 rounding); the pair is about delta rad apart. The cut-off is at
# delta = 0.0126 here, far from every case; LibMTL's max(lambda) * T * eps
# lies near delta = 1.7e-3, among the rounding errors of the 3e-3 case.
@pytest.mark.parametrize("delta,rank", [(0.0, 2), (1e-4, 2), (3e-3, 2),
                                        (0.1, 3), (0.3, 3)])
def test_nearly_parallel_tasks_are_invariant_and_match_float64(delta, rank):
  for seed in range(3):
    rng = np.random.default_rng(seed)
    g1, g3, noise = rng.standard_normal((3, 1000))
    j = np.stack([g1, 2.3 * (g1 + delta * noise), 0.5 * g3]).astype(np.float32)
    want, r = _reference(j, 100 * 3 * EPS32)
    assert r == rank
    got = _out(j)
    np.testing.assert_allclose(got, want, rtol=0,
                               atol=1e-4 * np.max(np.abs(want)))
    _check_invariance(j, got, 1e-4)


@pytest.mark.parametrize("ratio", [1e-2, 1e-4])
def test_small_tasks_are_kept_in_any_order(ratio):
  """Norms 1, 0.8, sqrt(ratio), ratio with moderate cosines: full rank."""
  rng = np.random.default_rng(5)
  j = rng.standard_normal((4, 50))
  j[1] += 0.7 * j[0]
  j /= np.linalg.norm(j, axis=1, keepdims=True)
  j *= np.array([[1.0], [0.8], [np.sqrt(ratio)], [ratio]])
  j = j.astype(np.float32)
  want, r = _reference(j, 0.0)
  assert r == 4
  got = _out(j)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.max(np.abs(want)))
  _check_invariance(j, got, 1e-5)
