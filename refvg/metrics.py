"""Evaluation metrics. Box part: aligned IoU / GIoU and accuracy at IoU thresholds. Mask part
(referring segmentation): overall IoU, mean IoU and precision at IoU thresholds, from per-sample
intersections and unions.

Box functions accept torch tensors (differentiable, used by the losses) or numpy arrays alike.
"""

from __future__ import annotations

import numpy as np
import torch

# COCO-style 0.50:0.05:0.95, written out so keys are exact ("acc@0.55", not "acc@0.5500000001").
IOU_THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
_EPS = 1e-9


def _ops(a):
    if isinstance(a, torch.Tensor):
        return torch.maximum, torch.minimum, lambda x: x.clamp(min=0), lambda x: x.clamp(min=_EPS)
    return np.maximum, np.minimum, lambda x: np.maximum(x, 0), lambda x: np.maximum(x, _EPS)


def _iou_parts(a, b):
    if not isinstance(a, torch.Tensor):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    vmax, vmin, pos, nonzero = _ops(a)
    area_a = pos(a[..., 2] - a[..., 0]) * pos(a[..., 3] - a[..., 1])
    area_b = pos(b[..., 2] - b[..., 0]) * pos(b[..., 3] - b[..., 1])
    iw = pos(vmin(a[..., 2], b[..., 2]) - vmax(a[..., 0], b[..., 0]))
    ih = pos(vmin(a[..., 3], b[..., 3]) - vmax(a[..., 1], b[..., 1]))
    inter = iw * ih
    union = area_a + area_b - inter
    return inter / nonzero(union), union, (vmax, vmin, pos, nonzero)


def box_iou(a_xyxy, b_xyxy):
    """IoU of a[i] with b[i] for [..., 4] xyxy boxes (aligned, not pairwise); degenerate pairs give
    0."""
    return _iou_parts(a_xyxy, b_xyxy)[0]


def generalized_box_iou(a_xyxy, b_xyxy):
    """Aligned GIoU = IoU - (enclosing area - union) / enclosing area, in [-1, 1]."""
    iou, union, (vmax, vmin, pos, nonzero) = _iou_parts(a_xyxy, b_xyxy)
    a, b = (
        (a_xyxy, b_xyxy)
        if isinstance(a_xyxy, torch.Tensor)
        else (np.asarray(a_xyxy), np.asarray(b_xyxy))
    )
    cw = pos(vmax(a[..., 2], b[..., 2]) - vmin(a[..., 0], b[..., 0]))
    ch = pos(vmax(a[..., 3], b[..., 3]) - vmin(a[..., 1], b[..., 1]))
    enclosing = cw * ch
    return iou - (enclosing - union) / nonzero(enclosing)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()  # float32 would turn 0.9 into 0.8999999
    return np.asarray(x, dtype=np.float64).reshape(-1)


def accuracy_at_iou(ious, thresholds=IOU_THRESHOLDS) -> dict[float, float]:
    """Fraction of predictions with IoU >= t, per threshold t (0.0 when there are no
    predictions)."""
    ious = _as_numpy(ious)
    return {float(t): float((ious >= t).mean()) if ious.size else 0.0 for t in thresholds}


def summarize_box_metrics(ious, thresholds=IOU_THRESHOLDS) -> dict:
    """{"acc@0.5", "acc@0.5:0.95", "mean_iou", "n"} plus "acc@<t>" for every requested threshold.

    acc@0.5:0.95 always averages the ten COCO thresholds, whatever `thresholds` holds."""
    ious = _as_numpy(ious)
    per_t = accuracy_at_iou(ious, sorted(set(thresholds) | set(IOU_THRESHOLDS)))
    out = {f"acc@{t:g}": per_t[t] for t in sorted(set(map(float, thresholds)))}
    out["acc@0.5"] = per_t[0.5]
    out["acc@0.5:0.95"] = float(np.mean([per_t[t] for t in IOU_THRESHOLDS]))
    out["mean_iou"] = float(ious.mean()) if ious.size else 0.0
    out["n"] = int(ious.size)
    return out


# --------------------------------------------------------------------------- masks

# prec@{0.5..0.9}: the thresholds referring-segmentation papers report (CMSA, LAVT, ...).
MASK_IOU_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def mask_intersection_union(pred, gt) -> tuple[int, int]:
    """Pixel counts (|pred & gt|, |pred | gt|) of two boolean masks of the same shape."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: predicted {pred.shape}, target {gt.shape}")
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def summarize_mask_metrics(intersections, unions, thresholds=MASK_IOU_THRESHOLDS) -> dict:
    """{"oIoU", "mIoU", "prec@<t>" for each t, "n"} over a split.

    oIoU = total intersection / total union over the split (large objects weigh more); mIoU = mean
    of the per-sample IoUs; prec@t = fraction of samples with IoU >= t. A sample whose union is
    empty (nothing predicted, nothing to find) counts as IoU 0, as in the LAVT/CRIS evaluation
    code."""
    inter, union = _as_numpy(intersections), _as_numpy(unions)
    if inter.shape != union.shape:
        raise ValueError(f"{inter.size} intersections but {union.size} unions")
    if (inter > union).any() or (inter < 0).any():
        raise ValueError("an intersection is negative or larger than its union")
    ious = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    out = {
        "oIoU": float(inter.sum() / union.sum()) if union.sum() > 0 else 0.0,
        "mIoU": float(ious.mean()) if ious.size else 0.0,
    }
    out.update(
        {f"prec@{float(t):g}": float((ious >= t).mean()) if ious.size else 0.0 for t in thresholds}
    )
    out["n"] = int(ious.size)
    return out
