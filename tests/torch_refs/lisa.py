"""LISA's losses (model/LISA.py) and the merge script's state dict, transcribed in PyTorch."""

import torch
import torch.nn.functional as F


def dice_loss(inputs, targets, num_masks, scale=1000, eps=1e-6):
  inputs = inputs.sigmoid().flatten(1, 2)
  targets = targets.flatten(1, 2)
  numerator = 2 * (inputs / scale * targets).sum(-1)
  denominator = (inputs / scale).sum(-1) + (targets / scale).sum(-1)
  loss = 1 - (numerator + eps) / (denominator + eps)
  return loss.sum() / (num_masks + 1e-8)


def sigmoid_ce_loss(inputs, targets, num_masks):
  loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
  return loss.flatten(1, 2).mean(1).sum() / (num_masks + 1e-8)


def mask_losses(pred_masks, masks_list):
  """model_forward's accumulation over images: (sum of per-image BCE x n, sum of dice x n, n masks)."""
  bce, dice, num_masks = 0, 0, 0
  for gt_mask, pred_mask in zip(masks_list, pred_masks):
    assert gt_mask.shape[0] == pred_mask.shape[0]
    bce = bce + sigmoid_ce_loss(pred_mask, gt_mask, num_masks=gt_mask.shape[0]) * gt_mask.shape[0]
    dice = dice + dice_loss(pred_mask, gt_mask, num_masks=gt_mask.shape[0]) * gt_mask.shape[0]
    num_masks += gt_mask.shape[0]
  return bce, dice, num_masks


def parts_state(ref) -> dict[str, torch.Tensor]:
  """The merge script's tensors beside the LLaMA ones: mm_projector, SAM (visual_model) and
  text_hidden_fcs, from a reference dict {'projector', 'sam', 'fcs'} of torch modules."""
  state = {"model.mm_projector.weight": ref["projector"].weight, "model.mm_projector.bias": ref["projector"].bias}
  state.update({"model.visual_model." + k: v for k, v in ref["sam"].state_dict().items()})
  state.update({"model.text_hidden_fcs." + k: v for k, v in ref["fcs"].state_dict().items()})
  return state
