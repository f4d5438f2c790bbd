"""Losses, exactly as the official implementations compute them.

LISA (model/LISA.py): total = ce_w * CE + bce_w * BCE + dice_w * DICE where
  CE   = HF causal-LM mean token cross entropy (shifted; label -100 ignored);
  BCE  = per mask, mean over the original-size pixels of BCE-with-logits, then
         sum_i [ (sum over image i's masks) / (n_i + 1e-8) * n_i ] / (sum_i n_i + 1e-8);
  DICE = per mask 1 - (2 sum(s/1000 * t) + 1e-6) / (sum(s/1000) + sum(t/1000) + 1e-6) with s = sigmoid,
         grouped over images the same way.
Masks live in a padded [Hb, Wb] canvas; only the top-left [H, W] of each image counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxlisa.constants import IGNORE_INDEX
from jaxlisa.models.losses import causal_lm_cross_entropy


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits [..., T, V], labels [..., T] -> (mean CE over supervised next tokens, #tokens)."""
  return causal_lm_cross_entropy(logits, labels), (labels[..., 1:] != IGNORE_INDEX).sum()


def valid_region(orig_hw: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """orig_hw [..., 2] -> bool [..., Hb, Wb]: the image's own pixels inside the padded canvas."""
  ys = jnp.arange(shape[0])[:, None]
  xs = jnp.arange(shape[1])[None, :]
  return (ys < orig_hw[..., 0, None, None]) & (xs < orig_hw[..., 1, None, None])


def mask_losses(pred: jax.Array, target: jax.Array, orig_hw: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-mask BCE (pixel mean) and dice. pred logits, target 0/1: [..., Hb, Wb]; orig_hw [..., 2]."""
  region = valid_region(orig_hw, pred.shape[-2:])
  x = pred.astype(jnp.float32)
  t = target.astype(jnp.float32)
  npix = (orig_hw[..., 0] * orig_hw[..., 1]).astype(jnp.float32)
  bce = optax.sigmoid_binary_cross_entropy(x, t)
  bce = jnp.where(region, bce, 0.0).sum((-2, -1)) / jnp.maximum(npix, 1.0)
  s = jnp.where(region, jax.nn.sigmoid(x), 0.0)
  t = jnp.where(region, t, 0.0)
  num = 2 * (s / 1000 * t).sum((-2, -1))
  den = (s / 1000).sum((-2, -1)) + (t / 1000).sum((-2, -1))
  dice = 1 - (num + 1e-6) / (den + 1e-6)
  return bce, dice


def sample_mask_points(rng: jax.Array, gt_masks: jax.Array, orig_hw: jax.Array, resize_hw: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """One uniformly random foreground pixel per mask, as a SAM point prompt.

  gt_masks [I, J, K, Hb, Wb] (1 = foreground; 0 / 255 not); orig_hw, resize_hw [I, 2] (h, w) ->
  (points [I, J, K, 2]: the pixel centre (x + 0.5, y + 0.5) scaled to SAM's input frame as
  segment-anything's ResizeLongestSide.apply_coords does, has_foreground [I, J, K])."""
  hb, wb = gt_masks.shape[-2:]
  fg = (gt_masks == 1) & valid_region(orig_hw[:, None, None, :], (hb, wb))
  flat = fg.reshape(fg.shape[:3] + (-1,))
  idx = jax.random.categorical(rng, jnp.where(flat, 0.0, -1e9))
  xy = jnp.stack([idx % wb, idx // wb], -1).astype(jnp.float32) + 0.5
  scale = (resize_hw / orig_hw).astype(jnp.float32)[:, ::-1]  # (w, h) ratios
  return xy * scale[:, None, None, :], flat.any(-1)


def grouped_mean(per_mask: jax.Array, valid: jax.Array, group: jax.Array, num_groups: int) -> jax.Array:
  """The official accumulation: sum over groups of (group sum / (n + 1e-8) * n), / (total n + 1e-8).

  per_mask, valid [M]; group [M] int (image of each mask)."""
  v = valid.astype(jnp.float32)
  sums = jax.ops.segment_sum(per_mask * v, group, num_groups)
  counts = jax.ops.segment_sum(v, group, num_groups)
  total = (sums / (counts + 1e-8) * counts).sum()
  return total / (counts.sum() + 1e-8)


def lisa_loss(logits: jax.Array, labels: jax.Array, pred_masks: jax.Array, gt_masks: jax.Array,
              mask_valid: jax.Array, orig_hw: jax.Array, *, ce_weight: float = 1.0, bce_weight: float = 2.0,
              dice_weight: float = 0.5) -> tuple[jax.Array, dict]:
  """logits [I, J, T, V]; labels [I, J, T]; pred_masks, gt_masks [I, J, K, Hb, Wb];
  mask_valid [I, J, K]; orig_hw [I, 2] -> (total, {ce, bce, dice, num_masks, num_tokens})."""
  ce, n_tok = causal_lm_loss(logits, labels)
  bce, dice = batch_mask_losses(pred_masks, gt_masks, mask_valid, orig_hw)
  total = ce_weight * ce + bce_weight * bce + dice_weight * dice
  return total, {"ce": ce, "bce": bce, "dice": dice, "num_masks": mask_valid.sum(), "num_tokens": n_tok}


def batch_mask_losses(pred_masks: jax.Array, gt_masks: jax.Array, mask_valid: jax.Array,
                      orig_hw: jax.Array) -> tuple[jax.Array, jax.Array]:
  """LISA's (BCE, dice) of a batch: per-mask losses averaged over the valid masks (grouped by image,
  as official). pred_masks, gt_masks [I, J, K, Hb, Wb]; mask_valid [I, J, K]; orig_hw [I, 2]."""
  n_img = pred_masks.shape[0]
  hw = jnp.broadcast_to(orig_hw[:, None, None, :], pred_masks.shape[:3] + (2,))
  bce, dice = mask_losses(pred_masks, gt_masks, hw)
  group = jnp.broadcast_to(jnp.arange(n_img)[:, None, None], mask_valid.shape).reshape(-1)
  valid = mask_valid.reshape(-1)
  return grouped_mean(bce.reshape(-1), valid, group, n_img), grouped_mean(dice.reshape(-1), valid, group, n_img)
