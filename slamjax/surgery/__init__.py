"""Multi-task gradient surgery as optax transformations.

Every transform takes updates whose leaves carry a leading task axis,
``(T, *param.shape)`` (per-task gradients, e.g. ``jax.jacrev`` of a loss
vector), and returns one combined update with the parameter shapes. Put it
**first** in ``optax.chain``. ``optax.MultiSteps`` goes inside the chain,
after it (``optax.chain(surgery.X(...), optax.MultiSteps(opt,
k).gradient_transformation())``: surgery per micro-batch, their combined
updates averaged), never around it; for surgery on accumulated gradients,
sum the per-task gradients before the update.

>>> import jax, jax.numpy as jnp, optax
>>> from slamjax import surgery
>>> params = {'w': jnp.ones(3)}
>>> def task_losses(p):            # two tasks -> loss vector of shape (2,)
...   return jnp.stack([jnp.sum(p['w'] ** 2), -jnp.sum(p['w'])])
>>> tx = optax.chain(surgery.adaptive_pcgrad(key=0, num_tasks=2), optax.sgd(0.1))
>>> @jax.jit
... def train_step(params, state):
...   grads = jax.jacrev(task_losses)(params)      # leaves shaped (2, 3)
...   updates, state = tx.update(grads, state, params)
...   return optax.apply_updates(params, updates), state
>>> state = tx.init(params)
>>> params, state = train_step(params, state)
>>> sorted(surgery.diagnostics(state))
['cos_mean', 'cos_min', 'cosine', 'norm_ratio', 'num_conflicts', 'weights']

Methods: :func:`sum_tasks`, :func:`mean_tasks`, :func:`pcgrad`,
:func:`adaptive_pcgrad` (SLAM-AGS), :func:`gradvac`, :func:`cagrad`,
:func:`mgda`, :func:`imtl_g`, :func:`aligned_mtl`, :func:`upgrad`,
:func:`nash_mtl`; by name with :func:`get`. Helpers: :func:`shared_only`
(surgery on shared parameters, heads summed), :func:`diagnostics`,
:func:`gram_weighted` (write your own weighting), :func:`gram_matrix`,
:func:`task_orders`, :func:`reduce_tasks`, :func:`apply_if_finite` (optax's,
able to wrap a chain that starts with surgery).

Non-finite gradients: NaN or inf anywhere in the input gives a NaN update
(everywhere, or only in the affected coordinates for ``sum``/``mean``), which
``apply_if_finite`` rejects; no method falls back to a finite-looking
update. Diagnostics: every method but ``sum``/``mean`` forms the Gram matrix
anyway and records cosines and conflicts for free; ``sum``/``mean`` only
with ``diagnostics=True``.

This package imports only jax, numpy and optax.
"""

from slamjax.surgery._aligned_mtl import aligned_mtl
from slamjax.surgery._cagrad import cagrad
from slamjax.surgery._diagnostics import diagnostics
from slamjax.surgery._gradvac import gradvac
from slamjax.surgery._gram import gram_matrix
from slamjax.surgery._imtl import imtl_g
from slamjax.surgery._mgda import mgda
from slamjax.surgery._nash_mtl import nash_mtl
from slamjax.surgery._partition import shared_only
from slamjax.surgery._pcgrad import adaptive_pcgrad, pcgrad, task_orders
from slamjax.surgery._registry import get, names
from slamjax.surgery._simple import mean_tasks, sum_tasks
from slamjax.surgery._upgrad import upgrad
from slamjax.surgery._weighted import SurgeryState, WeightingContext, gram_weighted
from slamjax.surgery._wrappers import apply_if_finite, reduce_tasks

__all__ = [
    "SurgeryState",
    "WeightingContext",
    "adaptive_pcgrad",
    "aligned_mtl",
    "apply_if_finite",
    "cagrad",
    "diagnostics",
    "get",
    "gradvac",
    "gram_matrix",
    "gram_weighted",
    "imtl_g",
    "mean_tasks",
    "mgda",
    "names",
    "nash_mtl",
    "pcgrad",
    "reduce_tasks",
    "shared_only",
    "sum_tasks",
    "task_orders",
    "upgrad",
]
