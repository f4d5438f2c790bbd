"""LLaVA's host-side collate: prompts with "<image>" -> ids with one placeholder per image token, and
padded batches laid out as LLaVA's `prepare_inputs_labels_for_multimodal` (padding removed, images
expanded, cut to max_length, re-padded), with the `image_row_offset` that `Llava.embed` reads."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxlisa.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from jaxlisa.data import tokenization as tok
from jaxlisa.models import llava as llava_lib
from jaxlisa.models.llava import LlavaConfig


@dataclasses.dataclass(frozen=True)
class LlavaBatch:
  """A padded batch with image placeholders, as LLaVA's `prepare_inputs_labels_for_multimodal`
  lays it out (padding removed, images expanded, cut to max_length, re-padded).

  input_ids, labels, attention_mask, position_ids, image_mask: [B, T];
  image_row_offset [B]: first row of the batch's image tokens that row b reads.
  """
  input_ids: np.ndarray
  labels: np.ndarray | None
  attention_mask: np.ndarray
  position_ids: np.ndarray
  image_mask: np.ndarray
  image_row_offset: np.ndarray


def tokenize_prompt(cfg: LlavaConfig, prompt: str, tokenizer,
                    image_sizes: Sequence[Sequence[int]] | None = None) -> np.ndarray:
  """An original LLaVA prompt with "<image>" -> ids [T'] with num_image_tokens placeholders
  (cfg.image_token_index) per image. "<image>" gets "<im_start>...<im_end>" when
  cfg.mm_use_im_start_end; image_sizes ((height, width) per image) matter for anyres."""
  ids = tok.tokenizer_image_token(tok.replace_image_tokens(prompt, cfg.mm_use_im_start_end), tokenizer)
  n_img = sum(i == IMAGE_TOKEN_INDEX for i in ids)
  sizes = list(image_sizes) if image_sizes is not None else [None] * n_img
  if len(sizes) != n_img:
    raise ValueError(f"{len(sizes)} image sizes for {n_img} images in the prompt")
  counts = [llava_lib.num_image_tokens(cfg, s) for s in sizes]
  return tok.expand_image_tokens(ids, None, counts, placeholder_id=cfg.image_token_index).input_ids


def collate(cfg: LlavaConfig, input_ids: Sequence[Sequence[int]],
            labels: Sequence[Sequence[int]] | None = None,
            image_token_counts: Sequence[Sequence[int]] | None = None, *,
            max_length: int | None = -1, pad_token_id: int = 0, padding_side: str = "right",
            pad_to: int | None = None) -> LlavaBatch:
  """Unpadded samples with IMAGE_TOKEN_INDEX (-200) per image -> LlavaBatch.

  image_token_counts[b]: the token count of every image attached to sample b, in order (default:
  cfg.tokens_per_crop per "<image>"). As in LLaVA, a sample consumes all its attached images:
  a text-only sample with one (dummy) image skips that image's tokens. max_length: LLaVA's
  tokenizer_model_max_length cut after expansion (-1: cfg.tokenizer_model_max_length; None: no
  cut). pad_to: pad T up to this length (fixed shapes). Placeholders carry cfg.image_token_index.
  """
  if max_length == -1:
    max_length = cfg.tokenizer_model_max_length
  if padding_side not in ("left", "right"):
    raise ValueError(f"padding_side {padding_side!r}")
  rows, offsets, start = [], [], 0
  for b, ids in enumerate(input_ids):
    ids = np.asarray(ids, np.int32)
    n_img = int(np.sum(ids == IMAGE_TOKEN_INDEX))
    counts = list(image_token_counts[b]) if image_token_counts is not None else [cfg.tokens_per_crop] * n_img
    if len(counts) < n_img:
      raise ValueError(f"sample {b}: {n_img} images in the text, {len(counts)} token counts")
    ex = tok.expand_image_tokens(ids, None if labels is None else labels[b], counts[:n_img],
                             placeholder_id=cfg.image_token_index, max_length=max_length)
    rows.append(ex)
    offsets.append(start)
    start += sum(counts)
  t = max([len(r.input_ids) for r in rows] + [0])
  if pad_to is not None:
    if pad_to < t:
      raise ValueError(f"pad_to {pad_to} < longest sample {t}")
    t = pad_to
  bsz = len(rows)
  out_ids = np.full((bsz, t), pad_token_id, np.int32)
  out_labels = np.full((bsz, t), IGNORE_INDEX, np.int32)
  mask = np.zeros((bsz, t), np.int32)
  pos = np.zeros((bsz, t), np.int32)
  img = np.zeros((bsz, t), bool)
  for b, r in enumerate(rows):  # host-side data preparation, not traced
    n = len(r.input_ids)
    sl = slice(0, n) if padding_side == "right" else slice(t - n, t)
    out_ids[b, sl], mask[b, sl], pos[b, sl], img[b, sl] = r.input_ids, 1, np.arange(n), r.image_positions
    if r.labels is not None:
      out_labels[b, sl] = r.labels
  return LlavaBatch(out_ids, out_labels if labels is not None else None, mask, pos, img,
                    np.asarray(offsets, np.int32))
