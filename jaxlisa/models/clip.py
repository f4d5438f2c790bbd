"""CLIP vision transformer (HF `CLIPVisionModel`), the vision tower of LLaVA and LISA.

Parameters (module names mirror HF; the encoder layers are scanned on a leading 'layers' axis):
  embeddings/class_embedding [D]; embeddings/patch_embedding/kernel [p, p, C, D] (HWIO, no bias);
  embeddings/position_embedding/embedding [1 + (S/p)^2, D]; pre_layrnorm/{scale,bias};
  encoder/layers/{layer_norm1,layer_norm2}/{scale,bias};
  encoder/layers/self_attn/{q,k,v}_proj/{kernel [D, N, H], bias [N, H]};
  encoder/layers/self_attn/out_proj/{kernel [N, H, D], bias [D]};
  encoder/layers/mlp/{fc1,fc2}/{kernel, bias}; post_layernorm/{scale,bias}.

`apply({'params': p}, pixels [B, H, W, 3])` -> CLIPVisionOutput with HF's semantics:
hidden_states[0] is the embeddings after `pre_layrnorm`, hidden_states[i] the output of layer i,
last_hidden_state = hidden_states[-1] (no final norm), pooler_output = post_layernorm(last[:, 0]).
Inputs whose size differs from `image_size` get bicubically interpolated position embeddings, as
HF's `interpolate_pos_encoding=True` (PyTorch bicubic, A=-0.75, align_corners=False).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxlisa.models.config_base import VisionTowerConfig
from jaxlisa.models.layers import BATCH_LEN_EMBED, Embed, LayerNorm, ViTBlockSpec, constrain, dtypes, vit_encoder


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(VisionTowerConfig):
  """Architecture + numerics of a CLIP vision tower. Field names follow HF `CLIPVisionConfig`."""
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"

  @classmethod
  def vit_l14(cls, image_size: int = 224, **kw) -> "CLIPVisionConfig":
    """openai/clip-vit-large-patch14 (224, LISA / LLaVA-1) or -336 (LLaVA-1.5)."""
    if image_size not in (224, 336):
      raise ValueError(f"CLIP ViT-L/14 exists at 224 and 336 px, not {image_size}")
    return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=image_size, patch_size=14, **kw)

  @property
  def num_positions(self) -> int:
    return self.grid ** 2 + 1

  @property
  def block_spec(self) -> ViTBlockSpec:
    """HF `CLIPEncoderLayer`: layer_norm1, self_attn (q/k/v/out_proj), layer_norm2, mlp (fc1, fc2)."""
    return ViTBlockSpec(num_heads=self.num_attention_heads, head_dim=self.head_dim,
                        mlp_dim=self.intermediate_size, hidden_act=self.hidden_act, eps=self.layer_norm_eps,
                        dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)


@flax.struct.dataclass
class CLIPVisionOutput:
  last_hidden_state: jax.Array  # [B, 1 + P, D], output of the last layer (no final norm)
  pooler_output: jax.Array  # [B, D] post_layernorm(last_hidden_state[:, 0])
  hidden_states: tuple | None = None  # L+1 x [B, 1 + P, D]: pre_layrnorm(embeddings), then each layer


# ----------------------------------------------------------------------------- shared vision pieces
def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
  """PyTorch's cubic convolution kernel (A = -0.75)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of `F.interpolate(mode='bicubic', align_corners=False)` along one axis
  (source index (o + 0.5) * n_in / n_out - 0.5, four taps, indices clamped at the border)."""
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src)
  t = src - base
  w = np.zeros((n_out, n_in), np.float64)
  for k in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + k, 0, n_in - 1)
    np.add.at(w, (np.arange(n_out), idx), _cubic(t + 1 - k))
  return w


def resize_pos_grid(grid: jax.Array | np.ndarray, new_hw: tuple[int, int]):
  """Bicubic resize of a position grid [h, w, D] -> [new_h, new_w, D] exactly as PyTorch's
  `F.interpolate(bicubic, align_corners=False)` on [1, D, h, w]. numpy in -> numpy out."""
  h, w = grid.shape[:2]
  if (h, w) == tuple(new_hw):
    return grid
  mh = bicubic_matrix(h, new_hw[0])
  mw = bicubic_matrix(w, new_hw[1])
  if isinstance(grid, np.ndarray):
    g = np.einsum("oh,hwd->owd", mh, grid.astype(np.float64))
    return np.einsum("pw,owd->opd", mw, g).astype(grid.dtype)
  g = jnp.einsum("oh,hwd->owd", jnp.asarray(mh, jnp.float32), grid.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  g = jnp.einsum("pw,owd->opd", jnp.asarray(mw, jnp.float32), g, precision=jax.lax.Precision.HIGHEST)
  return g.astype(grid.dtype)


def resize_pos_embed(table, new_hw: tuple[int, int], num_prefix: int = 1):
  """Position table [num_prefix + h*w, D] (square grid) -> [num_prefix + new_h*new_w, D]; the
  prefix (CLS) rows are kept, the patch rows resized bicubically (HF CLIP / LAVIS rule)."""
  xp = np if isinstance(table, np.ndarray) else jnp
  n = table.shape[0] - num_prefix
  side = int(round(n ** 0.5))
  if side * side != n:
    raise ValueError(f"position table with {n} patch rows is not a square grid")
  if (side, side) == tuple(new_hw):
    return table
  grid = resize_pos_grid(table[num_prefix:].reshape(side, side, -1), new_hw)
  return xp.concatenate([table[:num_prefix], grid.reshape(new_hw[0] * new_hw[1], -1)], axis=0)


class PatchConv(nn.Module):
  """Conv2d with kernel = stride = patch as a patchify + matmul (exact, and MXU-friendly).

  x [B, H, W, C] (H, W cropped down to multiples of the patch, as the strided conv does)
  -> [B, H/p, W/p, D]. kernel [p, p, C, D] HWIO; optional bias [D].
  """
  features: int
  patch: int
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    p = self.patch
    gh, gw = h // p, w // p
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
        ("conv_height", "conv_width", "conv_in", "conv_out")), (p, p, c, self.features), self.param_dtype)
    x = x[:, :gh * p, :gw * p].astype(self.dtype).reshape(b, gh, p, gw, p, c)
    y = jnp.einsum("bhpwqc,pqcd->bhwd", x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


# ----------------------------------------------------------------------------- CLIP modules
class CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels [B, H, W, C] -> [B, 1 + (H/p)(W/p), D] (CLS first, positions added)."""
    c = self.config
    kw = dtypes(c)
    b = pixels.shape[0]
    cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                     (c.hidden_size,), kw["param_dtype"])
    patches = PatchConv(c.hidden_size, c.patch_size, use_bias=False, name="patch_embedding", **kw)(pixels)
    gh, gw = patches.shape[1:3]
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(kw["dtype"]), (b, 1, c.hidden_size)),
                         patches.reshape(b, gh * gw, c.hidden_size)], axis=1)
    pos = Embed(c.num_positions, c.hidden_size, axes=(None, "embed"), name="position_embedding",
                **kw)(jnp.arange(c.num_positions))
    if (gh, gw) != (c.grid, c.grid):
      pos = resize_pos_embed(pos, (gh, gw))
    return x + pos[None].astype(x.dtype)


