"""BLIP-2 Querying Transformer (LAVIS `lavis/models/blip2_models/Qformer.py`, HF `Blip2QFormerModel`).

A BERT encoder (post-LN, exact GELU, LayerNorm eps 1e-12) whose layers see a sequence
[queries; text]:
  - self-attention over the whole sequence (mask per mode, see below);
  - cross-attention to the image features in layers `i % cross_attention_freq == 0`, for the
    query positions only;
  - a separate FFN for the query positions (`intermediate_query` / `output_query`) and for the
    text positions (`intermediate` / `output`).
The embeddings are word + absolute position embeddings for the text (positions start at 0 after
the queries), the learned query embeddings (owned by the BLIP-2 model, `query_tokens`) in front,
then one LayerNorm over the concatenation (LAVIS `bert.embeddings.LayerNorm`, HF `qformer.layernorm`).

Modes (`QFormer.bert(...)`):
  queries only        query_embeds, encoder_hidden_states              (BLIP-2 image features)
  text only           input_ids, attention_mask                        (unimodal text encoder, ITC)
  queries + text      both, causal=False: bidirectional                (ITM)
  queries + causal    both, causal=True: queries see queries, text sees all queries and earlier
                      text (LAVIS "UniLM" mask)                       (ITG)
  text after queries  input_ids with `prefix_kv` = the query states' self-attention K/V of an
                      earlier queries-only call (LAVIS `past_key_values`), causal: the LM pass of
                      ITG and Q-Former captioning reuse the query pass instead of recomputing it.
With `cache` / `cache_index` the text positions are written into a functional KV cache (slots),
for incremental decoding.

Parameters (names mirror LAVIS `Qformer.*`; layers are not scanned: cross-attention layers differ):
  bert/embeddings/{word_embeddings,position_embeddings}/embedding (when use_text);
  bert/embeddings/LayerNorm/{scale,bias};
  bert/encoder/layer_{i}/attention/self/{query,key,value}/{kernel [D, N, H], bias [N, H]};
  bert/encoder/layer_{i}/attention/output/{dense/{kernel [N, H, D], bias}, LayerNorm};
  bert/encoder/layer_{i}/crossattention/... (key/value kernels [encoder_hidden_size, N, H]);
  bert/encoder/layer_{i}/{intermediate_query,intermediate}/dense, {output_query,output}/{dense,LayerNorm};
  cls/predictions/transform/{dense,LayerNorm}, cls/predictions/bias [V],
  cls/predictions/decoder/kernel [D, V] unless tied to the word embeddings (LAVIS ties them).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlisa.constants import IGNORE_INDEX
from jaxlisa.models.config_base import ConfigMixin
from jaxlisa.models import attention as attn_lib
from jaxlisa.models.layers import BATCH_LEN_EMBED, DenseGeneral, Embed, LayerNorm, activation, constrain, dtypes
from jaxlisa.models.losses import IGNORE_INDEX, causal_lm_cross_entropy


@dataclasses.dataclass(frozen=True)
class QFormerConfig(ConfigMixin):
  """bert-base-uncased + BLIP-2 extras. Field names follow LAVIS / HF `Blip2QFormerConfig`."""
  vocab_size: int = 30523  # bert-base-uncased + "[DEC]" (LAVIS resizes the embeddings)
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  max_position_embeddings: int = 512
  hidden_dropout_prob: float = 0.1  # attention-probability dropout is not implemented
  cross_attention_freq: int = 2
  encoder_hidden_size: int = 1408
  num_query_tokens: int = 32
  use_text: bool = True  # word/position embeddings + text FFN (stage 1); blip2_opt/HF captioners drop them
  lm_head: bool = True  # cls.predictions (ITG / Q-Former captioning)
  tie_word_embeddings: bool = True
  pad_token_id: int = 0
  bos_token_id: int = 30522  # "[DEC]"
  sep_token_id: int = 102  # "[SEP]", the caption eos
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "xla"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def has_cross_attention(self, layer: int) -> bool:
    return layer % self.cross_attention_freq == 0


@flax.struct.dataclass
class QFormerOutput:
  last_hidden_state: jax.Array  # [B, Q + T, D] (query positions first)
  query_kv: dict | None = None  # {'k','v': [L, B, Q, N, H]} self-attention K/V of the query positions
  cache: dict | None = None  # {'k','v': [L, B, S, N, H]} text KV cache after this call


def self_attention_mask(b: int, q_len: int, t_len: int, *, prefix_len: int = 0,
                        text_mask: jax.Array | None = None, causal: bool = False,
                        q_offset: jax.Array | int = 0) -> jax.Array:
  """Boolean self-attention mask [B, 1, Q + T, P + Q + S] (True = attend).

  Rows: Q query positions, then T text positions (at text slots q_offset + t). Keys: P prefix
  positions (cached query K/V), Q query positions, then S text slots; text_mask [B, S] marks real
  text slots (S = T without a cache). Bidirectional: every real key. Causal (ITG): query rows see
  prefix + query keys only; text rows see prefix + queries + text slots <= their own.
  """
  s = t_len if text_mask is None else text_mask.shape[-1]
  tmask = jnp.ones((b, s), bool) if text_mask is None else text_mask.astype(bool)
  kv_valid = jnp.concatenate([jnp.ones((b, prefix_len + q_len), bool), tmask], axis=1)  # [B, K]
  n_rows, n_keys = q_len + t_len, prefix_len + q_len + s
  if not causal:
    return jnp.broadcast_to(kv_valid[:, None, None, :], (b, 1, n_rows, n_keys))
  row_is_text = jnp.arange(n_rows) >= q_len
  row_slot = jnp.arange(n_rows) - q_len + q_offset
  key_is_text = jnp.arange(n_keys) >= prefix_len + q_len
  key_slot = jnp.arange(n_keys) - prefix_len - q_len
  allowed = jnp.where(row_is_text[:, None],
                      ~key_is_text[None, :] | (key_slot[None, :] <= row_slot[:, None]),
                      ~key_is_text[None, :])
  return allowed[None, None] & kv_valid[:, None, None, :]


class BertSelfAttention(nn.Module):
  """LAVIS `BertSelfAttention`: query/key/value projections ([D, N, H] kernels) and attention."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, x, kv_input, mask, prefix_kv=None, layer_cache=None, cache_index=0, text_start=0,
               static_kv=None):
    """x [B, T, D]; kv_input [B, S, D_kv] (x itself for self-attention); mask [B, 1, T, K].

    prefix_kv {'k','v': [B, P, N, H]} goes in front of the keys. layer_cache {'k','v': [B, S, N, H]}
    receives the keys/values of positions text_start.. at `cache_index` (the query positions before
    `text_start` stay uncached). static_kv (k, v) [B, S, N, H] replaces the key/value projections of
    kv_input (cross-attention K/V computed once for decoding). Returns (context [B, T, N, H],
    (k, v) of kv_input, new cache | None).
    """
    c = self.config
    kw = dict(**dtypes(c), use_bias=True)
    n, h = c.num_attention_heads, c.head_dim
    proj = lambda name: DenseGeneral((n, h), kernel_axes=("embed", "heads", "head_dim"), name=name, **kw)
    q = checkpoint_name(proj("query")(x), "query_proj")
    if static_kv is None:
      k = checkpoint_name(proj("key")(kv_input), "key_proj")
      v = checkpoint_name(proj("value")(kv_input), "value_proj")
    else:
      k, v = static_kv
    own = (k, v)
    new_cache = None
    if layer_cache is not None:
      upd = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, cache_index, 0, 0))
      new_cache = {"k": upd(layer_cache["k"], k[:, text_start:]), "v": upd(layer_cache["v"], v[:, text_start:])}
      k = jnp.concatenate([k[:, :text_start], new_cache["k"].astype(k.dtype)], axis=1)
      v = jnp.concatenate([v[:, :text_start], new_cache["v"].astype(v.dtype)], axis=1)
    if prefix_kv is not None:
      k = jnp.concatenate([prefix_kv["k"].astype(k.dtype), k], axis=1)
      v = jnp.concatenate([prefix_kv["v"].astype(v.dtype), v], axis=1)
    q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
    out = attn_lib.dot_product_attention(q, k, v, mask, scale=h ** -0.5, impl=c.attention_impl)
    return checkpoint_name(out, "context"), own, new_cache


