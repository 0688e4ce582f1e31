"""SLAM-AGS pretraining: the pure train state, the jitted step and the loop.

Two tasks share the encoder: task 0 is SimCLR (NT-Xent) on two augmented
views of positive-bag cells; task 1 is the similarity loss on negative-bag
cells (view 1 a centre crop, view 2 augmented, as in the reference). The step
computes both per-task gradients in one backward pass: the encoder is applied
to each task's cells with its own copy of the parameters, and differentiating
the summed loss with respect to both copies yields the two gradients. They
are stacked on a leading task axis and handed to a ``slamjax.surgery``
transform, which sits first in the optax chain.

Variants against the collapse of the reference recipe (config keys, all off
by default):

* ``model.projection='per_task'``: the similarity task reads its own head
  (``sim_head``); each head gets zero gradient from the other task, so the
  tasks share, and surgery arbitrates, only the backbone.
* ``pretrain.similarity='repel'``: the similarity loss's softmax denominator
  also holds the batch's positive-bag views
  (:func:`slamjax.losses.similarity_repel_loss`). Their backbone features are
  the SimCLR forward's, detached: the repulsion moves the similarity task's
  own parameter copy through the negative-bag cells (and, through its head,
  the projection of the positive-bag features), never the SimCLR gradient,
  and costs no extra ResNet pass.
* ``pretrain.variance_weight > 0``: a VICReg-style variance floor on the
  negative-bag cells' projections, added to the similarity task
  (:func:`slamjax.losses.variance_hinge`).

Every logged step is checked for collapse (:mod:`slamjax.collapse`).

Example (a two-step run on random cells):
  >>> import numpy as np
  >>> from configs import default
  >>> cfg = default.get_config("quick")
  >>> mesh = sharding.make_mesh(-1)
  >>> model, tx, _ = build(cfg, steps_per_epoch=2)
  >>> state = init_state(cfg, model, tx, mesh)
  >>> step = make_train_step(cfg, model, tx, mesh)
  >>> imgs = np.zeros((16, 40, 40, 3), np.uint8)
  >>> state, m = step(state, sharding.shard_batch(mesh, {"pos": imgs, "neg": imgs}))
  >>> sorted(k for k in m if k.startswith("loss"))
  ['loss', 'loss_sim', 'loss_simclr']
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from slamjax import checkpoint as ckpt_lib
from slamjax import collapse as collapse_lib
from slamjax import distributed
from slamjax import losses
from slamjax import progress as progress_lib
from slamjax import sharding
from slamjax import surgery
from slamjax import workdir as workdir_lib
from slamjax.data import augment
from slamjax.data import batching
from slamjax.models import layers
from slamjax.models import pretrained
from slamjax.models import resnet

TASKS = ("simclr", "similarity")
# With the "bag_label" objective the two task slots hold the BCE of the
# positive-bag and of the negative-bag cells; metric names stay the same.
OBJECTIVES = ("slam", "bag_label")
# pretrain.similarity: the reference's pure attraction, or with repulsion.
SIMILARITIES = ("attract", "repel")
# pretrain.surgery_granularity: one surgery over the whole model, or one per leaf.
GRANULARITIES = ("model", "leaf")


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
  The training loop logs ``surgery.diagnostics``, so they are asked for
  (with ``model`` granularity; plain ``sum`` would otherwise skip them).
  """
  name = cfg.pretrain.surgery
  kwargs = dict(cfg.pretrain.surgery_kwargs)
  granularity = cfg.pretrain.surgery_granularity
  kwargs.setdefault("diagnostics", granularity == "model")
  make = lambda: surgery.get(name, key=cfg.seed, num_tasks=len(TASKS), **kwargs)
  if granularity == "model":
    return make()
  if granularity not in GRANULARITIES:
    raise ValueError(f"config.pretrain.surgery_granularity={granularity!r}; "
                     f"valid: {', '.join(GRANULARITIES)}")
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


