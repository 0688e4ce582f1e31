"""Every head: a bag padded to any length gives the same outputs and gradients
of the full training loss (head terms, AEM, ASMIL anchor KD, MECDS AKD).

Run in float64: padding is mathematically exact, but in float32 a reduction
over 11 or 32 entries (zeros included) groups its partial sums differently,
which alone moves large MECDS gradients by ~1e-5 relative. In float64 that
rounding is ~1e-14, so agreement to 1e-6 tests the masking, not the rounding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamjax.mil import heads, options
from slamjax.mil import train as mil_train
from slamjax.mil import spec as spec_lib

CASES = {
    # name: (config overrides, tasks, base tasks, valid instances)
    # ABMIL with the AEM regulariser (top-k variant, cosine weight)
    "abmil": (dict(aem_weight=0.1, aem_top_k=4, aem_schedule="cosine"), 1, None, 11),
    # official variant, multi-label with an unknown label; k_sample 8 > 5
    # valid instances: masked top-k with padded picks (slamags: toy test)
    "pamil": (dict(pamil=dict(variant="official", num_protos=4, inst_weight=0.5)), 3, None, 5),
    "asmil": (dict(asmil=dict(n_token=4, n_drop=1, num_heads=2, kd_reduction="reference_mean")),
              1, None, 11),
    # two layers (instance attention + routing), 2 base tasks + 1 extension task
    "mecds": (dict(mecds=dict(num_layers=2, num_heads=2)), 3, 2, 11),
}


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("head", sorted(CASES))
def test_padding_invariance(head, cfg_for, x64):
  over, num_tasks, num_base, n = CASES[head]
  cfg = options.resolve(cfg_for(head, **over))
  spec = heads.get_spec(cfg)
  model = spec.build(cfg, num_tasks, num_base)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, n, 8)).astype(np.float32)
  x[0, :2] += 3.0
  label = np.array([[1.0, 0.0, np.nan][:num_tasks]], np.float64)
  x = x.astype(np.float64)

  @jax.jit
  def init(x):  # jitted: eager init compiles op by op
    params = model.init(jax.random.key(0), x, jnp.ones(x.shape[:2], bool))
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    return params, jax.tree.map(lambda p: p + 0.05 * jnp.sin(13.0 * p + 1.0), params)

  params, other = init(x)
  # MECDS's AKD is a function of the logits alone (checked below); leaving the
  # teacher out halves what this test compiles.
  ctx = spec_lib.AuxContext(anchor_params=other,
                            teacher_params=None if head == "mecds" else other)
  loss_fn = mil_train.make_loss_fn(cfg, spec, model, np.ones(num_tasks, bool), 100,
                                   with_outputs=True)

  @jax.jit
  def run(xp, mask):
    batch = dict(x=xp, mask=mask, label=jnp.asarray(label), weight=jnp.ones((1,)))
    (_, (terms, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, jax.random.key(3), ctx, jnp.int32(7))
    return terms, grads, out  # training-mode outputs (dropout 0, token drop keyed)

  def padded(length, fill):
    xp = np.full((1, length, 8), fill, np.float64)
    xp[:, :n] = x
    return run(xp, np.arange(length)[None] < n)

  ref_terms, ref_grads, ref_out = padded(n, 0.0)
  assert len(ref_terms) >= (2 if head == "mecds" else 3)  # loss, bce, head/AEM terms
  for length, fill in ((32, 100.0), (32, -7.0)):
    terms, grads, out = padded(length, fill)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6)
    for k in ref_terms:
      close(terms[k], ref_terms[k], err_msg=k)
    close(out["logits"], ref_out["logits"])
    close(out["attention"][:, :n], ref_out["attention"])
    assert np.all(np.asarray(out["attention"])[:, n:] == 0)
    close(out["attention_rows"][..., :n], ref_out["attention_rows"])
    if "task_attention" in ref_out:
      close(out["task_attention"][..., :n], ref_out["task_attention"])
    jax.tree.map(close, grads, ref_grads)
