"""Training losses. Box part: L1 + GIoU on normalised cxcywh boxes (as in DETR / TransVG).

Computed in float32 whatever the autocast dtype: GIoU divides small areas, which bf16 handles poorly.
"""
from __future__ import annotations

import torch

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
