"""Jit-compiled incremental decoding with a functional KV cache.

Prompts are left-padded ([B, P], `left_pad` converts right-padded batches). One prefill call
fills the cache for all P slots, then a `lax.while_loop` decodes one token per step into slots
P, P+1, ... until every row has produced an eos/stop id or `max_new_tokens` is reached. Rows that
finished emit `pad_token_id`, as HF `generate` does. By default the stop ids are the model
config's `eos_token_id` and the pad is its `pad_token_id` (eos when it has none, as HF);
`default_stop_ids` / `default_pad_id` say which. `pad_batch` tokenizes a batch left-padded
(`pad_rows` pads id lists); `decode` gives the generated texts.
Greedy decoding equals HF's token for token;
HF's logits processors come first, on the raw logits: the repetition penalty
(RepetitionPenaltyLogitsProcessor: over the prompt ids after the left padding, and the tokens
generated so far) and `min_new_tokens` (MinNewTokensLengthLogitsProcessor: stop ids blocked until that many
new tokens); sampling then applies temperature, top-k, top-p (HF's warper order).

The model is any module with DecoderLM's calling convention (`input_ids | inputs_embeds`,
`attention_mask` over cache slots, `cache`, `cache_index`, `return_logits`) and a `logits`
method; `inputs_embeds` lets LLaVA/LISA put image features in the prefix.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxlisa.models import llm as llm_lib


@flax.struct.dataclass
class GenerateOutput:
  tokens: jax.Array  # [B, N] new tokens (pad after a row finished)
  lengths: jax.Array  # [B] number of tokens generated per row, eos included
  last_hidden: jax.Array | None = None  # [B, N, D] final-normed hidden state that produced each token
  prompt_hidden: jax.Array | None = None  # [B, P, D] final-normed hidden states of the prompt (prefill)


def left_pad(input_ids: np.ndarray, attention_mask: np.ndarray, pad_id: int = 0):
  """Move each row's real tokens to the right end (host-side, numpy). [B, T] -> [B, T]."""
  ids = np.full_like(input_ids, pad_id)
  mask = np.zeros_like(attention_mask)
  for b in range(input_ids.shape[0]):  # host-side data preparation, not traced
    real = input_ids[b][attention_mask[b].astype(bool)]
    if len(real):
      ids[b, -len(real):] = real
      mask[b, -len(real):] = 1
  return ids, mask


def _eos_tuple(eos) -> tuple[int, ...]:
  if eos is None:
    return ()
  return tuple(int(e) for e in eos) if isinstance(eos, (tuple, list)) else (int(eos),)


def default_stop_ids(config) -> tuple[int, ...]:
  """The model's eos ids (DecoderConfig.eos_token_id, filled by the converter from config.json /
  generation_config.json): what `generate` stops at unless given `stop_ids`."""
  return _eos_tuple(getattr(config, "eos_token_id", None))


def default_pad_id(config) -> int:
  """config.pad_token_id, else the first eos id (HF generate's fallback), else 0."""
  pad = getattr(config, "pad_token_id", None)
  if pad is not None:
    return int(pad)
  eos = default_stop_ids(config)
  return eos[0] if eos else 0


def pad_batch(tokenizer, texts: Sequence[str], **kw) -> tuple[np.ndarray, np.ndarray]:
  """Tokenize `texts` LEFT-padded, as `generate` needs: (input_ids [B, P], attention_mask [B, P]),
  numpy int32. kw go to the tokenizer (e.g. add_special_tokens=False)."""
  rows = [list(r) for r in tokenizer(list(texts), **kw)["input_ids"]]
  pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
  return pad_rows(rows, pad)