class DenseLayerNorm(nn.Module):
  """BERT `*Output`: dense + dropout + LayerNorm(y + residual). in_axes=2 for the attention output
  ([B, T, N, H] context, kernel [N, H, D])."""
  config: QFormerConfig
  in_axes: int = 1
  kernel_axes: tuple = ("mlp", "embed")

  @nn.compact
  def __call__(self, y, residual, deterministic=True):
    c = self.config
    kw = dtypes(c)
    y = DenseGeneral(c.hidden_size, in_axes=self.in_axes, kernel_axes=self.kernel_axes, use_bias=True,
                     name="dense", **kw)(y)
    y = nn.Dropout(c.hidden_dropout_prob)(y, deterministic=deterministic)
    return LayerNorm(eps=c.layer_norm_eps, name="LayerNorm", **kw)(y + residual)


class Intermediate(nn.Module):
  """BERT `*Intermediate`: dense + activation."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    y = DenseGeneral(c.intermediate_size, kernel_axes=("embed", "mlp"), use_bias=True, name="dense",
                     **dtypes(c))(x)
    y = checkpoint_name(activation(c.hidden_act)(y), "mlpwi")
    return constrain(y, ("activation_batch", "activation_length", "activation_mlp"))


class QFormerAttention(nn.Module):
  """LAVIS `BertAttention`: `self` (projections + attention) and `output` (dense + LN)."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, x, kv_input, mask, prefix_kv=None, layer_cache=None, cache_index=0, text_start=0,
               deterministic=True, static_kv=None):
    ctx, kv, new_cache = BertSelfAttention(self.config, name="self")(x, kv_input, mask, prefix_kv, layer_cache,
                                                                      cache_index, text_start, static_kv)
    out = DenseLayerNorm(self.config, in_axes=2, kernel_axes=("heads", "head_dim", "embed"), name="output")(
        ctx, x, deterministic)
    return checkpoint_name(out, "out_proj"), kv, new_cache


