"""Two processes on localhost (gloo CPU collectives) train like one process.

Launches ``jax.distributed`` workers through ``slamjax.distributed`` (one CPU
device each), runs 3 SLAM-AGS steps of ``slamjax.pretrain.make_train_step``
on the same global batches as a single process with two CPU devices, and
checks that the parameters and BatchNorm statistics agree.

Run as a script it is the worker: ``multiprocess_test.py OUT [PROCESS_ID]``.
"""

import os
import sys

import numpy as np

from tests.distributed import launch

STEPS = 3


def test_two_processes_match_one_process(tmp_path):
  port = launch.free_port()
  script = os.path.abspath(__file__)
  procs = [launch.start([script, str(tmp_path / "single.npz")], JAX_NUM_CPU_DEVICES="2")]
  procs += [launch.start([script, str(tmp_path / f"multi{pid}.npz")],
                         **launch.process_env(port, pid)) for pid in range(2)]
  logs = launch.communicate(procs)
  assert "processes=2 devices=2" in logs[1], logs[1][-2000:]
  single = np.load(tmp_path / "single.npz")
  for pid in range(2):
    multi = np.load(tmp_path / f"multi{pid}.npz")
    assert sorted(multi.files) == sorted(single.files)
    for k in single.files:
      scale = max(float(np.abs(single[k]).max()), 1e-3)
      np.testing.assert_allclose(multi[k], single[k], atol=2e-5 * scale, rtol=1e-4,
                                 err_msg=k)
  # Training moved the parameters (the comparison is not of initial values).
  assert float(single["loss_0"]) != float(single[f"loss_{STEPS - 1}"])


def _worker(out_path: str) -> None:
  from slamjax import distributed
  distributed.initialize()  # reads SLAMJAX_*; a no-op for the single run
  import flax
  import jax
  from configs import default
  from slamjax import pretrain, sharding

  cfg = default.get_config("quick")
  mesh = sharding.make_mesh(-1)
  print(f"processes={jax.process_count()} devices={jax.device_count()}", flush=True)
  model, tx, _ = pretrain.build(cfg, steps_per_epoch=10)
  size = cfg.data.image_size
  state = pretrain.init_state(cfg, model, tx, mesh, image_size=size)
  step = pretrain.make_train_step(cfg, model, tx, mesh)
  rng = np.random.RandomState(0)
  half = cfg.pretrain.batch_size // 2
  out = {}
  for i in range(STEPS):  # every process builds the same global batch
    imgs = rng.randint(0, 256, (2 * half, size, size, 3)).astype(np.uint8)
    batch = sharding.shard_batch(mesh, {"pos": imgs[:half], "neg": imgs[half:]})
    state, metrics = step(state, batch)
    out[f"loss_{i}"] = distributed.fetch_replicated(metrics["loss"])
  host = distributed.fetch_replicated({"params": state.params,
                                       "batch_stats": state.batch_stats})
  for k, v in flax.traverse_util.flatten_dict(host, sep="/").items():
    out[k] = v
  np.savez(out_path, **out)
  distributed.shutdown()


if __name__ == "__main__":
  _worker(sys.argv[1])
