"""SLAM-AGS pretraining: the pure train state, the jitted step and the loop.

Two tasks share the encoder: task 0 is SimCLR (NT-Xent) on two augmented
views of positive-bag cells; task 1 is the similarity loss on negative-bag
cells (view 1 a centre crop, view 2 augmented, as in the reference). The step
computes both per-task gradients in one backward pass: the encoder is applied
to each task's cells with its own copy of the parameters, and differentiating
the summed loss with respect to both copies yields the two gradients. They
are stacked on a leading task axis and handed to a ``slamjax.surgery``
transform, which sits first in the optax chain.

Example (a two-step run on random cells):
  >>> import numpy as np
  >>> from configs import default
  >>> cfg = default.get_config("quick")
  >>> mesh = sharding.make_mesh(-1)
  >>> model, tx, _ = build(cfg, steps_per_epoch=2)
  >>> state = init_state(cfg, model, tx, mesh, image_size=40)
  >>> step = make_train_step(cfg, model, tx, mesh)
  >>> imgs = np.zeros((16, 40, 40, 3), np.uint8)
  >>> state, m = step(state, sharding.shard_batch(mesh, {"pos": imgs, "neg": imgs}))
  >>> sorted(k for k in m if k.startswith("loss"))
  ['loss', 'loss_sim', 'loss_simclr']
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from slamjax import checkpoint as ckpt_lib
from slamjax import distributed
from slamjax import losses
from slamjax import progress as progress_lib
from slamjax import sharding
from slamjax import surgery
from slamjax.data import augment
from slamjax.data import batching
from slamjax.models import layers
from slamjax.models import resnet

TASKS = ("simclr", "similarity")
# With the "bag_label" objective the two task slots hold the BCE of the
# positive-bag and of the negative-bag cells; metric names stay the same.
OBJECTIVES = ("slam", "bag_label")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def build_model(cfg: ml_collections.ConfigDict) -> resnet.Encoder:
  return resnet.get_model(cfg.model)


def build_schedule(cfg, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up then cosine decay to 0, per step."""
  total = max(cfg.pretrain.epochs * steps_per_epoch, 1)
  warmup = min(cfg.pretrain.warmup_epochs * steps_per_epoch, total - 1)
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.pretrain.lr, warmup_steps=warmup, decay_steps=total, end_value=0.0)


def build_surgery(cfg, model=None) -> optax.GradientTransformation:
  """The surgery transform; ``surgery_granularity='leaf'`` runs one per leaf.

  Per-leaf surgery (as GradVac's per-layer groups) resolves conflicts inside
  every weight tensor separately instead of on the whole parameter vector.
  """
  name = cfg.pretrain.surgery
  kwargs = dict(cfg.pretrain.get("surgery_kwargs", {}) or {})
  make = lambda: surgery.get(name, key=cfg.seed, num_tasks=len(TASKS), **kwargs)
  granularity = cfg.pretrain.get("surgery_granularity", "model")
  if granularity == "model":
    return make()
  if granularity != "leaf":
    raise ValueError(f"config.pretrain.surgery_granularity={granularity!r}; "
                     "valid: 'model', 'leaf'")
  crop = cfg.augment.crop_size
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((2, crop, crop, 3)), train=False)["params"])
  label = lambda tree: jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path), tree)
  names = jax.tree.leaves(label(shapes))
  return optax.partition({n: make() for n in names}, label)


def build(cfg, steps_per_epoch: int):
  """(model, optax chain, lr schedule): surgery -> weight decay -> SGD."""
  schedule = build_schedule(cfg, steps_per_epoch)
  model = build_model(cfg)
  tx = optax.chain(
      build_surgery(cfg, model),
      optax.add_decayed_weights(cfg.pretrain.weight_decay),  # torch-style L2
      optax.sgd(schedule, momentum=cfg.pretrain.momentum))
  return model, tx, schedule


def init_state(cfg, model, tx, mesh, image_size: int) -> TrainState:
  """Initialises the replicated train state directly on the mesh."""
  crop = cfg.augment.crop_size

  def init(rng):
    variables = model.init(rng, jnp.zeros((2, crop, crop, 3)), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables["batch_stats"],
                      opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(cfg.seed + 1))

  del image_size
  rng = jax.random.PRNGKey(cfg.seed)
  return jax.jit(init, out_shardings=sharding.replicated(mesh))(rng)


