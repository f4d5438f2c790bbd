"""LLaVA-1.6 anyres arithmetic and tiling vs transformers' LLaVA-NeXT helpers."""

import functools
import types

import numpy as np
import pytest
import torch
from transformers.image_processing_utils import get_patch_output_size as hf_patch_output_size
from transformers.image_processing_utils import select_best_resolution as hf_select
from transformers.image_transforms import divide_to_patches as hf_divide
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next import modeling_llava_next as hf_model
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil)
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from jaxlisa.data import anyres

LLAVA_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
PINPOINT_SETS = [
    LLAVA_PINPOINTS,
    [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]],
    [[336, 336], [336, 672], [672, 336], [672, 672], [336, 1008], [1008, 336], [1008, 672],
     [672, 1008], [1008, 1008]],
]


def _sizes(n, lo=1, hi=2400, seed=0):
  rng = np.random.default_rng(seed)
  sizes = [tuple(int(v) for v in rng.integers(lo, hi, 2)) for _ in range(n)]
  # Exact multiples, squares and extreme aspect ratios, where ties and rounding bite; the last
  # ones have unpad products like 14.999999999999998 (int() and round(., 7) disagree).
  return sizes + [(336, 672), (672, 336), (100, 100), (672, 672), (1000, 3), (3, 1000),
                  (333, 999), (999, 333), (1, 1), (1344, 1008), (480, 640), (640, 480),
                  (47, 1128), (55, 176), (88, 55), (88, 99), (110, 352)]


@pytest.mark.parametrize("pinpoints", PINPOINT_SETS)
def test_select_best_resolution_and_grid(pinpoints):
  for size in _sizes(400):
    best = anyres.select_best_resolution(size, pinpoints)
    assert best == tuple(hf_select(size, pinpoints))
    assert anyres.get_anyres_image_grid_shape(size, pinpoints, 336) == tuple(
        hf_model.get_anyres_image_grid_shape(size, pinpoints, 336))
    image = np.broadcast_to(np.zeros((), np.uint8), (3, *size))  # shape only, no memory
    assert anyres.get_patch_output_size(size, best) == tuple(
        hf_patch_output_size(image, best, ChannelDimension.FIRST))


def _llava_original_select(original_size, possible_resolutions):
  """llava/mm_utils.py select_best_resolution: sizes and pinpoints as (width, height)."""
  original_width, original_height = original_size
  best_fit, max_effective_resolution, min_wasted_resolution = None, 0, float("inf")
  for width, height in possible_resolutions:
    scale = min(width / original_width, height / original_height)
    downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
    effective_resolution = min(downscaled_width * downscaled_height,
                               original_width * original_height)
    wasted_resolution = (width * height) - effective_resolution
    if effective_resolution > max_effective_resolution or (
        effective_resolution == max_effective_resolution
        and wasted_resolution < min_wasted_resolution):
      max_effective_resolution = effective_resolution
      min_wasted_resolution = wasted_resolution
      best_fit = (width, height)
  return best_fit


def test_original_llava_convention_is_swapped_pinpoints():
  swapped = [[w, h] for h, w in LLAVA_PINPOINTS]
  for h, w in _sizes(400, seed=1):
    width, height = _llava_original_select((w, h), LLAVA_PINPOINTS)
    assert anyres.select_best_resolution((h, w), swapped) == (height, width)
  # The documented tie: a small square image gets a 2-row grid in LLaVA, a 2-column one here.
  assert _llava_original_select((100, 100), LLAVA_PINPOINTS) == (336, 672)  # (w, h)
  assert anyres.select_best_resolution((100, 100), LLAVA_PINPOINTS) == (336, 672)  # (h, w)


def _fake_model(pinpoints, image_size, patch_size):
  config = types.SimpleNamespace(
      image_grid_pinpoints=pinpoints,
      vision_config=types.SimpleNamespace(image_size=image_size, patch_size=patch_size))
  return types.SimpleNamespace(config=config)


@pytest.mark.parametrize("image_size,patch_size,scale", [(336, 14, 1), (28, 14, 1 / 12),
                                                         (42, 14, 1 / 8)])
