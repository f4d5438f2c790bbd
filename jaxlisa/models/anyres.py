"""LLaVA-1.6 "anyres" grid geometry the model needs to pack crop features: which pinpoint
resolution an image gets and how many crops of the vision tower's size tile it. Sizes and
`grid_pinpoints` are (height, width), transformers' convention (data/anyres.py says how the original
LLaVA code differs and holds the image-side resize / pad / crop)."""

from __future__ import annotations

from typing import Sequence

Size = tuple[int, int]  # (height, width)


def select_best_resolution(original_size: Size, possible_resolutions: Sequence[Size]) -> Size:
  """The pinpoint that keeps the most image pixels after an aspect-preserving downscale, then
  wastes the fewest; the first one wins ties."""
  original_height, original_width = original_size
  best_fit, max_effective, min_wasted = None, 0, float("inf")
  for height, width in possible_resolutions:
    scale = min(width / original_width, height / original_height)
    downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
    effective = min(downscaled_width * downscaled_height, original_width * original_height)
    wasted = width * height - effective
    if effective > max_effective or (effective == max_effective and wasted < min_wasted):
      best_fit, max_effective, min_wasted = (height, width), effective, wasted
  return best_fit


def get_anyres_image_grid_shape(image_size: Size, grid_pinpoints: Sequence[Size],
                                patch_size: int) -> tuple[int, int]:
  """(rows, cols) of crops of side `patch_size` (the vision tower's input size)."""
  height, width = select_best_resolution(image_size, grid_pinpoints)
  return height // patch_size, width // patch_size
