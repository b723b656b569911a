"""Evaluation shared by every method: predict on a prepared split, map boxes (and masks, for mask methods)
back to the original image, and score them there (not in the padded square): Acc@IoU for boxes; oIoU, mIoU
and prec@IoU for masks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from refvg.data.dataset import PreparedSplit, collate
from refvg.data.transforms import cxcywh_to_xyxy
from refvg.engine.runtime import autocast, to_device
from refvg.metrics import box_iou, mask_intersection_union, summarize_box_metrics, summarize_mask_metrics


@dataclass
class SplitPredictions:
    split: str
    pred_xyxy: np.ndarray  # [N, 4] original pixels
    gt_xyxy: np.ndarray  # [N, 4] original pixels
    ious: np.ndarray  # [N]
    # Mask methods only: per-sample pixel counts at the original resolution (the masks themselves are not
    # kept: a RefCOCO split of 640x480 masks would not fit in memory).
    mask_inter: Optional[np.ndarray] = None  # [N]
    mask_union: Optional[np.ndarray] = None  # [N]

    @property
    def has_masks(self) -> bool:
        return self.mask_inter is not None


@torch.no_grad()
def predict_batches(
    model: torch.nn.Module, dataset, batch_size: int, device: torch.device, amp: str = "auto",
    keys: Sequence[str] = ("pred_boxes", "pred_masks"),
) -> Iterator[dict[str, torch.Tensor]]:
    """The model's outputs (the fields of `keys` it filled) batch by batch, in dataset order, as float32 on the
    CPU."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    try:
        for batch in loader:
            batch = to_device(batch, device)
            with autocast(device, amp):
                out = model(batch)
            yield {k: getattr(out, k).float().cpu() for k in keys if getattr(out, k, None) is not None}
    finally:
        model.train(was_training)


def predict_square_boxes(
    model: torch.nn.Module, dataset: PreparedSplit, batch_size: int, device: torch.device, amp: str = "auto"
) -> np.ndarray:
    """Normalised xyxy boxes in the letterboxed square, [N, 4]."""
    out = [cxcywh_to_xyxy(o["pred_boxes"]) for o in predict_batches(model, dataset, batch_size, device, amp)]
    return torch.cat(out).numpy() if out else np.zeros((0, 4))


def predict_split(model, dataset: PreparedSplit, batch_size: int, device, amp: str = "auto") -> SplitPredictions:
    """Boxes of every sample, and for a model that outputs "pred_masks" each mask's intersection and union
    with the target mask, both at the original resolution; in one pass over the split."""
    square, inter, union = [], [], []
    row = 0
    for out in predict_batches(model, dataset, batch_size, device, amp):
        square.append(cxcywh_to_xyxy(out["pred_boxes"]))
        for logits in out.get("pred_masks", ()):
            iu = mask_intersection_union(original_mask(dataset, row, logits), dataset.gt_mask(row))
            inter.append(iu[0])
            union.append(iu[1])
            row += 1
    square = torch.cat(square).numpy() if square else np.zeros((0, 4))
    pred = np.stack([lb.box_from_square(b) for lb, b in zip(dataset.letterboxes, square)]) if len(square) else square
    gt = np.asarray([r["bbox_xyxy"] for r in dataset.records], dtype=np.float64).reshape(-1, 4)
    masks = row > 0
    return SplitPredictions(dataset.split, pred, gt, np.asarray(box_iou(pred, gt)).reshape(-1),
                            np.asarray(inter) if masks else None, np.asarray(union) if masks else None)


def original_mask(dataset: PreparedSplit, i: int, logits: torch.Tensor) -> np.ndarray:
    """Sample i's predicted mask logits over the square -> bool [orig_h, orig_w]: foreground where the
    predicted probability exceeds 0.5 (logit > 0), the convention of referring-segmentation metrics."""
    return (dataset.letterboxes[i].mask_from_square(logits) > 0).numpy()


def predict_masks(model, dataset: PreparedSplit, indices: Sequence[int], batch_size: int, device,
                  amp: str = "auto") -> list[np.ndarray]:
    """Predicted masks (bool, original resolution) of a few samples, e.g. for the qualitative figure."""
    indices = [int(i) for i in indices]
    logits = [m for out in predict_batches(model, Subset(dataset, indices), batch_size, device, amp)
              for m in out["pred_masks"]]
    return [original_mask(dataset, i, m) for i, m in zip(indices, logits)]


def box_metrics(pred: SplitPredictions, thresholds) -> dict:
    return summarize_box_metrics(pred.ious, thresholds)


def mask_metrics(pred: SplitPredictions) -> dict:
    """oIoU, mIoU, prec@0.5..0.9 and n; empty for a box-only model."""
    return summarize_mask_metrics(pred.mask_inter, pred.mask_union) if pred.has_masks else {}


@torch.no_grad()
def match_metrics(model: torch.nn.Module, pairs, batch_size: int, device: torch.device, amp: str = "auto",
                  seed: int = 0) -> dict:
    """Box-free validation of a weakly supervised matcher on image-sentence pairs (`pairs`: a
    refvg.data.weak.WeakSplit, which holds no box): each expression against its own image and against
    another image, through `model.match_scores`. "match_acc": share of those pairs classified right
    (logit > 0 = match), "match_loss": their mean BCE. A fixed seeded order mixes the images within a
    batch (a split lists an image's expressions together), so every epoch meets the same negatives."""
    was_training = model.training
    model.eval()
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    loader = DataLoader(Subset(pairs, order), batch_size=batch_size, shuffle=False, collate_fn=collate)
    correct = loss = count = 0.0
    try:
        for batch in loader:
            with autocast(device, amp):
                out = model.match_scores(to_device(batch, device))
            logits = torch.cat([out["pos"], out["neg"][out["neg_valid"]]]).float()
            labels = torch.cat([torch.ones_like(out["pos"]), torch.zeros_like(logits[len(out["pos"]):])])
            correct += float(((logits > 0) == (labels > 0)).sum())
            loss += float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(),
                                                                              reduction="sum"))
            count += len(logits)
    finally:
        model.train(was_training)
    return {"match_acc": correct / max(count, 1), "match_loss": loss / max(count, 1), "match_pairs": count}
