"""Shared fixtures of the MIL tests: a toy MIL task."""

import ml_collections
import numpy as np
import pytest

D = 8


def make_toy(n, num_tasks=1, seed=0, shift=5.0, sizes=(8, 16)):
  """Bags of N(0, 1) cells; a witness of task t is N(0, 0.25) + shift e_t.

  One task: every other bag is positive (one witness). T tasks: bag i has
  witnesses of the tasks in a random non-empty-or-empty subset.
  Returns (bags, labels [n] or [n, T], witness flags per bag [T, N]).
  """
  rng = np.random.default_rng(seed)
  bags, labels, wits = [], [], []
  for i in range(n):
    size = int(rng.integers(*sizes))
    x = rng.normal(size=(size, D)).astype(np.float32)
    y = np.array([i % 2 == 1]) if num_tasks == 1 else rng.random(num_tasks) < 0.5
    w = np.zeros((num_tasks, size), bool)
    for t, j in zip(np.flatnonzero(y), rng.permutation(size)):
      x[j] = 0.5 * rng.normal(size=D)
      x[j, t] += shift
      w[t, j] = True
    bags.append(x)
    labels.append(y.astype(np.float32))
    wits.append(w)
  labels = np.asarray(labels)
  return bags, (labels[:, 0] if num_tasks == 1 else labels), wits


def small_cfg(head, **kw):
  """Tiny dims so that every head compiles in seconds."""
  c = dict(head=head, hidden_dim=16, attention_dim=8, dropout=0.0, epochs=20,
           batch_size=8, lr=1e-2, weight_decay=0.0, checkpoint_every_epochs=100,
           stability_bags=4,
           asmil=dict(n_token=4, n_drop=1, num_heads=2),
           mecds=dict(num_layers=1, num_heads=2),
           pamil=dict(num_protos=4))
  c.update(kw)
  return ml_collections.ConfigDict(c)


@pytest.fixture
def toy():
  return make_toy


@pytest.fixture
def cfg_for():
  return small_cfg