def objective(cfg) -> str:
  """'slam' (SimCLR + similarity) or 'bag_label' (weakly supervised baseline)."""
  name = cfg.pretrain.get("objective", "slam")
  if name not in OBJECTIVES:
    raise ValueError(f"config.pretrain.objective={name!r}; valid: {OBJECTIVES}")
  if name == "bag_label" and tuple(cfg.model.proj_dims)[-1:] != (1,):
    raise ValueError(
        "config.pretrain.objective='bag_label' classifies cells with the "
        "projection head, so config.model.proj_dims must end in 1, got "
        f"{tuple(cfg.model.proj_dims)}; embed with config.embed.output='backbone'")
  return name


def _views(cfg, rng, pos, neg, two_views: bool = True):
  a = cfg.augment
  aug = functools.partial(
      augment.augment_batch, crop_size=a.crop_size, flip=a.flip,
      jitter_strength=a.jitter_strength, jitter_prob=a.jitter_prob,
      rot90_prob=a.rot90_prob, mean=a.mean, std=a.std)
  k1, k2, k3 = jax.random.split(rng, 3)
  if not two_views:  # one augmented view per cell
    return aug(k1, pos), aug(k3, neg)
  pos_views = jnp.concatenate([aug(k1, pos), aug(k2, pos)])
  neg_views = jnp.concatenate([
      augment.eval_view(neg, a.crop_size, a.mean, a.std), aug(k3, neg)])
  return pos_views, neg_views


def _task_grad_metrics(stacked_grads) -> dict:
  """Cosine and norms of the two task gradients, from their Gram matrix.

  ``surgery.gram_matrix`` issues the same per-leaf contractions as the
  surgery transform, so XLA computes them once for both (no extra pass over
  the gradients).
  """
  gram = surgery.gram_matrix(stacked_grads)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  return dict(grad_cos=gram[0, 1] / (norms[0] * norms[1] + 1e-20),
              grad_norm_simclr=norms[0], grad_norm_sim=norms[1])


def make_train_step(cfg, model, tx, mesh, per_task: bool = True):
  """Returns the jitted ``step(state, batch) -> (state, metrics)``.

  ``batch`` is ``{"pos": uint8 [Bp,H,W,3], "neg": uint8 [Bn,H,W,3]}`` sharded
  over the mesh's ``data`` axis. With ``per_task=False`` the step
  differentiates the plain summed loss once (the benchmark baseline; the
  optimizer must then not start with a surgery transform).
  """
  t, tb = cfg.pretrain.temperature, cfg.pretrain.base_temperature

  def forward(params, batch_stats, x):
    (feats, z), upd = model.apply({"params": params, "batch_stats": batch_stats},
                                  x, train=True, mutable=["batch_stats"])
    return z, upd["batch_stats"]

  bag_label = objective(cfg) == "bag_label"

  def task_losses(z_pos, z_neg, n_pos, n_neg):
    if bag_label:  # cells inherit their bag's label; tasks = the two bag kinds
      w_pos = n_pos / (n_pos + n_neg)  # so that the plain sum is the batch BCE
      return (w_pos * losses.bag_label_bce(z_pos, 1.0),
              (1.0 - w_pos) * losses.bag_label_bce(z_neg, 0.0))
    return (losses.nt_xent(z_pos[:n_pos], z_pos[n_pos:], t),
            losses.similarity_loss(z_neg[:n_neg], z_neg[n_neg:], t, tb))

  def loss_fn(params_pos, params_neg, batch_stats, pos_views, neg_views):
    # Each task gets its own forward (and BN statistics), as in the reference.
    z_pos, batch_stats = forward(params_pos, batch_stats, pos_views)
    z_neg, batch_stats = forward(params_neg, batch_stats, neg_views)
    views = 1 if bag_label else 2
    l_simclr, l_sim = task_losses(z_pos, z_neg, pos_views.shape[0] // views,
                                  neg_views.shape[0] // views)
    zn = z_pos / jnp.linalg.norm(z_pos, axis=-1, keepdims=True)
    aux = dict(loss_simclr=l_simclr, loss_sim=l_sim,
               embed_std=jnp.mean(jnp.std(zn, axis=0)) * jnp.sqrt(zn.shape[-1]),
               batch_stats=batch_stats)
    w = cfg.pretrain.get("task_weights", (1.0, 1.0))
    return w[0] * l_simclr + w[1] * l_sim, aux

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    pos_views, neg_views = _views(cfg, rng, batch["pos"], batch["neg"],
                                  two_views=not bag_label)
    if per_task:
      grads, aux = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(
          state.params, state.params, state.batch_stats, pos_views, neg_views)
      updates_in = jax.tree.map(lambda a, b: jnp.stack([a, b]), *grads)
      extra = _task_grad_metrics(updates_in)
    else:
      updates_in, aux = jax.grad(
          lambda p: loss_fn(p, p, state.batch_stats, pos_views, neg_views),
          has_aux=True)(state.params)
      extra = {}
    updates, opt_state = tx.update(updates_in, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=aux["loss_simclr"] + aux["loss_sim"],
                   loss_simclr=aux["loss_simclr"], loss_sim=aux["loss_sim"],
                   embed_std=aux["embed_std"],
                   update_norm=optax.tree.norm(updates),
                   param_norm=optax.tree.norm(params), **extra)
    diag = {} if cfg.pretrain.get("surgery_granularity", "model") == "leaf" else (
        surgery.diagnostics(opt_state))
    for k, v in diag.items():
      if v.ndim == 0:
        metrics[f"surgery/{k}"] = v
      elif v.shape == (len(TASKS),):  # per-task vectors, e.g. weights
        for i, name in enumerate(TASKS):
          metrics[f"surgery/{k}_{name}"] = v[i]
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=aux["batch_stats"], opt_state=opt_state)
    return new_state, metrics

  repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, data), out_shardings=(repl, repl),
                 donate_argnums=(0,), compiler_options=layers.compiler_options(model.impl))


