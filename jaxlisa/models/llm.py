"""Decoder-only language models: LLaMA-1/2 and Vicuna, Mistral, Qwen2, Qwen(1), OPT.

One module family, switched by `DecoderConfig`:

| family  | norm      | positions        | MLP     | biases                      |
|---------|-----------|------------------|---------|-----------------------------|
| llama   | RMSNorm   | RoPE (rotate-half)| SwiGLU | none                        |
| mistral | RMSNorm   | RoPE + sliding window | SwiGLU | none                   |
| qwen2   | RMSNorm   | RoPE             | SwiGLU  | q/k/v                       |
| qwen    | RMSNorm   | RoPE             | SwiGLU  | q/k/v (fused `c_attn` split by the converter) |
| opt     | LayerNorm | learned, offset 2| ReLU fc1/fc2 | all; optional project_in/out; pre- or post-LN |

Parameters (module names mirror HF; scanned layers stack on a leading 'layers' axis):
  embed_tokens/embedding [V, D]; embed_positions/embedding [P+2, D] (opt);
  project_in/kernel, project_out/kernel (opt-350m);
  layers/input_layernorm, layers/post_attention_layernorm;
  layers/self_attn/{q,k,v}_proj/kernel [D, N|K, H] (+bias [N|K, H]); o_proj/kernel [N, H, D];
  layers/mlp/{gate,up,down}_proj/kernel  or  layers/mlp/{fc1,fc2}/kernel (+bias);
  norm (final norm); lm_head/kernel [D, V] unless embeddings are tied.

`apply({'params': p}, input_ids, attention_mask)` -> DecoderOutput(logits [B, T, V], ...).
With a KV cache (`init_cache`), `attention_mask` covers the cache slots [B, S] and
`cache_index` is where the new tokens are written.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlisa.models.config_base import LayerStackConfig
from jaxlisa.models import attention as attn_lib
from jaxlisa.models.layers import (BATCH_LEN_EMBED, DenseGeneral, Embed, FeedForward, LayerNorm, RMSNorm,
                                   activation, constrain, dtypes, layer_stack)

FAMILIES = ("llama", "mistral", "qwen2", "qwen", "opt")


@dataclasses.dataclass(frozen=True)
class DecoderConfig(LayerStackConfig):
  """Architecture + numerics of a decoder LM. Field names follow HF where one exists."""
  family: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None -> = num_attention_heads
  head_dim: int | None = None  # None -> hidden_size // num_attention_heads
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rope_scaling_factor: float = 1.0  # linear RoPE scaling
  norm_eps: float = 1e-6
  hidden_act: str = "silu"
  attention_bias: bool = False  # q/k/v biases (qwen2, qwen)
  o_proj_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None  # mistral (every layer), qwen2 (the "sliding_attention" layers)
  # HF `layer_types`: per layer "full_attention" | "sliding_attention"; None = every layer uses
  # sliding_window when it is set (Mistral). Qwen2 slides only layers >= max_window_layers.
  layer_types: tuple[str, ...] | None = None
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02  # std of the normal init of every kernel and embedding (HF's name)
  # OPT specifics
  word_embed_proj_dim: int | None = None  # != hidden_size -> project_in / project_out
  do_layer_norm_before: bool = True
  final_layer_norm: bool = True
  position_offset: int = 2
  # token ids (informational; generation reads them)
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = 0
  # LoRA on attention projections (LISA: r 8, alpha 16, dropout 0.05 on q_proj/v_proj); 0 = off
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.05
  lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

  def __post_init__(self):
    super().__post_init__()
    if self.family not in FAMILIES:
      raise ValueError(f"unknown decoder family {self.family!r}; expected one of {FAMILIES}")
    if self.layer_types is not None:
      bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
      if bad or len(self.layer_types) != self.num_hidden_layers:
        raise ValueError(f"layer_types must give 'full_attention' or 'sliding_attention' for each of the "
                         f"{self.num_hidden_layers} layers, got {self.layer_types}")

  @classmethod
  def qwen_7b(cls, **kw) -> "DecoderConfig":
    """Qwen-7B(-Chat), MiniGPT4-Qwen's LLM (its HF config.json; `c_attn` has biases)."""
    return cls(**{**dict(family="qwen", vocab_size=151936, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=8192, norm_eps=1e-6,
                         attention_bias=True, bos_token_id=None, eos_token_id=151643, pad_token_id=151643), **kw})

  @property
  def window_layers(self) -> tuple[bool, ...]:
    """Per layer: does it attend within sliding_window? ([L] static flags)"""
    if self.sliding_window is None:
      return (False,) * self.num_hidden_layers
    if self.layer_types is None:
      return (True,) * self.num_hidden_layers
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def is_opt(self) -> bool:
    return self.family == "opt"

  @property
  def embed_dim(self) -> int:
    """Width of the token embedding (OPT's word_embed_proj_dim)."""
    return self.word_embed_proj_dim or self.hidden_size

  def dummy_inputs(self) -> tuple:
    """(input_ids [1, 2],)."""
    return (jnp.zeros((1, 2), jnp.int32),)


