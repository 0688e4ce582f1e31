"""Training and inference of any MIL head on padded batches of embedded bags.

``fit`` trains the head named ``cfg.head`` (resuming from Orbax checkpoints
under ``workdir``; bags of similar lengths are padded once and every epoch is
one jitted scan, :mod:`slamjax.mil.resident`); ``predict`` gives bag probabilities and the attention used
to rank cells; ``extend`` adds tasks to a trained MECDS head. Every loss is
per bag: the supervised sigmoid BCE summed over the bag's known tasks (NaN
labels are missing and masked out), the head's own terms (PAMIL ER and
clustering, ASMIL anchor KD, MECDS AKD), and the optional AEM regulariser,
averaged over the real bags of a batch (filler bags have weight 0).

Per epoch, the mean of each loss term and the attention stability (mean
Jensen-Shannon divergence between this and the previous epoch's attention on
the first ``cfg.stability_bags`` training bags; the previous of epoch 1 is
the uniform distribution, as in ASMIL) are appended to
``workdir/mil_metrics.jsonl``.

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

import collections
import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from slamjax import checkpoint as ckpt_lib
from slamjax import progress as progress_lib
from slamjax.mil import aem as aem_lib
from slamjax.mil import asmil
from slamjax.mil import diagnostics
from slamjax.mil import heads
from slamjax.mil import mecds
from slamjax.mil import options
from slamjax.mil import padding
from slamjax.mil import resident
from slamjax.mil import spec as spec_lib


@flax.struct.dataclass
class MilState:
  """Train state. ``anchor`` is ASMIL's anchor parameters (else None).

  ``num_tasks`` and ``num_base`` (MECDS: tasks of the jointly routed base
  group; None = all) are static metadata, not checkpointed arrays.
  """
  epoch: jax.Array
  params: Any
  opt_state: Any
  step: Any = 0
  anchor: Any = None
  num_tasks: int = flax.struct.field(pytree_node=False, default=1)
  num_base: Any = flax.struct.field(pytree_node=False, default=None)


def _as_2d(labels):
  labels = np.asarray(labels, np.float32)
  return labels[:, None] if labels.ndim == 1 else labels


def build_tx(cfg, total_steps: int | None = None, param_labels=None):
  """Optimizer from ``cfg``: adam (L2 before Adam, as torch Adam) or adamw,
  optional global-norm clipping and cosine schedule; ``param_labels``
  ('train'/'frozen' per leaf) freezes parameters with ``set_to_zero``.

  ``cfg`` is resolved (:func:`slamjax.mil.options.resolve`), as the public
  entries :func:`fit`, :func:`predict` and :func:`extend` pass it: options
  are resolved once, there.
  """
  lr = cfg.lr
  if cfg.schedule == "cosine":
    lr = optax.cosine_decay_schedule(cfg.lr, max(int(total_steps or 1), 1))
  elif cfg.schedule != "constant":
    raise ValueError(f"mil.schedule={cfg.schedule!r}; valid: constant, cosine")
  if cfg.optimizer == "adam":
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(lr))
  elif cfg.optimizer == "adamw":
    tx = optax.adamw(lr, weight_decay=cfg.weight_decay)
  else:
    raise ValueError(f"mil.optimizer={cfg.optimizer!r}; valid: adam, adamw")
  if cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  if param_labels is not None:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, param_labels)
  return tx


def make_loss_fn(cfg, spec, model, task_mask, total_steps: int, with_outputs: bool = False):
  """loss_fn(params, batch, rng, ctx, step) -> (loss, per-term means).

  With ``with_outputs`` the aux is ``(per-term means, head outputs)``.
  """
  aem_w = heads.aem_weight(cfg)
  task_mask = jnp.asarray(task_mask, bool)

  def loss_fn(params, batch, rng, ctx, step):
    r_drop, r_tok = jax.random.split(rng)
    out = model.apply(params, batch["x"], batch["mask"], train=True,
                      rngs={"dropout": r_drop, "token_drop": r_tok})
    known = jnp.isfinite(batch["label"]) & task_mask[None]
    y = jnp.where(known, batch["label"], 0.0)
    bce = optax.sigmoid_binary_cross_entropy(out["logits"], y)
    terms = {"bce": jnp.sum(jnp.where(known, bce, 0.0), -1)}
    total = terms["bce"]
    if spec.aux_loss is not None:
      aux, t = spec.aux_loss(cfg, model, out, batch, known, ctx)
      if aux is not None:
        total = total + aux
        terms.update(t)
    if aem_w > 0:
      terms["aem"] = aem_lib.aem_loss(out["attention_rows"], batch["mask"], cfg.aem_top_k)
      total = total + aem_lib.aem_weight(aem_w, cfg.aem_schedule, step, total_steps) * terms["aem"]
    w = batch["weight"]
    mean = lambda v: jnp.sum(v * w) / jnp.maximum(jnp.sum(w), 1.0)
    loss = mean(total)
    metrics = dict({k: mean(v) for k, v in terms.items()}, loss=loss)
    return loss, ((metrics, out) if with_outputs else metrics)

  return loss_fn


def make_steps(cfg, model, tx, spec=None, task_mask=None, total_steps: int = 1):
  """(train_step, apply_fn, train_epoch), all jitted.

  ``train_step(state, batch, rng, teacher_params=None, kd_scale=1.0) ->
  (state, metrics)``; the ASMIL anchor is EMA-updated after the optimizer
  step when configured. ``kd_scale`` multiplies the teacher distillation term
  (MECDS: 0 in the teacher phase, so both phases share one compilation).
  ``train_epoch`` scans the same step over an epoch of device-resident bags
  (:func:`slamjax.mil.resident.make_epoch_fn`).
  """
  spec = spec or heads.get_spec(cfg)
  if task_mask is None:
    task_mask = np.ones((getattr(model, "num_tasks", 1),), bool)
  loss_fn = make_loss_fn(cfg, spec, model, task_mask, total_steps)
  ema = spec.anchor and cfg.asmil.anchor == "ema"

  def train_step(state, batch, rng, teacher_params=None, kd_scale=1.0):
    ctx = spec_lib.AuxContext(anchor_params=state.anchor, teacher_params=teacher_params,
                              kd_scale=kd_scale)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng, ctx, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    anchor = asmil.ema_update(state.anchor, params, cfg.asmil.anchor_decay) if ema else state.anchor
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                         anchor=anchor), metrics

  return jax.jit(train_step), _apply_fn(model), resident.make_epoch_fn(train_step)


def resident_bags(cfg, bags, labels2):
  """``fit``'s training bags padded once on the device, or None when their
  lengths differ too much (or they are too big): then every step pads its
  own batch (:mod:`slamjax.mil.resident`)."""
  length = resident.resident_length(bags, cfg.min_len, cfg.buckets_per_octave)
  return None if length is None else resident.make_resident(bags, labels2, length)


def run_epoch(cfg, steps, state, bags, labels2, order, base_key, epoch: int,
              teacher_params=None, kd_scale=1.0, data=None):
  """One epoch of ``fit``: batches of ``cfg.batch_size`` bags in ``order``;
  the rng of step i is ``fold_in(base_key, epoch * 100003 + i)``.

  ``steps`` is ``(train_step, train_epoch)`` of :func:`make_steps`. With
  ``data`` (:func:`resident_bags`) the epoch is one ``train_epoch`` call on
  device-resident bags; without, every batch is padded into its length
  bucket on the host and takes one ``train_step`` call. Returns ``(state,
  metrics)``: per metric, its value at every step, on the host.
  """
  train_step, train_epoch = steps
  if data is not None:
    idx = resident.batch_indices(order, cfg.batch_size, len(bags))
    state, metrics = train_epoch(state, data, idx, base_key, epoch, teacher_params,
                                 kd_scale)
    return state, jax.device_get(metrics)
  logs = []
  for i, (_, batch) in enumerate(padding.iterate_batches(
      bags, labels2, cfg.batch_size, order, min_len=cfg.min_len,
      per_octave=cfg.buckets_per_octave)):
    rng = jax.random.fold_in(base_key, epoch * 100_003 + i)
    state, m = train_step(state, batch, rng, teacher_params, kd_scale)
    logs.append(m)
  logs = jax.device_get(logs)
  return state, {k: np.array([m[k] for m in logs]) for k in logs[0]}


# Compiled functions are cached per (module, config, ...) so that phases,
# predict and repeated fits of the same head reuse one XLA compilation. The
# least recently used entries go first, so a long study does not grow it.
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 32


def _cached(key, make):
  if key in _CACHE:
    _CACHE.move_to_end(key)
  else:
    _CACHE[key] = make()
    if len(_CACHE) > _CACHE_SIZE:
      _CACHE.popitem(last=False)
  return _CACHE[key]


def _apply_fn(model):
  return _cached(("apply", model), lambda: jax.jit(
      lambda params, x, mask: model.apply(params, x, mask, train=False)))


def _init_fn(model):
  # Jitted: an eager init compiles every op separately (seconds on CPU).
  return _cached(("init", model), lambda: jax.jit(model.init))


def _steps(cfg, spec, model, task_mask, total_steps, param_labels):
  """(tx, train_step, apply_fn, train_epoch) for a phase, cached."""
  labels_key = None
  if param_labels is not None:
    leaves, treedef = jax.tree.flatten(param_labels)
    labels_key = (treedef, tuple(leaves))
  # Keys that do not enter the step function are left out of the cache key.
  step_cfg = cfg.to_dict()
  for k in ("epochs", "checkpoint_every_epochs", "stability_bags"):
    step_cfg.pop(k, None)
  step_cfg["mecds"] = dict(step_cfg["mecds"], teacher_epochs=None, student_init=None)
  if cfg.schedule == "constant" and (cfg.aem_schedule == "constant"
                                     or heads.aem_weight(cfg) == 0):
    total_steps = 1  # no schedule reads it
  key = ("steps", model, ml_collections.FrozenConfigDict(step_cfg),
         tuple(bool(t) for t in task_mask), total_steps, labels_key)

  def make():
    tx = build_tx(cfg, total_steps, param_labels)
    return (tx,) + make_steps(cfg, model, tx, spec, task_mask, total_steps)

  return _cached(key, make)


def _init_params(cfg, model, bags, seed: int):
  first = padding.pad_batch(bags[:1], np.zeros((1, 1), np.float32), cfg.batch_size,
                            cfg.min_len, per_octave=cfg.buckets_per_octave)
  return _init_fn(model)(jax.random.PRNGKey(seed), first["x"], first["mask"])


def _attention(cfg, apply_fn, params, bags, key="attention"):
  out_list = [None] * len(bags)
  dummy = np.zeros((len(bags), 1), np.float32)
  for idx, batch in padding.iterate_batches(bags, dummy, cfg.batch_size, min_len=cfg.min_len,
                                            per_octave=cfg.buckets_per_octave):
    att = np.asarray(jax.device_get(apply_fn(params, batch["x"], batch["mask"])[key]))
    for j, b in enumerate(idx):
      out_list[b] = att[j][..., :len(bags[b])]
  return out_list


def _epoch_order(n, seed, epoch, weights=None):
  rng = np.random.default_rng([seed, epoch])
  if weights is None:
    return rng.permutation(n)
  return rng.choice(n, size=n, replace=True, p=weights / weights.sum())


def _run_phase(cfg, spec, phase: str, bags, labels2, workdir: str, ckpt_name: str,
               seed: int, verbose: bool, *, num_tasks: int, num_base=None, epochs=None,
               balanced: bool = False, teacher_params=None, init_params=None,
               frozen=None, task_mask=None) -> MilState:
  epochs = cfg.epochs if epochs is None else epochs
  model = spec.build(cfg, num_tasks, num_base)
  if init_params is None:
    params = _init_params(cfg, model, bags, seed)
    if spec.init_params is not None:
      params = spec.init_params(cfg, params, bags, seed)
  else:
    params = init_params
  if frozen is None and spec.frozen is not None:
    frozen = spec.frozen(cfg)
  steps_per_epoch = math.ceil(len(bags) / cfg.batch_size)
  total_steps = epochs * steps_per_epoch
  labels_tree = heads.path_labels(params, frozen) if frozen is not None else None
  if task_mask is None:
    task_mask = np.ones((num_tasks,), bool)
  tx, train_step, apply_fn, train_epoch = _steps(cfg, spec, model, task_mask, total_steps,
                                                 labels_tree)
  anchor = None
  if spec.anchor:
    # EMA: starts as the online parameters (arrays are immutable: no copy).
    anchor = (params if cfg.asmil.anchor == "ema"
              else _init_params(cfg, model, bags, seed + 1))
    if cfg.asmil.anchor not in ("ema", "frozen_random"):
      raise ValueError(f"mil.asmil.anchor={cfg.asmil.anchor!r}; valid: ema, frozen_random")
  state = MilState(epoch=jnp.zeros((), jnp.int32), params=params,
                   opt_state=jax.jit(tx.init)(params),
                   step=jnp.zeros((), jnp.int32), anchor=anchor, num_tasks=num_tasks,
                   num_base=num_base)
  # The head lives on one process (process 0 of a multi-process run).
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, ckpt_name), process_local=True,
                               save_interval_steps=cfg.checkpoint_every_epochs,
                               save_on_steps=(epochs,))
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
  start = int(state.epoch)
  if start >= epochs:
    ckpt.close()
    return state
  weights = None
  if balanced:
    weights = mecds.balanced_weights(np.where(task_mask[None], labels2, np.nan))
  jsonl = progress_lib.JsonlWriter(os.path.join(workdir, "mil_metrics.jsonl"), start,
                                   step_key="epoch", fields={"phase": phase, "head": cfg.head})
  writer = jsonl
  if verbose:
    writer = progress_lib.with_jsonl(progress_lib.create_writer(os.path.join(
        workdir, "tb", "mil" if phase == "train" else f"mil_{ckpt_name}")), jsonl)
  prog = progress_lib.Progress(f"mil/{cfg.head}" + ("" if phase == "train" else f"/{phase}"),
                               epochs, max(1, epochs // 10), start, unit="epochs")
  probe = list(bags[:cfg.stability_bags])
  prev = _attention(cfg, apply_fn, state.params, probe) if start > 0 else [None] * len(probe)
  base_key = jax.random.PRNGKey(seed + 7)
  kd_scale = jnp.float32(1.0)
  if "teacher" in spec.phases and teacher_params is None:
    # Teacher phase: a stand-in teacher with weight 0 keeps one compilation.
    teacher_params, kd_scale = state.params, jnp.float32(0.0)
  data = resident_bags(cfg, bags, labels2)
  for epoch in range(start, epochs):
    order = _epoch_order(len(bags), seed, epoch, weights)
    state, logs = run_epoch(cfg, (train_step, train_epoch), state, bags, labels2, order,
                            base_key, epoch, teacher_params, kd_scale, data)
    state = state.replace(epoch=state.epoch + 1)
    record = {k: float(np.mean(v)) for k, v in logs.items()}
    cur = _attention(cfg, apply_fn, state.params, probe)
    record["attention_jsd"] = diagnostics.attention_jsd(prev, cur)
    prev = cur
    progress_lib.check_finite(epoch + 1, {"mil_loss": record["loss"]})
    writer.write_scalars(epoch + 1, record)
    if verbose:
      prog.update(epoch + 1, record)
    ckpt.save(epoch + 1, state)  # Orbax decides: every checkpoint_every_epochs, and the last
  ckpt.wait()
  ckpt.close()
  writer.flush()
  return state


def _trained_spec(cfg) -> heads.HeadSpec:
  spec = heads.get_spec(cfg)
  if spec.nonparametric is not None:
    raise ValueError(f"head {cfg.head!r} is non-parametric (no gradient training): fit and "
                     "predict it with slamjax.mil.multihead.fit_predict")
  return spec


def fit(cfg, bags, labels, workdir: str, seed: int, verbose: bool = True) -> MilState:
  """Trains (or resumes) the head ``cfg.head``; checkpoints every
  ``cfg.checkpoint_every_epochs`` under ``workdir/mil_ckpt``.

  ``labels`` is [n] (one task) or [n, T] (multi-task; NaN = unknown). MECDS
  With ``cfg.class_balance`` every epoch resamples the bags so that each
  class counts equally (as the MECDS teacher does). MECDS
  first trains a teacher with class-balanced resampling
  (``workdir/mil_ckpt_teacher``), then the student with natural sampling and
  the AKD loss toward the frozen teacher.
  """
  cfg = options.resolve(cfg)
  spec = _trained_spec(cfg)
  labels2 = _as_2d(labels)
  num_tasks = labels2.shape[1]
  if spec.phases == ("train",):
    return _run_phase(cfg, spec, "train", bags, labels2, workdir, "mil_ckpt", seed, verbose,
                      num_tasks=num_tasks, balanced=bool(cfg.class_balance))
  m = cfg.mecds
  teacher = _run_phase(cfg, spec, "teacher", bags, labels2, workdir, "mil_ckpt_teacher",
                       seed, verbose, num_tasks=num_tasks, balanced=True,
                       epochs=m.teacher_epochs or cfg.epochs)
  init = teacher.params if m.student_init == "teacher" else None
  if m.student_init not in ("fresh", "teacher"):
    raise ValueError(f"mil.mecds.student_init={m.student_init!r}; valid: fresh, teacher")
  return _run_phase(cfg, spec, "student", bags, labels2, workdir, "mil_ckpt", seed + 1,
                    verbose, num_tasks=num_tasks, teacher_params=teacher.params,
                    init_params=init)


def _merge_tasks(old_params, new_params, new_names):
  inner = dict(old_params["params"])
  for name in new_names:
    inner[name] = new_params["params"][name]
  return dict(old_params, params=inner)


def _fresh_tasks(model, params, names, seed: int):
  """``params`` plus freshly initialised extension tasks ``names``."""
  keys = jax.random.split(jax.random.PRNGKey(seed), len(names))
  new = {n: mecds.init_extension_params(model, k) for n, k in zip(names, keys)}
  return _merge_tasks(params, {"params": new}, names)


def extend(cfg, state: MilState, bags, labels, workdir: str, seed: int,
           verbose: bool = True) -> MilState:
  """Adds ``labels``' task(s) to a trained MECDS head; trains only them.

  Each new task gets its own token, router gate, experts and head
  (``task_{k}``); every other parameter is frozen, and the old tasks'
  predictions are bitwise unchanged (see ``slamjax.mil.mecds``). Teacher
  phase (balanced resampling) then student phase (AKD), both on the new
  labels only; checkpoints under ``workdir/mil_ckpt_extend{T}[_teacher]``,
  metrics as phases ``extend{T}_teacher`` / ``extend{T}_student``.
  """
  cfg = options.resolve(cfg)
  spec = _trained_spec(cfg)
  if not spec.extensible:
    raise ValueError(f"head {cfg.head!r} does not support task extension (use mecds)")
  new = _as_2d(labels)
  t_old, k = state.num_tasks, new.shape[1]
  num_base = state.num_base if state.num_base is not None else t_old
  t_new = t_old + k
  names = [f"task_{t}" for t in range(t_old, t_new)]
  labels2 = np.concatenate([np.full((len(bags), t_old), np.nan, np.float32), new], 1)
  task_mask = np.arange(t_new) >= t_old
  frozen = lambda path: len(path) < 2 or path[1] not in names
  model = spec.build(cfg, t_new, num_base)
  fresh = lambda s: _fresh_tasks(model, state.params, names, s)
  m = cfg.mecds
  common = dict(num_tasks=t_new, num_base=num_base, frozen=frozen, task_mask=task_mask)
  teacher = _run_phase(cfg, spec, f"extend{t_old}_teacher", bags, labels2, workdir,
                       f"mil_ckpt_extend{t_old}_teacher", seed, verbose, balanced=True,
                       epochs=m.teacher_epochs or cfg.epochs, init_params=fresh(seed),
                       **common)
  init = teacher.params if m.student_init == "teacher" else fresh(seed + 1)
  student = _run_phase(cfg, spec, f"extend{t_old}_student", bags, labels2, workdir,
                       f"mil_ckpt_extend{t_old}", seed + 1, verbose,
                       teacher_params=teacher.params, init_params=init, **common)
  # set_to_zero keeps frozen leaves exact up to the sign of zero; restore them.
  return student.replace(params=_merge_tasks(state.params, student.params, names))


def predict(cfg, state: MilState, bags, num_tasks: int | None = None) -> dict:
  """Bag probabilities and attention, unpadded.

  Returns ``prob`` [n_bags, T], ``attention`` (per bag, the 1-D attention
  used to rank its cells) and, for heads with per-task attention,
  ``task_attention`` (per bag, [T, n_i]). Old-task columns of an extended
  MECDS head are computed by the base-group program alone.
  """
  cfg = options.resolve(cfg)
  spec = _trained_spec(cfg)
  num_tasks = state.num_tasks if num_tasks is None else num_tasks
  model = spec.build(cfg, num_tasks, state.num_base)
  apply_fn = _apply_fn(model)
  base_fn = None
  if state.num_base is not None and state.num_base < num_tasks:
    # The pre-extension model itself: the same compiled program as before
    # (the new tasks' parameters are passed but unused), so bitwise equal.
    base_fn = _apply_fn(spec.build(cfg, state.num_base, None))
  probs = np.zeros((len(bags), num_tasks), np.float32)
  attention, task_attention = [None] * len(bags), [None] * len(bags)
  dummy = np.zeros((len(bags), 1), np.float32)
  for idx, batch in padding.iterate_batches(bags, dummy, cfg.batch_size, min_len=cfg.min_len,
                                            per_octave=cfg.buckets_per_octave):
    out = jax.device_get(apply_fn(state.params, batch["x"], batch["mask"]))
    logits = np.array(out["logits"])
    if base_fn is not None:
      logits[:, :state.num_base] = np.asarray(
          base_fn(state.params, batch["x"], batch["mask"])["logits"])
    for j, b in enumerate(idx):
      n = len(bags[b])
      probs[b] = 1 / (1 + np.exp(-logits[j]))
      attention[b] = np.asarray(out["attention"][j][:n])
      if "task_attention" in out:
        task_attention[b] = np.asarray(out["task_attention"][j][:, :n])
  result = {"prob": probs, "attention": attention}
  if task_attention[0] is not None:
    result["task_attention"] = task_attention
  return result
