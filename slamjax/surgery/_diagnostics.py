"""Loggable diagnostics of the surgery states inside any optax state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slamjax.surgery._weighted import SurgeryState


def _find_states(opt_state) -> list[SurgeryState]:
  found = jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, SurgeryState))
  return [s for s in found if isinstance(s, SurgeryState)]


def _state_diagnostics(s: SurgeryState) -> dict[str, jax.Array]:
  out = {"weights": s.weights, "norm_ratio": s.norm_ratio}
  if s.cosine is None:  # built with diagnostics=False
    return out
  t = s.cosine.shape[0]
  if t >= 2:
    iu = np.triu_indices(t, k=1)
    pairs = s.cosine[iu]
    cos_mean, cos_min = jnp.mean(pairs), jnp.min(pairs)
  else:
    cos_mean = cos_min = jnp.zeros((), jnp.float32)
  return {"cos_mean": cos_mean, "cos_min": cos_min, "cosine": s.cosine,
          "num_conflicts": s.num_conflicts, **out}


def diagnostics(opt_state: Any) -> dict[str, jax.Array]:
  """Loggable diagnostics of the surgery state(s) inside any optax state.

  Searches ``opt_state`` (a chain tuple, ``optax.partition``/``masked``
  state, ``named_chain`` dict, ...) for :class:`SurgeryState` instances. Works
  inside and outside ``jax.jit``.

  Returns:
    ``{}`` if there is no surgery state. For one state, the scalars
    ``cos_mean`` and ``cos_min`` (mean/min pairwise cosine over pairs ``i <
    j``, 0 if ``T < 2``), ``num_conflicts`` (int32) and ``norm_ratio``
    (``||out|| / ||sum_t g_t||``), and the arrays ``cosine`` ``(T, T)`` and
    ``weights`` ``(T,)``. (Per-task gradient norms are in the state,
    ``SurgeryState.task_norms``.) A transform built with
    ``diagnostics=False`` (the default of ``sum_tasks``/``mean_tasks``)
    gives only ``weights`` and ``norm_ratio``. With several surgery states
    the keys of the
    ``i``-th one (in tree order) are prefixed ``f"{i}/"``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from slamjax import surgery
    >>> tx = optax.chain(surgery.pcgrad(key=0, num_tasks=2), optax.sgd(0.1))
    >>> params = {'w': jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {'w': jnp.array([[1., 0.], [-1., 1.]])}
    >>> _, state = jax.jit(tx.update)(g, state, params)
    >>> d = surgery.diagnostics(state)
    >>> int(d['num_conflicts']), [round(float(w), 4) for w in d['weights']]
    (1, [2.0, 1.5])
  """
  states = _find_states(opt_state)
  if len(states) == 1:
    return _state_diagnostics(states[0])
  out = {}
  for i, s in enumerate(states):
    out.update({f"{i}/{k}": v for k, v in _state_diagnostics(s).items()})
  return out
