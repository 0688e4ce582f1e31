"""The image decoder on camera-style files: 12-bit data in 16-bit TIFF/PNG
(gray and colour, raw and compressed), bit-depth tags, alpha, EXIF
orientation; and the folder pipeline's decoder is the same one."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from slamjax.data import folder
from slamjax.data import image_cache


def _tiff16(a: np.ndarray, extra=(), deflate: bool = False) -> bytes:
  """A little-endian one-strip TIFF of uint16 ``a`` [H, W] or [H, W, 3]
  (PIL cannot write 16-bit colour), with optional extra (tag, type, value)."""
  a = np.ascontiguousarray(a, "<u2")
  h, w = a.shape[:2]
  spp = 1 if a.ndim == 2 else a.shape[2]
  data = a.tobytes()
  if deflate:
    data = zlib.compress(data)
  entries = {256: (3, 1, w), 257: (3, 1, h), 258: (3, spp, None),
             259: (3, 1, 8 if deflate else 1), 262: (3, 1, 2 if spp == 3 else 1),
             273: (4, 1, None), 277: (3, 1, spp), 278: (3, 1, h),
             279: (4, 1, len(data)), 284: (3, 1, 1)}
  for tag, typ, val in extra:
    entries[tag] = (typ, 1, val)
  n = len(entries)
  bps_off = 8 + 2 + 12 * n + 4
  bps = struct.pack("<" + "H" * spp, *[16] * spp) if spp > 1 else b""
  data_off = bps_off + len(bps)
  out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", n)
  for tag in sorted(entries):
    typ, count, val = entries[tag]
    if tag == 258:
      val = bps_off if spp > 1 else 16
    if tag == 273:
      val = data_off
    if typ == 3 and count == 1:
      out += struct.pack("<HHIHH", tag, typ, count, val, 0)
    else:
      out += struct.pack("<HHII", tag, typ, count, val)
  return out + struct.pack("<I", 0) + bps + data


def _png16(a: np.ndarray, sbit: bytes = b"") -> bytes:
  """A 16-bit PNG of uint16 ``a`` [H, W, 3|4] (optionally with an sBIT chunk)."""
  h, w, c = a.shape
  rows = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))

  def chunk(kind, body):
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body)))
  ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if c == 3 else 6, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
          + (chunk(b"sBIT", sbit) if sbit else b"")
          + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _ramp(h=8, w=8, c=None, top=4095):
  a = np.linspace(0, top, h * w * (c or 1)).round().astype(np.uint16)
  return a.reshape((h, w) if c is None else (h, w, c))


def test_twelve_bit_gray_tiff_spans_the_full_range():
  a = _ramp()
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, "TIFF")  # I;16, no bit-depth tag
  out = image_cache.decode_cell(buf.getvalue(), None)
  assert out.shape == (8, 8, 3) and out.max() == 255 and out.min() == 0
  # Scaled by 4095, not 65535 (which gave a near-black 0..16).
  np.testing.assert_array_equal(out[..., 0], np.rint(a.astype(float) * 255 / 4095).astype(np.uint8))
  # A full 16-bit image keeps 65535 as its top.
  b = _ramp(top=65535)
  full = image_cache.decode_cell(_tiff16(b), None)
  assert full.max() == 255 and full[0, 1, 0] == round(int(b[0, 1]) * 255 / 65535)


def test_bit_depth_tag_wins_over_the_maximum():
  a = _ramp(top=1000)  # a dim 12-bit image: the tag says 4095, not 1023
  out = image_cache.decode_cell(_tiff16(a, extra=[(281, 3, 4095)]), None)
  assert out.max() == round(1000 * 255 / 4095)
  no_tag = image_cache.decode_cell(_tiff16(a), None)
  assert no_tag.max() == round(1000 * 255 / 1023)  # 10 bits: the smallest holding 1000
  # A tag below the data is wrong and ignored.
  assert image_cache.decode_cell(_tiff16(a, extra=[(281, 3, 255)]), None).max() == 249


@pytest.mark.parametrize("deflate", [False, True])
def test_sixteen_bit_colour_tiff_keeps_its_low_byte(deflate):
  a = _ramp(6, 5, 3)
  out = image_cache.decode_cell(_tiff16(a, deflate=deflate), None)
  # The central 5x5 square; PIL alone gives the high byte (0..15 here).
  np.testing.assert_array_equal(out, np.rint(a[:5].astype(float) * 255 / 4095).astype(np.uint8))


def test_sixteen_bit_png_colour_alpha_and_sbit():
  a = _ramp(4, 4, 3, top=1023)
  out = image_cache.decode_cell(_png16(a), None)
  np.testing.assert_array_equal(out, np.rint(a.astype(float) * 255 / 1023).astype(np.uint8))
  # sBIT says 12 significant bits: 1023 is a quarter of the range.
  tagged = image_cache.decode_cell(_png16(a, sbit=bytes([12, 12, 12])), None)
  assert tagged.max() == round(1023 * 255 / 4095)
  # Alpha 0 over white; alpha full keeps the colour.
  rgba = np.concatenate([a, np.zeros((4, 4, 1), np.uint16)], -1)
  rgba[0, 0, 3] = 65535
  out = image_cache.decode_cell(_png16(rgba), None)
  assert out[1, 1].tolist() == [255, 255, 255]
  assert out[0, 0].tolist() == np.rint(a[0, 0].astype(float) * 255 / 1023).astype(int).tolist()


def test_exif_orientation_is_applied():
  img = np.zeros((4, 4, 3), np.uint8)
  img[0, 0] = 255  # a white top-left pixel
  exif = Image.Exif()
  exif[0x0112] = 6  # to view: rotate 90 degrees clockwise
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, "PNG", exif=exif.tobytes())
  out = image_cache.decode_cell(buf.getvalue(), None)
  assert out[0, 3].tolist() == [255, 255, 255] and out.sum() == 3 * 255  # top right
  plain = io.BytesIO()
  Image.fromarray(img).save(plain, "PNG")
  assert image_cache.decode_cell(plain.getvalue(), None)[0, 0].tolist() == [255] * 3


def test_folder_pipeline_uses_the_same_decoder():
  data = _tiff16(_ramp(6, 5, 3))
  np.testing.assert_array_equal(folder.decode_image(data, 4),
                                image_cache.decode_cell(data, 4, draft=False))
  with pytest.raises(folder.BadFileError, match="x.png: cannot decode"):
    folder.decode_image(b"not an image", 4, "x.png")


def test_decoder_version_is_in_the_cache_key():
  assert image_cache.DECODER_VERSION >= 2  # 16-bit and EXIF files decode differently
  key = image_cache.cache_key(["/nonexistent/a.png"], 8)
  old = image_cache.DECODER_VERSION
  try:
    image_cache.DECODER_VERSION = old + 1
    assert image_cache.cache_key(["/nonexistent/a.png"], 8) != key
  finally:
    image_cache.DECODER_VERSION = old
