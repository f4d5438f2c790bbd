"""Segmentation metrics as the official LISA `validate` computes them.

Per mask: prediction = logit > 0; pixels where the target is 255 (ignore) or outside the image's
own extent are excluded; I and U are the class-1 intersection and union
(`intersectionAndUnionGPU(K=2, ignore_index=255)`). IoU = I / (U + 1e-5), plus 1 when U == 0
(empty target and empty prediction count as a perfect match).
gIoU = mean of per-mask IoU over the dataset; cIoU = sum I / (sum U + 1e-10).
"""

from __future__ import annotations

import jax.numpy as jnp


def intersection_union(pred_logits, target, region=None):
  """pred_logits, target (0/1/255) [..., H, W]; region bool [..., H, W] -> (I, U) [...] float32."""
  valid = target != 255
  if region is not None:
    valid &= region
  pred = (pred_logits > 0) & valid
  gt = (target == 1) & valid
  inter = jnp.sum(pred & gt, axis=(-2, -1)).astype(jnp.float32)
  union = jnp.sum(pred | gt, axis=(-2, -1)).astype(jnp.float32)
  return inter, union


def mask_iou(inter, union):
  """Per-mask IoU with the official empty-union rule."""
  return inter / (union + 1e-5) + (union == 0).astype(jnp.float32)


def summarize(inter_sum: float, union_sum: float, iou_sum: float, num_masks: float) -> dict[str, float]:
  """Dataset totals -> {'giou', 'ciou'}."""
  return {"giou": iou_sum / max(num_masks, 1.0), "ciou": inter_sum / (union_sum + 1e-10)}