def test_token_counts_match_pack_image_features(image_size, patch_size, scale):
  """Our counts and unpadded shapes vs transformers' pack_image_features on real tensors."""
  pinpoints = [[int(h * scale), int(w * scale)] for h, w in LLAVA_PINPOINTS]
  per_side = image_size // patch_size
  fake = _fake_model(pinpoints, image_size, patch_size)
  sizes = _sizes(120, lo=1, hi=int(2400 * scale) + 2, seed=2)
  feats, expected = [], []
  for size in sizes:
    rows, cols = anyres.get_anyres_image_grid_shape(size, pinpoints, image_size)
    feats.append(torch.zeros(1 + rows * cols, per_side * per_side, 1))
    expected.append(anyres.num_anyres_image_tokens(size, pinpoints, image_size, patch_size))
  packed, lens = hf_model.LlavaNextModel.pack_image_features(
      fake, feats, torch.tensor(sizes), "default", image_newline=torch.ones(1))
  assert lens.tolist() == expected
  for size, feature in zip(sizes, packed):
    rows, cols = anyres.unpadded_feature_shape(size, pinpoints, image_size, patch_size)
    newline_rows = feature[per_side * per_side:, 0].reshape(rows, cols + 1)
    assert (newline_rows[:, -1] == 1).all() and (newline_rows[:, :-1] == 0).all()
    # transformers' processor counts the same number of <image> placeholders.
    proc = types.SimpleNamespace(image_processor=types.SimpleNamespace(
        image_grid_pinpoints=pinpoints), patch_size=patch_size, num_additional_image_tokens=0)
    proc._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, proc)
    assert LlavaNextProcessor._get_number_of_features(
        proc, *size, image_size, image_size) == len(feature)


def test_unpadded_shape_vs_unpad_image():
  for size in _sizes(300, seed=3):
    rows, cols = anyres.get_anyres_image_grid_shape(size, LLAVA_PINPOINTS, 336)
    grid = torch.zeros(1, rows * 24, cols * 24)
    assert anyres.unpadded_feature_shape(size, LLAVA_PINPOINTS, 336, 14) == tuple(
        hf_model.unpad_image(grid, size).shape[1:])


def _llava_original_unpad(tensor, original_size):
  """llava/model/llava_arch.py unpad_image: original_size as (width, height), int() truncation."""
  original_width, original_height = original_size
  current_height, current_width = tensor.shape[1:]
  if original_width / original_height > current_width / current_height:
    new_height = int(original_height * (current_width / original_width))
    padding = (current_height - new_height) // 2
    return tensor[:, padding:current_height - padding, :]
  new_width = int(original_width * (current_height / original_height))
  padding = (current_width - new_width) // 2
  return tensor[:, :, padding:current_width - padding]


def test_unpad_rounding_differs_from_llava():
  """The documented difference: (h, w) = (88, 99) on a 24 x 48 map, 99 * 24 / 88 evaluates to
  26.999999999999996; transformers keeps 28 columns, LLaVA's int() keeps 26."""
  size = (88, 99)
  rows, cols = anyres.get_anyres_image_grid_shape(size, LLAVA_PINPOINTS, 336)
  grid = torch.zeros(1, rows * 24, cols * 24)
  ours = anyres.unpadded_feature_shape(size, LLAVA_PINPOINTS, 336, 14)
  assert ours == tuple(hf_model.unpad_image(grid, size).shape[1:])
  assert ours != tuple(_llava_original_unpad(grid, size[::-1]).shape[1:])


MEAN, STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258,
                                                                     0.27577711])


def _processor_fn(patch):
  """uint8 [p, p, 3] -> float32 [3, p, p]: rescale and CLIP-normalise, as the HF processor."""
  x = patch.astype(np.float32) * np.float32(1 / 255)
  return ((x - MEAN.astype(np.float32)) / STD.astype(np.float32)).transpose(2, 0, 1)


@pytest.mark.parametrize("hw", [(50, 50), (37, 90), (90, 37), (120, 31), (17, 200), (64, 64),
                                (25, 61)])
def test_process_anyres_image_vs_hf_processor(hw):
  patch = 28
  pinpoints = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
  image = np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8)
  got = anyres.process_anyres_image(image, _processor_fn, pinpoints, patch)
  hf = LlavaNextImageProcessorPil(size={"shortest_edge": patch},
                                  crop_size={"height": patch, "width": patch},
                                  image_grid_pinpoints=pinpoints)
  want = hf(image, return_tensors="np")["pixel_values"][0]
  rows, cols = anyres.get_anyres_image_grid_shape(hw, pinpoints, patch)
  assert got.shape == want.shape == (1 + rows * cols, 3, patch, patch)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_resize_pad_and_divide():
  image = np.random.default_rng(0).integers(0, 256, (30, 70, 3), dtype=np.uint8)
  padded = anyres.resize_and_pad_image(image, (56, 84))
  new_h, new_w = anyres.get_patch_output_size((30, 70), (56, 84))
  assert padded.shape == (56, 84, 3) and (new_h, new_w) == (36, 84)
  pad_top = (56 - new_h) // 2
  assert not padded[:pad_top].any() and not padded[pad_top + new_h:].any()
  patches = anyres.divide_to_patches(padded, 28)
  want = hf_divide(padded.transpose(2, 0, 1), 28)
  np.testing.assert_array_equal(patches.transpose(0, 3, 1, 2), np.stack(want))
