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

``decode_cell`` is the single-image decoder (``folder.decode_image`` calls
it too): any mode -> RGB uint8, turned upright by its EXIF orientation,
centre-cropped to a square and resized to ``image_size`` (antialiased
bilinear). RGBA/LA/palette images with transparency are composited on
white. Images of more than 8 bits per sample (16-bit grayscale or colour,
32-bit integer) are scaled by their real range: the file's own
``MaxSampleValue`` (TIFF) or ``sBIT`` (PNG) tag, else the smallest of 8,
10, 12, 14 or 16 bits that holds the image's maximum, so 12-bit camera data
in a 16-bit TIFF spans 0-255 instead of decoding near black. Float images
are scaled by 255 (values in [0, 1]) or like integers. JPEGs are decoded at
reduced DCT scale when they are at least twice ``image_size``
(``Image.draft``), which is several times faster.

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
import sys
import time
import uuid
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from slamjax.data.errors import BadFileError

# Bump when decode_cell's output changes, so old caches are not reused.
# 2: high-bit-depth images scaled by their real range; 16-bit colour kept at
# full depth; EXIF orientation applied.
DECODER_VERSION = 2

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Candidate bit depths when the file does not say (camera data: 10-16 bits).
_BIT_DEPTHS = (8, 10, 12, 14, 16)
# PIL reads 16-bit colour samples through rawmodes ending in ;16L/;16B/;16N
# and keeps only the high byte. The same data read with the byte order
# swapped gives the low byte (the unpackers exist for both orders).
_SWAP_ORDER = {"L": "B", "B": "L", "N": "B" if sys.byteorder == "little" else "L"}
# EXIF orientation -> the transpose that makes the image upright (the table
# of PIL.ImageOps.exif_transpose, applied here to the converted image).
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


class CacheError(ValueError):
  """The cache folder cannot be used (not writable, disk full)."""


