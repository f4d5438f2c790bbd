"""gIoU / cIoU against a transcription of the official LISA validate() + intersectionAndUnionGPU."""

import jax.numpy as jnp
import numpy as np
import torch

from jaxlisa.evaluation import seg_metrics


def _official_intersection_and_union(output, target, k=2, ignore_index=255):
  output = output.view(-1).clone()
  target = target.view(-1)
  output[target == ignore_index] = ignore_index
  intersection = output[output == target]
  area_i = torch.histc(intersection.float(), bins=k, min=0, max=k - 1)
  area_o = torch.histc(output.float(), bins=k, min=0, max=k - 1)
  area_t = torch.histc(target.float(), bins=k, min=0, max=k - 1)
  return area_i, area_o + area_t - area_i


def _official_validate(samples):
  """samples: list of (pred_logits [n, H, W], gt [n, H, W]) per image -> (giou, ciou)."""
  inter_total, union_total, iou_total, n_total = torch.zeros(2), torch.zeros(2), torch.zeros(2), 0
  for logits, gt in samples:
    masks = (torch.tensor(logits) > 0).int()
    target = torch.tensor(gt).int()
    inter, union, acc_iou = 0.0, 0.0, 0.0
    for m, t in zip(masks, target):
      i, u = _official_intersection_and_union(m.contiguous().clone(), t.contiguous())
      inter += i
      union += u
      acc_iou += i / (u + 1e-5)
      acc_iou[u == 0] += 1.0
    acc_iou = acc_iou / masks.shape[0]
    inter_total += inter
    union_total += union
    iou_total += acc_iou * masks.shape[0]
    n_total += masks.shape[0]
  return float(iou_total[1] / n_total), float(inter_total[1] / (union_total[1] + 1e-10))


def test_giou_ciou_match_official():
  rs = np.random.RandomState(0)
  samples = []
  for n, h, w in [(3, 9, 7), (1, 5, 5), (2, 6, 10)]:
    logits = rs.randn(n, h, w).astype(np.float32)
    gt = (rs.rand(n, h, w) > 0.6).astype(np.int64)
    gt[0, :2] = 255  # ignore region
    samples.append((logits, gt))
  samples.append((-np.ones((1, 4, 4), np.float32), np.zeros((1, 4, 4), np.int64)))  # empty & empty -> IoU 1
  want_g, want_c = _official_validate(samples)
  i_sum = u_sum = iou_sum = n = 0.0
  for logits, gt in samples:
    i, u = seg_metrics.intersection_union(jnp.asarray(logits), jnp.asarray(gt))
    i_sum += float(i.sum())
    u_sum += float(u.sum())
    iou_sum += float(seg_metrics.mask_iou(i, u).sum())
    n += len(logits)
  got = seg_metrics.summarize(i_sum, u_sum, iou_sum, n)
  assert abs(got["giou"] - want_g) < 1e-6 and abs(got["ciou"] - want_c) < 1e-6


def test_region_excludes_padding():
  logits = jnp.ones((1, 4, 4))
  gt = jnp.zeros((1, 4, 4), jnp.int32).at[0, :2, :2].set(1)
  region = jnp.zeros((1, 4, 4), bool).at[0, :2, :2].set(True)
  i, u = seg_metrics.intersection_union(logits, gt, region)
  assert float(i[0]) == 4 and float(u[0]) == 4
  i, u = seg_metrics.intersection_union(logits, gt)
  assert float(i[0]) == 4 and float(u[0]) == 16
