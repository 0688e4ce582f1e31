r"""Images/s into the train step: slamjax's tf.data pipeline vs a PyTorch DataLoader.

Both sides read the same PBC JPEG files in the same shuffled order, decode
them, resize to ``--image_size`` and make ``--views`` augmented views per
image with the reference ops (random crop to 7/8, horizontal flip, colour
jitter 0.1 with p=0.8 in the order brightness, contrast, saturation, YIQ hue,
rot90 with p=0.8, normalisation), with ``--workers`` workers each: tf.data
decode threads + a thread pool of that size, or DataLoader worker processes.
Each batch is then made a global jax array sharded over the mesh and fed to
a jitted stand-in train step, which is waited on. Rounds alternate between the
two pipelines; the best round of each is reported, with the ratio.

``--mode=device`` instead times the input of ``slamjax.pretrain``'s on-device
augmentation: decode + resize to uint8 on the host, augmentation inside the
jitted step (both sides feed the same step).

  python benchmarks/input_pipeline.py                      # PBC, 64 px, 2 workers
  python benchmarks/input_pipeline.py --image_size=128 --workers=4

Needs torch (``pip install torch==2.13.0``; not a runtime dependency of
slamjax). torchvision is not used: the torch augmentations are plain torch ops.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slamjax import sharding  # noqa: E402
from slamjax.data import augment as jax_augment  # noqa: E402
from slamjax.data import folder  # noqa: E402
from slamjax.data import input_pipeline as ip  # noqa: E402

PBC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                   "data", "pbc")
MEAN, STD = (0.8556, 0.7294, 0.7165), (0.1744, 0.1983, 0.0860)
RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                    [0.211, -0.523, 0.312]], np.float32)


# ------------------------------------------------------------------ torch side
class TorchCells:
  """A map-style dataset: PIL decode + resize, augmentation in plain torch ops."""

  def __init__(self, paths, image_size, crop, views, augment):
    self.paths, self.size, self.crop = paths, image_size, crop
    self.views, self.augment = views, augment

  def __len__(self):
    return len(self.paths)

  def _view(self, x, torch):
    s, crop = 0.1, self.crop
    top = int(torch.randint(0, self.size - crop + 1, ()))
    left = int(torch.randint(0, self.size - crop + 1, ()))
    x = x[top:top + crop, left:left + crop]
    if torch.rand(()) < 0.5:
      x = torch.flip(x, (1,))
    if torch.rand(()) < 0.8:
      f = lambda: 1 - s + 2 * s * float(torch.rand(()))
      gray = torch.tensor([0.299, 0.587, 0.114])
      x = x * f()
      m = (x @ gray).mean()
      x = (x - m) * f() + m
      g = (x @ gray)[..., None]
      x = (x - g) * f() + g
      th = 2 * np.pi * s * (2 * float(torch.rand(())) - 1)
      rot = np.array([[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])
      mix = torch.from_numpy((np.linalg.inv(RGB2YIQ) @ rot @ RGB2YIQ).astype(np.float32))
      x = (x @ mix.T).clamp(0, 1)
    if torch.rand(()) < 0.8:
      x = torch.rot90(x, int(torch.randint(1, 4, ())), (0, 1))
    return (x - torch.tensor(MEAN)) / torch.tensor(STD)

  def __getitem__(self, i):
    import torch
    from PIL import Image
    with Image.open(self.paths[i]) as img:
      img = img.convert("RGB")
      if img.size != (self.size, self.size):
        img = img.resize((self.size, self.size), Image.BILINEAR)
      x = torch.from_numpy(np.asarray(img).copy())
    if not self.augment:
      return x
    x = x.float() / 255.0
    return torch.stack([self._view(x, torch) for _ in range(self.views)])


def torch_batches(paths, order, args, augment):
  import torch
  # DataLoader forks its workers (the Linux default); they never touch JAX.
  warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
  data = TorchCells(paths, args.image_size, args.crop, args.views, augment)
  sampler = [int(i) for i in order]
  loader = torch.utils.data.DataLoader(
      data, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
      drop_last=True, persistent_workers=False, prefetch_factor=4,
      generator=torch.Generator().manual_seed(0))
  for batch in loader:
    yield batch.numpy()


# ------------------------------------------------------------------ timing
def run(name, batches, mesh, step, num_batches, warmup=2):
  n = 0
  for i, batch in enumerate(batches):
    if i == warmup:
      start = time.perf_counter()
    if not isinstance(batch, jax.Array):
      batch = ip.to_global(mesh, {"x": batch})["x"]
    out = step(batch)
    if i >= warmup:
      n += batch.shape[0]
    if i + 1 == warmup + num_batches:
      break
  jax.block_until_ready(out)
  rate = n / (time.perf_counter() - start)
  print(f"  {name:<34} {rate:8.0f} images/s", flush=True)
  return rate


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", default=PBC)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--views", type=int, default=2)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--num_batches", type=int, default=16)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--mode", choices=["host", "device"], default="host")
  args = p.parse_args()
  args.crop = args.image_size * 7 // 8

  index = folder.scan_folder(args.root)
  paths = index.abspaths()
  need = (args.num_batches + 2) * args.batch_size
  fn = ip.epoch_index_fn(len(paths), args.batch_size, seed=0)
  order = np.concatenate([fn(s)["image"] for s in range(need // args.batch_size)])
  mesh = sharding.make_mesh(-1)
  host = args.mode == "host"
  aug = dict(crop_size=args.crop, flip=True, jitter_strength=0.1, jitter_prob=0.8,
             rot90_prob=0.8, mean=MEAN, std=STD)

  if host:  # the train step receives finished views
    step = jax.jit(lambda x: jnp.mean(x, axis=(0, 1, 2, 3, 4)))
  else:  # the train step augments uint8 images (slamjax.pretrain's path)
    def step(x):
      keys = jax.random.split(jax.random.key(0), args.views)
      v = [jax_augment.augment_batch(k, x, args.crop, mean=MEAN, std=STD) for k in keys]
      return jnp.mean(jnp.stack(v), axis=(0, 1, 2, 3))
    step = jax.jit(step)

  def tf_batches():
    views = {"image": ("augment",) * args.views} if host else None
    for b in ip.global_batches(paths, fn, mesh, keys=("image",), image_size=args.image_size,
                               seed=0, views=views, augment=aug, num_steps=need // args.batch_size,
                               num_parallel_calls=args.workers):
      yield b["image"]

  print(f"{len(paths)} files in {args.root}; {args.image_size} px -> {args.views} "
        f"view(s) of {args.crop} px; batch {args.batch_size}; {args.workers} workers; "
        f"mode={args.mode}; {jax.device_count()} {jax.default_backend()} device(s); "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
  best = {"tf.data (slamjax)": 0.0, "torch DataLoader": 0.0}
  for r in range(args.rounds):
    print(f"round {r + 1}:", flush=True)
    best["tf.data (slamjax)"] = max(best["tf.data (slamjax)"], run(
        "tf.data (slamjax)", tf_batches(), mesh, step, args.num_batches))
    best["torch DataLoader"] = max(best["torch DataLoader"], run(
        "torch DataLoader", torch_batches(paths, order, args, host), mesh, step,
        args.num_batches))
  ratio = best["tf.data (slamjax)"] / best["torch DataLoader"]
  print(f"best: tf.data {best['tf.data (slamjax)']:.0f} images/s, torch "
        f"{best['torch DataLoader']:.0f} images/s; ratio tf.data/torch = {ratio:.2f} "
        f"(load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
  main()