def init_state(cfg, model, tx, mesh) -> TrainState:
  """Initialises the replicated train state directly on the mesh."""
  crop = cfg.augment.crop_size

  def init(rng):
    variables = model.init(rng, jnp.zeros((2, crop, crop, 3)), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables["batch_stats"],
                      opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(cfg.seed + 1))

  rng = jax.random.PRNGKey(cfg.seed)
  state = jax.jit(init, out_shardings=sharding.replicated(mesh))(rng)
  return pretrained.init_state_from(cfg, state, tx, mesh)  # model.init_from, if set


def objective(cfg) -> str:
  """'slam' (SimCLR + similarity) or 'bag_label' (weakly supervised baseline)."""
  p = cfg.pretrain
  name = p.objective
  if name not in OBJECTIVES:
    raise ValueError(f"config.pretrain.objective={name!r}; valid: {OBJECTIVES}")
  if p.similarity not in SIMILARITIES:
    raise ValueError(f"config.pretrain.similarity={p.similarity!r}; valid: {SIMILARITIES}")
  if name == "bag_label" and tuple(cfg.model.proj_dims)[-1:] != (1,):
    raise ValueError(
        "config.pretrain.objective='bag_label' classifies cells with the "
        "projection head, so config.model.proj_dims must end in 1, got "
        f"{tuple(cfg.model.proj_dims)}; embed with config.embed.output='backbone'")
  if name == "bag_label" and (p.similarity != "attract" or p.variance_weight
                              or cfg.model.projection != "shared"):
    raise ValueError(
        "config.pretrain.objective='bag_label' has no similarity task: it takes "
        "neither pretrain.similarity='repel', pretrain.variance_weight > 0 nor "
        "model.projection='per_task'")
  return name


def _views(cfg, rng, pos, neg, two_views: bool = True):
  a = cfg.augment
  aug = functools.partial(augment.augment_batch, **augment.policy_kwargs(a))
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


def make_loss_fn(cfg, model):
  """``loss_fn(params_pos, params_neg, batch_stats, pos_views, neg_views)``.

  Returns ``(weighted total, aux)``. The SimCLR task reads only
  ``params_pos`` and the similarity task only ``params_neg``, so the
  gradients with respect to the two arguments (both given the same
  parameters) are the two task gradients. ``pos_views`` / ``neg_views`` are
  normalised float views (two per cell, stacked; one for 'bag_label');
  ``aux`` holds the unweighted task losses (``loss_sim`` without the
  variance term, ``loss_task_sim`` with it), ``loss_var``, the spreads and
  the new BatchNorm statistics.
  """
  p = cfg.pretrain
  t, tb = p.temperature, p.base_temperature
  bag_label = objective(cfg) == "bag_label"
  repel = p.similarity == "repel"
  variance_weight = float(p.variance_weight)
  w = tuple(p.task_weights)

  def forward(params, batch_stats, x, task):
    (feats, z), upd = model.apply({"params": params, "batch_stats": batch_stats},
                                  x, train=True, task=task, mutable=["batch_stats"])
    return feats, z, upd["batch_stats"]

  def project(params, batch_stats, feats, task):
    z, upd = model.apply({"params": params, "batch_stats": batch_stats}, feats,
                         train=True, task=task, method=type(model).project,
                         mutable=["batch_stats"])
    return z, upd["batch_stats"]

  def spread(z):
    zn = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    return jnp.mean(jnp.std(zn, axis=0)) * jnp.sqrt(zn.shape[-1])

  def loss_fn(params_pos, params_neg, batch_stats, pos_views, neg_views):
    # Each task gets its own forward (and BN statistics), as in the reference.
    feats_pos, z_pos, batch_stats = forward(params_pos, batch_stats, pos_views, "simclr")
    _, z_neg, batch_stats = forward(params_neg, batch_stats, neg_views, "similarity")
    aux = {}
    if bag_label:  # cells inherit their bag's label; tasks = the two bag kinds
      n_pos, n_neg = pos_views.shape[0], neg_views.shape[0]
      w_pos = n_pos / (n_pos + n_neg)  # so that the plain sum is the batch BCE
      l_simclr = w_pos * losses.bag_label_bce(z_pos, 1.0)
      l_sim = (1.0 - w_pos) * losses.bag_label_bce(z_neg, 0.0)
      l_task1 = l_sim
    else:
      n_pos, n_neg = pos_views.shape[0] // 2, neg_views.shape[0] // 2
      l_simclr = losses.nt_xent(z_pos[:n_pos], z_pos[n_pos:], t)
      if repel:
        # The positive-bag views to repel: the SimCLR forward's backbone
        # features, detached, projected by the similarity task's own head
        # and parameter copy. So the SimCLR gradient never sees this loss.
        z_rep, batch_stats = project(params_neg, batch_stats,
                                     jax.lax.stop_gradient(feats_pos), "similarity")
        l_sim = losses.similarity_repel_loss(z_neg[:n_neg], z_neg[n_neg:], z_rep, t, tb)
      else:
        l_sim = losses.similarity_loss(z_neg[:n_neg], z_neg[n_neg:], t, tb)
      l_task1 = l_sim
      if variance_weight:
        l_var = losses.variance_hinge(z_neg, p.variance_target)
        l_task1 = l_sim + variance_weight * l_var
        aux["loss_var"] = l_var
      aux["embed_std_neg"] = spread(z_neg)
    aux.update(loss_simclr=l_simclr, loss_sim=l_sim, loss_task_sim=l_task1,
               embed_std=spread(z_pos), batch_stats=batch_stats)
    return w[0] * l_simclr + w[1] * l_task1, aux

  return loss_fn


