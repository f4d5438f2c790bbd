"""BLIP captioning (salesforce BLIP `BLIP_Decoder`, LAVIS `blip_caption`, HF `BlipForConditionalGeneration`),
and a jit-compiled beam search / nucleus sampler with HF `generate`'s semantics.

Model: ViT (HF `BlipVisionModel`: pre-LN blocks, fused qkv, final `post_layernorm`) -> image_embeds
[B, 1 + P, Dv]; BERT text decoder (HF `BlipTextLMHeadModel`): word + position embeddings + LN, layers of
causal self-attention, cross-attention to image_embeds and FFN (post-LN, exact GELU, eps 1e-12), LM head
`cls.predictions` tied to the word embeddings.

The ViT is jaxlisa's EVA module (the same computation: patch conv with bias, CLS, absolute positions,
x + attn(norm1 x), x + mlp(norm2 x), final LayerNorm as `ln_vision`); the key bias of the fused qkv is
dropped by the converter (softmax is invariant to a per-query constant). The decoder reuses the
Q-Former's BERT blocks (`QFormerConfig` doubles as its BertConfig: cross-attention in every layer).

Captioning (BLIP): text = prompt ("a picture of ") + caption, [CLS] replaced by the [DEC] bos; LM loss
with label smoothing 0.1 on the caption tokens (prompt and padding -100). Generation: prompt tokens
without the trailing [SEP], eos = [SEP]; `beam_search` (num_beams, min/max length, repetition penalty,
length penalty, early stopping, all as HF) or `sample` (repetition penalty, temperature, top-k, top-p;
greedy when do_sample=False, which is what num_beams=1 means, as HF), each one `lax.while_loop` with
static shapes.

Parameters: visual_encoder/... (EVA tree, ln_vision = post_layernorm), text_decoder/bert/embeddings/...,
text_decoder/bert/encoder/layer_{i}/{attention,crossattention}/{self,output}/..., .../intermediate/dense,
.../output/{dense,LayerNorm}, text_decoder/cls/predictions/{transform/..., bias}.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxlisa.inference.generate import _filter_logits
from jaxlisa.models.eva import EVAViTConfig, EVAVisionTransformer
from jaxlisa.models.layers import constrain
from jaxlisa.models.config_base import ConfigMixin
from jaxlisa.models.losses import causal_lm_cross_entropy
from jaxlisa.models.qformer import (IGNORE_INDEX, BATCH_LEN_EMBED, BertEmbeddings, DenseLayerNorm, Intermediate,
                                    QFormerAttention, QFormerConfig, _OnlyMLMHead, self_attention_mask)


def blip_text_config(**kw) -> QFormerConfig:
  """BERT decoder config of BLIP (bert-base + [DEC] and [ENC]: vocab 30524; cross-attention in every
  layer; no query tokens)."""
  base = dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
              intermediate_size=3072, encoder_hidden_size=768, cross_attention_freq=1, num_query_tokens=0,
              hidden_dropout_prob=0.0, bos_token_id=30522, sep_token_id=102, pad_token_id=0)
  return QFormerConfig(**{**base, **kw})


@dataclasses.dataclass(frozen=True)
class BlipConfig(ConfigMixin):
  vision: EVAViTConfig = dataclasses.field(default_factory=lambda: EVAViTConfig(
      image_size=384, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_dim=3072,
      layer_norm_eps=1e-6, ln_vision_eps=1e-6))
  text: QFormerConfig = dataclasses.field(default_factory=blip_text_config)
  prompt: str = "a picture of "
  label_smoothing: float = 0.1

  @property
  def scan_layers(self) -> bool:
    return self.vision.scan_layers




@flax.struct.dataclass
class BlipTextOutput:
  logits: jax.Array  # [B, T, V]
  last_hidden_state: jax.Array  # [B, T, D]
  cache: dict | None = None  # {'k','v': [L, B, S, N, H]} self-attention cache
  cross_kv: dict | None = None  # {'k','v': [L, B, Timg, N, H]} cross-attention K/V of the image


@flax.struct.dataclass
class BlipOutput:
  logits: jax.Array  # [B, T, V]
  loss: jax.Array | None
  image_embeds: jax.Array  # [B, 1 + P, Dv]


class BlipTextLayer(nn.Module):
  """HF `BlipTextLayer` (decoder): self-attention, cross-attention, FFN; post-LN residuals."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, h, mask, enc, enc_mask, layer_cache, cache_index, cross_kv, deterministic):
    c = self.config
    h = constrain(h, BATCH_LEN_EMBED)
    a, _, new_cache = QFormerAttention(c, name="attention")(h, h, mask, None, layer_cache, cache_index, 0,
                                                             deterministic)
    a, kv, _ = QFormerAttention(c, name="crossattention")(a, enc, enc_mask, deterministic=deterministic,
                                                          static_kv=cross_kv)
    y = DenseLayerNorm(c, name="output")(Intermediate(c, name="intermediate")(a), a, deterministic)
    return constrain(y, BATCH_LEN_EMBED), new_cache, kv


