"""Reasoning segmentation: images + questions -> answer text and one mask per generated [SEG].

`segment(model, params, tokenizer, images, prompts)`:
  1. prompt = llava_v1("<image>\\n" + question) with an empty assistant turn (as the official
     chat.py), "<image>" -> "<im_start><image><im_end>", expanded to N image placeholders;
     prompts are left-padded to a length bucket;
  2. CLIP and SAM's image encoder run once per image (jit);
  3. jit-compiled KV-cache decoding (jaxlisa.inference.generate) collects, for every new token,
     the final-normed hidden state that produced it, so a generated [SEG]'s embedding is read
     as it goes (the official code re-runs the whole sequence at every step instead);
  4. each [SEG] embedding -> text_hidden_fcs -> SAM mask decoder -> mask logits at the original
     image size; pixels with logit > 0 are the mask.
An answer without [SEG] gives no mask (`SegmentResult.masks` is empty) and says so.

Two options reproduce the official code where it differs from that chat path:
  - `prompt_seg_masks=True`: the official `evaluate()` re-reads the whole output sequence and makes
    a mask for every [SEG] in it, including one that stands in the prompt (LISA issue #145); by
    default only generated [SEG]s give masks. The prompt's hidden states come from the prefill
    (the KV-cache design is kept). Masks are ordered as the official ones: prompt [SEG]s first.
  - `answers=[...]`: a pre-filled assistant answer per prompt (the template's full turn, as the
    official validation feeds it): nothing is generated; each [SEG] in the answer gives its
    teacher-forced mask, equal to `Lisa.__call__` on the same sequence.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlisa.data import conversation as conv_lib
from jaxlisa.data import tokenization as tok_lib
from jaxlisa.data.preprocess import clip_preprocess, sam_preprocess
from jaxlisa.inference.generate import generate_from_embeds, left_pad
from jaxlisa.models import sam as sam_lib
from jaxlisa.models.lisa import Lisa
from jaxlisa.models.llm import DecoderLM


class PromptTooLongError(ValueError):
  """The prompt plus max_new_tokens does not fit the model's context."""


@dataclasses.dataclass
class SegmentResult:
  text: str  # the generated answer (special tokens kept, as the official chat.py prints it)
  masks: np.ndarray  # bool [n_seg, H, W], one per generated [SEG], original image size
  mask_logits: np.ndarray  # float32 [n_seg, H, W]

  @property
  def has_seg(self) -> bool:
    return len(self.masks) > 0


def build_prompt(question: str, conv_type: str = "llava_v1", use_mm_start_end: bool = True,
                 answer: str | None = None) -> str:
  """The chat prompt for `question`; with `answer` the assistant turn is filled (teacher forcing)."""
  conv = conv_lib.get_template(conv_type)
  conv = conv.append(conv.roles[0], conv_lib.DEFAULT_IMAGE_TOKEN + "\n" + question).append(conv.roles[1], answer)
  return tok_lib.replace_image_tokens(conv.get_prompt(), use_mm_start_end)


@functools.partial(jax.jit, static_argnames=("model",))
def _encode(model: Lisa, params, input_ids, clip_pixels, sam_pixels):
  """input_ids [B, P] with placeholders; one image per prompt -> (inputs_embeds, SAM embeddings)."""
  def fn(m):
    image_tokens, image_embeddings = m.image_features(clip_pixels, sam_pixels)
    embeds, _ = m.embed_inputs(input_ids, None, image_tokens)
    return embeds, image_embeddings
  return model.apply({"params": params}, method=fn)


@functools.partial(jax.jit, static_argnames=("model",))
def _prompt_states(model: Lisa, params, embeds, mask):
  """Teacher-forced pass: inputs_embeds [B, P, D], mask [B, P] -> final-normed hidden [B, P, D]."""
  lm = DecoderLM(model.config.llava.text)
  return lm.apply({"params": params["llava"]["language_model"]}, None, mask, inputs_embeds=embeds,
                  return_logits=False).last_hidden_state


