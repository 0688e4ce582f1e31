"""Surgery on sharded gradients (4 simulated CPU devices, in a subprocess).

JAX >= 0.9 meshes default to Explicit axes, where contracting a sharded
parameter dimension (the Gram matrix with FSDP-style sharded gradients) must
name its output sharding. Results must equal the single-device ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_CODE = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from slamjax import surgery
    assert jax.device_count() == 4
    rng = np.random.default_rng(0)
    params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4), "s": jnp.zeros(())}
    g = jax.tree.map(lambda p: rng.standard_normal((3, *p.shape)).astype(
        np.float32), params)
    for name in ("mgda",):
      tx = optax.chain(surgery.get(name, key=0, num_tasks=3), optax.sgd(0.1))
      ref, _ = jax.jit(tx.update)(g, tx.init(params), params)
      for axis_type in (jax.sharding.AxisType.Explicit,
                        jax.sharding.AxisType.Auto):
        mesh = jax.make_mesh((4,), ("x",), axis_types=(axis_type,))
        with jax.set_mesh(mesh):
          ns = lambda *s: NamedSharding(mesh, P(*s))
          p_sh = {"w": ns(None, "x"), "b": ns("x"), "s": ns()}
          g_sh = {"w": ns(None, None, "x"), "b": ns(None, "x"), "s": ns()}
          for gs, ps in ((g_sh, p_sh),):
            pp, gg = jax.device_put(params, ps), jax.device_put(g, gs)
            state = jax.jit(tx.init)(pp)
            out, state = jax.jit(tx.update)(gg, state, pp)
            for k in out:
              np.testing.assert_allclose(out[k], ref[k], atol=1e-6)
            if axis_type == jax.sharding.AxisType.Explicit:  # kept as is
              assert out["w"].sharding.is_equivalent_to(pp["w"].sharding, 2)
    print("OK")
""")


def test_sharded_gradients_match_single_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  res = subprocess.run([sys.executable, "-c", _CODE], capture_output=True,
                       text=True, env=env, timeout=300)
  assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
