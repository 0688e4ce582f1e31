"""No N x N intermediate in ABMIL, PAMIL or ASMIL training (forward+backward),
checked on the jaxpr at N = 4096 (tracing only, nothing is compiled); MECDS's
full instance self-attention is the positive control."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamjax.mil import heads, options
from slamjax.mil import train as mil_train
from slamjax.mil import spec as spec_lib

N = 4096


def _avals(jaxpr):
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield getattr(v.aval, "shape", ())
    for p in eqn.params.values():
      for q in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(q, "jaxpr", q)
        if hasattr(inner, "eqns"):
          yield from _avals(inner)


def largest_square(head, **over):
  """Max number of axes of size >= N in any value of the training step."""
  cfg = options.resolve(dict(head=head, hidden_dim=16, attention_dim=8, **over))
  spec = heads.get_spec(cfg)
  model = spec.build(cfg, 1, None)
  x = jax.ShapeDtypeStruct((1, N, 32), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, N), jnp.bool_)
  params = jax.eval_shape(model.init, jax.random.key(0), x, mask)
  loss_fn = mil_train.make_loss_fn(cfg, spec, model, np.ones(1, bool), 10)
  batch = dict(x=x, mask=mask, label=jax.ShapeDtypeStruct((1, 1), jnp.float32),
               weight=jax.ShapeDtypeStruct((1,), jnp.float32))
  jaxpr = jax.make_jaxpr(lambda p, b: jax.value_and_grad(loss_fn, has_aux=True)(
      p, b, jax.random.key(1), spec_lib.AuxContext(anchor_params=p, teacher_params=p),
      0))(params, batch)
  return max(sum(d >= N for d in s) for s in _avals(jaxpr.jaxpr))


@pytest.mark.parametrize("head,over", [
    ("abmil", dict(aem_weight=0.1, aem_top_k=100)),
    ("pamil", dict(pamil=dict(inst_weight=0.5))),
    ("asmil", dict(asmil=dict(n_token=4, n_drop=1, num_heads=2))),
    ("mecds", dict(mecds=dict(num_layers=2, num_heads=2, instance_attention="none"))),
])
def test_no_n_by_n_intermediate(head, over):
  assert largest_square(head, **over) == 1


def test_checker_sees_self_attention():
  assert largest_square("mecds", mecds=dict(num_layers=2, num_heads=2)) == 2