def pad_rows(rows: Sequence[Sequence[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token id lists -> LEFT-padded (input_ids [B, P], attention_mask [B, P]), numpy int32."""
  p = max(len(r) for r in rows)
  ids = np.full((len(rows), p), pad, np.int32)
  mask = np.zeros((len(rows), p), np.int32)
  for b, r in enumerate(rows):  # host-side data preparation
    if r:
      ids[b, p - len(r):], mask[b, p - len(r):] = r, 1
  return ids, mask


def decode(tokenizer, tokens, lengths, start: int = 0) -> list[str]:
  """Each row's tokens[start:start + length] as text without special tokens (HF / LAVIS
  `batch_decode(..., skip_special_tokens=True)` of what was generated), stripped."""
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  return [tokenizer.decode([int(x) for x in row[start:start + int(n)]], skip_special_tokens=True).strip()
          for row, n in zip(tokens, lengths)]


def penalize_repeats(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
  """HF RepetitionPenaltyLogitsProcessor on raw logits [B, V]: tokens marked in seen [B, V] are
  multiplied by penalty where negative, divided by it where positive."""
  if penalty == 1.0:
    return logits
  return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def mark_seen(seen: jax.Array, ids: jax.Array) -> jax.Array:
  """seen [B, V] bool with ids [B, N] set (ids outside [0, V), e.g. -1, are ignored)."""
  b, v = seen.shape
  idx = jnp.where((ids >= 0) & (ids < v), ids, v)
  return jnp.zeros((b, v + 1), bool).at[:, :v].set(seen).at[jnp.arange(b)[:, None], idx].set(True)[:, :v]


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """logits [B, V] -> logits with -inf outside the top-k / nucleus."""
  logits = logits / jnp.maximum(temperature, 1e-6)
  neg = jnp.finfo(logits.dtype).min
  if top_k and top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)  # ascending, as HF's TopPLogitsWarper
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted = remove_sorted.at[:, -1].set(False)  # keep at least the best token
    thresh = jnp.max(jnp.where(remove_sorted, sorted_logits, neg), axis=-1, keepdims=True)
    any_removed = jnp.any(remove_sorted, axis=-1, keepdims=True)
    logits = jnp.where(any_removed & (logits <= thresh), neg, logits)
  return logits


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "stop_ids", "pad_token_id",
                                             "do_sample", "temperature", "top_k", "top_p", "streamer",
                                             "collect_hidden", "repetition_penalty", "min_new_tokens",
                                             "collect_prompt_hidden"))
def generate(module, params, input_ids: jax.Array | None, attention_mask: jax.Array, *,
             inputs_embeds: jax.Array | None = None, max_new_tokens: int = 32,
             stop_ids: Sequence[int] | None = None, pad_token_id: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             rng: jax.Array | None = None, streamer: Callable | None = None,
             collect_hidden: bool = False, repetition_penalty: float = 1.0, min_new_tokens: int = 0,
             penalty_ids: jax.Array | None = None, collect_prompt_hidden: bool = False) -> GenerateOutput:
  """Decode up to `max_new_tokens` after a left-padded prompt.

  input_ids [B, P] (or inputs_embeds [B, P, D]); attention_mask [B, P] (1 = real token).
  stop_ids: eos and any extra stop token ids (None: the model config's eos, `default_stop_ids`;
  () never stops early). pad_token_id: what finished rows emit (None: `default_pad_id`). streamer(step, tokens[B]) is called on the host
  after each step (ordered io_callback) when given. collect_hidden keeps the last hidden state
  that produced each new token ([B, N, D]), e.g. to read LISA's [SEG] embeddings.
  repetition_penalty (HF's, on raw logits) counts penalty_ids [B, P'] (ids < 0 skipped; default
  input_ids after each row's left padding, as HF 5; nothing with inputs_embeds alone, as HF) and
  the generated tokens;
  min_new_tokens blocks every stop id until that many tokens are out (HF's min_new_tokens).
  collect_prompt_hidden also returns the prefill's final-normed hidden states ([B, P, D]).
  """
  c = module.config
  stop_ids = default_stop_ids(c) if stop_ids is None else tuple(stop_ids)
  pad_token_id = default_pad_id(c) if pad_token_id is None else int(pad_token_id)
  variables = {"params": params}
  b, p = attention_mask.shape
  total = p + max_new_tokens
  cache = llm_lib.init_cache(c, b, total)
  mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.zeros((b, max_new_tokens), jnp.int32)], 1)
  out = module.apply(variables, input_ids, mask, inputs_embeds=inputs_embeds, cache=cache,
                     cache_index=0, return_logits=False)
  last = out.last_hidden_state[:, -1:]
  logits = module.apply(variables, last, method=module.logits)[:, -1].astype(jnp.float32)
  stop = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  d = last.shape[-1]
  v = logits.shape[-1]
  seen = jnp.zeros((b, v if repetition_penalty != 1.0 else 0), bool)
  ctx = input_ids if penalty_ids is None else penalty_ids
  if repetition_penalty != 1.0 and ctx is not None:
    ctx = ctx.astype(jnp.int32)
    if penalty_ids is None:  # HF 5: the left padding (before each row's first real token) is not counted
      first_real = jnp.argmax(attention_mask != 0, axis=1)
      ctx = jnp.where(jnp.arange(p)[None] < first_real[:, None], -1, ctx)
    seen = mark_seen(seen, ctx)
  is_stop_tok = jnp.any(jnp.arange(v)[:, None] == stop[None, :], axis=-1)  # [V]

  def process(logits, i, seen):
    """HF logits processors, in HF's order: repetition penalty, then min new tokens."""
    logits = penalize_repeats(logits, seen, repetition_penalty)
    if min_new_tokens > 0:
      logits = jnp.where(is_stop_tok[None] & (i < min_new_tokens), -jnp.inf, logits)
    return logits

  def pick(logits, key):
    if not do_sample:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)

  def cond(state):
    i, _, _, done, *_ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, tokens, hidden, done, logits, last, cache, mask, rng, seen = state
    rng, key = jax.random.split(rng)
    tok = pick(process(logits, i, seen), key)
    tok = jnp.where(done, pad_token_id, tok)
    if repetition_penalty != 1.0:
      seen = mark_seen(seen, tok[:, None])
    tokens = tokens.at[:, i].set(tok)
    if collect_hidden:
      hidden = hidden.at[:, i].set(last[:, 0].astype(hidden.dtype))
    if streamer is not None:
      io_callback(streamer, None, i, tok, ordered=True)
    new_done = done | jnp.any(tok[:, None] == stop[None, :], axis=-1)
    mask = mask.at[:, p + i].set(1)
    o = module.apply(variables, tok[:, None], mask, cache=cache, cache_index=p + i, return_logits=False)
    new_logits = module.apply(variables, o.last_hidden_state, method=module.logits)[:, -1]
    return (i + 1, tokens, hidden, new_done, new_logits.astype(jnp.float32), o.last_hidden_state,
            o.cache, mask, rng, seen)

  tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)
  hidden = jnp.zeros((b, max_new_tokens, d) if collect_hidden else (b, 0, d), last.dtype)
  done = jnp.zeros((b,), bool)
  state = (jnp.int32(0), tokens, hidden, done, logits, last, out.cache, mask, rng, seen)
  _, tokens, hidden, done, *_ = jax.lax.while_loop(cond, body, state)
  is_stop = jnp.any(tokens[..., None] == stop[None, None, :], axis=-1)
  first_stop = jnp.where(jnp.any(is_stop, 1), jnp.argmax(is_stop, 1) + 1, max_new_tokens)
  return GenerateOutput(tokens=tokens, lengths=first_stop.astype(jnp.int32),
                        last_hidden=hidden if collect_hidden else None,
                        prompt_hidden=out.last_hidden_state if collect_prompt_hidden else None)


@functools.partial(jax.jit, static_argnames=("module",))
def embed_inputs(module, params, *args, **kwargs):
  """`module.embed_inputs(*args, **kwargs)` under jit: every multimodal family's images + ids ->
  (inputs_embeds [B, T, D], attention_mask [B, T]) for its decoder LM (None kwargs are fine)."""
  return module.apply({"params": params}, *args, method="embed_inputs", **kwargs)


def generate_from_embeds(text_config: llm_lib.DecoderConfig, lm_params, inputs_embeds: jax.Array,
                         attention_mask: jax.Array, **kw) -> GenerateOutput:
  """`generate` on the decoder LM `DecoderLM(text_config)` whose params are the sub-tree `lm_params`
  of a multimodal model (params['language_model'], ['opt_model'], ['llm_model']), after the prefix
  inputs_embeds [B, P, D] with attention_mask [B, P] (left padded; from the model's `embed_inputs`).
  kw: `generate`'s options (max_new_tokens, stop_ids, pad_token_id, do_sample, collect_hidden, ...)."""
  return generate(llm_lib.DecoderLM(text_config), lm_params, None, jnp.asarray(attention_mask),
                  inputs_embeds=inputs_embeds, **kw)
