"""Pseudo-label contrastive fine-tuning after pretraining (ItS2CLR-style).

The slide labels say more than SLAM-AGS uses: every cell of a negative bag
is a known negative, and a positive bag is mostly negatives plus a few
witnesses. This stage, after SimCLR or SLAM-AGS pretraining, runs
``pseudo.rounds`` rounds of:

1. **Score** every positive-bag cell with the current encoder by its
   negative-reference score (:func:`slamjax.mil.negref.cell_scores`, kind
   ``mil.negref.score``: by default its mean cosine similarity to its
   ``mil.negref.k`` nearest positive-bag cells minus that to its nearest
   negative-bag cells), on the features the MIL heads read
   (``embed.output``).
2. **Label** the ``pseudo.per_bag[r]`` highest-scored cells of each positive bag
   pseudo-positive (default one: a positive bag is only known to hold at
   least one witness, whatever the witness rate). Labels are re-chosen
   every round by the improving encoder. A cell is never its own reference:
   exact copies are left out of its neighbours, so a cell that simulated
   bags reuse in a negative bag is scored as a new slide's cell would be
   (real slides share no cells; treating such a cell as a known negative
   would leak the simulation's witness labels).
3. **Fine-tune** the encoder for ``pseudo.steps_per_round`` steps with
   :func:`slamjax.losses.pseudo_supcon` on two augmented views: batches of
   ``pseudo.positive_share`` pseudo-positives and other training cells;
   pseudo-positives pull together, every other cell keeps only its own
   other view (so the negatives are not collapsed onto one point).

Each round's pseudo-labels are written to ``workdir/pseudo_labels.npz``
before its first step, and the state to ``workdir/pseudo_ckpt`` every
``pseudo.checkpoint_every_steps`` and at the end of every round, so a killed
run resumes to the same result. With simulated bags the precision and
recall of the pseudo-positives (against the true witnesses) are recorded
per round in ``workdir/pseudo_rounds.json``.

Example (scoring and labelling, without the encoder)::

  positives = choose_positives(bags["train"], scores, per_bag=1)
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slamjax import checkpoint as ckpt_lib
from slamjax import distributed
from slamjax import embed
from slamjax import losses
from slamjax import progress as progress_lib
from slamjax import sharding
from slamjax import workdir as workdir_lib
from slamjax.data import augment
from slamjax.mil import negref
from slamjax.models import layers

CKPT = workdir_lib.PSEUDO_CKPT
LABELS = workdir_lib.PSEUDO_LABELS
ROUNDS = workdir_lib.PSEUDO_ROUNDS
METRICS = workdir_lib.PSEUDO_METRICS
_SALT = 27  # separates this stage's random streams from pretraining's


def build_tx(cfg) -> optax.GradientTransformation:
  """Weight decay -> SGD with momentum at ``pseudo.lr`` (one task: no surgery)."""
  return optax.chain(optax.add_decayed_weights(cfg.pretrain.weight_decay),
                     optax.sgd(cfg.pseudo.lr, momentum=cfg.pretrain.momentum))


def start_state(state, tx, mesh):
  """The pretrained state with this stage's optimizer state and step 0."""
  init = jax.jit(lambda s: s.replace(step=jnp.zeros((), jnp.int32),
                                     opt_state=tx.init(s.params)),
                 out_shardings=sharding.replicated(mesh))
  return init(state)


def make_train_step(cfg, model, tx, mesh):
  """Jitted ``step(state, batch) -> (state, metrics)``.

  ``batch``: ``{"x": uint8 [B,H,W,3], "positive": bool [B]}`` sharded over
  the mesh's data axis; the loss is over the whole global batch.
  """
  aug = functools.partial(augment.augment_batch, **augment.policy_kwargs(cfg.augment))
  temperature = cfg.pretrain.temperature

  def loss_fn(params, batch_stats, views, positive):
    (_, z), upd = model.apply({"params": params, "batch_stats": batch_stats}, views,
                              train=True, task="simclr", mutable=["batch_stats"])
    n = positive.shape[0]
    zn = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    spread = jnp.mean(jnp.std(zn, axis=0)) * jnp.sqrt(zn.shape[-1])
    loss = losses.pseudo_supcon(z[:n], z[n:], positive, temperature)
    return loss, (upd["batch_stats"], spread)

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, _SALT), state.step)
    k1, k2 = jax.random.split(rng)
    views = jnp.concatenate([aug(k1, batch["x"]), aug(k2, batch["x"])])
    (loss, (batch_stats, spread)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, views, batch["positive"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state)
    return new, {"loss_pseudo": loss, "embed_std": spread,
                 "grad_norm": optax.tree.norm(grads)}

  repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, data), out_shardings=(repl, repl),
                 donate_argnums=(0,), compiler_options=layers.compiler_options(model.impl))