@flax.struct.dataclass
class DecoderOutput:
  logits: jax.Array | None  # [B, T, V]
  last_hidden_state: jax.Array  # [B, T, D] after the final norm (and OPT's project_out)
  hidden_states: tuple | None = None  # L+1 x [B, T, D] as HF: embeddings, layer outputs, last = last_hidden_state
  cache: dict | None = None  # {'k','v': [L, B, S, K, H]}


def _init(c: DecoderConfig):
  return nn.initializers.normal(stddev=c.initializer_range)


class Attention(nn.Module):
  config: DecoderConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask, cos, sin, layer_cache, cache_index):
    """x [B, T, D]; mask [B, 1, T, S]; cos/sin [B, T, H] or None; layer_cache {'k','v': [B, S, K, H]}."""
    c = self.config
    kw = dict(**dtypes(c), kernel_init=_init(c))
    n, k, h = c.num_attention_heads, c.kv_heads, c.dim_per_head

    def lora(name):
      if c.lora_rank and name in c.lora_targets:
        return dict(lora_rank=c.lora_rank, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout)
      return {}

    q = DenseGeneral((n, h), kernel_axes=("embed", "heads", "head_dim"), use_bias=c.attention_bias,
                     name="q_proj", **kw, **lora("q_proj"))(x, self.deterministic)
    kk = DenseGeneral((k, h), kernel_axes=("embed", "kv_heads", "head_dim"), use_bias=c.attention_bias,
                      name="k_proj", **kw, **lora("k_proj"))(x, self.deterministic)
    v = DenseGeneral((k, h), kernel_axes=("embed", "kv_heads", "head_dim"), use_bias=c.attention_bias,
                     name="v_proj", **kw, **lora("v_proj"))(x, self.deterministic)
    q = checkpoint_name(q, "query_proj")
    kk = checkpoint_name(kk, "key_proj")
    v = checkpoint_name(v, "value_proj")
    if cos is not None:
      q = attn_lib.apply_rope(q, cos, sin)
      kk = attn_lib.apply_rope(kk, cos, sin)
    new_cache = None
    if layer_cache is not None:
      kk = jax.lax.dynamic_update_slice(layer_cache["k"], kk.astype(layer_cache["k"].dtype),
                                        (0, cache_index, 0, 0))
      v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype),
                                       (0, cache_index, 0, 0))
      new_cache = {"k": kk, "v": v}
    q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
    out = attn_lib.dot_product_attention(q, kk.astype(q.dtype), v.astype(q.dtype), mask,
                                         scale=h ** -0.5, impl=c.attention_impl)
    out = checkpoint_name(out, "context")
    out = DenseGeneral(c.hidden_size, in_axes=2, kernel_axes=("heads", "head_dim", "embed"),
                       use_bias=c.o_proj_bias, name="o_proj", **kw, **lora("o_proj"))(out, self.deterministic)
    return checkpoint_name(out, "out_proj"), new_cache