def pretrain(cfg, pool, bags, workdir: str, mesh) -> TrainState:
  """Runs (or resumes) pretraining on the cells of the training bags.

  Writes checkpoints to ``workdir/pretrain_ckpt``, TensorBoard summaries to
  ``workdir/tb/pretrain`` and the metric history to
  ``workdir/pretrain_metrics.jsonl``; returns the final train state.
  """
  train = bags["train"]
  batcher = batching.ProportionalBatcher(
      train.all_cells(1), train.all_cells(0), cfg.pretrain.batch_size,
      seed=cfg.seed, multiple=mesh.size)
  total = cfg.pretrain.epochs * batcher.steps_per_epoch
  model, tx, schedule = build(cfg, batcher.steps_per_epoch)
  state = init_state(cfg, model, tx, mesh, pool.images.shape[1])
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "pretrain_ckpt"))
  start = 0
  log_path = os.path.join(workdir, "pretrain_metrics.jsonl")
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    start = int(state.step)
    print(f"pretrain: resumed from step {start}", flush=True)
  if distributed.is_main_process():
    _truncate_log(log_path, start)
  print(f"pretrain: {len(batcher.pos_cells)} positive-bag and "
        f"{len(batcher.neg_cells)} negative-bag cells; batch {batcher.b_pos}+"
        f"{batcher.b_neg}; {batcher.steps_per_epoch} steps/epoch; {total} steps; "
        f"surgery={cfg.pretrain.surgery}; {mesh.size} device(s)", flush=True)
  step_fn = make_train_step(cfg, model, tx, mesh)
  writer = progress_lib.create_writer(os.path.join(workdir, "tb", "pretrain"))
  if start == 0:
    writer.write_hparams({k: str(v) for k, v in cfg.pretrain.items()})
  prog = progress_lib.Progress("pretrain", total, cfg.pretrain.log_every_steps, start)
  every = cfg.pretrain.log_every_steps
  for step in range(start, total):
    pos, neg = batcher.indices(step)
    batch = sharding.take_batch(mesh, pool.images, {"pos": pos, "neg": neg})
    state, metrics = step_fn(state, batch)
    done = step + 1
    if done % every == 0 or done == total:
      m = distributed.fetch_replicated(metrics)
      m["lr"] = float(schedule(step))
      m["epoch"] = done / batcher.steps_per_epoch
      progress_lib.check_finite(done, m)
      writer.write_scalars(done, m)
      if distributed.is_main_process():
        with open(log_path, "a") as f:
          f.write(json.dumps({"step": done, **{k: float(v) for k, v in m.items()}}) + "\n")
      prog.update(done, {k: m[k] for k in ("loss_simclr", "loss_sim", "grad_cos") if k in m})
    if done % cfg.pretrain.checkpoint_every_steps == 0 or done == total:
      ckpt.save(done, state, force=True)
  ckpt.wait()
  ckpt.close()
  writer.flush()
  return state


def _truncate_log(path: str, step: int) -> None:
  """Drops history lines after ``step`` (logged after the last checkpoint)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
  with open(path, "w") as f:
    f.writelines(keep)