class QFormerLayer(nn.Module):
  """LAVIS `BertLayer` with query_length = q_len (static)."""
  config: QFormerConfig
  layer_idx: int = 0

  @nn.compact
  def __call__(self, h, mask, q_len, enc=None, enc_mask=None, prefix_kv=None, layer_cache=None,
               cache_index=0, deterministic=True):
    """h [B, Q + T, D] -> (h [B, Q + T, D], (k, v) [B, Q + T, N, H], new text cache | None)."""
    c = self.config
    h = constrain(h, BATCH_LEN_EMBED)
    a, kv, new_cache = QFormerAttention(c, name="attention")(h, h, mask, prefix_kv, layer_cache, cache_index,
                                                              q_len, deterministic)
    t_len = h.shape[1] - q_len
    parts = []
    if q_len > 0:
      aq = a[:, :q_len]
      if c.has_cross_attention(self.layer_idx):
        if enc is None:
          raise ValueError(f"Q-Former layer {self.layer_idx} cross-attends: encoder_hidden_states required")
        aq, _, _ = QFormerAttention(c, name="crossattention")(aq, enc, enc_mask, deterministic=deterministic)
      parts.append(self._ffn("_query", aq, deterministic))
    if c.use_text and (t_len > 0 or self.is_initializing()):
      text = self._ffn("", a[:, q_len:] if t_len > 0 else a[:, :1], deterministic)
      if t_len > 0:
        parts.append(text)
    elif t_len > 0:
      raise ValueError("this Q-Former has no text parts (use_text=False)")
    out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return constrain(out, BATCH_LEN_EMBED), kv, new_cache

  def _ffn(self, suffix, x, deterministic):
    y = Intermediate(self.config, name=f"intermediate{suffix}")(x)
    return DenseLayerNorm(self.config, name=f"output{suffix}")(y, x, deterministic)