def make_train_step(cfg, model, tx, mesh):
  """Returns the jitted ``step(state, batch) -> (state, metrics)``.

  ``batch`` is ``{"pos": uint8 [Bp,H,W,3], "neg": uint8 [Bn,H,W,3]}`` sharded
  over the mesh's ``data`` axis. Besides the losses and the two task
  gradients' cosine and norms, the metrics hold ``embed_std`` (spread of the
  positive-bag cells' normalised SimCLR projections, times sqrt(D)),
  ``embed_std_neg`` (the same for the negative-bag cells' similarity-task
  projections) and ``ntxent_uniform`` (log(2B-1), NT-Xent at uniform
  similarity): see :mod:`slamjax.collapse`.
  """
  bag_label = objective(cfg) == "bag_label"
  loss_fn = make_loss_fn(cfg, model)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    pos_views, neg_views = _views(cfg, rng, batch["pos"], batch["neg"],
                                  two_views=not bag_label)
    grads, aux = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(
        state.params, state.params, state.batch_stats, pos_views, neg_views)
    updates_in = jax.tree.map(lambda a, b: jnp.stack([a, b]), *grads)
    updates, opt_state = tx.update(updates_in, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=aux["loss_simclr"] + aux["loss_task_sim"],
                   loss_simclr=aux["loss_simclr"], loss_sim=aux["loss_sim"],
                   embed_std=aux["embed_std"],
                   update_norm=optax.tree.norm(updates),
                   param_norm=optax.tree.norm(params), **_task_grad_metrics(updates_in))
    for k in ("loss_var", "embed_std_neg"):
      if k in aux:
        metrics[k] = aux[k]
    if not bag_label:
      metrics["ntxent_uniform"] = jnp.float32(
          collapse_lib.ntxent_uniform(pos_views.shape[0] // 2))
    diag = ({} if cfg.pretrain.surgery_granularity == "leaf"
            else surgery.diagnostics(opt_state))
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
  ``workdir/tb/pretrain``, the metric history to
  ``workdir/pretrain_metrics.jsonl`` and (objective 'slam') the collapse
  summary to ``workdir/pretrain_collapse.json``, warning on the console the
  first time a logged step has collapsed; returns the final train state.
  """
  train = bags["train"]
  batcher = batching.ProportionalBatcher(
      train.all_cells(1), train.all_cells(0), cfg.pretrain.batch_size,
      seed=cfg.seed, multiple=mesh.size)
  total = cfg.pretrain.epochs * batcher.steps_per_epoch
  model, tx, schedule = build(cfg, batcher.steps_per_epoch)
  state = init_state(cfg, model, tx, mesh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, workdir_lib.PRETRAIN_CKPT),
                              save_interval_steps=cfg.pretrain.checkpoint_every_steps,
                              save_on_steps=(total,))
  start = 0
  log_path = os.path.join(workdir, workdir_lib.PRETRAIN_METRICS)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    start = int(state.step)
    print(f"pretrain: resumed from step {start}", flush=True)
  main_process = distributed.is_main_process()
  jsonl = progress_lib.JsonlWriter(log_path, resume_step=start) if main_process else None
  monitor = None
  if objective(cfg) == "slam":
    monitor = collapse_lib.Monitor(
        batcher.b_pos, cfg.pretrain.collapse_spread, cfg.pretrain.collapse_margin,
        cfg.pretrain.collapse_patience,
        history=progress_lib.read_jsonl(log_path) if main_process and start else (),
        echo=main_process, projection=cfg.model.projection,
        compact=cfg.pretrain.epochs <= 2)  # smoke runs: one line, not the box
  print(f"pretrain: {len(batcher.pos_cells)} positive-bag and "
        f"{len(batcher.neg_cells)} negative-bag cells; batch {batcher.b_pos}+"
        f"{batcher.b_neg}; {batcher.steps_per_epoch} steps/epoch; {total} steps; "
        f"surgery={cfg.pretrain.surgery}; {mesh.size} device(s)", flush=True)
  step_fn = make_train_step(cfg, model, tx, mesh)
  tb = progress_lib.create_writer(os.path.join(workdir, "tb", "pretrain"))
  writer = progress_lib.with_jsonl(tb, jsonl)
  if start == 0:
    writer.write_hparams({k: str(v) for k, v in cfg.pretrain.items()})
  every = cfg.pretrain.log_every_steps
  prog = progress_lib.Progress("pretrain", total, every, start)
  report = progress_lib.report_progress(total, tb, every)  # steps/s to TensorBoard
  means = progress_lib.IntervalMeans()  # logged values: means over the interval
  for step in range(start, total):
    pos, neg = batcher.indices(step)
    batch = sharding.take_batch(mesh, pool.images, {"pos": pos, "neg": neg})
    state, metrics = step_fn(state, batch)
    means.add(metrics)
    done = step + 1
    if done % every == 0 or done == total:
      m = distributed.fetch_replicated(means.pop())
      m["lr"] = float(schedule(step))
      m["epoch"] = done / batcher.steps_per_epoch
      progress_lib.check_finite(done, m)
      writer.write_scalars(done, m)
      prog.update(done, {k: m[k] for k in ("loss_simclr", "loss_sim", "grad_cos", "embed_std")
                         if k in m})
      if monitor is not None:
        monitor.update(done, {k: float(v) for k, v in m.items()})
    if report is not None:
      report(done)
    ckpt.save(done, state)  # Orbax decides: every checkpoint_every_steps, and the last
  ckpt.wait()
  ckpt.close()
  writer.flush()
  if monitor is not None and main_process:
    summary = monitor.write(workdir)
    if summary["collapsed"]:
      verdict = ("COLLAPSED" if collapse_lib.end_state(summary) == "end" else
                 "flagged as collapsed, but past both thresholds at the end")
      print(f"pretrain: {verdict} (first at step {summary['first_step']}; final spread "
            f"{summary['final_spread']:.3g}, NT-Xent {summary['final_ntxent']:.4g} vs "
            f"log(2B-1) {summary['ntxent_uniform']:.4g}); see "
            f"{os.path.join(workdir, collapse_lib.FILENAME)}", flush=True)
  return state