class _BlipTextEncoder(nn.Module):
  config: QFormerConfig

  @nn.compact
  def __call__(self, x, mask, enc, enc_mask, cache, cache_index, cross_kv, deterministic):
    caches, ks, vs = [], [], []
    for i in range(self.config.num_hidden_layers):
      lc = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]}
      ckv = None if cross_kv is None else (cross_kv["k"][i], cross_kv["v"][i])
      x, nc, (k, v) = BlipTextLayer(self.config, name=f"layer_{i}")(x, mask, enc, enc_mask, lc, cache_index, ckv,
                                                                    deterministic)
      caches.append(nc)
      ks.append(k)
      vs.append(v)
    new_cache = None if cache is None else jax.tree.map(lambda *xs: jnp.stack(xs), *caches)
    return x, new_cache, {"k": jnp.stack(ks), "v": jnp.stack(vs)}


class _BlipTextModel(nn.Module):
  config: QFormerConfig

  def setup(self):
    self.embeddings = BertEmbeddings(self.config)
    self.encoder = _BlipTextEncoder(self.config)


class BlipTextDecoder(nn.Module):
  """HF `BlipTextLMHeadModel` / BLIP `BertLMHeadModel` (`bert` + `cls`)."""
  config: QFormerConfig

  def setup(self):
    self.bert = _BlipTextModel(self.config)
    self.cls = _OnlyMLMHead(self.config)

  def __call__(self, input_ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, *,
               cross_kv: dict | None = None, cache: dict | None = None, cache_index: jax.Array | int = 0,
               deterministic: bool = True) -> BlipTextOutput:
    """input_ids [B, T]; attention_mask [B, T] (or [B, S] over cache slots); encoder_hidden_states
    [B, Timg, Dv] (or cross_kv from an earlier call); cache {'k','v': [L, B, S, N, H]}."""
    c = self.config
    b, t = input_ids.shape
    offset = cache_index if cache is not None else 0
    x = self.bert.embeddings(input_ids, None, offset, deterministic)
    if attention_mask is None:
      attention_mask = jnp.ones((b, cache["k"].shape[2] if cache is not None else t), jnp.int32)
    mask = self_attention_mask(b, 0, t, text_mask=attention_mask, causal=True, q_offset=offset)
    enc_mask = None
    if encoder_attention_mask is not None:
      enc_mask = encoder_attention_mask.astype(bool)[:, None, None, :]
    enc = None if encoder_hidden_states is None else encoder_hidden_states.astype(jnp.dtype(c.dtype))
    if enc is None and cross_kv is None:
      raise ValueError("the BLIP text decoder needs encoder_hidden_states or cross_kv")
    h, new_cache, kv = self.bert.encoder(x, mask, enc, enc_mask, cache, offset, cross_kv, deterministic)
    logits = self.cls(h, self.bert.embeddings.word_embeddings.embedding if c.tie_word_embeddings else None)
    return BlipTextOutput(logits=logits, last_hidden_state=h, cache=new_cache, cross_kv=kv)


