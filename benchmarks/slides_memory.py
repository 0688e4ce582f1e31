r"""Peak memory and time to load and embed a large slide cohort.

  python -m slamjax.data.make_cohort --out /tmp/big --source pbc --reuse \
      --patients 1145 --min_cells 120 --max_cells 250 --image_size 64
  python benchmarks/slides_memory.py --root /tmp/big --cache_dir /tmp/big_cache

Loads the cohort with the slides config (``data.image_size=64``), then embeds
every cell with a randomly initialised encoder (the cost of embedding does
not depend on the weights), and prints the wall time of each phase, whether
the decoded-cell cache was hit, and the peak RSS of the process. Run it twice:
the second run reads the cache instead of decoding.
"""

import argparse
import resource
import time

import numpy as np

from slamjax import config as config_lib
from slamjax import encoder
from slamjax import runtime
from slamjax import sharding
from slamjax.data import slides as slides_lib
from slamjax.slides import fold_run


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--root", required=True)
  p.add_argument("--cache_dir", default="")
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--embed_batch", type=int, default=256)
  args = p.parse_args()
  runtime.setup()
  cfg = config_lib.load("slides")
  cfg.data.root, cfg.data.cache_dir = args.root, args.cache_dir
  cfg.data.image_size = args.image_size
  cfg.embed.batch_size = args.embed_batch
  cfg.pretrain.epochs = 0  # random init: load_encoder builds it without a checkpoint
  t0 = time.perf_counter()
  cohort = slides_lib.load_cohort(cfg.data)
  t_load = time.perf_counter() - t0
  print(f"load: {cohort.summary()}; {t_load:.1f} s; peak RSS {peak_rss_gib():.2f} GiB",
        flush=True)
  mesh = sharding.make_mesh(-1)
  model, state = encoder.load(cfg, "/nonexistent", mesh)
  t0 = time.perf_counter()
  emb = fold_run.embed_slides(cfg, model, state, cohort, np.arange(len(cohort.slide_ids)), mesh)
  t_embed = time.perf_counter() - t0
  n = sum(len(e) for e in emb)
  print(f"embed: {n} cells -> dim {emb[0].shape[1]} in {t_embed:.1f} s "
        f"({n / t_embed:.0f} cells/s); peak RSS {peak_rss_gib():.2f} GiB", flush=True)
  print(f"cache_hit={cohort.report['cache_hit']} load_s={t_load:.1f} embed_s={t_embed:.1f} "
        f"peak_rss_gib={peak_rss_gib():.2f}")


if __name__ == "__main__":
  main()
