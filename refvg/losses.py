"""Training losses. Box part: L1 + GIoU on normalised cxcywh boxes (as in DETR / TransVG). Mask part:
per-pixel BCE + soft Dice on mask logits (referring segmentation).

Computed in float32 whatever the autocast dtype: GIoU divides small areas, which bf16 handles poorly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from refvg.data.transforms import cxcywh_to_xyxy
from refvg.metrics import generalized_box_iou


def box_l1_loss(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> torch.Tensor:
    """L1 summed over the 4 coordinates, averaged over boxes."""
    return (pred_cxcywh.float() - target_cxcywh.float()).abs().sum(-1).mean()


def giou_loss(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> torch.Tensor:
    """Mean over boxes of 1 - GIoU."""
    giou = generalized_box_iou(cxcywh_to_xyxy(pred_cxcywh.float()), cxcywh_to_xyxy(target_cxcywh.float()))
    return (1 - giou).mean()


def grounding_box_loss(
    pred: torch.Tensor, target: torch.Tensor, l1_weight: float, giou_weight: float
) -> dict[str, torch.Tensor]:
    """{"loss": weighted sum, "l1": unweighted L1, "giou": unweighted 1 - GIoU}."""
    l1 = box_l1_loss(pred, target)
    giou = giou_loss(pred, target)
    return {"loss": l1_weight * l1 + giou_weight * giou, "l1": l1, "giou": giou}


def mask_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, bce_weight: float, dice_weight: float
) -> dict[str, torch.Tensor]:
    """logits [B,H,W], target {0,1} [B,H,W], valid bool [B,H,W] (False on letterbox padding, which is left out).

    {"loss": weighted sum, "bce": mean per-pixel BCE, "dice": mean over samples of 1 - soft Dice}. Dice
    weighs every object equally whatever its size, where BCE alone lets the background's many easy pixels
    dominate and under-segments small objects."""
    logits, target, valid = logits.float(), target.float(), valid.float()
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid).sum() / valid.sum().clamp_min(1)
    prob = logits.sigmoid() * valid
    inter = (prob * target).flatten(1).sum(-1)
    total = prob.flatten(1).sum(-1) + (target * valid).flatten(1).sum(-1)
    dice = (1 - (2 * inter + 1) / (total + 1)).mean()
    return {"loss": bce_weight * bce + dice_weight * dice, "bce": bce, "dice": dice}
