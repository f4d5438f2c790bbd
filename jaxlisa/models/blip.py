"""BLIP captioning (salesforce BLIP `BLIP_Decoder`, LAVIS `blip_caption`, HF `BlipForConditionalGeneration`).
Its decoding (beam search, greedy, nucleus sampling) is jaxlisa.inference.captioning.blip_captions.

Model: ViT (HF `BlipVisionModel`: pre-LN blocks, fused qkv, final `post_layernorm`) -> image_embeds
[B, 1 + P, Dv]; BERT text decoder (HF `BlipTextLMHeadModel`): word + position embeddings + LN, layers of
causal self-attention, cross-attention to image_embeds and FFN (post-LN, exact GELU, eps 1e-12), LM head
`cls.predictions` tied to the word embeddings.

The ViT is jaxlisa's EVA module (the same computation: patch conv with bias, CLS, absolute positions,
x + attn(norm1 x), x + mlp(norm2 x), final LayerNorm as `ln_vision`); the key bias of the fused qkv is
dropped by the converter (softmax is invariant to a per-query constant). The decoder reuses the
Q-Former's BERT blocks (`QFormerConfig` doubles as its BertConfig: cross-attention in every layer).

Captioning (BLIP): text = prompt ("a picture of ") + caption, [CLS] replaced by the [DEC] bos; LM loss
with label smoothing 0.1 on the caption tokens (prompt and padding -100). Generation feeds the prompt
tokens without the trailing [SEP] through `prefill` (image -> cross K/V, prompt -> cache), then
`decode_step` one token at a time; eos = [SEP].

Parameters: visual_encoder/... (EVA tree, ln_vision = post_layernorm), text_decoder/bert/embeddings/...,
text_decoder/bert/encoder/layer_{i}/{attention,crossattention}/{self,output}/..., .../intermediate/dense,
.../output/{dense,LayerNorm}, text_decoder/cls/predictions/{transform/..., bias}.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxlisa.constants import IGNORE_INDEX
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

  def dummy_inputs(self) -> tuple:
    """(pixels [1, S, S, C], input_ids [1, 4])."""
    v = self.vision
    return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32), jnp.zeros((1, 4), jnp.int32))


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