def default_cache_dir(cache_dir: str = "") -> str:
  """``cache_dir`` if set, else ``$SLAMJAX_CACHE``, else ``~/.cache/slamjax``."""
  if cache_dir:
    return os.path.expanduser(cache_dir)
  return os.environ.get("SLAMJAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "slamjax")


def _rawmode(tile) -> str:
  args = tile.args
  return str(args[0] if isinstance(args, tuple) else args)


def _sixteen_bit_colour(data: bytes, img: Image.Image, tiles) -> np.ndarray | None:
  """uint16 ``[h, w, bands]`` of an image with 16-bit colour samples (which
  PIL cuts to their high byte), read a second time for the low byte; None
  for other images or when PIL cannot (then the 8-bit decode stands)."""
  raws = [_rawmode(t) for t in tiles]
  if not raws or img.mode not in ("RGB", "RGBA", "LA") or not all(
      r[-4:-1] == ";16" and r[-1] in _SWAP_ORDER for r in raws):
    return None
  try:
    with Image.open(io.BytesIO(data)) as low:
      low.tile = [t._replace(args=(_rawmode(t)[:-1] + _SWAP_ORDER[_rawmode(t)[-1]],)
                             + tuple(t.args[1:]) if isinstance(t.args, tuple)
                             else _rawmode(t)[:-1] + _SWAP_ORDER[_rawmode(t)[-1]])
                  for t in low.tile]
      low.load()
      lo = np.asarray(low)
  except Exception:  # noqa: BLE001 - an unusual layout: keep the 8-bit decode
    return None
  hi = np.asarray(img)
  if lo.shape != hi.shape:
    return None
  return (hi.astype(np.uint16) << 8) | lo


def _png_sbit(data: bytes) -> int | None:
  """Significant bits of a PNG's colour samples (its sBIT chunk), if given."""
  pos = 8
  while pos + 8 <= len(data):
    n = int.from_bytes(data[pos:pos + 4], "big")
    kind = data[pos + 4:pos + 8]
    if kind == b"sBIT":
      bits = data[pos + 8:pos + 8 + n]
      colour = bits[:3] if n >= 3 else bits[:1]  # RGB(A): 3 colour; gray(A): 1
      return max(colour) if colour else None
    if kind in (b"IDAT", b"IEND"):
      return None
    pos += 12 + n
  return None


def _full_scale(img: Image.Image, data: bytes, a: np.ndarray) -> float:
  """The value that maps to 255: the file's tag, else the smallest bit depth
  of ``_BIT_DEPTHS`` holding the maximum (beyond 16 bits, the maximum). A
  depth rather than each image's own maximum keeps cells of one camera
  equally bright."""
  peak = float(a.max()) if a.size else 0.0
  tags = getattr(img, "tag_v2", None)
  if tags is not None:
    top = tags.get(281)  # TIFF MaxSampleValue
    if top is not None:
      top = max(top) if isinstance(top, tuple) else top
      if 0 < top < 65535 and top >= peak:  # a tag below the data is wrong
        return float(top)
    bps = tags.get(258)  # TIFF BitsPerSample
    bps = max(bps) if isinstance(bps, tuple) else bps
    if bps and 8 < bps < 16 and 2 ** bps - 1 >= peak:
      return float(2 ** bps - 1)
  if img.format == "PNG":
    sbit = _png_sbit(data)
    if sbit and 8 <= sbit < 16 and 2 ** sbit - 1 >= peak:
      return float(2 ** sbit - 1)
  top = peak
  for bits in _BIT_DEPTHS:
    if top <= 2 ** bits - 1:
      return float(2 ** bits - 1)
  return top


def _to_uint8(a: np.ndarray, full: float) -> np.ndarray:
  a = a.astype(np.float64) * (255.0 / max(full, 1e-12))
  return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image, data: bytes = b"", wide: np.ndarray | None = None
            ) -> Image.Image:
  mode = img.mode
  if wide is not None:  # 16-bit colour (+ alpha): [h, w, 3|4] or [h, w, 2]
    n = 1 if mode == "LA" else 3
    rgb = _to_uint8(wide[..., :n], _full_scale(img, data, wide[..., :n]))
    if wide.shape[-1] > n:  # alpha is always full range
      alpha = wide[..., n:n + 1].astype(np.float64) / 65535.0
      rgb = np.rint(rgb * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    return Image.fromarray(np.repeat(rgb, 3, -1) if n == 1 else rgb, "RGB")
  if mode in _SIXTEEN_BIT or mode == "F":
    # PIL's own convert("L") clips 16-bit values at 255 (a dim 12-bit image
    # turns white) and a fixed 65535 makes 12-bit data near black: scale by
    # the data's real range instead.
    a = np.asarray(img)
    full = 1.0 if mode == "F" and a.size and float(np.nanmax(a)) <= 1.0 else None
    a = np.nan_to_num(a.astype(np.float64)) if mode == "F" else a
    full = _full_scale(img, data, a) if full is None else full
    return Image.fromarray(_to_uint8(a, full), "L").convert("RGB")
  if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
    # Transparent background -> white (a slide background), not black.
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    bg.alpha_composite(rgba)
    return bg.convert("RGB")
  return img if mode == "RGB" else img.convert("RGB")


def decode_cell(data: bytes, image_size: int | None, name: str = "<bytes>",
                center_crop: float = 1.0, draft: bool = True) -> np.ndarray:
  """Decodes image bytes of any mode to uint8 ``[image_size, image_size, 3]``:
  the upright image's central square, of which the central ``center_crop``
  fraction of the side is kept, resized to ``image_size`` (None: not
  resized). ``draft=False`` decodes JPEGs at full scale before resizing.

  Raises:
    BadFileError: naming ``name`` if the bytes do not decode.

  Example:
    >>> import io, numpy as np
    >>> from PIL import Image
    >>> buf = io.BytesIO()  # 12-bit data in a 16-bit TIFF
    >>> Image.fromarray(np.full((6, 10), 4095, np.uint16)).save(buf, "TIFF")
    >>> decode_cell(buf.getvalue(), 4)[0, 0].tolist()
    [255, 255, 255]
  """
  try:
    with Image.open(io.BytesIO(data)) as img:
      if draft and image_size is not None:
        need = int(np.ceil(image_size / center_crop))
        if img.format == "JPEG" and min(img.size) >= 2 * need:
          img.draft(None, (need, need))  # DCT-domain downscale
      tiles = list(img.tile)  # load() clears them
      img.load()  # truncated/corrupt data fails here, not lazily later
      orientation = img.getexif().get(0x0112, 1)
      img = _to_rgb(img, data, _sixteen_bit_colour(data, img, tiles))
  except Image.UnidentifiedImageError:
    raise BadFileError(name, "cannot decode image (not a recognised "
                              "image format)") from None
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
    raise BadFileError(
        name, f"cannot decode image ({type(e).__name__}: {e})") from None
  if orientation in _ORIENT:
    img = img.transpose(_ORIENT[orientation])
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
  if image_size is not None and img.size != (image_size, image_size):
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
  except BadFileError as e:
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