@functools.partial(jax.jit, static_argnames=("model", "out_hw"))
def _masks(model: Lisa, params, hidden, image_embeddings, image_index, resize_hw, orig_hw, out_hw):
  """hidden [P, D] ([SEG] states), image_index [P], orig_hw [2] -> mask logits [P, *out_hw]
  (valid in [:H, :W] of orig_hw, zero beyond)."""
  def fn(m):
    seg = m.text_hidden_fcs(hidden)
    return m.decode_masks(seg, image_embeddings, image_index)
  low = model.apply({"params": params}, method=fn)
  return sam_lib.postprocess_masks_dynamic(low, resize_hw, orig_hw, out_shape=out_hw,
                                           padded_size=model.config.sam.img_size)


def _prompt_rows(c, tokenizer, prompts, conv_type, use_mm_start_end, answers=None):
  """(rows, starts): each prompt's token ids with the image placeholders expanded (the filled
  assistant turn included with `answers`), and where each row's answer begins."""
  expand = lambda ids: tok_lib.expand_image_tokens(ids, None, c.num_image_tokens, c.llava.image_token_index).input_ids
  rows, starts = [], []  # starts: where each row's answer begins (its [SEG]s always give masks)
  for i, q in enumerate(prompts):
    question = expand(tok_lib.tokenizer_image_token(build_prompt(q, conv_type, use_mm_start_end), tokenizer))
    rows.append(question if answers is None else expand(tok_lib.tokenizer_image_token(
        build_prompt(q, conv_type, use_mm_start_end, answers[i]), tokenizer)))
    starts.append(len(question))
  return rows, starts


def _check_length(c, rows, max_new_tokens: int, max_length: int | None) -> int:
  """The context limit; PromptTooLongError when the longest row + max_new_tokens exceeds it."""
  limit = max_length or c.llava.text.max_position_embeddings
  longest = max(len(r) for r in rows)
  if longest + max_new_tokens > limit:
    raise PromptTooLongError(f"prompt of {longest} tokens (incl. {c.num_image_tokens} image tokens) + "
                             f"max_new_tokens {max_new_tokens} exceeds the model context of {limit} tokens")
  return limit


def check_prompts(model_config, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
                  conv_type: str = "llava_v1", use_mm_start_end: bool = True, max_length: int | None = None) -> None:
  """PromptTooLongError unless every prompt fits as `segment` would run it (no weights needed)."""
  rows, _ = _prompt_rows(model_config, tokenizer, prompts, conv_type, use_mm_start_end)
  _check_length(model_config, rows, max_new_tokens, max_length)