class BertEmbeddings(nn.Module):
  """LAVIS `BertEmbeddings`: LN([query_embeds; word + position embeddings]) + dropout."""
  config: QFormerConfig

  def setup(self):
    c = self.config
    kw = dtypes(c)
    if c.use_text:
      self.word_embeddings = Embed(c.vocab_size, c.hidden_size, **kw)
      self.position_embeddings = Embed(c.max_position_embeddings, c.hidden_size, axes=(None, "embed"), **kw)
    self.LayerNorm = LayerNorm(eps=c.layer_norm_eps, **kw)  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(c.hidden_dropout_prob)

  def __call__(self, input_ids=None, query_embeds=None, position_offset=0, deterministic=True):
    """input_ids [B, T] (at positions position_offset + t), query_embeds [B, Q, D] -> [B, Q + T, D]."""
    c = self.config
    parts = [] if query_embeds is None else [query_embeds.astype(jnp.dtype(c.dtype))]
    if input_ids is not None:
      if not c.use_text:
        raise ValueError("this Q-Former has no word embeddings (use_text=False)")
      pos = position_offset + jnp.arange(input_ids.shape[1])
      parts.append(self.word_embeddings(input_ids) + self.position_embeddings(pos)[None])
    elif c.use_text and self.is_initializing():
      _ = self.word_embeddings.embedding, self.position_embeddings.embedding
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class BertEncoder(nn.Module):
  """`bert.encoder`: layers `layer_{i}` (unscanned; cross-attention every `cross_attention_freq`)."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, x, mask, q_len, enc, enc_mask, prefix_kv, cache, cache_index, deterministic):
    c = self.config
    ks, vs, caches = [], [], []
    for i in range(c.num_hidden_layers):
      pkv = None if prefix_kv is None else {"k": prefix_kv["k"][i], "v": prefix_kv["v"][i]}
      lc = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]}
      x, (k, v), nc = QFormerLayer(c, i, name=f"layer_{i}")(x, mask, q_len, enc, enc_mask, pkv, lc, cache_index,
                                                            deterministic)
      ks.append(k[:, :q_len])
      vs.append(v[:, :q_len])
      caches.append(nc)
    query_kv = {"k": jnp.stack(ks), "v": jnp.stack(vs)} if q_len else None
    new_cache = None if cache is None else jax.tree.map(lambda *xs: jnp.stack(xs), *caches)
    return x, query_kv, new_cache


class BertModel(nn.Module):
  """LAVIS `Qformer.bert` (no pooler): every Q-Former mode, see the module docstring."""
  config: QFormerConfig

  def setup(self):
    self.embeddings = BertEmbeddings(self.config)
    self.encoder = BertEncoder(self.config)

  def __call__(self, input_ids=None, attention_mask=None, query_embeds=None, encoder_hidden_states=None,
               encoder_attention_mask=None, *, causal: bool = False, prefix_kv: dict | None = None,
               cache: dict | None = None, cache_index: jax.Array | int = 0,
               deterministic: bool = True) -> QFormerOutput:
    """input_ids [B, T]; attention_mask [B, T] text padding mask (or [B, S] over the cache slots);
    query_embeds [B, Q, D]; encoder_hidden_states [B, Timg, Dv]; encoder_attention_mask [B, Timg];
    prefix_kv {'k','v': [L, B, P, N, H]} (query K/V of an earlier call, LAVIS past_key_values);
    cache {'k','v': [L, B, S, N, H]} text KV cache, written at cache_index (implies causal)."""
    c = self.config
    if input_ids is None and query_embeds is None:
      raise ValueError("the Q-Former needs query_embeds and/or input_ids")
    q_len = 0 if query_embeds is None else query_embeds.shape[1]
    t_len = 0 if input_ids is None else input_ids.shape[1]
    b = (query_embeds if query_embeds is not None else input_ids).shape[0]
    offset = cache_index if cache is not None else 0
    x = self.embeddings(input_ids, query_embeds, offset, deterministic)
    text_mask = attention_mask
    if text_mask is None and (t_len or cache is not None):
      text_mask = jnp.ones((b, cache["k"].shape[2] if cache is not None else t_len), jnp.int32)
    p_len = 0 if prefix_kv is None else prefix_kv["k"].shape[2]
    mask = self_attention_mask(b, q_len, t_len, prefix_len=p_len, text_mask=text_mask,
                               causal=causal or cache is not None, q_offset=offset)
    enc = enc_mask = None
    if encoder_hidden_states is not None:
      enc = encoder_hidden_states.astype(jnp.dtype(c.dtype))
      em = jnp.ones(enc.shape[:2], bool) if encoder_attention_mask is None else encoder_attention_mask.astype(bool)
      enc_mask = em[:, None, None, :]
    x, query_kv, new_cache = self.encoder(x, mask, q_len, enc, enc_mask, prefix_kv, cache, offset, deterministic)
    return QFormerOutput(last_hidden_state=x, query_kv=query_kv, cache=new_cache)


class BertLMPredictionHead(nn.Module):
  """`cls.predictions`: transform (dense + act + LayerNorm), decoder (tied or own kernel) + bias."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, h, tied_table=None):
    """h [B, T, D] -> logits [B, T, V]; tied_table [V, D] when the decoder is tied."""
    c = self.config
    kw = dtypes(c)
    x = _Transform(c, name="transform")(h)
    if c.tie_word_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, tied_table.astype(x.dtype))
    else:
      logits = DenseGeneral(c.vocab_size, kernel_axes=("embed", "vocab"), name="decoder", **kw)(x)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), (c.vocab_size,),
                      jnp.dtype(c.param_dtype))
    logits = logits + bias.astype(logits.dtype)
    return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))


