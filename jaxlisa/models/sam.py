"""Segment Anything (SAM v1): ViT image encoder, prompt encoder, two-way transformer, mask decoder.

Module and parameter names mirror `segment_anything` (scenic style): a PyTorch `ModuleList` or
`Sequential` entry `x.{i}` is the module `x_{i}` here (`blocks_3`, `neck_2`,
`output_hypernetworks_mlps_1/layers_0`), so the converter's key map stays one line per tensor.
Activations are NHWC; masks carry the mask index where PyTorch has channels ([N, M, H, W]).

Parameters (under `Sam`):
  image_encoder/patch_embed/proj/{kernel [p, p, 3, D], bias}; image_encoder/pos_embed [1, g, g, D]
  image_encoder/blocks_{i}/{norm1, norm2}/{scale, bias}; .../attn/qkv/kernel [D, 3, N, Dh] (+bias);
    .../attn/proj/kernel [N, Dh, D]; .../attn/rel_pos_{h,w} [2 s - 1, Dh]; .../mlp/{lin1, lin2}
  image_encoder/neck_{0,2}/kernel (convs, no bias); image_encoder/neck_{1,3} (LayerNorm2d)
  prompt_encoder/pe_layer/positional_encoding_gaussian_matrix [2, C/2]  (a torch buffer, kept)
  prompt_encoder/{point_embeddings_{0..3}, not_a_point_embed, no_mask_embed}/embedding [1, C]
  prompt_encoder/mask_downscaling_{0,3,6} (convs), mask_downscaling_{1,4} (LayerNorm2d)
  mask_decoder/{iou_token [1, C], mask_tokens [M+1, C]}/embedding
  mask_decoder/transformer/layers_{i}/{self_attn, cross_attn_token_to_image,
    cross_attn_image_to_token}/{q,k,v}_proj/kernel [C, N, Dh'], out_proj/kernel [N, Dh', C];
    .../norm{1..4}; .../mlp/{lin1, lin2}; transformer/final_attn_token_to_image; norm_final_attn
  mask_decoder/output_upscaling_{0,3}/kernel [2, 2, out, in] (ConvTranspose2d), output_upscaling_1
  mask_decoder/output_hypernetworks_mlps_{m}/layers_{j}; mask_decoder/iou_prediction_head/layers_{j}

Image-encoder blocks are unrolled (window and global blocks differ in their rel-pos shapes), so
`SamConfig.scan_layers` is always False. Interpolations that must match PyTorch (`F.interpolate`
linear/bilinear/bicubic, align_corners=False, no antialiasing) are written as explicit weight
matrices: static ones in numpy, per-sample ones (traced sizes) in jnp.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlisa.models.config_base import ConfigMixin
from jaxlisa.models import attention as attn_lib
from jaxlisa.models.layers import DenseGeneral, Embed, LayerNorm, activation, constrain, dtypes, maybe_remat

HIGHEST = jax.lax.Precision.HIGHEST
NHWC_AXES = ("activation_batch", None, None, "activation_embed")


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class SamConfig(ConfigMixin):
  """SAM architecture and numerics. Names follow `segment_anything.build_sam` where one exists."""
  # image encoder (ImageEncoderViT)
  img_size: int = 1024
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 1280
  depth: int = 32
  num_heads: int = 16
  mlp_ratio: float = 4.0
  mlp_dim: int | None = None  # None -> int(embed_dim * mlp_ratio)
  out_chans: int = 256
  window_size: int = 14
  global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
  use_rel_pos: bool = True
  use_abs_pos: bool = True
  qkv_bias: bool = True
  encoder_norm_eps: float = 1e-6  # build_sam: partial(nn.LayerNorm, eps=1e-6)
  neck_norm_eps: float = 1e-6  # LayerNorm2d
  # prompt encoder
  prompt_embed_dim: int = 256
  mask_in_chans: int = 16
  pe_scale: float = 1.0  # PositionEmbeddingRandom init scale (the matrix is converted anyway)
  # mask decoder (MaskDecoder + TwoWayTransformer)
  decoder_depth: int = 2
  decoder_mlp_dim: int = 2048
  decoder_num_heads: int = 8
  attention_downsample_rate: int = 2
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  decoder_norm_eps: float = 1e-5  # nn.LayerNorm in TwoWayAttentionBlock (HF SamModel: 1e-6)
  decoder_final_norm_eps: float = 1e-5  # norm_final_attn (1e-5 in both)
  # preprocessing
  pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
  pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
  # numerics and scaling
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  attention_impl: str = "xla"
  scan_layers: bool = False  # SAM blocks are always unrolled; the converter reads this

  def __post_init__(self):
    super().__post_init__()
    if self.scan_layers:
      raise ValueError("SAM image-encoder blocks are unrolled; scan_layers must be False")
    bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"global_attn_indexes {bad} outside 0..{self.depth - 1}")

  @property
  def image_embedding_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def encoder_mlp_dim(self) -> int:
    return self.mlp_dim or int(self.embed_dim * self.mlp_ratio)

  @property
  def num_mask_tokens(self) -> int:
    return self.num_multimask_outputs + 1

  def dummy_inputs(self) -> tuple:
    """(pixels [1, S, S, C],): the image encoder's input (the module's init)."""
    return (jnp.zeros((1, self.img_size, self.img_size, self.in_chans), jnp.float32),)


def vit_h(**kw) -> SamConfig:
  return SamConfig(**{**dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)), **kw})


def vit_l(**kw) -> SamConfig:
  return SamConfig(**{**dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)), **kw})


def vit_b(**kw) -> SamConfig:
  return SamConfig(**{**dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)), **kw})


def tiny(**kw) -> SamConfig:
  """Test size: 64 px, patch 8 (8x8 grid), window 3 (padded to 9), block 1 global."""
  return SamConfig(**{**dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, out_chans=32,
                             window_size=3, global_attn_indexes=(1,), prompt_embed_dim=32, mask_in_chans=8,
                             decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32), **kw})


PRESETS = {"vit_h": vit_h, "vit_l": vit_l, "vit_b": vit_b, "tiny": tiny}


# ----------------------------------------------------------------------------- interpolation
def linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float64 weights of PyTorch 1-D linear interpolation (`F.interpolate` linear /
  bilinear per axis, align_corners=False, no antialiasing; also what it does when downsampling)."""
  if in_size == out_size:
    return np.eye(in_size)
  f32 = np.float32  # source positions and weights in float32, as PyTorch computes them
  src = np.maximum((np.arange(out_size, dtype=f32) + f32(0.5)) * f32(in_size / out_size) - f32(0.5), f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  l1 = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(np.float64)
  w = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  np.add.at(w, (rows, i0), 1.0 - l1)
  np.add.at(w, (rows, i1), l1)
  return w


def cubic_resize_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out, in] weights of PyTorch bicubic interpolation per axis (align_corners=False, A=-0.75,
  border taps clamped), as ViTDet's `get_abs_pos` uses to resize absolute position embeddings."""
  if in_size == out_size:
    return np.eye(in_size)
  f32 = np.float32
  src = (np.arange(out_size, dtype=f32) + f32(0.5)) * f32(in_size / out_size) - f32(0.5)
  i0 = np.floor(src).astype(np.int64)
  t = (src - i0.astype(f32)).astype(np.float64)
  cc1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
  cc2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
  w = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  for k, wk in enumerate((cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t))):
    np.add.at(w, (rows, np.clip(i0 - 1 + k, 0, in_size - 1)), wk)
  return w