class CLIPEncoder(nn.Module):
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, h: jax.Array, collect: bool = False):
    """h [B, T, D] -> (h, stacked layer outputs [L, B, T, D] | None)."""
    c = self.config
    return vit_encoder(c.block_spec, h, num_layers=c.num_hidden_layers, scan=c.scan_layers,
                       remat_policy=c.remat_policy, name="layers", collect=collect)


class CLIPVisionModel(nn.Module):
  """HF `CLIPVisionModel` (the inner `CLIPVisionTransformer`). See the module docstring."""
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixels: jax.Array, output_hidden_states: bool = False) -> CLIPVisionOutput:
    """pixels [B, H, W, C] (normalized, NHWC) -> CLIPVisionOutput."""
    c = self.config
    kw = dict(eps=c.layer_norm_eps, **dtypes(c))
    x = CLIPVisionEmbeddings(c, name="embeddings")(pixels)
    h0 = constrain(LayerNorm(name="pre_layrnorm", **kw)(x), BATCH_LEN_EMBED)
    last, stacked = CLIPEncoder(c, name="encoder")(h0, output_hidden_states)
    pooled = LayerNorm(name="post_layernorm", **kw)(last[:, 0])
    hidden = None
    if output_hidden_states:
      hidden = (h0, *[stacked[i] for i in range(c.num_hidden_layers)])
    return CLIPVisionOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)


def select_features(hidden_states, layer: int = -2, kind: str = "patch") -> jax.Array:
  """LLaVA's `feature_select`: hidden_states[layer] [B, 1 + P, D] -> [B, P, D] ("patch", CLS
  dropped) or [B, 1 + P, D] ("cls_patch"). `hidden_states` is the HF-ordered tuple (or a stacked
  array [L + 1, B, T, D])."""
  feats = hidden_states[layer]
  if kind == "patch":
    return feats[:, 1:]
  if kind == "cls_patch":
    return feats
  raise ValueError(f"unknown vision feature kind {kind!r}; expected 'patch' or 'cls_patch'")
