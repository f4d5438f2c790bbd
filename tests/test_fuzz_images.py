"""Fuzzed images through the path segment() and the serving engine take (data/preprocess.py):
load_image -> clip_preprocess -> sam_preprocess, at the real sizes (CLIP 224, SAM 1024) and the tiny
demo's (64, 64). Every input must give arrays of the static shapes, or ImageError (a ValueError)
with a one-line message; never another exception, never more than a few seconds or ~1 GB. Every
input that loads then goes through segment() on a tiny LISA (random init, a pre-filled "[SEG]"
answer so each gives one mask), which must give a finite mask at the image's own size.

  python tests/test_fuzz_images.py      # prints the crash count and each crash (no pytest needed)
"""

from __future__ import annotations

import io
import os
import resource
import struct
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlisa.data import preprocess as pp  # noqa: E402

SIZES = ((224, 1024), (64, 64))  # (CLIP crop, SAM side): LISA-7B's, lisa_tiny's
SECONDS_PER_INPUT = 5.0
PEAK_RSS_GROWTH_BYTES = 1.5 * 2**30


def _encode(arr_or_img, fmt: str, **kw) -> bytes:
  img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _raw_png(w: int, h: int, bit_depth: int, color_type: int, rows: bytes | None) -> bytes:
  """A PNG written by hand: any IHDR (huge dimensions, 16-bit RGB) over `rows` (filter bytes included)."""
  ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
  idat = zlib.compress(rows if rows is not None else b"\0" * 64)
  return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _exif_jpeg(orientation: int, rng) -> bytes:
  img = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
  exif = Image.Exif()
  exif[0x0112] = orientation
  return _encode(img, "JPEG", exif=exif.tobytes())