class MLP(nn.Module):
  """SwiGLU (LLaMA, Mistral, Qwen): down_proj(act(gate_proj(x)) * up_proj(x)), x [B, T, D] -> [B, T, D]."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(**dtypes(c), use_bias=c.mlp_bias, kernel_init=_init(c))
    act = activation(c.hidden_act)
    gate = DenseGeneral(c.intermediate_size, kernel_axes=("embed", "mlp"), name="gate_proj", **kw)(x)
    up = DenseGeneral(c.intermediate_size, kernel_axes=("embed", "mlp"), name="up_proj", **kw)(x)
    y = checkpoint_name(act(gate) * up, "mlpwi")
    y = constrain(y, ("activation_batch", "activation_length", "activation_mlp"))
    return checkpoint_name(DenseGeneral(c.hidden_size, kernel_axes=("mlp", "embed"), name="down_proj", **kw)(y),
                           "mlpwo")


def _mlp(c: DecoderConfig, name: str) -> nn.Module:
  """OPT's fc1 -> act -> fc2, or the SwiGLU MLP (gate/up/down_proj) of the other families."""
  if c.is_opt:
    return FeedForward(c.intermediate_size, c.hidden_act, use_bias=c.mlp_bias, kernel_init=_init(c), name=name,
                       **dtypes(c))
  return MLP(c, name=name)


def _norm(c: DecoderConfig, name: str):
  kw = dict(**dtypes(c), name=name)
  return LayerNorm(eps=c.norm_eps, **kw) if c.is_opt else RMSNorm(eps=c.norm_eps, **kw)


class DecoderLayer(nn.Module):
  """Pre-norm (or OPT post-norm) residual block. Scan-compatible: (carry, *xs) -> (carry, ys)."""
  config: DecoderConfig
  deterministic: bool = True
  collect_hidden: bool = False

  @nn.compact
  def __call__(self, h, mask, cos, sin, layer_cache, cache_index, window=None):
    """mask [B, 1, T, S], or a pair (full, windowed) when layers differ; window: bool scalar (this
    layer's flag, scanned over the layers) selecting from the pair."""
    c = self.config
    if isinstance(mask, (tuple, list)):
      mask = jnp.where(window, mask[1], mask[0])
    pre = c.do_layer_norm_before
    h = constrain(h, BATCH_LEN_EMBED)
    residual = h
    x = _norm(c, "input_layernorm")(h) if pre else h
    a, new_cache = Attention(c, self.deterministic, name="self_attn")(x, mask, cos, sin, layer_cache, cache_index)
    h = residual + a
    if not pre:
      h = _norm(c, "input_layernorm")(h)
    residual = h
    x = _norm(c, "post_attention_layernorm")(h) if pre else h
    h = residual + _mlp(c, "mlp")(x)
    if not pre:
      h = _norm(c, "post_attention_layernorm")(h)
    h = constrain(h, BATCH_LEN_EMBED)
    return h, (new_cache, h if self.collect_hidden else None)


