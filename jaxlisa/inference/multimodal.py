"""Chat decoding of the LLaVA and MiniGPT4-Qwen families: the model's `embed_inputs` (images merged into
the token embeddings) is the `inputs_embeds` prefix of jaxlisa.inference.generate on the decoder LM's
sub-tree of params (`generate_from_embeds`). LISA's [SEG]-reading decode is jaxlisa.inference.segment.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxlisa.data import chatml
from jaxlisa.inference import generate as gen_lib
from jaxlisa.models.llava import Llava, anyres_feature_index
from jaxlisa.models.minigpt4qwen import MiniGPT4Qwen


def _maybe_array(x):
  return None if x is None else jnp.asarray(x)


def llava_generate(module: Llava, params, input_ids, attention_mask, pixel_values=None, image_sizes=None, *,
                   image_mask=None, image_row_offset=None, feature_index=None, **kw) -> gen_lib.GenerateOutput:
  """Greedy / sampled decoding after a LEFT-padded multimodal prompt.

  input_ids / attention_mask [B, P]; pixel_values, image_sizes, image_mask, image_row_offset,
  feature_index as `Llava.embed` (anyres image_sizes become feature_index here, on the host);
  **kw: max_new_tokens, stop_ids, pad_token_id, do_sample, ... Returns GenerateOutput (tokens [B, N]).
  """
  c = module.config
  if feature_index is None and c.is_anyres and image_sizes is not None:
    slot = pixel_values.shape[1] if pixel_values is not None and pixel_values.ndim == 5 else None
    feature_index = anyres_feature_index(c, np.asarray(image_sizes).tolist(), slot)[0]
  embeds, mask = gen_lib.embed_inputs(module, params, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                                      _maybe_array(pixel_values), image_mask=_maybe_array(image_mask),
                                      image_row_offset=_maybe_array(image_row_offset),
                                      feature_index=_maybe_array(feature_index))
  return gen_lib.generate_from_embeds(c.text, params["language_model"], embeds, mask, **kw)


def minigpt4qwen_generate(model: MiniGPT4Qwen, params, pixels, input_ids, attention_mask, *,
                          max_new_tokens: int = 64, stop_ids: Sequence[int] = (), pad_token_id: int | None = None,
                          **kw) -> gen_lib.GenerateOutput:
  """Answers: prompt ids [B, P] left-padded, with B * Q placeholders (`<ImageHere>` expanded by
  jaxlisa.data.chatml) -> greedy decoding on the merged inputs_embeds (sampling options in kw).
  stop_ids: <|im_end|> and <|im_start|> as the original."""
  c = model.config.llm
  embeds, mask = gen_lib.embed_inputs(model, params, pixels, input_ids, attention_mask)
  pad = c.pad_token_id if pad_token_id is None else pad_token_id
  return gen_lib.generate_from_embeds(c, params["llm_model"], embeds, mask, max_new_tokens=max_new_tokens,
                                      stop_ids=tuple(stop_ids), pad_token_id=pad or 0, **kw)


def minigpt4qwen_chat(model: MiniGPT4Qwen, params, tokenizer, pixels, queries: Sequence[str], *,
                      max_new_tokens: int = 64, system: str = chatml.SYSTEM_MESSAGE, **kw) -> list[str]:
  """MiniGPT4-Qwen `chat` for one turn per image: pixels [B, S, S, 3] (the LAVIS eval transform),
  queries B texts (chatml.chat_ids: "<Img><ImageHere></Img> " in front when a query has no
  <ImageHere>) -> B answers, decoded up to <|im_end|> / <|im_start|> (the original's stop words)
  without special tokens. kw: generate's sampling options (do_sample, top_p, temperature, rng, ...)."""
  rows = [chatml.chat_ids(tokenizer, q, model.config.num_query_tokens, system=system) for q in queries]
  ids, mask = gen_lib.pad_rows(rows, model.config.llm.pad_token_id or 0)
  stop = tuple(int(tokenizer.convert_tokens_to_ids(t)) for t in ("<|im_end|>", "<|im_start|>"))
  out = minigpt4qwen_generate(model, params, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask),
                              max_new_tokens=max_new_tokens, stop_ids=stop, **kw)
  return gen_lib.decode(tokenizer, out.tokens, out.lengths)