def segment(model: Lisa, params, tokenizer, images: Sequence[np.ndarray], prompts: Sequence[str], *,
            max_new_tokens: int = 64, conv_type: str = "llava_v1", use_mm_start_end: bool = True,
            max_length: int | None = None, length_buckets: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
            streamer=None, prompt_seg_masks: bool = False,
            answers: Sequence[str] | None = None, row_max_new_tokens: Sequence[int] | None = None,
            mask_size_multiple: int = 0) -> list[SegmentResult]:
  """images: uint8 [H, W, 3] each (one per prompt); prompts: questions. See the module docstring.

  prompt_seg_masks: also a mask for each [SEG] in the prompt (the official evaluate()); answers:
  pre-filled assistant answers (teacher-forced masks, no generation; `text` is the answer).
  row_max_new_tokens: per-prompt caps (<= max_new_tokens) applied to the decoded answers, so one
  compiled decode of max_new_tokens serves rows that asked for fewer (serving).
  mask_size_multiple > 0: the mask decoder runs at the output size rounded up to this multiple and
  with the [SEG] count rounded up to a power of two, then crops, so differently sized images share
  one compiled mask program (serving); 0 = exact sizes (one compile per size)."""
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
  if answers is not None and len(answers) != len(prompts):
    raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
  c = model.config
  rows, starts = _prompt_rows(c, tokenizer, prompts, conv_type, use_mm_start_end, answers)
  if answers is not None:
    max_new_tokens = 0
  limit = _check_length(c, rows, max_new_tokens, max_length)
  longest = max(len(r) for r in rows)
  p = next((b for b in length_buckets if b >= longest), longest)
  p = min(p, limit - max_new_tokens)
  ids = np.zeros((len(rows), p), np.int32)
  mask = np.zeros((len(rows), p), np.int32)
  for b, r in enumerate(rows):
    ids[b, :len(r)], mask[b, :len(r)] = r, 1
  ids, mask = left_pad(ids, mask)
  s = c.sam.img_size
  clip = np.stack([clip_preprocess(im, c.llava.vision.image_size, c.llava.vision.image_size) for im in images])
  sams, resizes = zip(*[sam_preprocess(im, s) for im in images])
  embeds, image_embeddings = _encode(model, params, jnp.asarray(ids), jnp.asarray(clip), jnp.asarray(np.stack(sams)))
  t = c.llava.text
  eos = t.eos_token_id if isinstance(t.eos_token_id, tuple) else (t.eos_token_id,)
  if answers is None:
    out = generate_from_embeds(t, params["llava"]["language_model"], embeds, mask, max_new_tokens=max_new_tokens,
                               stop_ids=tuple(e for e in eos if e is not None), pad_token_id=t.pad_token_id or 0,
                               streamer=streamer, collect_hidden=True, collect_prompt_hidden=prompt_seg_masks)
    tokens, lengths, hidden, prompt_hidden = jax.device_get((out.tokens, out.lengths, out.last_hidden,
                                                             out.prompt_hidden))
  else:
    prompt_hidden = np.asarray(_prompt_states(model, params, embeds, jnp.asarray(mask)))
    tokens = hidden = np.zeros((len(rows), 0), np.int32)
    lengths = np.zeros((len(rows),), np.int32)
  results = []
  if row_max_new_tokens is not None:
    lengths = np.minimum(lengths, np.asarray(row_max_new_tokens, lengths.dtype))
  for b, im in enumerate(images):
    new = tokens[b, :lengths[b]]
    if answers is None:
      text = tokenizer.decode([int(x) for x in new], skip_special_tokens=False).replace("\n", "")
    else:
      text = answers[b]
    states = []  # the hidden state before each [SEG], prompt ones first (the official order)
    if prompt_seg_masks or answers is not None:
      pad = p - len(rows[b])  # left padding of row b
      row = np.asarray(rows[b])
      first = 1 if prompt_seg_masks else max(starts[b], 1)
      where_p = [j for j in np.flatnonzero(row == c.seg_token_idx) if j >= first]
      states += [prompt_hidden[b, pad + j - 1] for j in where_p]
    where = np.flatnonzero(new == c.seg_token_idx)
    states += [hidden[b, j] for j in where]
    h, w = im.shape[:2]
    if not states:
      results.append(SegmentResult(text, np.zeros((0, h, w), bool), np.zeros((0, h, w), np.float32)))
      continue
    k = n = len(states)
    out_hw, sel = (h, w), np.stack(states)
    if mask_size_multiple > 0:
      mul = mask_size_multiple
      out_hw = (-(-h // mul) * mul, -(-w // mul) * mul)
      n = 1 << (k - 1).bit_length()
      sel = np.concatenate([sel, np.repeat(sel[-1:], n - k, 0)])
    logits = _masks(model, params, jnp.asarray(sel), image_embeddings, jnp.full((n,), b, jnp.int32),
                    jnp.asarray(np.repeat(np.asarray(resizes[b])[None], n, 0)), jnp.asarray((h, w)), out_hw)
    logits = np.asarray(logits)[:k, :h, :w]
    results.append(SegmentResult(text, logits > 0, logits))
  return results


def overlay(image: np.ndarray, mask: np.ndarray, color=(255, 0, 0)) -> np.ndarray:
  """The official chat.py visualisation: masked pixels = 0.5 * image + 0.5 * color."""
  out = image.astype(np.float32).copy()
  out[mask] = 0.5 * out[mask] + 0.5 * np.asarray(color, np.float32)
  return out.astype(np.uint8)
