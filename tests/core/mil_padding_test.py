"""Padded-bag masks and padding invariance of the ABMIL head."""

import jax
import numpy as np

from slamjax.mil import abmil, padding


def test_masks_and_filler_bags():
  bags = [np.ones((3, 4)), 2 * np.ones((17, 4))]
  b = padding.pad_batch(bags, np.array([1, 0]), batch_size=3, min_len=8,
                        instance_labels=[np.array([1, 0, 0]), np.zeros(17)])
  assert b["x"].shape == (3, 32, 4)
  np.testing.assert_array_equal(b["mask"].sum(1), [3, 17, 1])
  np.testing.assert_array_equal(b["weight"], [1, 1, 0])
  assert b["x"][0, 3:].sum() == 0 and b["instance_label"][0].tolist()[:4] == [1, 0, 0, 0]


def test_iterate_batches_covers_every_bag_once():
  bags = [np.ones((n, 2)) for n in (3, 5, 9, 2, 7)]
  seen = [i for idx, _ in padding.iterate_batches(bags, np.zeros(5), 2) for i in idx]
  assert sorted(seen) == list(range(5))


def test_abmil_padding_invariance():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 6, 5)).astype(np.float32)
  head = abmil.GatedABMIL(hidden_dim=8, attention_dim=4)
  params = head.init(jax.random.key(0), x, np.ones((1, 6), bool))

  def run(length):
    xp = np.zeros((1, length, 5), np.float32)
    xp[:, :6] = x
    xp[:, 6:] = 100.0  # garbage in padding must not matter
    mask = np.arange(length)[None] < 6
    f = lambda p: head.apply(p, xp, mask)["logits"].sum()
    out = head.apply(params, xp, mask)
    return out["logits"], out["attention"][:, :6], jax.grad(f)(params)

  l0, a0, g0 = run(6)
  for length in (8, 64):
    l1, a1, g1 = run(length)
    np.testing.assert_allclose(l0, l1, atol=1e-6)
    np.testing.assert_allclose(a0, a1, atol=1e-6)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6), g0, g1)
