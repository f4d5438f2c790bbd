"""LLaVA v1 / v1.5 / v1.6 (LLaVA-NeXT): CLIP vision tower -> projector -> decoder LM.

Parameters (module names mirror llava-hf):
  vision_tower/...            CLIPVisionModel (models/clip.py)
  multi_modal_projector/linear_1..linear_N/{kernel [Dv*, D], bias [D]}   ("mlpNx_gelu"; "linear"
                              has only linear_1; "identity" has no projector)
  language_model/...          DecoderLM (models/llm.py)
  image_newline [D]           LLaVA-1.6 `spatial_unpad` only

Image tokens enter the sequence at fixed shapes. Every image becomes a run of token features;
the runs of all images of the batch are concatenated into one array `image_tokens [S, D]`, and
the placeholder positions of `input_ids` ([B, T] bool `image_mask`, by default `input_ids ==
image_token_index`) take them in order with the cumsum-index pattern:

    row[b, t] = image_row_offset[b] + cumsum(image_mask[b])[t] - 1

`image_row_offset [B]` defaults to the exclusive cumsum of the per-row placeholder counts (HF's
`masked_scatter`: features flow across the batch in reading order). The collate helpers set it
explicitly when a row does not use all its image tokens (LLaVA's truncation to
`tokenizer_model_max_length`, or LLaVA's dummy image of text-only samples).

LLaVA-1.6 "anyres": each image is a base view plus a grid of crops, all encoded as a batch of
crops [n_crops, H, W, 3]. Which crop feature goes where (base first, the crop grid in raster
order, `spatial_unpad` cropping back to the image's aspect ratio, `image_newline` at each row end;
or `flat` / `spatial`) only depends on image sizes, so it is computed on the host as an index
array `feature_index [S]` (row of the flattened crop features, -1 = image_newline) by
`anyres_feature_index`; the device only gathers. Image sizes are (height, width), the
transformers convention (see data/anyres.py for how the original LLaVA code differs).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlisa.models import anyres
from jaxlisa.models.clip import CLIPVisionConfig, CLIPVisionModel
from jaxlisa.models.config_base import ConfigMixin
from jaxlisa.models.layers import DenseGeneral, activation, constrain
from jaxlisa.models.llm import DecoderConfig, DecoderLM, DecoderOutput

PROJECTORS = "linear | mlp{N}x_gelu | identity"
MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
ASPECT_RATIOS = ("square", "pad", "anyres")


@dataclasses.dataclass(frozen=True)
class LlavaConfig(ConfigMixin):
  """LLaVA architecture. Field names follow llava-hf where one exists, else the original config.

  vision_feature_layer: CLIP hidden state(s) used (HF order: 0 = embeddings); a tuple concatenates
    several along features. vision_feature_select_strategy: "default" drops CLS (LLaVA "patch"),
    "full" keeps it ("cls_patch"). image_token_index: the placeholder id (llava-hf: an in-vocab id
    such as 32000; original LLaVA: IMAGE_TOKEN_INDEX = -200 repeated by the collate). Placeholder
    ids never reach the embedding table, so any id works.
  image_aspect_ratio: "square" | "pad" (preprocessing) | "anyres" (LLaVA-1.6 crops);
  image_grid_pinpoints: (height, width) pairs; mm_patch_merge_type: flat | spatial | spatial_unpad.
  tokenizer_model_max_length: LLaVA's cut after image expansion (collate default), or None.
  """
  vision: CLIPVisionConfig = CLIPVisionConfig()
  text: DecoderConfig = DecoderConfig()
  projector_type: str = "mlp2x_gelu"
  projector_hidden_act: str = "gelu"
  projector_bias: bool = True
  vision_feature_layer: int | tuple[int, ...] = -2
  vision_feature_select_strategy: str = "default"
  image_token_index: int = 32000
  mm_use_im_start_end: bool = False
  image_aspect_ratio: str = "square"
  image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
  mm_patch_merge_type: str = "flat"
  tokenizer_model_max_length: int | None = None

  def __post_init__(self):
    if self.vision_feature_select_strategy not in ("default", "full"):
      raise ValueError(f"vision_feature_select_strategy {self.vision_feature_select_strategy!r}: "
                       "expected 'default' or 'full'")
    if self.mm_patch_merge_type not in MERGE_TYPES:
      raise ValueError(f"mm_patch_merge_type {self.mm_patch_merge_type!r}: expected one of {MERGE_TYPES}")
    if self.image_aspect_ratio not in ASPECT_RATIOS:
      raise ValueError(f"image_aspect_ratio {self.image_aspect_ratio!r}: expected one of {ASPECT_RATIOS}")
    if self.image_aspect_ratio == "anyres" and not self.image_grid_pinpoints:
      raise ValueError("image_aspect_ratio='anyres' needs image_grid_pinpoints")
    self.projector_depth  # validates projector_type
    if self.projector_type == "identity" and self.mm_hidden_size != self.text.hidden_size:
      raise ValueError(f"identity projector needs vision features ({self.mm_hidden_size}) == LM width "
                       f"({self.text.hidden_size})")

  @property
  def projector_depth(self) -> int:
    """Number of Linear layers of the projector (0 for identity)."""
    if self.projector_type == "identity":
      return 0
    if self.projector_type == "linear":
      return 1
    m = re.fullmatch(r"mlp(\d+)x_gelu", self.projector_type)
    if not m or int(m.group(1)) < 1:
      raise ValueError(f"unknown projector_type {self.projector_type!r}; expected {PROJECTORS}")
    return int(m.group(1))

  @property
  def feature_layers(self) -> tuple[int, ...]:
    v = self.vision_feature_layer
    return (v,) if isinstance(v, int) else tuple(v)

  @property
  def mm_hidden_size(self) -> int:
    return self.vision.hidden_size * len(self.feature_layers)

  @property
  def tokens_per_crop(self) -> int:
    """Feature tokens one CLIP view gives: grid^2, plus CLS with the "full" strategy."""
    return self.vision.grid ** 2 + (self.vision_feature_select_strategy == "full")

  @property
  def is_anyres(self) -> bool:
    return self.image_aspect_ratio == "anyres"

  @property
  def has_image_newline(self) -> bool:
    return "unpad" in self.mm_patch_merge_type

  def dummy_inputs(self) -> tuple:
    """(input_ids [1, 2 + N] with one image's N placeholders, attention_mask, pixels [1, S, S, C])."""
    n = self.tokens_per_crop
    ids = jnp.full((1, n + 2), self.image_token_index, jnp.int32).at[:, :2].set(1)
    pixels = jnp.zeros((1, self.vision.image_size, self.vision.image_size, self.vision.num_channels), jnp.float32)
    return ids, jnp.ones_like(ids), pixels


# ----------------------------------------------------------------------------- host-side layout
def _crop_layout(cfg: LlavaConfig, image_size: Sequence[int] | None) -> np.ndarray:
  """Feature-row order of one image, relative to its first crop: [L] int (-1 = image_newline).

  Rows index the image's crops flattened as [n_crops * tokens_per_crop]: crop 0 is the base
  view, crops 1.. the grid in raster order (HF / LLaVA `pack_image_features`).
  """
  n = cfg.tokens_per_crop
  if not cfg.is_anyres or image_size is None:
    return np.arange(n)
  rows, cols = anyres.get_anyres_image_grid_shape(tuple(image_size), cfg.image_grid_pinpoints,
                                                  cfg.vision.image_size)
  n_crops = 1 + rows * cols
  if cfg.mm_patch_merge_type == "flat":
    return np.arange(n_crops * n)
  s = cfg.vision.grid
  if n != s * s:
    raise ValueError("spatial patch merging needs the 'default' feature strategy (no CLS token)")
  base = np.arange(n)
  # crop (r, c) pixel (i, j) -> map row r*s + i, column c*s + j
  grid = (n + np.arange(rows * cols * n)).reshape(rows, cols, s, s).transpose(0, 2, 1, 3)
  grid = grid.reshape(rows * s, cols * s)
  if cfg.mm_patch_merge_type == "spatial":
    return np.concatenate([base, grid.reshape(-1)])
  h, w = image_size
  ch, cw = grid.shape
  if w / h > cw / ch:  # transformers' unpad_image (round to 7 places)
    pad = (ch - int(round(h * (cw / w), 7))) // 2
    grid = grid[pad:ch - pad]
  else:
    pad = (cw - int(round(w * (ch / h), 7))) // 2
    grid = grid[:, pad:cw - pad]
  grid = np.concatenate([grid, np.full((grid.shape[0], 1), -1)], axis=1)
  return np.concatenate([base, grid.reshape(-1)])


def num_crops(cfg: LlavaConfig, image_size: Sequence[int] | None = None) -> int:
  """CLIP views of one image: 1, or 1 + rows * cols for anyres."""
  if not cfg.is_anyres or image_size is None:
    return 1
  rows, cols = anyres.get_anyres_image_grid_shape(tuple(image_size), cfg.image_grid_pinpoints,
                                                  cfg.vision.image_size)
  return 1 + rows * cols


def num_image_tokens(cfg: LlavaConfig, image_size: Sequence[int] | None = None) -> int:
  """Placeholder positions one image needs (its (height, width) matters for anyres)."""
  return len(_crop_layout(cfg, image_size))


def anyres_feature_index(cfg: LlavaConfig, image_sizes: Sequence[Sequence[int]],
                         crops_per_slot: int | None = None, pad_to: int | None = None
                         ) -> tuple[np.ndarray, list[int]]:
  """Host-side gather map for anyres images -> (feature_index [S] int32, tokens per image).

  image_sizes: (height, width) per image, in order. The crops of all images are encoded as one
  batch: concatenated ([sum n_crops, H, W, 3], crops_per_slot None) or padded per image
  ([n_img, crops_per_slot, H, W, 3], HF's 5-D layout). feature_index[k] is the row of the
  flattened projected crop features for image token k (-1: image_newline); `pad_to` pads S with
  row 0 for fixed shapes (the padding is never read by a placeholder).
  """
  n, parts, lens, start = cfg.tokens_per_crop, [], [], 0
  for i, size in enumerate(image_sizes):
    layout = _crop_layout(cfg, size)
    first = (i * crops_per_slot if crops_per_slot else start) * n
    parts.append(np.where(layout >= 0, layout + first, -1))
    lens.append(len(layout))
    k = num_crops(cfg, size)
    if crops_per_slot and k > crops_per_slot:
      raise ValueError(f"image {i} of size {tuple(size)} has {k} crops > crops_per_slot {crops_per_slot}")
    start += k
  index = np.concatenate(parts) if parts else np.zeros((0,), np.int64)
  if pad_to is not None:
    if pad_to < len(index):
      raise ValueError(f"pad_to {pad_to} < {len(index)} image tokens")
    index = np.concatenate([index, np.zeros(pad_to - len(index), index.dtype)])
  return index.astype(np.int32), lens


# ----------------------------------------------------------------------------- device-side merge
def merge_image_features(inputs_embeds: jax.Array, image_mask: jax.Array, image_tokens: jax.Array,
                         image_row_offset: jax.Array | None = None) -> jax.Array:
  """Scatter image tokens into the placeholder positions (static shapes, no loop over rows).

  inputs_embeds [B, T, D]; image_mask [B, T] bool; image_tokens [S, D] (all images, in order);
  image_row_offset [B] int: row of image_tokens where row b's first placeholder reads (default:
  placeholders consume image_tokens in reading order across the batch). -> [B, T, D].
  """
  mask = image_mask.astype(bool)
  counts = jnp.sum(mask, axis=1, dtype=jnp.int32)
  if image_row_offset is None:
    image_row_offset = jnp.cumsum(counts) - counts
  rows = image_row_offset.astype(jnp.int32)[:, None] + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
  rows = jnp.clip(rows, 0, max(image_tokens.shape[0] - 1, 0))
  picked = jnp.take(image_tokens, rows, axis=0, mode="clip").astype(inputs_embeds.dtype)
  return jnp.where(mask[..., None], picked, inputs_embeds)


class LlavaProjector(nn.Module):
  """LLaVA `mm_projector` / llava-hf `multi_modal_projector`: Linear (GELU Linear) x (N-1)."""
  config: LlavaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., mm_hidden] -> [..., D].

    The features of the input and of every layer's output stay whole on each device (batch
    sharded only): with them on `tensor`, XLA's SPMD partitioner (CPU, jax 0.10.2) mis-partitions
    this small row-parallel matmul on data x fsdp x tensor meshes, swapping batch shards."""
    c = self.config
    kw = dict(dtype=jnp.dtype(c.text.dtype), param_dtype=jnp.dtype(c.text.param_dtype),
              use_bias=c.projector_bias)
    whole = ("activation_batch",) + ("activation_length",) * (x.ndim - 2) + (None,)
    x = constrain(x, whole)
    for k in range(c.projector_depth):
      if k:
        x = activation(c.projector_hidden_act)(x)
      x = constrain(DenseGeneral(c.text.hidden_size, kernel_axes=("mlp", "embed"),
                                 name=f"linear_{k + 1}", **kw)(x), whole)
    return x


class Llava(nn.Module):
  """LLaVA (all versions). See the module docstring."""
  config: LlavaConfig

  def setup(self):
    c = self.config
    self.vision_tower = CLIPVisionModel(c.vision)
    if c.projector_depth:
      self.multi_modal_projector = LlavaProjector(c)
    self.language_model = DecoderLM(c.text)
    if c.has_image_newline:
      d = c.text.hidden_size
      self.image_newline = self.param(
          "image_newline", nn.with_logical_partitioning(nn.initializers.normal(d ** -0.5), ("embed",)),
          (d,), jnp.dtype(c.text.param_dtype))

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values [n, H, W, 3] (CLIP-normalized, NHWC) -> projected features
    [n, tokens_per_crop, D]."""
    c = self.config
    out = self.vision_tower(pixel_values, output_hidden_states=True)
    feats = [out.hidden_states[k] for k in c.feature_layers]
    if c.vision_feature_select_strategy == "default":
      feats = [f[:, 1:] for f in feats]
    x = jnp.concatenate(feats, axis=-1) if len(feats) > 1 else feats[0]
    if c.projector_depth:
      x = self.multi_modal_projector(x)
    return x.astype(jnp.dtype(c.text.dtype))

  def image_tokens(self, pixel_values: jax.Array, image_sizes=None,
                   feature_index: jax.Array | None = None) -> jax.Array:
    """All image tokens of a batch in order -> [S, D].

    pixel_values: [n_img, H, W, 3] (one view per image), or anyres crops [n_crops, H, W, 3] /
    [n_img, max_crops, H, W, 3]. Anyres packing needs `feature_index` (anyres_feature_index) or
    concrete `image_sizes` [n_img, 2] (height, width) to build it at trace time.
    """
    c = self.config
    slot = None
    if pixel_values.ndim == 5:
      slot = pixel_values.shape[1]
      pixel_values = pixel_values.reshape(-1, *pixel_values.shape[2:])
    flat = self.encode_images(pixel_values)
    flat = flat.reshape(-1, flat.shape[-1])
    if feature_index is None and c.is_anyres and image_sizes is not None:
      if isinstance(image_sizes, jax.core.Tracer):
        raise ValueError("under jit pass feature_index=anyres_feature_index(config, image_sizes) "
                         "instead of traced image_sizes")
      feature_index = anyres_feature_index(c, np.asarray(image_sizes).tolist(), slot)[0]
    if feature_index is None:
      return flat
    idx = jnp.asarray(feature_index, jnp.int32)
    picked = jnp.take(flat, jnp.maximum(idx, 0), axis=0, mode="clip")
    if c.has_image_newline:
      picked = jnp.where((idx < 0)[:, None], self.image_newline.astype(flat.dtype), picked)
    return picked

  def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None, image_sizes=None, *,
            image_mask: jax.Array | None = None, image_row_offset: jax.Array | None = None,
            feature_index: jax.Array | None = None) -> jax.Array:
    """input_ids [B, T] with image placeholders -> merged inputs_embeds [B, T, D].

    image_mask [B, T] (default input_ids == image_token_index); image_row_offset [B] (see
    merge_image_features). Placeholder ids are replaced by 0 before the table lookup.
    """
    c = self.config
    if image_mask is None:
      image_mask = input_ids == c.image_token_index
    ids = jnp.where(image_mask, 0, input_ids)
    x = self.language_model.embed(ids)
    if pixel_values is not None:
      tokens = self.image_tokens(pixel_values, image_sizes, feature_index)
      x = merge_image_features(x, image_mask, tokens, image_row_offset)
    return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

  def embed_inputs(self, input_ids: jax.Array, attention_mask: jax.Array, pixel_values: jax.Array | None = None,
                   image_sizes=None, *, image_mask: jax.Array | None = None,
                   image_row_offset: jax.Array | None = None, feature_index: jax.Array | None = None):
    """Decoding entry (jaxlisa.inference): input_ids / attention_mask [B, T] (+ images, as `embed`)
    -> (inputs_embeds [B, T, D], attention_mask [B, T]) for `language_model`."""
    return self.embed(input_ids, pixel_values, image_sizes, image_mask=image_mask,
                      image_row_offset=image_row_offset, feature_index=feature_index), attention_mask

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               pixel_values: jax.Array | None = None, image_sizes=None, *,
               image_mask: jax.Array | None = None, image_row_offset: jax.Array | None = None,
               feature_index: jax.Array | None = None, position_ids: jax.Array | None = None,
               inputs_embeds: jax.Array | None = None, cache: dict | None = None,
               cache_index: jax.Array | int = 0, output_hidden_states: bool = False,
               return_logits: bool = True, deterministic: bool = True) -> DecoderOutput:
    """input_ids [B, T]; attention_mask [B, T]; pixel_values (see image_tokens) -> DecoderOutput
    (logits [B, T, V]). `inputs_embeds` (from `embed`) skips the vision side."""
    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids, pixel_values, image_sizes, image_mask=image_mask,
                                 image_row_offset=image_row_offset, feature_index=feature_index)
    return self.language_model(None, attention_mask, position_ids, inputs_embeds=inputs_embeds,
                               cache=cache, cache_index=cache_index,
                               output_hidden_states=output_hidden_states, return_logits=return_logits,
                               deterministic=deterministic)


__all__ = ["LlavaConfig", "Llava", "LlavaProjector", "merge_image_features", "anyres_feature_index",
           "num_image_tokens", "num_crops"]
