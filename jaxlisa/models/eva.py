"""EVA ViT-g as BLIP-2 uses it (LAVIS `lavis/models/eva_vit.py`, `create_eva_vit_g`), plus BLIP-2's
`ln_vision` LayerNorm on its output.

ViT-g: patch 14, width 1408, depth 39, 16 heads of 88, MLP 6144 (mlp_ratio 4.3637), exact GELU,
LayerNorm eps 1e-6, absolute positions with a CLS token, no final norm, no layer scale
(init_values=None), fused qkv with q and v biases (k has none). `ln_vision` is LAVIS's fp32
`LayerNorm` subclass with PyTorch's default eps 1e-5.

Parameters (names mirror LAVIS; blocks are scanned on a leading 'layers' axis):
  patch_embed/proj/{kernel [p, p, C, D], bias [D]}; cls_token [1, 1, D]; pos_embed [1, 1 + P, D];
  blocks/{norm1,norm2}/{scale,bias}; blocks/attn/qkv/kernel [D, 3, N, H];
  blocks/attn/{q_bias, v_bias} [N, H]; blocks/attn/proj/{kernel [N, H, D], bias [D]};
  blocks/mlp/{fc1,fc2}/{kernel,bias}; ln_vision/{scale,bias} (when use_ln_vision).

`apply({'params': p}, pixels [B, H, W, 3])` -> EVAOutput(last_hidden_state = ViT output
[B, 1 + P, D] (LAVIS `visual_encoder(image)`), image_embeds = ln_vision(last_hidden_state) (or the
same array without ln_vision), hidden_states (embeddings, then each block) | None).
Inputs of another size get the position grid resized bicubically (LAVIS `interpolate_pos_embed`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlisa.models.config_base import ConfigMixin
from jaxlisa.models import attention as attn_lib
from jaxlisa.models.clip import PatchConv, resize_pos_embed
from jaxlisa.models.layers import DenseGeneral, LayerNorm, activation, constrain, maybe_remat

BATCH_LEN_EMBED = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class EVAViTConfig(ConfigMixin):
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  hidden_size: int = 1408
  num_hidden_layers: int = 39
  num_attention_heads: int = 16
  mlp_dim: int = 6144
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"  # nn.GELU, exact
  use_ln_vision: bool = True
  ln_vision_eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"

  @classmethod
  def eva_vit_g(cls, image_size: int = 224, **kw) -> "EVAViTConfig":
    """LAVIS `create_eva_vit_g` (224 for pretraining / VQA, 364 for the caption fine-tunes)."""
    return cls(image_size=image_size, patch_size=14, hidden_size=1408, num_hidden_layers=39,
               num_attention_heads=1408 // 88, mlp_dim=int(1408 * 4.3637), **kw)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size



@flax.struct.dataclass
class EVAOutput:
  last_hidden_state: jax.Array  # [B, 1 + P, D] ViT output (no final norm)
  image_embeds: jax.Array  # [B, 1 + P, D] ln_vision(last_hidden_state), or last_hidden_state
  hidden_states: tuple | None = None  # L+1 x [B, 1 + P, D]: embeddings, then each block


def _dt(name: str):
  return jnp.dtype(name)


class EVAAttention(nn.Module):
  config: EVAViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, T, D]. One fused qkv matmul; bias = (q_bias, 0, v_bias)."""
    c = self.config
    kw = dict(dtype=_dt(c.dtype), param_dtype=_dt(c.param_dtype))
    n, h = c.num_attention_heads, c.head_dim
    qkv = DenseGeneral((3, n, h), kernel_axes=("embed", None, "heads", "head_dim"), name="qkv", **kw)(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if c.qkv_bias:
      bias = lambda name: self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim")),
                                     (n, h), _dt(c.param_dtype)).astype(_dt(c.dtype))
      q = q + bias("q_bias")
      v = v + bias("v_bias")
    q = checkpoint_name(q, "query_proj")
    k = checkpoint_name(k, "key_proj")
    v = checkpoint_name(v, "value_proj")
    q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
    out = attn_lib.dot_product_attention(q, k, v, None, scale=h ** -0.5, impl=c.attention_impl)
    out = checkpoint_name(out, "context")
    out = DenseGeneral(c.hidden_size, in_axes=2, kernel_axes=("heads", "head_dim", "embed"), use_bias=True,
                       name="proj", **kw)(out)
    return checkpoint_name(out, "out_proj")