class DecoderLM(nn.Module):
  """Causal LM. See module docstring for the parameter tree."""
  config: DecoderConfig

  def setup(self):
    c = self.config
    kw = dtypes(c)
    self.embed_tokens = Embed(c.vocab_size, c.embed_dim, embedding_init=_init(c), **kw)
    kw["kernel_init"] = _init(c)
    if c.is_opt:
      self.embed_positions = Embed(c.max_position_embeddings + c.position_offset, c.hidden_size,
                                   axes=(None, "embed"), embedding_init=_init(c), dtype=kw["dtype"],
                                   param_dtype=kw["param_dtype"])
      if c.embed_dim != c.hidden_size:
        self.project_in = DenseGeneral(c.hidden_size, kernel_axes=("embed_proj", "embed"), **kw)
        self.project_out = DenseGeneral(c.embed_dim, kernel_axes=("embed", "embed_proj"), **kw)
    if not c.is_opt or c.final_layer_norm:
      self.norm = _norm(c, "norm")
    if not c.tie_word_embeddings:
      self.lm_head = DenseGeneral(c.vocab_size, kernel_axes=("embed", "vocab"), **kw)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """input_ids [B, T] -> token embeddings [B, T, embed_dim] (before OPT's project_in)."""
    return self.embed_tokens(input_ids)

  @nn.compact
  def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
               cache: dict | None = None, cache_index: jax.Array | int = 0,
               output_hidden_states: bool = False, return_logits: bool = True,
               deterministic: bool = True) -> DecoderOutput:
    """input_ids [B, T] (or inputs_embeds [B, T, embed_dim]); attention_mask [B, T], or [B, S]
    over the cache slots when `cache` is given; position_ids [B, T] (default: from the mask)."""
    c = self.config
    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids)
    b, t = inputs_embeds.shape[:2]
    s = cache["k"].shape[2] if cache is not None else t
    if attention_mask is None:
      attention_mask = jnp.ones((b, s), jnp.int32)
    if attention_mask.shape[-1] != s:
      raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} slots, expected {s}")
    if position_ids is None:
      position_ids = jax.lax.dynamic_slice_in_dim(attn_lib.positions_from_mask(attention_mask),
                                                  cache_index, t, axis=1)
    h = inputs_embeds
    if c.is_opt:
      if c.embed_dim != c.hidden_size:
        h = self.project_in(h)
      h = h + self.embed_positions(position_ids + c.position_offset)
    h = constrain(h.astype(jnp.dtype(c.dtype)), BATCH_LEN_EMBED)
    cos = sin = None
    if not c.is_opt:
      cos, sin = attn_lib.rope_cos_sin(position_ids, c.dim_per_head, c.rope_theta,
                                       c.rope_scaling_factor, dtype=jnp.dtype(c.dtype))
    flags = c.window_layers
    full = attn_lib.make_attention_mask(attention_mask, t, q_offset=cache_index, causal=True,
                                        sliding_window=c.sliding_window if all(flags) else None)
    if any(flags) and not all(flags):  # per-layer windows (Qwen2's layer_types): both masks, a flag per layer
      mask = (full, attn_lib.make_attention_mask(attention_mask, t, q_offset=cache_index, causal=True,
                                                 sliding_window=c.sliding_window))
    else:
      mask = full
    h0 = h
    h, new_cache, layer_hidden = self._layers(h, mask, cos, sin, cache, cache_index,
                                              deterministic, output_hidden_states)
    last = self.norm(h) if hasattr(self, "norm") else h
    if c.is_opt and c.embed_dim != c.hidden_size:
      last = self.project_out(last)  # as HF: OPT's last hidden state is after project_out
    hidden_states = None
    if output_hidden_states:
      hidden_states = (h0, *[layer_hidden[i] for i in range(c.num_hidden_layers - 1)], last)
    logits = self.logits(last) if return_logits else None
    return DecoderOutput(logits=logits, last_hidden_state=last, hidden_states=hidden_states,
                         cache=new_cache)

  def logits(self, last_hidden: jax.Array) -> jax.Array:
    """Last hidden states [B, T, D] (final norm, and OPT's project_out, applied) -> logits [B, T, V]."""
    if self.config.tie_word_embeddings:
      out = self.embed_tokens.attend(last_hidden)
    else:
      out = self.lm_head(last_hidden)
    return constrain(out, ("activation_batch", "activation_length", "activation_vocab"))

  def _layers(self, h, mask, cos, sin, cache, cache_index, deterministic, collect):
    c = self.config
    window = jnp.asarray(c.window_layers)  # [L] per-layer flags, sliced alongside the stacked params
    per_layer, whole = 0, nn.broadcast
    h, (new_cache, hidden) = layer_stack(
        DecoderLayer, (c, deterministic, collect), h, mask, cos, sin, cache, cache_index, window,
        length=c.num_hidden_layers, scan=c.scan_layers, remat_policy=c.remat_policy, name="layers",
        in_axes=(whole, whole, whole, per_layer, whole, per_layer), split_rngs=("params", "dropout"))
    return h, new_cache, hidden


def init_cache(config: DecoderConfig, batch: int, length: int, dtype=None) -> dict:
  """Zeroed KV cache {'k','v': [L, B, S, K, H]}."""
  shape = (config.num_hidden_layers, batch, length, config.kv_heads, config.dim_per_head)
  dt = jnp.dtype(dtype or config.dtype)
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


CACHE_AXES = ("layers", "cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")