def cases() -> list[tuple[str, bytes]]:
  """(name, encoded bytes): >= 250 odd, extreme or broken inputs, the same on every run."""
  rng = np.random.default_rng(0)
  out: list[tuple[str, bytes]] = []
  rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
  # extreme sizes and aspect ratios (both orientations), PNG
  for h, w in [(1, 1), (1, 2), (2, 1), (1, 5000), (5000, 1), (1, 20000), (20000, 1), (3, 4097), (4097, 3),
               (1, 129), (129, 1), (1, 2049), (2049, 1), (2, 300), (300, 2), (7, 3000), (3000, 7),
               (1, 224), (224, 1), (1023, 1), (1, 1025), (31, 4000), (4000, 31), (640, 480), (1, 64), (64, 1)]:
    out.append((f"png {h}x{w}", _encode(rgb(h, w), "PNG")))
  for k in range(40):  # random sizes, mostly thin
    h, w = (int(x) for x in rng.integers(1, 600, 2))
    if k % 2:
      h = max(1, h // 50)
    out.append((f"png random {h}x{w}", _encode(rgb(h, w), "PNG" if k % 3 else "JPEG")))
  # Pillow modes
  base = rgb(37, 53)
  img = Image.fromarray(base)
  for mode in ("L", "LA", "P", "PA", "RGBA", "1", "I", "I;16", "CMYK", "YCbCr", "F", "RGBX", "La", "RGBa", "HSV"):
    try:
      im = img.convert(mode)
    except ValueError:
      continue
    for fmt in ("PNG", "TIFF", "JPEG", "BMP", "GIF", "WEBP"):
      try:
        out.append((f"{mode} as {fmt}", _encode(im, fmt)))
      except (OSError, ValueError, KeyError):
        pass
  out.append(("16-bit gray png", _encode(Image.fromarray(rng.integers(0, 65536, (40, 30), dtype=np.uint16)), "PNG")))
  out.append(("16-bit gray 1x3000 png", _encode(Image.fromarray(rng.integers(0, 65536, (1, 3000), dtype=np.uint16)),
                                                 "PNG")))
  out.append(("32-bit int tiff", _encode(Image.fromarray(rng.integers(-2**31, 2**31, (20, 20), dtype=np.int32)),
                                         "TIFF")))
  out.append(("float tiff with nan/inf", _encode(Image.fromarray(np.array([[np.nan, np.inf], [-np.inf, 1e30]],
                                                                          np.float32)), "TIFF")))
  for w, h in [(5, 4), (1, 7), (300, 1)]:
    rows = b"".join(b"\0" + rng.integers(0, 256, 6 * w, dtype=np.uint8).tobytes() for _ in range(h))
    out.append((f"16-bit RGB png {h}x{w}", _raw_png(w, h, 16, 2, rows)))
    rows = b"".join(b"\0" + rng.integers(0, 256, 8 * w, dtype=np.uint8).tobytes() for _ in range(h))
    out.append((f"16-bit RGBA png {h}x{w}", _raw_png(w, h, 16, 6, rows)))
  # grayscale ndarray shapes
  out.append(("gray png 1x1", _encode(np.zeros((1, 1), np.uint8), "PNG")))
  out.append(("gray jpeg", _encode(rng.integers(0, 256, (40, 60), dtype=np.uint8), "JPEG")))
  # EXIF orientations (rotations swap H and W)
  for o in range(0, 10):
    out.append((f"exif orientation {o}", _exif_jpeg(o, rng)))
  bad_exif = bytearray(_exif_jpeg(6, rng))
  i = bad_exif.find(b"Exif")
  bad_exif[i + 10:i + 30] = b"\xff" * 20
  out.append(("corrupt exif", bytes(bad_exif)))
  # animated GIF
  frames = [Image.fromarray(rgb(20, 20)) for _ in range(3)]
  buf = io.BytesIO()
  frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
  out.append(("animated gif", buf.getvalue()))
  # decompression bombs: huge IHDR, tiny data
  for w, h in [(100000, 100000), (60000, 60000), (20000, 20000), (9000, 9000), (1, 10**8), (10**8, 1),
               (2**31 - 1, 1), (0, 10), (10, 0), (8 * 10**7, 1), (1, 8 * 10**7)]:
    out.append((f"bomb png {w}x{h}", _raw_png(w, h, 8, 2, None)))
  for depth, ctype in [(3, 2), (8, 7), (16, 4), (1, 0), (2, 3), (4, 3), (16, 0)]:  # odd and invalid IHDRs
    rows = b"".join(b"\0" + rng.integers(0, 256, 16, dtype=np.uint8).tobytes() for _ in range(4))
    out.append((f"png depth {depth} color type {ctype}", _raw_png(4, 4, depth, ctype, rows)))
  # truncations and corruptions of good files
  good = {"png": _encode(rgb(64, 96), "PNG"), "jpeg": _encode(rgb(64, 96), "JPEG"),
          "gif": _encode(Image.fromarray(rgb(64, 96)).convert("P"), "GIF"), "bmp": _encode(rgb(64, 96), "BMP"),
          "tiff": _encode(rgb(64, 96), "TIFF"), "webp": _encode(rgb(64, 96), "WEBP")}
  for fmt, data in good.items():
    for frac in (0.0, 0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
      out.append((f"{fmt} truncated at {frac}", data[: int(len(data) * frac)]))
    for k in range(4):
      flipped = bytearray(data)
      for j in rng.integers(0, len(data), 8):
        flipped[j] ^= 0xFF
      out.append((f"{fmt} bit flips {k}", bytes(flipped)))
  # not images
  out += [("zero bytes", b""), ("one byte", b"\x89"), ("text", b"hello, this is not an image\n" * 10),
          ("png magic only", b"\x89PNG\r\n\x1a\n"), ("jpeg magic only", b"\xff\xd8\xff"),
          ("json", b'{"image": "no"}'), ("pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"), ("svg", b"<svg></svg>")]
  for k in range(12):
    out.append((f"random bytes {k}", rng.integers(0, 256, int(rng.integers(1, 5000)), dtype=np.uint8).tobytes()))
  return out


def run_case(data: bytes):
  """None (arrays fine), an ImageError, or the other exception / problem string."""
  try:
    img = pp.load_image(data)
  except pp.ImageError as e:
    msg = str(e)
    return None if msg and "\n" not in msg else f"ImageError not one line: {msg!r}"
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}"
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
    return f"load_image gave {img.dtype} {img.shape}"
  for crop, side in SIZES:
    try:
      clip = pp.clip_preprocess(img, crop, crop)
      sam, (rh, rw) = pp.sam_preprocess(img, side)
    except Exception as e:  # pylint: disable=broad-except
      return f"{img.shape} at {crop}/{side}: {type(e).__name__}: {e}"
    if clip.shape != (crop, crop, 3) or clip.dtype != np.float32 or not np.isfinite(clip).all():
      return f"clip {clip.dtype} {clip.shape}"
    if sam.shape != (side, side, 3) or sam.dtype != np.float32 or not (1 <= rh <= side and 1 <= rw <= side):
      return f"sam {sam.dtype} {sam.shape} resized {rh}x{rw}"
  return None


def fuzz() -> tuple[int, list[str]]:
  """(number of inputs, problems); raises nothing."""
  problems = []
  all_cases = cases()
  for name, data in all_cases:
    t0 = time.time()
    why = run_case(data)
    dt = time.time() - t0
    if why is None and dt > SECONDS_PER_INPUT:
      why = f"took {dt:.1f} s"
    if why:
      problems.append(f"{name}: {why}")
  return len(all_cases), problems


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_fuzzed_images_work_or_give_the_image_error():
  before = _peak_rss()
  n, problems = fuzz()
  assert n >= 250
  assert not problems, f"{len(problems)} of {n}:\n" + "\n".join(problems)
  assert _peak_rss() - before < PEAK_RSS_GROWTH_BYTES


@pytest.fixture(scope="module")
def tiny_segmenter():
  from conftest import tiny_lisa  # pylint: disable=import-outside-toplevel
  from jaxlisa.data import synthetic_shapes  # pylint: disable=import-outside-toplevel
  tok = synthetic_shapes.train_tokenizer(synthetic_shapes.template_texts(), template_weight=1)
  return (*tiny_lisa(tok), tok)


def test_fuzzed_images_that_load_segment_at_their_size(tiny_segmenter):
  """segment() on every loadable fuzz input: the mask decoder padded to multiples of 1024 (the
  serving option: ~10 compiled sizes for all of them), and at the exact size (the CLI's, one
  compile each) for the most extreme shapes."""
  from jaxlisa.inference import segment as seg_lib  # pylint: disable=import-outside-toplevel
  model, params, tok = tiny_segmenter
  images = []
  for name, data in cases():
    try:
      images.append((name, pp.load_image(data)))
    except pp.ImageError:
      pass
  assert len(images) >= 100
  problems = []
  exact = {"png 1x1", "png 1x20000", "png 20000x1", "png 3x4097"}
  for name, img in images:
    for multiple in (1024, 0) if name in exact else (1024,):
      try:
        (r,) = seg_lib.segment(model, params, tok, [img], ["Where is it?"], answers=["It is [SEG]."],
                               max_length=256, mask_size_multiple=multiple)
        if r.masks.shape != (1, *img.shape[:2]) or not np.isfinite(r.mask_logits).all():
          problems.append(f"{name} {img.shape}: masks {r.masks.shape}")
      except Exception as e:  # pylint: disable=broad-except
        problems.append(f"{name} {img.shape}: {type(e).__name__}: {e}")
  assert not problems, f"{len(problems)} of {len(images)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path_kind", ["directory", "missing", "fifo-like empty"])
def test_paths_that_are_not_image_files(tmp_path, path_kind):
  if path_kind == "directory":
    with pytest.raises(pp.ImageError, match="not a file"):
      pp.load_image(str(tmp_path))
  elif path_kind == "missing":
    with pytest.raises(FileNotFoundError, match="image not found"):
      pp.load_image(str(tmp_path / "nope.png"))
  else:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(pp.ImageError, match="empty.png"):
      pp.load_image(str(tmp_path / "empty.png"))


if __name__ == "__main__":
  t = time.time()
  n_cases, found = fuzz()
  print("\n".join(found))
  print(f"{len(found)} of {n_cases} inputs crashed or misbehaved ({time.time() - t:.0f} s, "
        f"peak RSS {_peak_rss() / 2**20:.0f} MiB)")
