"""Training and inference of a MIL head on padded batches of embedded bags.

Example:
  >>> import numpy as np, ml_collections, tempfile
  >>> rng = np.random.default_rng(0)
  >>> bags = [rng.normal(size=(6, 4)).astype("float32") + y for y in (0, 1) * 4]
  >>> labels = np.array([0, 1] * 4)
  >>> cfg = ml_collections.ConfigDict(dict(head="abmil", hidden_dim=8,
  ...     attention_dim=4, dropout=0.0, epochs=30, batch_size=4, lr=1e-2,
  ...     weight_decay=0.0, checkpoint_every_epochs=100))
  >>> state = fit(cfg, bags, labels, tempfile.mkdtemp(), seed=0, verbose=False)
  >>> out = predict(cfg, state, bags)
  >>> float(((out["prob"][:, 0] > 0.5) == labels).mean())
  1.0
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from slamjax import checkpoint as ckpt_lib
from slamjax import progress as progress_lib
from slamjax.mil import heads
from slamjax.mil import padding


@flax.struct.dataclass
class MilState:
  epoch: jax.Array
  params: Any
  opt_state: Any


def _num_tasks(labels) -> int:
  labels = np.asarray(labels)
  return 1 if labels.ndim == 1 else labels.shape[1]


def _as_2d(labels):
  labels = np.asarray(labels, np.float32)
  return labels[:, None] if labels.ndim == 1 else labels


def build_tx(cfg):
  # L2 added before Adam, as torch Adam(weight_decay=...) in the references.
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(cfg.lr))


def make_steps(cfg, model, tx):
  """(train_step, apply_fn), both jitted."""

  def loss_fn(params, batch, rng):
    out = model.apply(params, batch["x"], batch["mask"], train=True,
                      rngs={"dropout": rng})
    per_bag = optax.sigmoid_binary_cross_entropy(out["logits"], batch["label"]).mean(-1)
    return jnp.sum(per_bag * batch["weight"]) / jnp.maximum(batch["weight"].sum(), 1.0)

  @jax.jit
  def train_step(state, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), loss

  @jax.jit
  def apply_fn(params, x, mask):
    return model.apply(params, x, mask, train=False)

  return train_step, apply_fn


def fit(cfg, bags, labels, workdir: str, seed: int, verbose: bool = True) -> MilState:
  """Trains (or resumes) a head; checkpoints every ``cfg.checkpoint_every_epochs``."""
  labels2 = _as_2d(labels)
  model = heads.get_head(cfg, _num_tasks(labels))
  tx = build_tx(cfg)
  first = padding.pad_batch(bags[:1], labels2[:1], cfg.batch_size)
  params = model.init(jax.random.PRNGKey(seed), first["x"], first["mask"])
  state = MilState(epoch=jnp.zeros((), jnp.int32), params=params,
                   opt_state=tx.init(params))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "mil_ckpt"))
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
  train_step, _ = make_steps(cfg, model, tx)
  writer = progress_lib.create_writer(os.path.join(workdir, "tb", "mil")) if verbose else None
  prog = progress_lib.Progress("mil", cfg.epochs, max(1, cfg.epochs // 10),
                               int(state.epoch), unit="epochs")
  for epoch in range(int(state.epoch), cfg.epochs):
    order = np.random.default_rng([seed, epoch]).permutation(len(bags))
    losses = []
    for i, (_, batch) in enumerate(padding.iterate_batches(bags, labels2, cfg.batch_size, order)):
      rng = jax.random.fold_in(jax.random.PRNGKey(seed + 7), epoch * 100_003 + i)
      state, loss = train_step(state, batch, rng)
      losses.append(loss)
    state = state.replace(epoch=state.epoch + 1)
    mean_loss = float(np.mean(jax.device_get(losses)))
    progress_lib.check_finite(epoch + 1, {"mil_loss": mean_loss})
    if verbose:
      writer.write_scalars(epoch + 1, {"mil_loss": mean_loss})
      prog.update(epoch + 1, {"loss": mean_loss})
    if (epoch + 1) % cfg.checkpoint_every_epochs == 0 or epoch + 1 == cfg.epochs:
      ckpt.save(epoch + 1, state, force=True)
  ckpt.wait()
  ckpt.close()
  if writer is not None:
    writer.flush()
  return state


def predict(cfg, state: MilState, bags, num_tasks: int | None = None) -> dict:
  """Bag probabilities [n_bags, T] and per-bag attention (unpadded arrays)."""
  if num_tasks is None:
    leaves = jax.tree.leaves(state.params["params"]["classifier"])
    num_tasks = [l for l in leaves if l.ndim == 1][0].shape[0]
  model = heads.get_head(cfg, num_tasks)
  _, apply_fn = make_steps(cfg, model, build_tx(cfg))
  probs = np.zeros((len(bags), num_tasks), np.float32)
  attention = [None] * len(bags)
  dummy = np.zeros((len(bags), num_tasks), np.float32)
  for idx, batch in padding.iterate_batches(bags, dummy, cfg.batch_size):
    out = jax.device_get(apply_fn(state.params, batch["x"], batch["mask"]))
    for j, b in enumerate(idx):
      probs[b] = 1 / (1 + np.exp(-out["logits"][j]))
      attention[b] = np.asarray(out["attention"][j][:len(bags[b])])
  return {"prob": probs, "attention": attention}