class EVAMlp(nn.Module):
  config: EVAViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=_dt(c.dtype), param_dtype=_dt(c.param_dtype), use_bias=True)
    y = DenseGeneral(c.mlp_dim, kernel_axes=("embed", "mlp"), name="fc1", **kw)(x)
    y = checkpoint_name(activation(c.hidden_act)(y), "mlpwi")
    y = constrain(y, ("activation_batch", "activation_length", "activation_mlp"))
    return checkpoint_name(DenseGeneral(c.hidden_size, kernel_axes=("mlp", "embed"), name="fc2", **kw)(y),
                           "mlpwo")


class EVABlock(nn.Module):
  """x = x + attn(norm1(x)); x = x + mlp(norm2(x)). Scan-compatible: h -> (h, h | None)."""
  config: EVAViTConfig
  collect_hidden: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, _=None):
    c = self.config
    kw = dict(eps=c.layer_norm_eps, dtype=_dt(c.dtype), param_dtype=_dt(c.param_dtype))
    h = constrain(h, BATCH_LEN_EMBED)
    h = h + EVAAttention(c, name="attn")(LayerNorm(name="norm1", **kw)(h))
    h = h + EVAMlp(c, name="mlp")(LayerNorm(name="norm2", **kw)(h))
    h = constrain(h, BATCH_LEN_EMBED)
    return h, (h if self.collect_hidden else None)


class _PatchEmbed(nn.Module):
  """LAVIS `PatchEmbed`: holds `proj` (Conv2d, kernel = stride = patch, with bias)."""
  config: EVAViTConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    c = self.config
    return PatchConv(c.hidden_size, c.patch_size, use_bias=True, dtype=_dt(c.dtype),
                     param_dtype=_dt(c.param_dtype), name="proj")(pixels)


class EVAVisionTransformer(nn.Module):
  """LAVIS EVA ViT (+ optional `ln_vision`). See the module docstring."""
  config: EVAViTConfig

  @nn.compact
  def __call__(self, pixels: jax.Array, output_hidden_states: bool = False) -> EVAOutput:
    """pixels [B, H, W, C] (normalized, NHWC) -> EVAOutput."""
    c = self.config
    dt, pdt = _dt(c.dtype), _dt(c.param_dtype)
    b = pixels.shape[0]
    x = _PatchEmbed(c, name="patch_embed")(pixels)  # [B, H/p, W/p, D]
    gh, gw = x.shape[1:3]
    x = x.reshape(b, gh * gw, c.hidden_size)
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param("cls_token", nn.with_logical_partitioning(init, (None, None, "embed")),
                     (1, 1, c.hidden_size), pdt)
    pos = self.param("pos_embed", nn.with_logical_partitioning(init, (None, None, "embed")),
                     (1, c.grid ** 2 + 1, c.hidden_size), pdt)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, c.hidden_size)), x], axis=1)
    pos = pos[0]
    if (gh, gw) != (c.grid, c.grid):
      pos = resize_pos_embed(pos, (gh, gw))
    h0 = constrain(x + pos[None].astype(dt), BATCH_LEN_EMBED)
    h, stacked = self._blocks(h0, output_hidden_states)
    embeds = h
    if c.use_ln_vision:
      embeds = LayerNorm(eps=c.ln_vision_eps, dtype=dt, param_dtype=pdt, name="ln_vision")(h)
    hidden = None
    if output_hidden_states:
      hidden = (h0, *[stacked[i] for i in range(c.num_hidden_layers)])
    return EVAOutput(last_hidden_state=h, image_embeds=embeds, hidden_states=hidden)

  def _blocks(self, h, collect):
    c = self.config
    if c.scan_layers:
      block = maybe_remat(EVABlock, c.remat_policy, scanned=True)
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      return scanned(c, collect, name="blocks")(h, None)
    block = maybe_remat(EVABlock, c.remat_policy, scanned=False)
    outs = []
    for i in range(c.num_hidden_layers):
      h, o = block(c, collect, name=f"blocks_{i}")(h)
      outs.append(o)
    return h, (jnp.stack(outs) if collect else None)


def dummy_inputs(c: EVAViTConfig):
  return (jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32),)