def traced_linear_resize_matrix(in_size: jax.Array, out_size: jax.Array, max_in: int, max_out: int) -> jax.Array:
  """Like `linear_resize_matrix` for traced sizes, padded to a static [max_out, max_in].

  Row i < out_size samples the first `in_size` inputs at (i + 0.5) * in/out - 0.5 (clamped at 0);
  rows >= out_size are zero, and so are columns >= in_size (this is the crop)."""
  in_f = jnp.asarray(in_size, jnp.float32)
  out_f = jnp.asarray(out_size, jnp.float32)
  in_i = jnp.asarray(in_size, jnp.int32)
  dst = jnp.arange(max_out, dtype=jnp.float32)
  src = jnp.maximum((dst + 0.5) * (in_f / out_f) - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_i - 1)
  i1 = jnp.where(i0 < in_i - 1, i0 + 1, i0)
  l1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
  cols = jnp.arange(max_in, dtype=jnp.int32)[None, :]
  w = (cols == i0[:, None]) * (1.0 - l1)[:, None] + (cols == i1[:, None]) * l1[:, None]
  return jnp.where((dst < out_f)[:, None], w, 0.0)


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
  return (int(x), int(x)) if np.ndim(x) == 0 else (int(x[0]), int(x[1]))


def postprocess_masks(masks: jax.Array, input_size: Sequence[int], original_size: Sequence[int],
                      padded_size: int | Sequence[int] = 1024) -> jax.Array:
  """`Sam.postprocess_masks` with static sizes: masks [..., h, w] (low-res logits) -> [..., H, W].

  Bilinear to `padded_size` (the encoder input, e.g. 1024), crop to `input_size` (the resized
  image inside the padding), bilinear to `original_size`; all align_corners=False without
  antialiasing, as PyTorch. The three steps are one linear map per axis, applied as two matmuls
  in float32."""
  h, w = masks.shape[-2:]
  (ph, pw), (hr, wr), (oh, ow) = _pair(padded_size), _pair(input_size), _pair(original_size)
  wy = linear_resize_matrix(hr, oh) @ linear_resize_matrix(h, ph)[:hr]
  wx = linear_resize_matrix(wr, ow) @ linear_resize_matrix(w, pw)[:wr]
  m = masks.astype(jnp.float32)
  m = jnp.einsum("yh,...hw->...yw", jnp.asarray(wy, jnp.float32), m, precision=HIGHEST)
  return jnp.einsum("...yw,xw->...yx", m, jnp.asarray(wx, jnp.float32), precision=HIGHEST)