class BlipForConditionalGeneration(nn.Module):
  """BLIP captioner: `visual_encoder` (ViT, EVA module) + `text_decoder`."""
  config: BlipConfig

  def setup(self):
    self.visual_encoder = EVAVisionTransformer(self.config.vision)
    self.text_decoder = BlipTextDecoder(self.config.text)

  def image_embeds(self, pixels: jax.Array) -> jax.Array:
    """pixels [B, H, W, 3] (normalized, NHWC) -> [B, 1 + P, Dv] (after the final LayerNorm)."""
    return self.visual_encoder(pixels).image_embeds

  def __call__(self, pixels, input_ids, attention_mask=None, labels=None, deterministic: bool = True) -> BlipOutput:
    """input_ids [B, T] ([DEC] first); labels [B, T] (-100 ignored; see `caption_targets`): next-token
    CE with config.label_smoothing, mean over real targets."""
    img = self.image_embeds(pixels)
    out = self.text_decoder(input_ids, attention_mask, img, deterministic=deterministic)
    loss = None
    if labels is not None:
      loss = causal_lm_cross_entropy(out.logits, labels, self.config.label_smoothing)
    return BlipOutput(logits=out.logits, loss=loss, image_embeds=img)

  def decode_step(self, input_ids, cross_kv, cache, cache_index):
    """One incremental decoder call: input_ids [B, T] at cache slots cache_index.. -> (logits [B, T, V], cache)."""
    out = self.text_decoder(input_ids, None, cross_kv=cross_kv, cache=cache, cache_index=cache_index)
    return out.logits, out.cache

  def prefill(self, pixels, input_ids, cache, num_beams: int = 1):
    """Image -> cross K/V, repeated num_beams times per image ([B * K, ...]), then the prompt
    [B, P] (repeated likewise) into the cache. Returns (last logits [B * K, V], cache, cross_kv)."""
    img = jnp.repeat(self.image_embeds(pixels), num_beams, axis=0)
    ids = jnp.repeat(input_ids, num_beams, axis=0)
    out = self.text_decoder(ids, None, img, cache=cache, cache_index=0)
    return out.logits[:, -1], out.cache, out.cross_kv


def caption_targets(input_ids: jax.Array, attention_mask: jax.Array, prompt_length: int) -> jax.Array:
  """BLIP decoder targets: padding and the first prompt_length tokens ([DEC] + prompt) -> -100."""
  t = jnp.where(attention_mask.astype(bool), input_ids, IGNORE_INDEX)
  return jnp.where(jnp.arange(input_ids.shape[1])[None] < prompt_length, IGNORE_INDEX, t)


def init_cache(c: QFormerConfig, batch: int, length: int, dtype=None) -> dict:
  shape = (c.num_hidden_layers, batch, length, c.num_attention_heads, c.head_dim)
  dt = jnp.dtype(dtype or c.dtype)
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


