"""LISA: an LLaVA model whose [SEG] token prompts SAM's mask decoder.

Parameters (names mirror the official `LISAForCausalLM`):
  llava/{vision_tower, multi_modal_projector, language_model}   (jaxlisa.models.llava.Llava)
  visual_model/{image_encoder, prompt_encoder, mask_decoder}     (jaxlisa.models.sam.Sam)
  text_hidden_fcs/{layers_0, layers_2}                           Linear(D, D) - ReLU - Linear(D, out_dim)

Batches are grouped per image with static shapes (the official `offset` becomes a fixed number J
of conversation slots per image):
  input_ids, labels, attention_mask [I, J, T]; conv_valid [I, J]
  clip_pixels [I, Hc, Wc, 3]; sam_pixels [I, S, S, 3]; resize_hw, orig_hw [I, 2]
  gt_masks [I, J, K, Hb, Wb] (0/1, 255 ignore); mask_valid [I, J, K]
CLIP and SAM's image encoder run once per image; every conversation of an image reads its
features (`image_row_offset`), and every [SEG] of an image decodes against its embedding
(`image_index`). The [SEG] embedding is the last hidden state (after the final norm) at the
position *before* each [SEG] token, as the official `input_ids[:, 1:] == seg_token_idx` shift.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxlisa.models import sam as sam_lib
from jaxlisa.models.config_base import ConfigMixin
from jaxlisa.models.layers import DenseGeneral
from jaxlisa.models.llava import Llava, LlavaConfig, merge_image_features
from jaxlisa.models.sam import Sam, SamConfig


@dataclasses.dataclass(frozen=True)
class LisaConfig(ConfigMixin):
  llava: LlavaConfig = LlavaConfig()
  sam: SamConfig = sam_lib.vit_h()
  seg_token_idx: int = 32003
  out_dim: int = 256
  max_seg_per_conversation: int = 1  # K
  ce_loss_weight: float = 1.0
  bce_loss_weight: float = 2.0
  dice_loss_weight: float = 0.5
  # Not in the official recipe (0 there): SAM's own promptable objective on the same ground-truth
  # masks, prompted by one random point inside each (SAM's pretraining task). The official SAM is
  # pretrained promptable; a from-scratch one (the tiny demo) learns to segment the salient shape
  # whatever its prompt, and [SEG] then has nothing to steer (docs/ARCHITECTURE.md, the tiny demo).
  point_prompt_loss_weight: float = 0.0

  def __post_init__(self):
    if self.out_dim != self.sam.prompt_embed_dim:
      raise ValueError(f"out_dim {self.out_dim} must equal SAM's prompt_embed_dim {self.sam.prompt_embed_dim}")

  @property
  def num_image_tokens(self) -> int:
    return self.llava.tokens_per_crop

  def dummy_inputs(self) -> tuple:
    """(input_ids [1, 1, N + 4] with the image's N placeholders, attention_mask, CLIP pixels, SAM pixels)."""
    n = self.num_image_tokens
    ids = jnp.zeros((1, 1, n + 4), jnp.int32).at[0, 0, 1:n + 1].set(self.llava.image_token_index)
    v, s = self.llava.vision, self.sam
    return (ids, jnp.ones_like(ids), jnp.zeros((1, v.image_size, v.image_size, 3)),
            jnp.zeros((1, s.img_size, s.img_size, 3)))


@flax.struct.dataclass
class LisaOutput:
  logits: jax.Array  # [I, J, T, V]
  seg_embeddings: jax.Array  # [I, J, K, out_dim] text_hidden_fcs([SEG] hidden states)
  seg_valid: jax.Array  # [I, J, K] a k-th [SEG] exists in the conversation
  low_res_masks: jax.Array  # [I, J, K, 4h, 4w] mask logits from SAM's decoder
  pred_masks: jax.Array | None = None  # [I, J, K, Hb, Wb] logits at original size (zero outside)
  point_masks: jax.Array | None = None  # [I, J, K, Hb, Wb] the same, SAM prompted by `prompt_points`


class TextHiddenFcs(nn.Module):
  """`text_hidden_fcs[0]`: Linear(D, D) - ReLU - Linear(D, out_dim) - Dropout(0)."""
  hidden: int
  out_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    x = DenseGeneral(self.hidden, kernel_axes=("embed", "mlp"), name="layers_0", **kw)(x)
    x = jax.nn.relu(x)
    return DenseGeneral(self.out_dim, kernel_axes=("mlp", None), name="layers_2", **kw)(x)


def seg_positions(input_ids: jax.Array, seg_token_idx: int, k: int) -> tuple[jax.Array, jax.Array]:
  """Positions whose hidden state is each [SEG]'s embedding (the official one-token shift).

  input_ids [..., T] -> (positions [..., K] int32, valid [..., K] bool): position of the k-th
  token t with input_ids[t + 1] == [SEG]."""
  nxt = jnp.concatenate([input_ids[..., 1:] == seg_token_idx,
                         jnp.zeros(input_ids.shape[:-1] + (1,), bool)], axis=-1)
  count = jnp.cumsum(nxt, axis=-1)
  ks = jnp.arange(1, k + 1)
  hit = nxt[..., None, :] & (count[..., None, :] == ks[:, None])  # [..., K, T]
  pos = jnp.argmax(hit, axis=-1).astype(jnp.int32)
  return pos, count[..., -1:] >= ks


class Lisa(nn.Module):
  config: LisaConfig

  def setup(self):
    c = self.config
    self.llava = Llava(c.llava)
    self.visual_model = Sam(c.sam)
    t = c.llava.text
    self.text_hidden_fcs = TextHiddenFcs(t.hidden_size, c.out_dim, dtype=jnp.dtype(t.dtype),
                                         param_dtype=jnp.dtype(t.param_dtype))

  def image_features(self, clip_pixels: jax.Array, sam_pixels: jax.Array):
    """clip_pixels [I, Hc, Wc, 3], sam_pixels [I, S, S, 3] -> (LLaVA image tokens [I*N, D],
    SAM image embeddings [I, h, w, C]); each image encoded once."""
    return self.llava.image_tokens(clip_pixels), self.visual_model.encode_image(sam_pixels)

  def embed_inputs(self, input_ids: jax.Array, attention_mask: jax.Array, image_tokens: jax.Array,
                   convs_per_image: int = 1):
    """Decoding entry: input_ids / attention_mask [C, T] with placeholders; conversation c reads image
    c // convs_per_image of image_tokens [I * N, D] (from `image_features`) -> (inputs_embeds [C, T, D],
    attention_mask [C, T])."""
    c = self.config
    image_mask = input_ids == c.llava.image_token_index
    row_offset = (jnp.arange(input_ids.shape[0]) // convs_per_image) * c.num_image_tokens
    embeds = merge_image_features(self.llava.embed(input_ids, None, image_mask=image_mask), image_mask,
                                  image_tokens, row_offset)
    return embeds, attention_mask

  def decode_masks(self, seg_embeddings: jax.Array, image_embeddings: jax.Array, image_index: jax.Array):
    """seg_embeddings [P, out_dim] (after text_hidden_fcs); image_index [P] -> low-res mask
    logits [P, 4h, 4w] (multimask_output=False, as LISA)."""
    sparse, dense = self.visual_model.encode_prompts(text_embeds=seg_embeddings[:, None])
    masks, _ = self.visual_model.decode(image_embeddings, sparse, dense, False, image_index)
    return masks[:, 0]

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, clip_pixels: jax.Array,
               sam_pixels: jax.Array, resize_hw: jax.Array | None = None, orig_hw: jax.Array | None = None,
               mask_shape: tuple[int, int] | None = None, deterministic: bool = True,
               prompt_points: jax.Array | None = None) -> LisaOutput:
    """input_ids, attention_mask [I, J, T]; clip_pixels [I, Hc, Wc, 3]; sam_pixels [I, S, S, 3];
    resize_hw / orig_hw [I, 2] and a static mask_shape (Hb, Wb) give pred_masks at original size.
    prompt_points [I, J, K, 2] (x, y in SAM input pixels) also decode every mask from a positive
    point instead of [SEG] (point_masks; see point_prompt_loss_weight)."""
    c = self.config
    n_img, n_conv, t = input_ids.shape
    k = c.max_seg_per_conversation
    image_tokens, image_embeddings = self.image_features(clip_pixels, sam_pixels)
    ids = input_ids.reshape(n_img * n_conv, t)
    embeds, mask = self.embed_inputs(ids, attention_mask.reshape(n_img * n_conv, t), image_tokens, n_conv)
    out = self.llava.language_model(None, mask, inputs_embeds=embeds, deterministic=deterministic)
    pos, valid = seg_positions(ids, c.seg_token_idx, k)  # [C, K]
    hidden = jnp.take_along_axis(out.last_hidden_state, pos[..., None], axis=1)  # [C, K, D]
    seg = self.text_hidden_fcs(hidden)
    image_index = jnp.repeat(jnp.arange(n_img * n_conv) // n_conv, k)
    low_res = self.decode_masks(seg.reshape(-1, c.out_dim), image_embeddings, image_index)
    pred = point_pred = None
    if resize_hw is not None and orig_hw is not None and mask_shape is not None:
      to_orig = lambda m: sam_lib.postprocess_masks_dynamic(
          m, resize_hw[image_index], orig_hw[image_index], out_shape=mask_shape,
          padded_size=c.sam.img_size).reshape(n_img, n_conv, k, *mask_shape)
      pred = to_orig(low_res)
      if prompt_points is not None:
        points = prompt_points.reshape(-1, 1, 2)
        sparse, dense = self.visual_model.encode_prompts(points, jnp.ones(points.shape[:2], jnp.int32))
        point_pred = to_orig(self.visual_model.decode(image_embeddings, sparse, dense, False, image_index)[0][:, 0])
    return LisaOutput(logits=out.logits.reshape(n_img, n_conv, t, -1),
                      seg_embeddings=seg.reshape(n_img, n_conv, k, -1),
                      seg_valid=valid.reshape(n_img, n_conv, k),
                      low_res_masks=low_res.reshape(n_img, n_conv, k, *low_res.shape[-2:]),
                      pred_masks=pred, point_masks=point_pred)