def cell_sets(bagset) -> tuple[np.ndarray, np.ndarray]:
  """(cells of negative bags, cells of positive bags): unique pool indices."""
  neg = [c for c, y in zip(bagset.cells, bagset.bag_labels) if y == 0]
  pos = [c for c, y in zip(bagset.cells, bagset.bag_labels) if y == 1]
  neg = np.unique(np.concatenate(neg)) if neg else np.zeros(0, np.int64)
  pos = np.unique(np.concatenate(pos)) if pos else np.zeros(0, np.int64)
  return neg, pos


def score_cells(cfg, model, state, pool, bagset, mesh) -> dict[int, float]:
  """Negative-reference score (``mil.negref.score``) of every positive-bag
  cell; a cell is never its own neighbour (exact copies are skipped)."""
  neg, pos = cell_sets(bagset)
  if not len(neg) or not len(pos):
    raise ValueError("the pseudo-label stage needs training bags of both labels; got "
                     f"{len(neg)} negative-bag and {len(pos)} positive-bag cells")
  emb = embed.embed_rows(cfg, model, state, pool.images, np.concatenate([neg, pos]), mesh)
  e_neg, e_pos = emb[:len(neg)], emb[len(neg):]
  none = lambda n: np.full(n, -1, np.int32)
  score = cfg.mil.negref.score
  refs = negref.references(e_neg, none(len(neg)), e_pos, none(len(pos)), score,
                           int(cfg.mil.negref.bank_size), cfg.seed)
  s = negref.cell_scores(e_pos, score, int(cfg.mil.negref.k), *refs)
  return dict(zip(pos.tolist(), np.asarray(s, np.float64).tolist()))


def choose_positives(bagset, scores: dict[int, float], per_bag: int) -> np.ndarray:
  """Pool indices of the pseudo-positives: in each positive bag, the
  ``per_bag`` highest-scored of its scored cells.

  >>> import types
  >>> b = types.SimpleNamespace(cells=[np.array([0, 1, 2]), np.array([3, 4, 5])],
  ...                           bag_labels=np.array([0, 1]))
  >>> choose_positives(b, {3: 0.1, 4: 0.9, 5: 0.3}, per_bag=1).tolist()
  [4]
  """
  chosen = []
  for cells, y in zip(bagset.cells, bagset.bag_labels):
    if y != 1:
      continue
    cand = [c for c in np.asarray(cells).tolist() if c in scores]
    if not cand:
      continue
    order = np.argsort([-scores[c] for c in cand], kind="stable")
    chosen.extend(cand[i] for i in order[:int(per_bag)])
  return np.unique(np.asarray(chosen, np.int64))


def label_quality(bagset, positives: np.ndarray) -> dict | None:
  """Precision and recall of the pseudo-positives against the true witnesses
  (simulated bags only; None where witnesses are unknown)."""
  witness = getattr(bagset, "witness", None)
  # Real slides carry no witness flags (all False): nothing to compare with.
  if witness is None or not any(np.asarray(w).any() for w in witness):
    return None
  truth = np.unique(np.concatenate([np.asarray(c)[np.asarray(w, bool)]
                                    for c, w in zip(bagset.cells, witness)] or [[]]))
  hit = np.intersect1d(positives, truth).size
  return {"precision": hit / max(len(positives), 1), "recall": hit / max(len(truth), 1),
          "num_witness_cells": int(len(truth))}


def batch_indices(seed: int, step: int, positives, others, batch_size: int,
                  share: float) -> tuple[np.ndarray, np.ndarray]:
  """(pool indices, is-pseudo-positive) of one batch, a function of the step."""
  rng = np.random.default_rng([seed, _SALT, step])
  n_pos = min(max(1, round(share * batch_size)), batch_size - 1)
  p = rng.choice(positives, n_pos, replace=len(positives) < n_pos)
  o = rng.choice(others, batch_size - n_pos, replace=len(others) < batch_size - n_pos)
  return (np.concatenate([p, o]),
          np.concatenate([np.ones(n_pos, bool), np.zeros(batch_size - n_pos, bool)]))


def _load_labels(workdir: str) -> dict[int, np.ndarray]:
  path = os.path.join(workdir, LABELS)
  if not os.path.exists(path):
    return {}
  with np.load(path, allow_pickle=False) as f:
    return {int(k[len("round"):]): f[k] for k in f.files}