class _Transform(nn.Module):
  config: QFormerConfig

  @nn.compact
  def __call__(self, h):
    c = self.config
    kw = dtypes(c)
    x = DenseGeneral(c.hidden_size, kernel_axes=("embed", "mlp"), use_bias=True, name="dense", **kw)(h)
    return LayerNorm(eps=c.layer_norm_eps, name="LayerNorm", **kw)(activation(c.hidden_act)(x))


class _OnlyMLMHead(nn.Module):
  config: QFormerConfig

  def setup(self):
    self.predictions = BertLMPredictionHead(self.config)

  def __call__(self, h, tied_table=None):
    return self.predictions(h, tied_table)


class QFormer(nn.Module):
  """LAVIS `BertLMHeadModel` as the Q-Former: `bert` (+ `cls` when config.lm_head).

  apply(..., method=...) entry points: `__call__` = `bert` (all modes) and, when initializing, the LM
  head too; `logits(hidden [B, T, D]) -> [B, T, V]`; `lm_loss(...)` (ITG).
  """
  config: QFormerConfig

  def setup(self):
    self.bert = BertModel(self.config)
    if self.config.lm_head:
      self.cls = _OnlyMLMHead(self.config)

  def __call__(self, *args, **kw) -> QFormerOutput:
    out = self.bert(*args, **kw)
    if self.config.lm_head and self.is_initializing():
      self.logits(out.last_hidden_state[:, :1])
    return out

  def logits(self, hidden: jax.Array) -> jax.Array:
    c = self.config
    table = self.bert.embeddings.word_embeddings.embedding if c.tie_word_embeddings else None
    return self.cls(hidden, table)

  def lm_loss(self, input_ids: jax.Array, attention_mask: jax.Array, prefix_kv: dict, labels: jax.Array,
              label_smoothing: float = 0.1, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """ITG: text [B, T] after the cached query K/V (prefix_kv, from a queries-only call), causal;
    next-token CE with label smoothing over labels[:, 1:] (-100 ignored, mean over real targets).
    Returns (loss, logits [B, T, V])."""
    out = self.bert(input_ids, attention_mask, prefix_kv=prefix_kv, causal=True, deterministic=deterministic)
    logits = self.logits(out.last_hidden_state)
    return causal_lm_cross_entropy(logits, labels, label_smoothing), logits