def postprocess_masks_dynamic(masks: jax.Array, input_size: jax.Array, original_size: jax.Array,
                              out_shape: Sequence[int], padded_size: int | Sequence[int] = 1024) -> jax.Array:
  """`postprocess_masks` for per-sample traced sizes with a static output shape (jit-friendly).

  masks [N, ..., h, w]; input_size, original_size: int [N, 2] (or [2], shared) as (h, w).
  Returns [N, ..., Hmax, Wmax] = `out_shape`; sample n is valid in [:H_n, :W_n], zero elsewhere."""
  n = masks.shape[0]
  h, w = masks.shape[-2:]
  (ph, pw), (hmax, wmax) = _pair(padded_size), _pair(out_shape)
  input_size = jnp.broadcast_to(jnp.asarray(input_size, jnp.int32), (n, 2))
  original_size = jnp.broadcast_to(jnp.asarray(original_size, jnp.int32), (n, 2))
  w1y = jnp.asarray(linear_resize_matrix(h, ph), jnp.float32)
  w1x = jnp.asarray(linear_resize_matrix(w, pw), jnp.float32)
  w2y = jax.vmap(lambda i, o: traced_linear_resize_matrix(i, o, ph, hmax))(input_size[:, 0], original_size[:, 0])
  w2x = jax.vmap(lambda i, o: traced_linear_resize_matrix(i, o, pw, wmax))(input_size[:, 1], original_size[:, 1])
  wy = jnp.einsum("nyp,ph->nyh", w2y, w1y, precision=HIGHEST)
  wx = jnp.einsum("nxp,pw->nxw", w2x, w1x, precision=HIGHEST)
  m = masks.astype(jnp.float32).reshape(n, -1, h, w)
  m = jnp.einsum("nyh,nchw->ncyw", wy, m, precision=HIGHEST)
  m = jnp.einsum("ncyw,nxw->ncyx", m, wx, precision=HIGHEST)
  return m.reshape(masks.shape[:-2] + (hmax, wmax))


def preprocess(pixels: jax.Array, config: SamConfig) -> jax.Array:
  """`Sam.preprocess`: pixels [B, H, W, 3] in 0..255 -> normalized, zero-padded bottom/right to
  [B, img_size, img_size, 3]."""
  x = (pixels.astype(jnp.float32) - jnp.asarray(config.pixel_mean)) / jnp.asarray(config.pixel_std)
  ph, pw = config.img_size - x.shape[1], config.img_size - x.shape[2]
  return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))


# ----------------------------------------------------------------------------- building blocks
def _conv(c: SamConfig, features: int, kernel: int, stride: int = 1, padding: int = 0, use_bias: bool = True,
          name: str | None = None) -> nn.Conv:
  """PyTorch Conv2d (NHWC, HWIO kernel)."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                 use_bias=use_bias, **dtypes(c), precision=None,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          ("conv_height", "conv_width", "conv_in", "conv_out")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), name=name)


def _ln(eps: float, c: SamConfig, name: str | None = None) -> LayerNorm:
  return LayerNorm(eps=eps, **dtypes(c), name=name)


class Activation(nn.Module):
  """A parameter-free activation, so that `Sequential` indices line up with PyTorch's."""
  fn: str = "gelu"

  def __call__(self, x):
    return activation(self.fn)(x)


class ConvTranspose(nn.Module):
  """PyTorch ConvTranspose2d with kernel_size == stride (no overlap, no padding), NHWC.

  kernel [k, k, out, in] = PyTorch weight [in, out, k, k].transpose(2, 3, 1, 0) (the layout of
  flax `nn.ConvTranspose(transpose_kernel=True)`); x [B, H, W, in] -> [B, k H, k W, out] with
  y[b, k h + i, k w + j, o] = sum_c x[b, h, w, c] kernel[i, j, o, c] + bias[o]."""
  features: int
  kernel_size: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, (b, h, w, cin) = self.kernel_size, x.shape
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(in_axis=-1, out_axis=-2), ("conv_height", "conv_width", "conv_out", "conv_in")),
                        (k, k, self.features, cin), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                      (self.features,), self.param_dtype)
    y = jnp.einsum("bhwc,ijoc->bhiwjo", x.astype(self.dtype), kernel.astype(self.dtype))
    return y.reshape(b, h * k, w * k, self.features) + bias.astype(self.dtype)


