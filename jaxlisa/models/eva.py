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

from jaxlisa.models.config_base import VisionTowerConfig
from jaxlisa.models.clip import PatchConv, resize_pos_embed
from jaxlisa.models.layers import BATCH_LEN_EMBED, LayerNorm, ViTBlockSpec, constrain, dtypes, vit_encoder


@dataclasses.dataclass(frozen=True)
class EVAViTConfig(VisionTowerConfig):
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

  @classmethod
  def eva_vit_g(cls, image_size: int = 224, **kw) -> "EVAViTConfig":
    """LAVIS `create_eva_vit_g` (224 for pretraining / VQA, 364 for the caption fine-tunes)."""
    return cls(image_size=image_size, patch_size=14, hidden_size=1408, num_hidden_layers=39,
               num_attention_heads=1408 // 88, mlp_dim=int(1408 * 4.3637), **kw)

  @property
  def block_spec(self) -> ViTBlockSpec:
    """LAVIS EVA `Block`: norm1, attn (fused qkv + q_bias/v_bias, proj), norm2, mlp (fc1, fc2)."""
    return ViTBlockSpec(num_heads=self.num_attention_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim,
                        hidden_act=self.hidden_act, eps=self.layer_norm_eps, dtype=self.dtype,
                        param_dtype=self.param_dtype, attention_impl=self.attention_impl, fused_qkv=True,
                        qkv_bias=self.qkv_bias, names=("norm1", "attn", "norm2", "mlp", "proj"))


@flax.struct.dataclass
class EVAOutput:
  last_hidden_state: jax.Array  # [B, 1 + P, D] ViT output (no final norm)
  image_embeds: jax.Array  # [B, 1 + P, D] ln_vision(last_hidden_state), or last_hidden_state
  hidden_states: tuple | None = None  # L+1 x [B, 1 + P, D]: embeddings, then each block


class _PatchEmbed(nn.Module):
  """LAVIS `PatchEmbed`: holds `proj` (Conv2d, kernel = stride = patch, with bias)."""
  config: EVAViTConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    c = self.config
    return PatchConv(c.hidden_size, c.patch_size, use_bias=True, name="proj", **dtypes(c))(pixels)


class EVAVisionTransformer(nn.Module):
  """LAVIS EVA ViT (+ optional `ln_vision`). See the module docstring."""
  config: EVAViTConfig

  @nn.compact
  def __call__(self, pixels: jax.Array, output_hidden_states: bool = False) -> EVAOutput:
    """pixels [B, H, W, C] (normalized, NHWC) -> EVAOutput."""
    c = self.config
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
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
    h, stacked = vit_encoder(c.block_spec, h0, num_layers=c.num_hidden_layers, scan=c.scan_layers,
                             remat_policy=c.remat_policy, name="blocks", collect=output_hidden_states)
    embeds = h
    if c.use_ln_vision:
      embeds = LayerNorm(eps=c.ln_vision_eps, dtype=dt, param_dtype=pdt, name="ln_vision")(h)
    hidden = None
    if output_hidden_states:
      hidden = (h0, *[stacked[i] for i in range(c.num_hidden_layers)])
    return EVAOutput(last_hidden_state=h, image_embeds=embeds, hidden_states=hidden)
