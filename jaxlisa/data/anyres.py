"""LLaVA-1.6 "anyres" tiling: choose a grid resolution, resize + pad, cut crops, count tokens.

Follows transformers' LLaVA-NeXT (`image_processing_utils.select_best_resolution`,
`llava_next` image processor, `modeling_llava_next.get_anyres_image_grid_shape / unpad_image /
pack_image_features`), which our parity tests compare with. Sizes are (height, width) and
`grid_pinpoints` are (height, width) pairs.

Two known differences from the original LLaVA code (llava/mm_utils.py, llava_arch.py):
  - LLaVA reads image sizes and the same `image_grid_pinpoints` list as (width, height). The
    candidate set is symmetric but its order is not, so ties (e.g. any image smaller than every
    pinpoint: a 1x2 vs a 2x1 grid) resolve differently. LLaVA's choice for pinpoints P equals
    ours for P with each pair swapped.
  - LLaVA's `unpad_image` truncates `int(h * scale)`; transformers uses `int(round(h * scale, 7))`.
    E.g. (h, w) = (88, 99) on a 24 x 48 feature map: 99 * (24 / 88) = 26.999999999999996, so 28
    columns are kept here and 26 in LLaVA (a different token count).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image

# the grid geometry the model packs features by lives with the model (data/ sits above models/)
from jaxlisa.models.anyres import Size, get_anyres_image_grid_shape, select_best_resolution  # noqa: F401


def get_patch_output_size(original_size: Size, target_resolution: Size) -> Size:
  """(height, width) of the aspect-preserving resize that fits inside target_resolution."""
  original_height, original_width = original_size
  target_height, target_width = target_resolution
  scale_w, scale_h = target_width / original_width, target_height / original_height
  if scale_w < scale_h:
    return min(math.ceil(original_height * scale_w), target_height), target_width
  return target_height, min(math.ceil(original_width * scale_h), target_width)


def _resize(image: np.ndarray, size: Size) -> np.ndarray:
  """PIL bicubic resize of a uint8 [H, W, C] image to (height, width)."""
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BICUBIC))


def resize_and_pad_image(image: np.ndarray, target_resolution: Size) -> np.ndarray:
  """uint8 [H, W, C] -> [th, tw, C]: bicubic resize inside the target, centred on black
  (the odd pixel of padding goes right / bottom)."""
  new_height, new_width = get_patch_output_size(image.shape[:2], target_resolution)
  resized = _resize(image, (new_height, new_width))
  pad_y, pad_x = (target_resolution[0] - new_height) // 2, (target_resolution[1] - new_width) // 2
  padded = np.zeros((*target_resolution, image.shape[2]), image.dtype)
  padded[pad_y:pad_y + new_height, pad_x:pad_x + new_width] = resized
  return padded


def divide_to_patches(image: np.ndarray, patch_size: int) -> np.ndarray:
  """[H, W, C] with H, W multiples of patch_size -> [rows * cols, p, p, C], row-major."""
  height, width, channels = image.shape
  rows, cols = height // patch_size, width // patch_size
  patches = image.reshape(rows, patch_size, cols, patch_size, channels).swapaxes(1, 2)
  return patches.reshape(rows * cols, patch_size, patch_size, channels)


def unpadded_feature_shape(image_size: Size, grid_pinpoints: Sequence[Size],
                           vision_image_size: int, vision_patch_size: int) -> tuple[int, int]:
  """(rows, cols) of the crop feature map after `spatial_unpad` removed the padding.

  The crops' features tile a (grid_rows * s, grid_cols * s) map, s = vision_image_size //
  vision_patch_size; unpad_image keeps the centred part with the image's aspect ratio.
  """
  per_side = vision_image_size // vision_patch_size
  grid_rows, grid_cols = get_anyres_image_grid_shape(image_size, grid_pinpoints, vision_image_size)
  current_height, current_width = grid_rows * per_side, grid_cols * per_side
  original_height, original_width = image_size
  if original_width / original_height > current_width / current_height:
    new_height = int(round(original_height * (current_width / original_width), 7))
    current_height -= 2 * ((current_height - new_height) // 2)
  else:
    new_width = int(round(original_width * (current_height / original_height), 7))
    current_width -= 2 * ((current_width - new_width) // 2)
  return current_height, current_width


def num_anyres_image_tokens(image_size: Size, grid_pinpoints: Sequence[Size],
                            vision_image_size: int, vision_patch_size: int) -> int:
  """Image positions of one anyres image with `spatial_unpad` and newlines (CLS dropped):
  s*s base-image tokens + rows*cols unpadded crop tokens + one newline per row."""
  per_side = vision_image_size // vision_patch_size
  rows, cols = unpadded_feature_shape(image_size, grid_pinpoints, vision_image_size,
                                      vision_patch_size)
  return per_side * per_side + rows * cols + rows


def process_anyres_image(image: np.ndarray, processor_fn: Callable[[np.ndarray], np.ndarray],
                         grid_pinpoints: Sequence[Size], patch_size: int) -> np.ndarray:
  """uint8 [H, W, C] -> [1 + rows * cols, ...]: the whole image resized to patch_size square,
  then the crops of the resized-and-padded image, each passed through `processor_fn`
  (uint8 [p, p, C] -> normalised array, e.g. rescale + CLIP mean/std)."""
  best = select_best_resolution(image.shape[:2], grid_pinpoints)
  crops = divide_to_patches(resize_and_pad_image(image, best), patch_size)
  base = _resize(image, (patch_size, patch_size))
  return np.stack([processor_fn(p) for p in [base, *crops]])
