"""Captions of the BLIP family, decoded with HF `generate`'s semantics (jaxlisa.inference.beam_search):

  blip_captions     BLIP (LAVIS `BlipCaption.generate`, HF `BlipForConditionalGeneration.generate`)
  qformer_captions  BLIP-2 stage 1 from the Q-Former's own LM head (LAVIS `Blip2Qformer.generate`;
                    qformer_caption_texts decodes them, as main.py --config.mode=caption)
  generate_captions BLIP-2 OPT, greedy / sampling (LAVIS `Blip2OPT.generate`; jaxlisa.inference.generate)
  beam_captions     BLIP-2 OPT, beam search (HF `Blip2ForConditionalGeneration.generate`)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlisa.inference import beam_search as bs
from jaxlisa.inference import generate as gen_lib
from jaxlisa.models import blip as blip_lib
from jaxlisa.models import llm as llm_lib
from jaxlisa.models.blip import BlipForConditionalGeneration
from jaxlisa.models.blip2 import Blip2OPT, Blip2Qformer
from jaxlisa.models.llm import DecoderLM


@functools.partial(jax.jit, static_argnames=("module", "num_beams", "max_length", "min_length",
                                             "repetition_penalty", "length_penalty", "early_stopping",
                                             "use_nucleus_sampling", "top_p", "top_k", "temperature",
                                             "num_return_sequences"))
def blip_captions(module: BlipForConditionalGeneration, params, pixels: jax.Array, prompt_ids: jax.Array, *,
                  num_beams: int = 3, max_length: int = 30, min_length: int = 10, repetition_penalty: float = 1.0,
                  length_penalty: float = 1.0, early_stopping: bool | str = False, use_nucleus_sampling: bool = False,
                  top_p: float = 0.9, top_k: int = 50, temperature: float = 1.0, num_return_sequences: int = 1,
                  rng: jax.Array | None = None):
  """BLIP captions (LAVIS `BlipCaption.generate`, HF `BlipForConditionalGeneration.generate`).

  pixels [B, H, W, 3]; prompt_ids [B, P]: [DEC] + prompt tokens (no trailing [SEP]), the same length
  for every row. max_length / min_length count the prompt, as HF. Beam search by default; num_beams=1
  is HF's greedy decoding (repetition penalty on the raw logits, finished rows padded with pad);
  nucleus sampling (num_beams 1, top_p, HF's default top_k 50) with use_nucleus_sampling. Returns
  (sequences [B * R, max_length], lengths [B * R] generated tokens incl. eos); the tail after the end
  holds HF's fill value (pad, or eos when pad is 0) for beams, pad for greedy and sampling.
  """
  c = module.config.text
  k = 1 if use_nucleus_sampling else num_beams
  b, p = prompt_ids.shape
  variables = {"params": params}
  cache = blip_lib.init_cache(c, b * k, max_length)
  first, cache, cross_kv = module.apply(variables, pixels, prompt_ids, cache, k, method=module.prefill)

  def step(state, tokens, index):
    logits, new_cache = module.apply(variables, tokens, state["cross_kv"], state["cache"], index,
                                     method=module.decode_step)
    return logits[:, -1], {"cache": new_cache, "cross_kv": state["cross_kv"]}

  state = {"cache": cache, "cross_kv": cross_kv}
  eos = (c.sep_token_id,)
  if use_nucleus_sampling or k == 1:  # HF: num_beams=1 without sampling is greedy decoding
    rng = jax.random.PRNGKey(0) if rng is None else rng
    seqs, lengths = bs.sample(step, state, first, prompt_ids, rng, max_length=max_length, min_length=min_length,
                              eos_ids=eos, pad_token_id=c.pad_token_id, repetition_penalty=repetition_penalty,
                              do_sample=use_nucleus_sampling, temperature=temperature, top_k=top_k, top_p=top_p)
    return seqs, lengths
  fill = c.pad_token_id if c.pad_token_id else eos[0]  # HF: `pad_token_id or eos_token_id[0]`
  out = bs.beam_search(step, state, first, prompt_ids, num_beams=k, max_length=max_length, min_length=min_length,
                       eos_ids=eos, fill_value=fill, repetition_penalty=repetition_penalty,
                       length_penalty=length_penalty, early_stopping=early_stopping,
                       num_return_sequences=num_return_sequences, state_batch_axis=1)
  r = num_return_sequences
  return out.sequences.reshape(b * r, max_length), out.lengths.reshape(b * r)


def generate_captions(model: Blip2OPT, params, pixels, prompt_ids, prompt_mask, *, max_new_tokens: int = 30,
                      eos_token_id: int | tuple[int, ...] | None = None, pad_token_id: int | None = None,
                      repetition_penalty: float = 1.0, min_length: int = 0, length_penalty: float = 1.0,
                      **kw) -> gen_lib.GenerateOutput:
  """Captions / answers: [opt_proj(queries); prompt] as inputs_embeds into
  `generate_from_embeds` (greedy, or sampling with do_sample/top_p/temperature in kw).
  prompt_ids / prompt_mask [B, P] left-padded OPT tokens (BOS first; P may be 1). eos defaults to
  the text config's (LAVIS passes the id of "\\n").

  LAVIS `Blip2OPT.generate`'s arguments: repetition_penalty (HF's, on raw logits, over the ids HF
  `Blip2ForConditionalGeneration.generate` holds: the Q image-token ids (config.image_token_index;
  none when unset), the prompt after its left padding, the generated tokens); min_length = minimum
  new tokens (LAVIS hands inputs_embeds alone to OPT's generate, whose ids then start empty);
  length_penalty only scores beams (`beam_captions`), as in HF greedy/sampling it has no effect."""
  del length_penalty  # beam-only in HF; accepted for LAVIS's signature
  c = model.config.text
  embeds, mask = gen_lib.embed_inputs(model, params, pixels, prompt_ids, prompt_mask)
  eos = c.eos_token_id if eos_token_id is None else eos_token_id
  stop = tuple(eos) if isinstance(eos, (tuple, list)) else (() if eos is None else (eos,))
  pad = c.pad_token_id if pad_token_id is None else pad_token_id
  b, nq = prompt_ids.shape[0], model.config.num_query_tokens
  image_ids = jnp.full((b, nq), -1 if model.config.image_token_index is None else model.config.image_token_index,
                       jnp.int32)
  penalty_ids = jnp.concatenate([image_ids, jnp.where(_after_left_pad(prompt_mask), prompt_ids, -1)], axis=1)
  return gen_lib.generate_from_embeds(c, params["opt_model"], embeds, mask,
                                      max_new_tokens=max_new_tokens, stop_ids=stop, pad_token_id=pad or 0,
                                      repetition_penalty=float(repetition_penalty),
                                      min_new_tokens=int(min_length), penalty_ids=penalty_ids, **kw)


def _after_left_pad(mask: jax.Array) -> jax.Array:
  """[B, P] -> [B, P] bool: positions from each row's first real token on (HF 5's prompt_ignore_length)."""
  mask = jnp.asarray(mask)
  return jnp.arange(mask.shape[1])[None] >= jnp.argmax(mask != 0, axis=1)[:, None]


@functools.partial(jax.jit, static_argnames=("model", "num_beams", "max_length", "min_length", "repetition_penalty",
                                             "use_nucleus_sampling", "top_p"))
def qformer_captions(model: Blip2Qformer, params, pixels, *, num_beams: int = 3, max_length: int = 30,
                     min_length: int = 10, repetition_penalty: float = 1.0, use_nucleus_sampling: bool = False,
                     top_p: float = 0.9, rng: jax.Array | None = None):
  """LAVIS `Blip2Qformer.generate`: captions from the Q-Former's own LM head. The text starts with
  "[DEC]" after the query K/V of the image (queries-only pass, cached as `prefix_kv`); eos "[SEP]";
  beam search (HF semantics, jaxlisa.inference.beam_search), greedy decoding for num_beams=1 (as
  HF), or nucleus sampling (top_p, HF's default top_k 50). max/min length count the [DEC] token.
  Returns (sequences [B, max_length] with [DEC] first, lengths [B] generated tokens)."""
  qc = model.config.qformer
  k = 1 if use_nucleus_sampling else num_beams
  b = pixels.shape[0]
  variables = {"params": params}

  def query_kv(mdl, x):
    return mdl.query_output(mdl.image_embeds(x)).query_kv

  qkv = model.apply(variables, pixels, method=query_kv)
  qkv = jax.tree.map(lambda x: jnp.repeat(x, k, axis=1), qkv)  # [L, B * K, Q, N, H]
  shape = (qc.num_hidden_layers, b * k, max_length, qc.num_attention_heads, qc.head_dim)
  cache = {"k": jnp.zeros(shape, jnp.dtype(qc.dtype)), "v": jnp.zeros(shape, jnp.dtype(qc.dtype))}
  slots = jnp.ones((b * k, max_length), jnp.int32)

  def text_step(mdl, tokens, prefix, cache, index):
    out = mdl.Qformer(tokens, slots, prefix_kv=prefix, cache=cache, cache_index=index)
    return mdl.Qformer.logits(out.last_hidden_state[:, -1:])[:, -1], out.cache

  def step(state, tokens, index):
    logits, new_cache = model.apply(variables, tokens, state["prefix"], state["cache"], index, method=text_step)
    return logits, {"prefix": state["prefix"], "cache": new_cache}

  prompt = jnp.full((b, 1), qc.bos_token_id, jnp.int32)
  first, cache = model.apply(variables, jnp.repeat(prompt, k, axis=0), qkv, cache, 0, method=text_step)
  state = {"prefix": qkv, "cache": cache}
  if use_nucleus_sampling or k == 1:  # HF: num_beams=1 without sampling is greedy decoding
    return bs.sample(step, state, first, prompt, jax.random.PRNGKey(0) if rng is None else rng,
                     max_length=max_length, min_length=min_length, eos_ids=(qc.sep_token_id,),
                     pad_token_id=qc.pad_token_id, repetition_penalty=repetition_penalty,
                     do_sample=use_nucleus_sampling, top_p=top_p)
  fill = qc.pad_token_id if qc.pad_token_id else qc.sep_token_id  # HF: `pad_token_id or eos_token_id[0]`
  res = bs.beam_search(step, state, first, prompt, num_beams=k, max_length=max_length, min_length=min_length,
                       eos_ids=(qc.sep_token_id,), fill_value=fill, repetition_penalty=repetition_penalty,
                       state_batch_axis=1)
  return res.sequences[:, 0], res.lengths[:, 0]


def qformer_caption_texts(model: Blip2Qformer, params, tokenizer, pixels, **kw) -> list[str]:
  """`qformer_captions(model, params, pixels, **kw)` as texts: LAVIS's `tokenizer.batch_decode(outputs,
  skip_special_tokens=True)` of each row after [DEC], up to its end."""
  seqs, lengths = qformer_captions(model, params, pixels, **kw)
  return gen_lib.decode(tokenizer, seqs, lengths, start=1)


@functools.partial(jax.jit, static_argnames=("model", "num_beams", "max_new_tokens", "min_new_tokens", "eos_ids",
                                             "fill_value", "repetition_penalty", "length_penalty", "early_stopping",
                                             "num_return_sequences"))
def beam_captions(model: Blip2OPT, params, pixels, prompt_ids, prompt_mask, *, num_beams: int = 5,
                  max_new_tokens: int = 30, min_new_tokens: int = 0, eos_ids: tuple[int, ...] = (),
                  fill_value: int = 1, repetition_penalty: float = 1.0, length_penalty: float = 1.0,
                  early_stopping: bool | str = False, num_return_sequences: int = 1):
  """Beam search over OPT after [opt_proj(queries); prompt] (LAVIS `Blip2OPT.generate` defaults to 5
  beams), with HF's beam semantics (jaxlisa.inference.beam_search); num_beams=1 is HF's greedy
  decoding (fill_value then pads finished rows; num_return_sequences must be 1). The hypotheses are written as HF
  `Blip2ForConditionalGeneration.generate` returns them: Q image-token ids (config.image_token_index;
  -1 when unset, never penalised), the prompt ids, then the new tokens; lengths count new tokens.
  prompt_ids / prompt_mask [B, P] (unpadded prompts keep the repetition penalty HF-exact).
  Returns (sequences [B * R, Q + P + max_new_tokens], lengths [B * R])."""
  c = model.config.text
  k = num_beams
  b, p = prompt_ids.shape
  nq = model.config.num_query_tokens
  embeds, mask = model.apply({"params": params}, pixels, prompt_ids, prompt_mask, method=Blip2OPT.embed_inputs)
  total = nq + p + max_new_tokens
  lm = DecoderLM(c)
  rep = lambda x: jnp.repeat(x, k, axis=0)
  slots = jnp.concatenate([rep(mask).astype(jnp.int32), jnp.ones((b * k, max_new_tokens), jnp.int32)], axis=1)
  cache = llm_lib.init_cache(c, b * k, total)
  out = lm.apply({"params": params["opt_model"]}, None, slots, inputs_embeds=rep(embeds), cache=cache,
                 cache_index=0)
  first = out.logits[:, -1]

  def step(cache, tokens, index):
    o = lm.apply({"params": params["opt_model"]}, tokens, slots, cache=cache, cache_index=index)
    return o.logits[:, -1], o.cache

  image_ids = jnp.full((b, nq), -1 if model.config.image_token_index is None else model.config.image_token_index,
                       jnp.int32)
  hf_prompt = jnp.concatenate([image_ids, prompt_ids.astype(jnp.int32)], axis=1)
  if k == 1:  # HF: num_beams=1 is greedy decoding (penalty on raw logits, finished rows padded)
    seqs, lengths = bs.sample(step, out.cache, first, hf_prompt, jax.random.PRNGKey(0), max_length=total,
                              min_length=nq + p + min_new_tokens, eos_ids=eos_ids, pad_token_id=fill_value,
                              repetition_penalty=repetition_penalty, do_sample=False)
    return seqs, lengths
  res = bs.beam_search(step, out.cache, first, hf_prompt, num_beams=k, max_length=total,
                       min_length=nq + p + min_new_tokens, eos_ids=eos_ids, fill_value=fill_value,
                       repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                       early_stopping=early_stopping, num_return_sequences=num_return_sequences,
                       state_batch_axis=1)
  r = num_return_sequences
  return res.sequences.reshape(b * r, total), res.lengths.reshape(b * r)