# ----------------------------------------------------------------------------- decoding
def _penalize_repeats(scores: jax.Array, seqs: jax.Array, length: jax.Array, penalty: float) -> jax.Array:
  """HF RepetitionPenaltyLogitsProcessor: scores [N, V] of tokens present in seqs[:, :length]
  ([N, M]) are multiplied by penalty where negative, divided where positive."""
  if penalty == 1.0:
    return scores
  n, v = scores.shape
  valid = (jnp.arange(seqs.shape[1])[None] < length) & (seqs >= 0) & (seqs < v)
  present = jnp.zeros((n, v + 1), bool).at[jnp.arange(n)[:, None], jnp.where(valid, seqs, v)].set(True)[:, :v]
  return jnp.where(present, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def _block_eos(scores: jax.Array, length: jax.Array, min_length: int, eos: jax.Array) -> jax.Array:
  """HF MinLengthLogitsProcessor: eos scores -> -inf while the sequence is shorter than min_length."""
  is_eos = jnp.any(jnp.arange(scores.shape[-1])[:, None] == eos[None, :], axis=-1)
  return jnp.where(is_eos[None] & (length < min_length), -jnp.inf, scores)


@flax.struct.dataclass
class BeamSearchOutput:
  sequences: jax.Array  # [B, R, M] prompt + generated tokens, filled with fill_value after each end
  scores: jax.Array  # [B, R] length-penalised log-probabilities
  lengths: jax.Array  # [B, R] generated tokens (eos included)


def beam_search(step: Callable, state: Any, first_logits: jax.Array, prompt: jax.Array, *, num_beams: int,
                max_length: int, min_length: int = 0, eos_ids: tuple[int, ...] = (), fill_value: int = 0,
                repetition_penalty: float = 1.0, length_penalty: float = 1.0,
                early_stopping: bool | str = False, num_return_sequences: int = 1,
                state_batch_axis: int = 0) -> BeamSearchOutput:
  """HF `_beam_search` (transformers 5) with static shapes, inside one `lax.while_loop`.

  prompt [B, P] (the same for every beam); first_logits [B * K, V] for the last prompt position;
  state: pytree whose leaves have the B * K axis at `state_batch_axis` (caches: [L, B * K, ...] -> 1),
  reordered along with the beams;
  step(state, tokens [B * K, 1], index) -> (logits [B * K, V], state) feeds the token at slot `index`.
  Keeps 2K candidates per step (K live, eos-ended ones scored by length ** length_penalty), the early
  stop heuristic and `early_stopping` (False | True | "never") of HF. Returns the best
  num_return_sequences hypotheses per batch row.
  """
  b, p = prompt.shape
  k, m = num_beams, max_length
  v = first_logits.shape[-1]
  keep = max(2, 1 + len(eos_ids)) * k
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  seqs0 = jnp.full((b, k, m), fill_value, jnp.int32).at[:, :, :p].set(jnp.broadcast_to(prompt[:, None], (b, k, p)))
  running_scores0 = jnp.concatenate([jnp.zeros((b, 1)), jnp.full((b, k - 1), -1e9)], axis=1).astype(jnp.float32)
  top_mask = jnp.arange(keep) < k
  gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def cond(s):
    return ~s["done"]

  def body(s):
    cur = s["cur"]
    running = s["running"]
    logp = jax.nn.log_softmax(s["logits"].astype(jnp.float32), axis=-1)
    flat = running.reshape(b * k, m)
    logp = _penalize_repeats(logp, flat, cur, repetition_penalty)
    logp = _block_eos(logp, cur, min_length, eos)
    acc = (logp.reshape(b, k, v) + s["running_scores"][:, :, None]).reshape(b, k * v)
    top_scores, top_idx = jax.lax.top_k(acc, keep)
    beam, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
    cand = gather(running, beam)
    cand = jnp.where(jnp.arange(m)[None, None] == cur, tok[..., None], cand)
    hits = jnp.any(tok[..., None] == eos, axis=-1) | (cur + 1 >= m)
    # live beams for the next step
    live_scores = top_scores + hits.astype(jnp.float32) * -1e9
    _, nxt = jax.lax.top_k(live_scores, k)
    new_running = gather(cand, nxt)
    new_running_scores = gather(live_scores, nxt)
    src = (gather(beam, nxt) + jnp.arange(b)[:, None] * k).reshape(b * k)
    # finished hypotheses
    gen_len = cur + 1 - p
    fin = top_scores / (gen_len.astype(jnp.float32) ** length_penalty)
    full = jnp.all(s["finished"], axis=-1, keepdims=True) & (early_stopping is True)
    fin = fin + full.astype(jnp.float32) * -1e9
    fin = fin + (~s["unsatisfied"]).astype(jnp.float32) * -1e9
    just = hits & top_mask[None]
    fin = fin + (~just).astype(jnp.float32) * -1e9
    merged_scores = jnp.concatenate([s["scores"], fin], axis=1)
    _, best = jax.lax.top_k(merged_scores, k)
    seqs = gather(jnp.concatenate([s["seqs"], cand], axis=1), best)
    scores = gather(merged_scores, best)
    finished = gather(jnp.concatenate([s["finished"], just], axis=1), best)
    lengths = gather(jnp.concatenate([s["lengths"], jnp.full((b, keep), gen_len, jnp.int32)], axis=1), best)
    # early-stop heuristic and loop condition (after cur_len += 1, as HF)
    cur = cur + 1
    if early_stopping == "never" and length_penalty > 0.0:
      best_len = jnp.float32(m - p)
    else:
      best_len = (cur - p).astype(jnp.float32)
    best_running = new_running_scores[:, :1] / (best_len ** length_penalty)
    worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), -1e9)
    unsatisfied = s["unsatisfied"] & jnp.any(best_running > worst, axis=-1, keepdims=True)
    go_on = jnp.any(unsatisfied) & ~(jnp.all(finished) & (early_stopping is True)) & ~jnp.all(hits)
    # reorder the model state, feed the last token of every live beam
    state = jax.tree.map(lambda x: jnp.take(x, src, axis=state_batch_axis), s["state"])
    last = jnp.take_along_axis(new_running.reshape(b * k, m), jnp.full((b * k, 1), cur - 1), axis=1)
    logits, state = step(state, last, cur - 1)
    return dict(cur=cur, running=new_running, running_scores=new_running_scores, seqs=seqs, scores=scores,
                finished=finished, lengths=lengths, unsatisfied=unsatisfied, done=~go_on, logits=logits,
                state=state)

  s0 = dict(cur=jnp.int32(p), running=seqs0, running_scores=running_scores0, seqs=seqs0,
            scores=jnp.full((b, k), -1e9, jnp.float32), finished=jnp.zeros((b, k), bool),
            lengths=jnp.zeros((b, k), jnp.int32), unsatisfied=jnp.ones((b, 1), bool), done=jnp.bool_(p >= m),
            logits=first_logits, state=state)
  s = jax.lax.while_loop(cond, body, s0)
  r = num_return_sequences
  return BeamSearchOutput(sequences=s["seqs"][:, :r], scores=s["scores"][:, :r], lengths=s["lengths"][:, :r])


