"""Image loading and the CLIP / SAM / LLaVA preprocessing, in numpy + PIL (no jax, no torch).

Everything works on uint8 RGB arrays [H, W, 3] (what LISA's `cv2.imread` + BGR->RGB gives).

How the originals read images, and what `load_image` does:
  - LISA: `cv2.imread(path)` (IMREAD_COLOR) then BGR->RGB. That applies the EXIF orientation,
    drops alpha (no compositing), expands grayscale and palette images to 3 channels, and reduces
    16-bit data to 8 bits by keeping the high byte.
  - LLaVA / HF: `Image.open(path).convert('RGB')`: no EXIF rotation, alpha dropped, and 16-bit
    grayscale ('I;16', 'I') *clipped* at 255 (Pillow's mode conversion), which saturates images.
  `load_image` follows LISA (the model this package reproduces): EXIF orientation applied
  (`exif_transpose=False` gives LLaVA's unrotated pixels), alpha dropped, grayscale / palette /
  CMYK / LA / PA converted with Pillow, 16-bit and 32-bit integer modes scaled by >> 8.

`clip_preprocess` matches transformers' `CLIPImageProcessor` (its PIL backend, which is what
transformers 5 uses without torchvision, and what transformers 4's slow processor did):
shortest edge -> `size` with PIL bicubic (long edge `int(size * long / short)`), center crop
(top = (h - crop) // 2), x * (1/255) in float64 then float32, (x - mean) / std in float32.
`sam_resize_longest_side` / `sam_preprocess` match segment-anything's `ResizeLongestSide.apply_image`
(PIL bilinear to `(int(h*s + 0.5), int(w*s + 0.5))`) and `Sam.preprocess` (normalize with the SAM
pixel mean / std in float32, zero-pad bottom / right). GT masks are never resized: LISA computes
its mask losses at the original resolution.
"""

from __future__ import annotations

import io
import os
import warnings
from struct import error as struct_error
from typing import Sequence, Union

import numpy as np
from absl import logging
from PIL import Image, ImageOps, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# clip_preprocess resizes the whole image (as transformers) up to this many output pixels (48 MiB
# of uint8 RGB; aspect ratios up to ~330:1 at 224 px), and only the crop window beyond it.
CLIP_FULL_RESIZE_MAX_PIXELS = 1 << 24

# Images with more pixels than this are refused before decoding (ImageError): Pillow's own
# decompression-bomb threshold, which it only warns about (89.5 MP: 268 MB as uint8 RGB).
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# ... and images with a longer side than this (JPEG's own limit; Pillow decodes row by row, so a
# 1 x 80,000,000 PNG takes ~15 s to decode although it has fewer pixels than MAX_IMAGE_PIXELS).
MAX_IMAGE_SIDE = 1 << 16

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]


class ImageError(ValueError):
  """An input that is not a readable image (corrupt, truncated, or another kind of file)."""


def _name(src) -> str:
  if isinstance(src, (bytes, bytearray, memoryview)):
    return f"<{len(src)} bytes>"
  return os.fspath(src)


def _to_rgb(img: Image.Image) -> np.ndarray:
  """Any Pillow mode -> uint8 [H, W, 3] (see module docstring for the choices)."""
  mode = img.mode
  if mode.startswith("I;16") or mode == "I":
    a = np.asarray(img)
    a = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)  # in the source's own integer type: no int64 copy
    return np.repeat(a[..., None], 3, axis=-1)
  if mode == "RGB":
    return np.asarray(img, dtype=np.uint8)
  # RGBA/LA/PA/P/L/1/CMYK/YCbCr/F...: Pillow's conversion; alpha is dropped, not composited.
  return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_image(src: ImageSource, exif_transpose: bool = True, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
  """Read an image file (path or encoded bytes) as uint8 RGB [H, W, 3].

  Raises FileNotFoundError for a missing path and ImageError (naming the file, one line) for
  anything that does not decode completely: another kind of file, a directory, truncated or
  corrupt data, or a header claiming more than `max_pixels` pixels (checked before decoding).
  """
  name = _name(src)
  if isinstance(src, (bytes, bytearray, memoryview)):
    fh = io.BytesIO(bytes(src))
  else:
    if not os.path.exists(src):
      raise FileNotFoundError(f"image not found: {name}")
    if not os.path.isfile(src):
      raise ImageError(f"cannot read image {name}: not a file")
    try:
      fh = open(src, "rb")  # pylint: disable=consider-using-with
    except OSError as e:
      raise ImageError(f"cannot read image {name}: {e.strerror or e}") from e
  try:
    with fh, warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Pillow's per-file chatter (corrupt EXIF, ...); failures raise below
      try:
        img = Image.open(fh)
        w, h = img.size
        if w < 1 or h < 1:
          raise ImageError(f"cannot read image {name}: its header says {w}x{h} pixels")
        if max(w, h) > MAX_IMAGE_SIDE:
          raise ImageError(f"cannot read image {name}: {w}x{h} pixels, a side longer than {MAX_IMAGE_SIDE}")
        if w * h > max_pixels:
          raise ImageError(f"cannot read image {name}: {w}x{h} pixels is more than the {max_pixels} allowed "
                           "(max_pixels)")
        img.load()  # decode now: truncated data fails here, not later
      except ImageError:
        raise
      except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError, struct_error,
              Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image {name}: {_one_line(e)}") from e
      if exif_transpose:
        try:
          img = ImageOps.exif_transpose(img)
        except Exception as e:  # pylint: disable=broad-except
          logging.warning("ignoring unreadable EXIF orientation of %s: %s", name, e)
      try:
        return _to_rgb(img)
      except (OSError, ValueError, MemoryError) as e:  # decoders that defer work to the conversion
        raise ImageError(f"cannot read image {name}: {_one_line(e)}") from e
  except ImageError:
    raise
  except OSError as e:
    raise ImageError(f"cannot read image {name}: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return text or type(e).__name__


def _check_rgb(img: np.ndarray) -> np.ndarray:
  img = np.asarray(img)
  if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
    raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {img.dtype} {img.shape}")
  return img


def _pil_resize(img: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
  return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), resample=resample))


