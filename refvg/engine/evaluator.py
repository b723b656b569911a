"""Evaluation shared by every box method: predict on a prepared split, map boxes back to the original image,
and score Acc@IoU there (not in the padded square)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from refvg.data.dataset import PreparedSplit, collate
from refvg.data.transforms import cxcywh_to_xyxy
from refvg.engine.runtime import autocast, to_device
from refvg.metrics import box_iou, summarize_box_metrics


@dataclass
class SplitPredictions:
    split: str
    pred_xyxy: np.ndarray  # [N, 4] original pixels
    gt_xyxy: np.ndarray  # [N, 4] original pixels
    ious: np.ndarray  # [N]


@torch.no_grad()
def predict_square_boxes(
    model: torch.nn.Module, dataset: PreparedSplit, batch_size: int, device: torch.device, amp: str = "auto"
) -> np.ndarray:
    """Normalised xyxy boxes in the letterboxed square, [N, 4]."""
    was_training = model.training
    model.eval()
    out = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, amp):
            pred = model(batch)["pred_boxes"]
        out.append(cxcywh_to_xyxy(pred.float()).cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 4))


def predict_split(model, dataset: PreparedSplit, batch_size: int, device, amp: str = "auto") -> SplitPredictions:
    square = predict_square_boxes(model, dataset, batch_size, device, amp)
    pred = np.stack([lb.box_from_square(b) for lb, b in zip(dataset.letterboxes, square)]) if len(square) else square
    gt = np.asarray([r["bbox_xyxy"] for r in dataset.records], dtype=np.float64).reshape(-1, 4)
    return SplitPredictions(dataset.split, pred, gt, np.asarray(box_iou(pred, gt)).reshape(-1))


def box_metrics(pred: SplitPredictions, thresholds) -> dict:
    return summarize_box_metrics(pred.ious, thresholds)
