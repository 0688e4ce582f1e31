"""Decodes image files once into a uint8 disk cache and memory-maps it.

``load_images(paths, image_size, cache_dir=...)`` returns the decoded cells
as a read-only ``np.memmap`` of shape ``[N, S, S, 3]`` whose row ``i`` is
``paths[i]``. The cache file is keyed by a hash of the (sorted, absolute) file
list, every file's size and mtime, ``image_size`` and ``DECODER_VERSION``, so
a rerun on unchanged files opens the memmap without decoding, and touching,
adding or removing any file makes a new cache entry.

Decoding runs on a thread pool (PIL releases the GIL) in chunks that are
appended to a temporary ``.npy`` file; only a chunk is ever in RAM, so RAM
does not bound the cohort. The temporary file is renamed into place when it
is complete, so a killed run never leaves a half-written cache behind, and
two processes that decode the same files at once both end with a valid file.

Files that do not decode get a zero row; their indices and reasons are kept
in the cache's ``.json`` sidecar (so a cache hit still knows them) and
returned in ``CachedImages.bad``. The caller decides whether that is an
error.

``decode_cell`` is the single-image decoder: any mode (grayscale, RGBA/LA/
palette with transparency are composited on white, 16-bit and 32-bit
integer images are scaled by 255/65535, float images by 255) -> RGB uint8,
centre-cropped to a square and resized to ``image_size`` (antialiased
bilinear). JPEGs are decoded at reduced DCT scale when they are at least
twice ``image_size`` (``Image.draft``), which is several times faster.

Example:
  >>> import os, tempfile
  >>> from PIL import Image
  >>> d = tempfile.mkdtemp()
  >>> paths = []
  >>> for i in range(3):
  ...   paths.append(os.path.join(d, f"{i}.png"))
  ...   Image.new("RGB", (30, 20), (10 * i, 0, 0)).save(paths[-1])
  >>> out = load_images(paths, 8, cache_dir=os.path.join(d, "cache"), log=None)
  >>> out.images.shape, out.cache_hit, out.decoded, int(out.images[2, 0, 0, 0])
  ((3, 8, 8, 3), False, 3, 20)
  >>> again = load_images(paths, 8, cache_dir=os.path.join(d, "cache"), log=None)
  >>> again.cache_hit, again.decoded
  (True, 0)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from slamjax.data import folder

# Bump when decode_cell's output changes, so old caches are not reused.
DECODER_VERSION = 1

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class CacheError(ValueError):
  """The cache folder cannot be used (not writable, disk full)."""


def default_cache_dir(cache_dir: str = "") -> str:
  """``cache_dir`` if set, else ``$SLAMJAX_CACHE``, else ``~/.cache/slamjax``."""
  if cache_dir:
    return os.path.expanduser(cache_dir)
  return os.environ.get("SLAMJAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "slamjax")


def _to_rgb(img: Image.Image) -> Image.Image:
  mode = img.mode
  if mode in _SIXTEEN_BIT or mode == "F":
    # PIL's own convert("L") clips 16-bit values at 255 (a dim 12-bit image
    # turns white); scale by the container's full range instead. A fixed
    # scale, not each image's max, keeps brightness comparable across cells.
    a = np.asarray(img).astype(np.float64)
    a = a * (255.0 if mode == "F" else 255.0 / 65535.0)
    a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB")
  if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
    # Transparent background -> white (a slide background), not black.
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    bg.alpha_composite(rgba)
    return bg.convert("RGB")
  return img if mode == "RGB" else img.convert("RGB")


def decode_cell(data: bytes, image_size: int, name: str = "<bytes>",
                center_crop: float = 1.0) -> np.ndarray:
  """Decodes image bytes of any mode to uint8 ``[image_size, image_size, 3]``:
  the central square, of which the central ``center_crop`` fraction of the
  side is kept, resized to ``image_size``.

  Raises:
    folder.BadFileError: naming ``name`` if the bytes do not decode.

  Example:
    >>> import io, numpy as np
    >>> from PIL import Image
    >>> buf = io.BytesIO()
    >>> Image.fromarray(np.full((6, 10), 65535, np.uint16)).save(buf, "TIFF")
    >>> decode_cell(buf.getvalue(), 4)[0, 0].tolist()
    [255, 255, 255]
  """
  try:
    with Image.open(io.BytesIO(data)) as img:
      need = int(np.ceil(image_size / center_crop))
      if img.format == "JPEG" and min(img.size) >= 2 * need:
        img.draft(None, (need, need))  # DCT-domain downscale
      img.load()  # truncated/corrupt data fails here, not lazily later
      img = _to_rgb(img)
  except Image.UnidentifiedImageError:
    raise folder.BadFileError(name, "cannot decode image (not a recognised "
                              "image format)") from None
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
    raise folder.BadFileError(
        name, f"cannot decode image ({type(e).__name__}: {e})") from None
  w, h = img.size
  if w != h:
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
  if center_crop < 1.0:
    s = img.size[0]
    k = max(1, int(round(s * center_crop)))
    off = (s - k) // 2
    img = img.crop((off, off, off + k, off + k))
  if img.size != (image_size, image_size):
    img = img.resize((image_size, image_size), Image.BILINEAR)
  return np.asarray(img, np.uint8)


def cache_key(paths: Sequence[str], image_size: int, center_crop: float = 1.0) -> str:
  """Hash of (paths, their sizes and mtimes, image_size, center_crop, decoder version)."""
  crop = "" if center_crop == 1.0 else f"|crop{center_crop!r}"
  h = hashlib.sha256(f"v{DECODER_VERSION}|{image_size}{crop}|{len(paths)}\n".encode())
  for p in paths:
    try:
      st = os.stat(p)
      h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
      h.update(f"{p}\0missing\n".encode())
  return h.hexdigest()[:40]


@dataclasses.dataclass(frozen=True)
class CachedImages:
  """Result of ``load_images``.

  Attributes:
    images: read-only uint8 memmap ``[N, S, S, 3]``, row i = ``paths[i]``.
    bad: ``{row: reason}`` of files that did not decode (their row is zero).
    cache_hit: True when the cache existed and nothing was decoded.
    cache_path: the ``.npy`` file.
    decoded: files decoded by this call (0 on a cache hit).
    seconds: wall time of this call.
  """
  images: np.ndarray
  bad: dict[int, str]
  cache_hit: bool
  cache_path: str
  decoded: int
  seconds: float


def _open_cached(npy: str, meta_path: str, shape: tuple) -> CachedImages | None:
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    images = np.load(npy, mmap_mode="r")
  except (OSError, ValueError):
    return None
  if tuple(images.shape) != shape or images.dtype != np.uint8:
    return None
  bad = {int(k): v for k, v in meta.get("bad", {}).items()}
  return CachedImages(images, bad, True, npy, 0, 0.0)


def _decode_file(args):
  path, image_size, center_crop = args
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return None, f"cannot read file ({e.strerror or e})"
  try:
    return decode_cell(data, image_size, path, center_crop), None
  except folder.BadFileError as e:
    return None, e.reason


def load_images(paths: Sequence[str], image_size: int, *, cache_dir: str = "",
                num_workers: int = 0, chunk_size: int = 2048,
                log: Callable[[str], None] | None = print,
                center_crop: float = 1.0) -> CachedImages:
  """Returns the decoded images of ``paths`` from the cache, decoding on a miss.

  Args:
    paths: absolute file paths; row order of the result. Callers that want
      the cache shared across orderings pass them sorted.
    image_size: side of the square cells.
    center_crop: fraction of the square crop's side kept (centred) before
      resizing.
    cache_dir: cache folder ('' = ``default_cache_dir()``).
    num_workers: decode threads (0 = CPU count).
    chunk_size: files decoded per chunk (bounds RAM during decoding).
    log: called with progress lines (None = silent).

  Raises:
    CacheError: the cache folder is not writable or lacks disk space.
  """
  t0 = time.time()
  paths = list(paths)
  if not paths:  # np.memmap cannot map an empty file
    return CachedImages(np.zeros((0, image_size, image_size, 3), np.uint8),
                        {}, False, "", 0, 0.0)
  cache_dir = default_cache_dir(cache_dir)
  key = cache_key(paths, image_size, center_crop)
  name = f"cells-{image_size}px-{len(paths)}-{key}"
  npy = os.path.join(cache_dir, name + ".npy")
  meta_path = os.path.join(cache_dir, name + ".json")
  shape = (len(paths), image_size, image_size, 3)
  hit = _open_cached(npy, meta_path, shape)
  if hit is not None:
    return dataclasses.replace(hit, seconds=time.time() - t0)

  try:
    os.makedirs(cache_dir, exist_ok=True)
    free = shutil.disk_usage(cache_dir).free
  except OSError as e:
    raise CacheError(f"Cannot use cache folder {cache_dir!r} ({e}); set "
                     "config.data.cache_dir or $SLAMJAX_CACHE to a writable "
                     "folder") from None
  nbytes = int(np.prod(shape))
  if nbytes > free:
    raise CacheError(
        f"Decoding {len(paths)} cells at {image_size} px needs {nbytes / 2**30:.2f} "
        f"GiB in {cache_dir!r} but only {free / 2**30:.2f} GiB are free; set "
        "config.data.cache_dir or $SLAMJAX_CACHE to a bigger disk")
  log = log if len(paths) >= 1000 else None  # small sets decode in a blink
  if log:
    log(f"data: decoding {len(paths)} images at {image_size} px into {npy}")
  tmp = os.path.join(cache_dir, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
  workers = num_workers or os.cpu_count() or 1
  bad: dict[int, str] = {}
  zero = np.zeros((image_size, image_size, 3), np.uint8)
  report_every = max(chunk_size, (len(paths) // 10 // chunk_size + 1) * chunk_size)
  try:
    with open(tmp, "wb") as f, concurrent.futures.ThreadPoolExecutor(workers) as ex:
      # Write the .npy header, then append rows chunk by chunk: only one chunk
      # is in RAM and written pages go to the page cache, not our RSS.
      np.lib.format.write_array_header_1_0(
          f, {"descr": "|u1", "fortran_order": False, "shape": shape})
      for start in range(0, len(paths), chunk_size):
        chunk = paths[start:start + chunk_size]
        results = ex.map(_decode_file, [(p, image_size, center_crop) for p in chunk],
                         chunksize=max(1, len(chunk) // (workers * 4)))
        out = np.empty((len(chunk), image_size, image_size, 3), np.uint8)
        for j, (img, err) in enumerate(results):
          if err is not None:
            bad[start + j] = err
            img = zero
          out[j] = img
        f.write(out.tobytes())
        done = start + len(chunk)
        if log and len(paths) > 20000 and (done % report_every == 0 or done == len(paths)):
          log(f"data: decoded {done}/{len(paths)} images ({time.time() - t0:.0f} s)")
    os.replace(tmp, npy)
    # The sidecar is renamed last: its presence means the .npy is complete.
    meta_tmp = tmp + ".json"
    with open(meta_tmp, "w") as f:
      json.dump({"num_files": len(paths), "image_size": image_size,
                 "decoder_version": DECODER_VERSION,
                 "bad": {str(k): v for k, v in bad.items()},
                 "first_path": paths[0] if paths else None}, f)
    os.replace(meta_tmp, meta_path)
  except BaseException:
    for p in (tmp, tmp + ".json"):
      if os.path.exists(p):
        os.remove(p)
    raise
  images = np.load(npy, mmap_mode="r")
  seconds = time.time() - t0
  if log:
    log(f"data: decoded {len(paths)} images in {seconds:.1f} s"
        + (f" ({len(bad)} did not decode)" if bad else ""))
  return CachedImages(images, bad, False, npy, len(paths), seconds)