def shortest_edge_size(h: int, w: int, size: int) -> tuple[int, int]:
  """transformers' `get_resize_output_image_size(default_to_square=False)`: (new_h, new_w)."""
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(size * long / short)
  return (new_long, size) if w <= h else (size, new_long)


def center_crop(img: np.ndarray, crop: int | tuple[int, int]) -> np.ndarray:
  """transformers' center crop (top = (h - ch) // 2), zero-padding when the image is smaller."""
  ch, cw = (crop, crop) if isinstance(crop, int) else crop
  h, w = img.shape[:2]
  top, left = (h - ch) // 2, (w - cw) // 2
  if top >= 0 and left >= 0:
    return img[top:top + ch, left:left + cw]
  nh, nw = max(ch, h), max(cw, w)
  out = np.zeros((nh, nw) + img.shape[2:], img.dtype)
  pt, pl = -(-(nh - h) // 2), -(-(nw - w) // 2)
  out[pt:pt + h, pl:pl + w] = img
  top, left = (nh - ch) // 2, (nw - cw) // 2
  return out[top:top + ch, left:left + cw]


def normalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float], scale: float | None = None) -> np.ndarray:
  """(img * scale - mean) / std as transformers does it: rescale in float64 -> float32, then
  normalize in float32. scale=None skips the rescale (SAM normalizes 0..255 values)."""
  x = img.astype(np.float64) * scale if scale is not None else img
  x = x.astype(np.float32)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def clip_preprocess(img: np.ndarray, size: int = 224, crop: int = 224, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                    std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
  """uint8 RGB [H, W, 3] -> float32 [crop, crop, 3] as `CLIPImageProcessor` (see module docstring)."""
  img = _check_rgb(img)
  h, w = img.shape[:2]
  out_hw = shortest_edge_size(h, w, size)
  ch, cw = (crop, crop) if isinstance(crop, int) else crop
  if out_hw[0] * out_hw[1] <= CLIP_FULL_RESIZE_MAX_PIXELS:
    img = _pil_resize(img, out_hw, Image.BICUBIC)  # transformers' exact order: resize, then crop
  else:
    # A very long image (1 x 5000 -> 224 x 1120000): resize only the source box that lands in the
    # crop window, with the full resize's scale and sample centres, so nothing larger than the crop
    # is allocated. PIL's fixed-point box path can differ from resize-then-crop by a few levels.
    (oh, ow), box = out_hw, []
    win_h, win_w = min(ch, oh), min(cw, ow)
    top, left = (oh - win_h) // 2, (ow - win_w) // 2
    sy, sx = h / oh, w / ow
    box = (left * sx, top * sy, (left + win_w) * sx, (top + win_h) * sy)
    img = np.asarray(Image.fromarray(img).resize((win_w, win_h), resample=Image.BICUBIC, box=box))
  img = center_crop(img, crop)
  return normalize(img, mean, std, scale=1 / 255)


def sam_preprocess_shape(h: int, w: int, target: int = 1024) -> tuple[int, int]:
  """segment-anything `ResizeLongestSide.get_preprocess_shape`: (new_h, new_w)."""
  s = target * 1.0 / max(h, w)
  # at least 1 px: beyond target:0.5 (e.g. 1 x 200 at 64 px) the original rounds a side to 0 and fails
  return max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))


def sam_resize_longest_side(img: np.ndarray, target: int = 1024) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 resized so the longest side is `target` (PIL bilinear)."""
  img = _check_rgb(img)
  return _pil_resize(img, sam_preprocess_shape(img.shape[0], img.shape[1], target), Image.BILINEAR)


def sam_preprocess(img: np.ndarray, target: int = 1024, mean: Sequence[float] = SAM_PIXEL_MEAN,
                   std: Sequence[float] = SAM_PIXEL_STD) -> tuple[np.ndarray, tuple[int, int]]:
  """uint8 RGB [H, W, 3] -> (float32 [target, target, 3], (resized_h, resized_w)): resize the longest
  side, normalize with the SAM pixel mean / std, zero-pad bottom and right (LISA's dataset code)."""
  resized = sam_resize_longest_side(img, target)
  h, w = resized.shape[:2]
  x = normalize(resized, mean, std)
  out = np.zeros((target, target, 3), np.float32)
  out[:h, :w] = x
  return out, (h, w)


def mean_background(mean: Sequence[float] = OPENAI_CLIP_MEAN) -> tuple[int, ...]:
  """LLaVA's pad colour: tuple(int(x * 255) for x in image_mean)."""
  return tuple(int(x * 255) for x in mean)


def expand2square(img: np.ndarray, background: Sequence[int] | None = None) -> np.ndarray:
  """LLaVA `expand2square` ("pad" aspect mode): paste the image centred (offset (long - short) // 2)
  on a square canvas of `background` (default: the CLIP mean colour)."""
  img = np.asarray(img)
  h, w = img.shape[:2]
  if h == w:
    return img
  bg = mean_background() if background is None else tuple(background)
  side = max(h, w)
  out = np.empty((side, side) + img.shape[2:], img.dtype)
  out[...] = np.asarray(bg, img.dtype) if img.ndim == 3 else bg[0]
  top, left = (side - h) // 2, (side - w) // 2
  out[top:top + h, left:left + w] = img
  return out
