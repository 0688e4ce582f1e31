"""Input checks shared by every transform: the task axis and task weights.

Errors name the offending leaf and say how to fix the call, including the
composition mistake that strips the task axis before the surgery sees it:
``optax.MultiSteps`` wrapping a chain that starts with surgery.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

TASK_AXIS_HINT = (
    "Surgery transforms expect per-task gradients with a leading task axis on "
    "every leaf, shape (T, *param.shape) (e.g. jax.jacrev(task_losses)(params) "
    "for a loss vector, or jnp.stack of per-task grads), and must come first "
    "in optax.chain.")

ACCUMULATION_HINT = (
    "optax.MultiSteps cannot wrap a chain that starts with surgery: it "
    "accumulates updates shaped like the parameters, without the task axis. "
    "Put it inside the chain, after the surgery: optax.chain(surgery.X(...), "
    "optax.MultiSteps(opt, k).gradient_transformation()) (optax.apply_every "
    "too), which averages the combined updates of k micro-batches; for "
    "surgery on accumulated gradients, sum the per-task gradients before the "
    "update instead.")


def _where(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _params_shaped(name: str, with_path, params) -> None:
  """Raises if every update leaf has exactly its parameter's shape."""
  p_leaves = jax.tree_util.tree_leaves(params)
  if len(p_leaves) != len(with_path):
    return
  shapes = [(tuple(jnp.shape(l)), tuple(jnp.shape(p)))
            for (_, l), p in zip(with_path, p_leaves)]
  if all(u == p for u, p in shapes):
    path, leaf = with_path[0]
    raise ValueError(
        f"surgery.{name}: the updates have the parameters' shapes, with no "
        f"task axis (leaf {_where(path)} has shape {jnp.shape(leaf)}, as its "
        f"parameter). {ACCUMULATION_HINT} {TASK_AXIS_HINT}")


def check_task_axis(name: str, updates: Any, params: Any,
                    num_tasks: Optional[int]):
  """Returns ``(leaves, treedef, T)``; raises ``ValueError`` naming a leaf.

  ``T`` is ``None`` for a tree without leaves (e.g. everything masked out by
  ``optax.partition``).
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(updates)
  if not with_path:
    return [], treedef, None
  if params is not None:
    _params_shaped(name, with_path, params)
  first_path, t = None, None
  for path, leaf in with_path:
    shape = jnp.shape(leaf)
    if len(shape) < 1:
      raise ValueError(
          f"surgery.{name}: update leaf {_where(path)} has shape {shape}, "
          f"with no leading task axis. {TASK_AXIS_HINT}")
    if t is None:
      first_path, t = _where(path), shape[0]
    elif shape[0] != t:
      raise ValueError(
          f"surgery.{name}: inconsistent task axis: update leaf "
          f"{_where(path)} has {shape[0]} tasks (shape {shape}) but leaf "
          f"{first_path} has {t}. {TASK_AXIS_HINT} {ACCUMULATION_HINT}")
  if params is not None:
    p_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    if len(p_with_path) == len(with_path):
      for (path, leaf), (_, p) in zip(with_path, p_with_path):
        if tuple(jnp.shape(leaf)[1:]) != tuple(jnp.shape(p)):
          raise ValueError(
              f"surgery.{name}: update leaf {_where(path)} has shape "
              f"{jnp.shape(leaf)} but the parameter has shape "
              f"{jnp.shape(p)}; expected (T, *param.shape). {TASK_AXIS_HINT}")
  if num_tasks is not None and t != num_tasks:
    raise ValueError(
        f"surgery.{name}: built with num_tasks={num_tasks} but the updates "
        f"have {t} tasks on their leading axis (leaf {first_path}). "
        f"{ACCUMULATION_HINT}")
  return [jnp.asarray(leaf) for _, leaf in with_path], treedef, t


def task_weight_vector(name: str, task_weights: Any, t: int,
                       dtype) -> Optional[jax.Array]:
  """The ``task_weights`` extra argument as a ``(T,)`` array (or ``None``)."""
  if task_weights is None:
    return None
  c = jnp.asarray(task_weights, dtype)
  if c.shape != (t,):
    raise ValueError(f"surgery.{name}: task_weights has shape {c.shape}, "
                     f"expected ({t},).")
  return c