def sample(step: Callable, state: Any, first_logits: jax.Array, prompt: jax.Array, rng: jax.Array, *,
           max_length: int, min_length: int = 0, eos_ids: tuple[int, ...] = (), pad_token_id: int = 0,
           repetition_penalty: float = 1.0, do_sample: bool = True, temperature: float = 1.0, top_k: int = 50,
           top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """HF `_sample`: repetition penalty and min length on the logits, then temperature, top-k, top-p and
  a categorical draw (argmax when do_sample=False). prompt [B, P]; step as in `beam_search`.
  Returns (sequences [B, M] prompt + tokens, pad after eos; lengths [B] generated tokens)."""
  b, p = prompt.shape
  m = max_length
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  seqs0 = jnp.full((b, m), pad_token_id, jnp.int32).at[:, :p].set(prompt)

  def cond(s):
    return (s["cur"] < m) & ~jnp.all(s["done"])

  def body(s):
    cur = s["cur"]
    scores = _penalize_repeats(s["logits"].astype(jnp.float32), s["seqs"], cur, repetition_penalty)
    scores = _block_eos(scores, cur, min_length, eos)
    rng, key = jax.random.split(s["rng"])
    if do_sample:
      k = min(top_k, scores.shape[-1])  # HF TopKLogitsWarper: top_k capped at the vocabulary
      tok = jax.random.categorical(key, _filter_logits(scores, temperature, k, top_p), axis=-1)
    else:
      tok = jnp.argmax(scores, axis=-1)
    tok = jnp.where(s["done"], pad_token_id, tok.astype(jnp.int32))
    seqs = jax.lax.dynamic_update_slice(s["seqs"], tok[:, None], (0, cur))
    done = s["done"] | jnp.any(tok[:, None] == eos[None], axis=-1)
    lengths = s["lengths"] + (~s["done"]).astype(jnp.int32)
    logits, state = step(s["state"], tok[:, None], cur)
    return dict(cur=cur + 1, seqs=seqs, done=done, lengths=lengths, logits=logits, state=state, rng=rng)

  s0 = dict(cur=jnp.int32(p), seqs=seqs0, done=jnp.zeros((b,), bool), lengths=jnp.zeros((b,), jnp.int32),
            logits=first_logits, state=state, rng=rng)
  s = jax.lax.while_loop(cond, body, s0)
  return s["seqs"], s["lengths"]


@functools.partial(jax.jit, static_argnames=("module", "num_beams", "max_length", "min_length",
                                             "repetition_penalty", "length_penalty", "early_stopping",
                                             "use_nucleus_sampling", "top_p", "top_k", "temperature",
                                             "num_return_sequences"))
def generate(module: BlipForConditionalGeneration, params, pixels: jax.Array, prompt_ids: jax.Array, *,
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
  cache = init_cache(c, b * k, max_length)
  first, cache, cross_kv = module.apply(variables, pixels, prompt_ids, cache, k, method=module.prefill)

  def step(state, tokens, index):
    logits, new_cache = module.apply(variables, tokens, state["cross_kv"], state["cache"], index,
                                     method=module.decode_step)
    return logits[:, -1], {"cache": new_cache, "cross_kv": state["cross_kv"]}

  state = {"cache": cache, "cross_kv": cross_kv}
  eos = (c.sep_token_id,)
  if use_nucleus_sampling or k == 1:  # HF: num_beams=1 without sampling is greedy decoding
    rng = jax.random.PRNGKey(0) if rng is None else rng
    seqs, lengths = sample(step, state, first, prompt_ids, rng, max_length=max_length, min_length=min_length,
                           eos_ids=eos, pad_token_id=c.pad_token_id, repetition_penalty=repetition_penalty,
                           do_sample=use_nucleus_sampling, temperature=temperature, top_k=top_k, top_p=top_p)
    return seqs, lengths
  fill = c.pad_token_id if c.pad_token_id else eos[0]  # HF: `pad_token_id or eos_token_id[0]`
  out = beam_search(step, state, first, prompt_ids, num_beams=k, max_length=max_length, min_length=min_length,
                    eos_ids=eos, fill_value=fill, repetition_penalty=repetition_penalty,
                    length_penalty=length_penalty, early_stopping=early_stopping,
                    num_return_sequences=num_return_sequences, state_batch_axis=1)
  r = num_return_sequences
  return out.sequences.reshape(b * r, max_length), out.lengths.reshape(b * r)


def dummy_inputs(c: BlipConfig):
  v = c.vision
  return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32), jnp.zeros((1, 4), jnp.int32))