def _save_labels(workdir: str, labels: dict[int, np.ndarray]) -> None:
  path = os.path.join(workdir, LABELS)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **{f"round{r}": v for r, v in labels.items()})
  os.replace(tmp, path)  # atomic: a kill never leaves half a file


def restore(cfg, workdir: str, state, mesh):
  """The fine-tuned state of a finished stage, given the pretrained ``state``."""
  tx = build_tx(cfg)
  like = start_state(state, tx, mesh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, CKPT))
  if ckpt.latest_step() != cfg.pseudo.rounds * cfg.pseudo.steps_per_round:
    raise FileNotFoundError(f"no finished pseudo-label stage in {workdir}/{CKPT}")
  state = ckpt.restore(like)
  ckpt.close()
  return state


def finetune(cfg, pool, bags, workdir: str, mesh, model, state):
  """Runs (or resumes) the pseudo-label rounds; returns the fine-tuned state."""
  ps = cfg.pseudo
  spr, total = int(ps.steps_per_round), int(ps.rounds) * int(ps.steps_per_round)
  train = bags["train"]
  tx = build_tx(cfg)
  state = start_state(state, tx, mesh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, CKPT),
                              save_interval_steps=ps.checkpoint_every_steps,
                              save_on_steps=tuple(range(spr, total + 1, spr)))
  start = 0
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    start = int(state.step)
    print(f"pseudo: resumed from step {start}", flush=True)
  main_process = distributed.is_main_process()
  labels = _load_labels(workdir)
  rounds_path = os.path.join(workdir, ROUNDS)
  records = []
  if os.path.exists(rounds_path):
    with open(rounds_path) as f:
      records = [r for r in json.load(f) if r["round"] in labels]
  batch_size = max(mesh.size, cfg.pretrain.batch_size - cfg.pretrain.batch_size % mesh.size)
  all_cells = np.union1d(*cell_sets(train))
  jsonl = (progress_lib.JsonlWriter(os.path.join(workdir, METRICS), resume_step=start)
           if main_process else None)
  tb = progress_lib.create_writer(os.path.join(workdir, "tb", "pseudo"))
  writer = progress_lib.with_jsonl(tb, jsonl)
  every = cfg.pretrain.log_every_steps
  prog = progress_lib.Progress("pseudo", total, every, start)
  means = progress_lib.IntervalMeans()
  step_fn = make_train_step(cfg, model, tx, mesh)
  per_bag = tuple(ps.per_bag)
  positives = others = None
  for step in range(start, total):
    r = step // spr
    if positives is None or step % spr == 0:
      if r not in labels:
        # Labels come from the state at the start of the round: a resumed
        # round reads them from the file, so it trains on the same ones.
        if step != r * spr:
          raise RuntimeError(f"{workdir}/{LABELS} lacks round {r} but the checkpoint "
                             f"is at step {step}; delete {CKPT} to redo this stage")
        take = int(per_bag[min(r, len(per_bag) - 1)])
        labels[r] = choose_positives(
            train, score_cells(cfg, model, state, pool, train, mesh), take)
        rec = {"round": r, "per_bag": take, "num_positives": int(len(labels[r]))}
        rec.update(label_quality(train, labels[r]) or {})
        records.append(rec)
        if main_process:
          _save_labels(workdir, labels)
          workdir_lib.write_text(rounds_path, json.dumps(records, indent=1))
        quality = (f"; precision {rec['precision']:.2f}, recall {rec['recall']:.2f} "
                   "against the true witnesses" if "precision" in rec else "")
        print(f"pseudo: round {r + 1}/{ps.rounds}: {rec['num_positives']} pseudo-positive "
              f"cells (the {take} highest-scored of each positive bag){quality}", flush=True)
      positives = labels[r]
      others = np.setdiff1d(all_cells, positives)
    idx, flag = batch_indices(cfg.seed, step, positives, others, batch_size,
                              ps.positive_share)
    batch = sharding.take_batch(mesh, pool.images, {"x": idx})
    batch["positive"] = sharding.shard_batch(mesh, {"p": flag})["p"]
    state, metrics = step_fn(state, batch)
    means.add(metrics)
    done = step + 1
    if done % every == 0 or done == total:
      m = distributed.fetch_replicated(means.pop())
      m["round"] = r + 1
      progress_lib.check_finite(done, m)
      writer.write_scalars(done, m)
      prog.update(done, {k: m[k] for k in ("loss_pseudo", "embed_std")})
    ckpt.save(done, state)
  ckpt.wait()
  ckpt.close()
  writer.flush()
  return state