class MLPBlock(nn.Module):
  """segment_anything.modeling.common.MLPBlock: lin2(act(lin1(x)))."""
  mlp_dim: int
  act: str
  config: SamConfig

  @nn.compact
  def __call__(self, x):
    kw = dict(**dtypes(self.config), use_bias=True)
    y = DenseGeneral(self.mlp_dim, kernel_axes=("embed", "mlp"), name="lin1", **kw)(x)
    y = activation(self.act)(y)
    return DenseGeneral(x.shape[-1], kernel_axes=("mlp", "embed"), name="lin2", **kw)(y)


class MLP(nn.Module):
  """mask_decoder.MLP: `layers_{j}` Linear, ReLU between them (none after the last)."""
  hidden_dim: int
  output_dim: int
  num_layers: int
  config: SamConfig

  @nn.compact
  def __call__(self, x):
    kw = dict(**dtypes(self.config), use_bias=True)
    for j in range(self.num_layers):
      last = j == self.num_layers - 1
      x = DenseGeneral(self.output_dim if last else self.hidden_dim, kernel_axes=("embed", "mlp"),
                       name=f"layers_{j}", **kw)(x)
      if not last:
        x = jax.nn.relu(x)
    return x


# ----------------------------------------------------------------------------- image encoder
def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
  """Relative position embeddings [q_size, k_size, C] from rel_pos [L, C] (linearly resized to
  2 max(q, k) - 1 when L differs, as segment_anything's `get_rel_pos`)."""
  max_rel = 2 * max(q_size, k_size) - 1
  if rel_pos.shape[0] != max_rel:
    wts = jnp.asarray(linear_resize_matrix(rel_pos.shape[0], max_rel), jnp.float32)
    rel_pos = jnp.einsum("ml,lc->mc", wts, rel_pos.astype(jnp.float32), precision=HIGHEST).astype(rel_pos.dtype)
  q = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
  k = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
  idx = ((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).astype(np.int64)
  return jnp.take(rel_pos, jnp.asarray(idx), axis=0)


def decomposed_rel_pos_bias(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array,
                            q_size: tuple[int, int], k_size: tuple[int, int]) -> jax.Array:
  """`add_decomposed_rel_pos` as an additive attention bias.

  q: [B, qh*qw, N, Dh] (unscaled queries) -> bias [B, N, qh*qw, kh*kw]."""
  (qh, qw), (kh, kw) = q_size, k_size
  rh = get_rel_pos(qh, kh, rel_pos_h)
  rw = get_rel_pos(qw, kw, rel_pos_w)
  b, _, n, d = q.shape
  rq = q.reshape(b, qh, qw, n, d)
  rel_h = jnp.einsum("bhwnc,hkc->bnhwk", rq, rh.astype(q.dtype))
  rel_w = jnp.einsum("bhwnc,wkc->bnhwk", rq, rw.astype(q.dtype))
  bias = rel_h[..., :, None] + rel_w[..., None, :]
  return bias.reshape(b, n, qh * qw, kh * kw)


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
  """[B, H, W, C] -> windows [B * nH * nW, window, window, C] (zero-padded bottom/right), (Hp, Wp)."""
  b, h, w, c = x.shape
  ph, pw = (-h) % window, (-w) % window
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  hp, wp = h + ph, w + pw
  x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: jax.Array, window: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition`, dropping the padding: -> [B, H, W, C]."""
  (hp, wp), (h, w) = pad_hw, hw
  b = windows.shape[0] // ((hp // window) * (wp // window))
  x = windows.reshape(b, hp // window, wp // window, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hp, wp, -1)[:, :h, :w, :]


class EncoderAttention(nn.Module):
  """image_encoder.Attention: fused qkv, optional decomposed relative positions. x [B, H, W, D]."""
  config: SamConfig
  input_size: tuple[int, int]  # grid the rel-pos tables are sized for

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = dtypes(c)
    n, d = c.num_heads, c.embed_dim // c.num_heads
    b, h, w, _ = x.shape
    qkv = DenseGeneral((3, n, d), kernel_axes=("embed", None, "heads", "head_dim"), use_bias=c.qkv_bias,
                       name="qkv", **kw)(x).reshape(b, h * w, 3, n, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    bias = None
    if c.use_rel_pos:
      init = nn.with_logical_partitioning(nn.initializers.zeros, (None, "head_dim"))
      rel_h = self.param("rel_pos_h", init, (2 * self.input_size[0] - 1, d), jnp.dtype(c.param_dtype))
      rel_w = self.param("rel_pos_w", init, (2 * self.input_size[1] - 1, d), jnp.dtype(c.param_dtype))
      bias = decomposed_rel_pos_bias(q, rel_h, rel_w, (h, w), (h, w))
    out = attn_lib.dot_product_attention(q, k, v, bias=bias, scale=d ** -0.5, impl=c.attention_impl)
    out = out.reshape(b, h, w, n, d)
    return DenseGeneral(c.embed_dim, in_axes=2, kernel_axes=("heads", "head_dim", "embed"), use_bias=True,
                        name="proj", **kw)(out)


class Block(nn.Module):
  """image_encoder.Block: pre-norm attention (windowed when window_size > 0) + GELU MLP."""
  config: SamConfig
  window_size: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    x = constrain(x, NHWC_AXES)
    g = x.shape[1:3]
    shortcut = x
    x = _ln(c.encoder_norm_eps, c, "norm1")(x)
    rel_size = (c.image_embedding_size,) * 2 if self.window_size == 0 else (self.window_size,) * 2
    if self.window_size > 0:
      x, pad_hw = window_partition(x, self.window_size)
    x = EncoderAttention(c, rel_size, name="attn")(x)
    if self.window_size > 0:
      x = window_unpartition(x, self.window_size, pad_hw, g)
    x = shortcut + x
    return x + MLPBlock(c.encoder_mlp_dim, "gelu", c, name="mlp")(_ln(c.encoder_norm_eps, c, "norm2")(x))


class PatchEmbed(nn.Module):
  config: SamConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    return _conv(c, c.embed_dim, c.patch_size, c.patch_size, name="proj")(x)


class ImageEncoderViT(nn.Module):
  """ViTDet backbone + neck. x [B, H, W, 3] normalized pixels (H, W multiples of the patch size;
  any size: the absolute position embedding is resized bicubically and global blocks' rel-pos
  tables linearly when the grid differs from img_size / patch) -> [B, H/p, W/p, out_chans]."""
  config: SamConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    x = PatchEmbed(c, name="patch_embed")(x.astype(jnp.dtype(c.dtype)))
    gh, gw = x.shape[1:3]
    if c.use_abs_pos:
      g = c.image_embedding_size
      pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, None, "embed")),
                       (1, g, g, c.embed_dim), jnp.dtype(c.param_dtype))
      if (gh, gw) != (g, g):
        wy = jnp.asarray(cubic_resize_matrix(g, gh), jnp.float32)
        wx = jnp.asarray(cubic_resize_matrix(g, gw), jnp.float32)
        pos = jnp.einsum("yh,bhwc,xw->byxc", wy, pos.astype(jnp.float32), wx, precision=HIGHEST)
      x = x + pos.astype(x.dtype)
    block = maybe_remat(Block, c.remat_policy, scanned=False)
    for i in range(c.depth):
      ws = 0 if i in c.global_attn_indexes else c.window_size
      x = block(c, ws, name=f"blocks_{i}")(x)
    x = _conv(c, c.out_chans, 1, use_bias=False, name="neck_0")(x)
    x = _ln(c.neck_norm_eps, c, "neck_1")(x)
    x = _conv(c, c.out_chans, 3, padding=1, use_bias=False, name="neck_2")(x)
    x = _ln(c.neck_norm_eps, c, "neck_3")(x)
    return constrain(x, NHWC_AXES)


# ----------------------------------------------------------------------------- prompt encoder
class PositionEmbeddingRandom(nn.Module):
  """Random-Fourier positional encoding; `positional_encoding_gaussian_matrix` [2, F] is a buffer
  in PyTorch and a (frozen in practice) parameter here."""
  num_pos_feats: int
  scale: float = 1.0
  param_dtype: Any = jnp.float32

  def setup(self):
    self.positional_encoding_gaussian_matrix = self.param(
        "positional_encoding_gaussian_matrix",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=self.scale), (None, None)),
        (2, self.num_pos_feats), self.param_dtype)

  def encode(self, coords: jax.Array) -> jax.Array:
    """coords [..., 2] in [0, 1] (x, y) -> [..., 2F] = [sin, cos], in float32."""
    coords = 2.0 * coords.astype(jnp.float32) - 1.0
    coords = jnp.einsum("...i,if->...f", coords, self.positional_encoding_gaussian_matrix.astype(jnp.float32),
                        precision=HIGHEST)
    coords = (2 * np.pi) * coords
    return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

  def __call__(self, size: tuple[int, int]) -> jax.Array:
    """Dense grid encoding [h, w, 2F] at pixel centres."""
    h, w = size
    y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
    return self.encode(grid)

  def forward_with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
    """coords [..., 2] in pixels (x, y) of an image (H, W) -> [..., 2F]."""
    coords = coords.astype(jnp.float32) / jnp.asarray([image_size[1], image_size[0]], jnp.float32)
    return self.encode(coords)


class PromptEncoder(nn.Module):
  """Sparse (points, boxes, ready-made embeddings) and dense (mask) prompt embeddings.

  Which prompts are present is static: pass None for absent ones (None is an empty pytree, so a
  jitted caller recompiles per combination, never per value)."""
  config: SamConfig

  def setup(self):
    c = self.config
    kw = dtypes(c)
    emb = lambda: Embed(1, c.prompt_embed_dim, axes=(None, "embed"), **kw)  # noqa: E731
    self.pe_layer = PositionEmbeddingRandom(c.prompt_embed_dim // 2, c.pe_scale, jnp.dtype(c.param_dtype))
    self.point_embeddings = [emb() for _ in range(4)]  # pos/neg point, box corners
    self.not_a_point_embed = emb()
    self.no_mask_embed = emb()
    mc = c.mask_in_chans
    self.mask_downscaling = [
        _conv(c, mc // 4, 2, 2), _ln(c.neck_norm_eps, c), Activation("gelu"),
        _conv(c, mc, 2, 2), _ln(c.neck_norm_eps, c), Activation("gelu"),
        _conv(c, c.prompt_embed_dim, 1)]

  @property
  def input_image_size(self) -> tuple[int, int]:
    return (self.config.img_size, self.config.img_size)

  @property
  def image_embedding_size(self) -> tuple[int, int]:
    return (self.config.image_embedding_size,) * 2

  @property
  def mask_input_size(self) -> tuple[int, int]:
    return (4 * self.config.image_embedding_size,) * 2

  def get_dense_pe(self) -> jax.Array:
    """Positional encoding of the image-embedding grid: [1, h, w, C]."""
    return self.pe_layer(self.image_embedding_size)[None].astype(jnp.dtype(self.config.dtype))

  def _embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
    """points [B, N, 2] (x, y pixels), labels [B, N] (1 fg, 0 bg, -1 not a point) -> [B, N(+1), C]."""
    points = points.astype(jnp.float32) + 0.5
    labels = labels.astype(jnp.int32)
    if pad:
      points = jnp.concatenate([points, jnp.zeros((points.shape[0], 1, 2), jnp.float32)], axis=1)
      labels = jnp.concatenate([labels, -jnp.ones((labels.shape[0], 1), jnp.int32)], axis=1)
    pe = self.pe_layer.forward_with_coords(points, self.input_image_size)
    lab = labels[..., None]
    pe = jnp.where(lab == -1, self.not_a_point_embed.embedding[0].astype(jnp.float32), pe)
    pe = jnp.where(lab == 0, pe + self.point_embeddings[0].embedding[0].astype(jnp.float32), pe)
    pe = jnp.where(lab == 1, pe + self.point_embeddings[1].embedding[0].astype(jnp.float32), pe)
    return pe

  def _embed_boxes(self, boxes: jax.Array) -> jax.Array:
    """boxes [B, 4] or [B, nb, 4] (x1, y1, x2, y2 pixels) -> corners [B, 2 nb, C]."""
    b = boxes.shape[0]
    coords = boxes.astype(jnp.float32).reshape(b, -1, 2, 2) + 0.5
    pe = self.pe_layer.forward_with_coords(coords, self.input_image_size)
    corners = jnp.stack([self.point_embeddings[2].embedding[0], self.point_embeddings[3].embedding[0]])
    return (pe + corners.astype(jnp.float32)).reshape(b, -1, pe.shape[-1])

  def _embed_masks(self, masks: jax.Array) -> jax.Array:
    """masks [B, 4h, 4w, 1] (low-res mask logits) -> [B, h, w, C]."""
    x = masks.astype(jnp.dtype(self.config.dtype))
    for layer in self.mask_downscaling:
      x = layer(x)
    return x

  def __call__(self, points: jax.Array | None = None, labels: jax.Array | None = None,
               boxes: jax.Array | None = None, masks: jax.Array | None = None,
               text_embeds: jax.Array | None = None, batch_size: int | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Returns sparse [B, T, C] (points (+ a padding point when boxes is None), box corners,
    then `text_embeds` [B, k, C] as they are: LISA's [SEG] projections) and dense [B, h, w, C]
    (the embedded mask, or `no_mask_embed` broadcast)."""
    c = self.config
    dt = jnp.dtype(c.dtype)
    if self.is_initializing():  # create every parameter whatever prompts init sees
      self._embed_boxes(jnp.zeros((1, 4)))
      self._embed_points(jnp.zeros((1, 1, 2)), jnp.zeros((1, 1), jnp.int32), True)
      self._embed_masks(jnp.zeros((1,) + self.mask_input_size + (1,)))
      _ = self.no_mask_embed.embedding
    present = [x for x in (points, boxes, masks, text_embeds) if x is not None]
    bs = present[0].shape[0] if present else (batch_size or 1)
    parts = []
    if points is not None:
      parts.append(self._embed_points(points, labels, pad=boxes is None).astype(dt))
    if boxes is not None:
      parts.append(self._embed_boxes(boxes).astype(dt))
    if text_embeds is not None:
      parts.append(text_embeds.astype(dt))
    sparse = jnp.concatenate(parts, axis=1) if parts else jnp.zeros((bs, 0, c.prompt_embed_dim), dt)
    if masks is not None:
      dense = self._embed_masks(masks)
    else:
      dense = jnp.broadcast_to(self.no_mask_embed.embedding.astype(dt).reshape(1, 1, 1, -1),
                               (bs,) + self.image_embedding_size + (c.prompt_embed_dim,))
    return sparse, dense


# ----------------------------------------------------------------------------- mask decoder
class DecoderAttention(nn.Module):
  """transformer.Attention: q/k/v projected to embed_dim / downsample_rate, then MHA."""
  config: SamConfig
  downsample_rate: int = 1

  @nn.compact
  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q [B, Tq, C], k/v [B, Tk, C] -> [B, Tq, C]."""
    c = self.config
    kw = dict(**dtypes(c), use_bias=True)
    n = c.decoder_num_heads
    d = c.prompt_embed_dim // self.downsample_rate // n
    proj = lambda name: DenseGeneral((n, d), kernel_axes=("embed", "heads", "head_dim"), name=name, **kw)  # noqa
    q, k, v = proj("q_proj")(q), proj("k_proj")(k), proj("v_proj")(v)
    out = attn_lib.dot_product_attention(q, k, v, scale=d ** -0.5, impl=c.attention_impl)
    return DenseGeneral(c.prompt_embed_dim, in_axes=2, kernel_axes=("heads", "head_dim", "embed"),
                        name="out_proj", **kw)(out)


class TwoWayAttentionBlock(nn.Module):
  """Token self-attention, token->image cross-attention, MLP, image->token cross-attention."""
  config: SamConfig
  skip_first_layer_pe: bool = False

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe):
    c = self.config
    r = c.attention_downsample_rate
    ln = lambda name: _ln(c.decoder_norm_eps, c, name)  # noqa: E731
    if self.skip_first_layer_pe:
      queries = DecoderAttention(c, name="self_attn")(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + DecoderAttention(c, name="self_attn")(q, q, queries)
    queries = ln("norm1")(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = ln("norm2")(queries + DecoderAttention(c, r, name="cross_attn_token_to_image")(q, k, keys))
    queries = ln("norm3")(queries + MLPBlock(c.decoder_mlp_dim, "relu", c, name="mlp")(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = ln("norm4")(keys + DecoderAttention(c, r, name="cross_attn_image_to_token")(k, q, queries))
    return queries, keys


class TwoWayTransformer(nn.Module):
  config: SamConfig

  @nn.compact
  def __call__(self, image_embedding: jax.Array, image_pe: jax.Array, point_embedding: jax.Array):
    """image_embedding, image_pe [B, h*w, C]; point_embedding [B, T, C] -> (queries [B, T, C],
    keys [B, h*w, C])."""
    c = self.config
    queries, keys = point_embedding, image_embedding
    for i in range(c.decoder_depth):
      queries, keys = TwoWayAttentionBlock(c, skip_first_layer_pe=(i == 0), name=f"layers_{i}")(
          queries, keys, point_embedding, image_pe)
    q, k = queries + point_embedding, keys + image_pe
    queries = queries + DecoderAttention(c, c.attention_downsample_rate, name="final_attn_token_to_image")(q, k, keys)
    return _ln(c.decoder_final_norm_eps, c, "norm_final_attn")(queries), keys


class MaskDecoder(nn.Module):
  config: SamConfig

  @nn.compact
  def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse_prompt_embeddings: jax.Array,
               dense_prompt_embeddings: jax.Array, multimask_output: bool = False,
               image_index: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Masks and IoU predictions for N prompts.

    image_embeddings [B_img, h, w, C]; image_pe [1 | B_img, h, w, C] (`get_dense_pe()`);
    sparse_prompt_embeddings [N, T, C]; dense_prompt_embeddings [N | 1, h, w, C].
    image_index int [N]: the image each prompt decodes against (several prompts can share one
    embedding with static shapes). Without it, B_img must be 1 (shared by all prompts, as
    segment_anything's repeat_interleave) or N (prompt n uses image n).
    multimask_output (static): masks 1..M when True, mask 0 when False.
    Returns masks [N, M | 1, 4h, 4w] and iou_pred [N, M | 1].
    """
    c = self.config
    dt = jnp.dtype(c.dtype)
    kw = dict(dtype=dt, param_dtype=jnp.dtype(c.param_dtype))
    ch = c.prompt_embed_dim
    n = sparse_prompt_embeddings.shape[0]
    b_img, h, w, _ = image_embeddings.shape
    iou_token = Embed(1, ch, axes=(None, "embed"), name="iou_token", **kw)
    mask_tokens = Embed(c.num_mask_tokens, ch, axes=(None, "embed"), name="mask_tokens", **kw)
    out_tokens = jnp.concatenate([iou_token.embedding, mask_tokens.embedding], axis=0).astype(dt)
    tokens = jnp.concatenate([jnp.broadcast_to(out_tokens[None], (n,) + out_tokens.shape),
                              sparse_prompt_embeddings.astype(dt)], axis=1)
    if image_index is not None:
      src = jnp.take(image_embeddings, image_index, axis=0)
    elif b_img == 1:
      src = jnp.broadcast_to(image_embeddings, (n, h, w, ch))
    elif b_img == n:
      src = image_embeddings
    else:
      raise ValueError(f"{b_img} image embeddings for {n} prompts: pass image_index")
    src = src.astype(dt) + dense_prompt_embeddings.astype(dt)
    pos = jnp.broadcast_to(image_pe.astype(dt), (n, h, w, ch)) if image_pe.shape[0] in (1, n) else \
        jnp.take(image_pe, image_index, axis=0)
    hs, src = TwoWayTransformer(c, name="transformer")(src.reshape(n, h * w, ch), pos.reshape(n, h * w, ch), tokens)
    iou_token_out = hs[:, 0]
    mask_tokens_out = hs[:, 1:1 + c.num_mask_tokens]

    x = src.reshape(n, h, w, ch)
    x = ConvTranspose(ch // 4, 2, name="output_upscaling_0", **kw)(x)
    x = jax.nn.gelu(_ln(c.neck_norm_eps, c, "output_upscaling_1")(x), approximate=False)
    x = jax.nn.gelu(ConvTranspose(ch // 8, 2, name="output_upscaling_3", **kw)(x), approximate=False)
    hyper_in = jnp.stack([MLP(ch, ch // 8, 3, c, name=f"output_hypernetworks_mlps_{m}")(mask_tokens_out[:, m])
                          for m in range(c.num_mask_tokens)], axis=1)
    masks = jnp.einsum("nmc,nhwc->nmhw", hyper_in, x)
    iou_pred = MLP(c.iou_head_hidden_dim, c.num_mask_tokens, c.iou_head_depth, c, name="iou_prediction_head")(
        iou_token_out)
    sl = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, sl], iou_pred[:, sl]


# ----------------------------------------------------------------------------- SAM
class Sam(nn.Module):
  """image_encoder + prompt_encoder + mask_decoder.

  `apply(v, pixels, method=Sam.encode_image)` -> [B, h, w, C];
  `apply(v, points=..., labels=..., method=Sam.encode_prompts)` -> (sparse, dense);
  `apply(v, emb, sparse, dense, multimask_output, image_index, method=Sam.decode)` -> (masks, iou);
  `apply(v, pixels, ...prompts)` runs all three (one image batch; prompts per image when
  image_index is None and B_img == N, or shared by all prompts when B_img == 1)."""
  config: SamConfig

  def setup(self):
    self.image_encoder = ImageEncoderViT(self.config)
    self.prompt_encoder = PromptEncoder(self.config)
    self.mask_decoder = MaskDecoder(self.config)

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    """pixels [B, H, W, 3] normalized (see `preprocess`) -> image embeddings [B, h, w, out_chans]."""
    return self.image_encoder(pixels)

  def encode_prompts(self, points=None, labels=None, boxes=None, masks=None, text_embeds=None, batch_size=None):
    return self.prompt_encoder(points, labels, boxes, masks, text_embeds, batch_size)

  def get_dense_pe(self) -> jax.Array:
    return self.prompt_encoder.get_dense_pe()

  def decode(self, image_embeddings: jax.Array, sparse: jax.Array, dense: jax.Array,
             multimask_output: bool = False, image_index: jax.Array | None = None):
    return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense,
                             multimask_output, image_index)

  def __call__(self, pixels: jax.Array, points=None, labels=None, boxes=None, masks=None, text_embeds=None,
               multimask_output: bool = True, image_index: jax.Array | None = None):
    emb = self.encode_image(pixels)
    sparse, dense = self.encode_prompts(points, labels, boxes, masks, text_embeds)
    return self.decode(emb, sparse, dense, multimask_output, image_index)


__all__ = ["SamConfig", "Sam", "ImageEncoderViT", "PromptEncoder", "MaskDecoder", "TwoWayTransformer",
           "PositionEmbeddingRandom", "ConvTranspose", "postprocess_masks", "postprocess_masks_dynamic",
           "preprocess", "get_rel_pos", "decomposed_rel_pos_bias", "window_partition", "window_unpartition",
           "linear_resize_matrix", "cubic_resize_matrix", "traced_linear_resize_matrix", "PRESETS",
           "vit_b", "vit_l", "vit_h", "tiny"]
