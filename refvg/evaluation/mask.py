"""Mask evaluator (referring segmentation): oIoU, mIoU and prec@IoU of the predicted mask against
the target mask at the original resolution. Only each sample's intersection and union are kept: a
RefCOCO split of 640x480 masks would not fit in memory."""

from __future__ import annotations

import numpy as np
import torch

from refvg.evaluation.base import DatasetEvaluator
from refvg.metrics import mask_intersection_union, summarize_mask_metrics


def original_mask(dataset, i: int, logits: torch.Tensor) -> np.ndarray:
    """Sample i's predicted mask logits over the square -> bool [orig_h, orig_w]: foreground where
    the predicted probability exceeds 0.5 (logit > 0), the convention of referring-segmentation
    metrics."""
    return (dataset.letterboxes[i].mask_from_square(logits) > 0).numpy()


class MaskEvaluator(DatasetEvaluator):
    """Reads "pred_masks" (logits over the square) of samples of `dataset` (a PreparedSplit prepared
    with masks). Results: {"mask": refvg.metrics.summarize_mask_metrics}."""

    output_keys = ("pred_masks",)

    def __init__(self, dataset):
        self.dataset = dataset
        self.reset()

    def reset(self) -> None:
        self._inter: list[int] = []
        self._union: list[int] = []

    def process(self, inputs, outputs) -> None:
        if "pred_masks" not in outputs:
            raise ValueError(
                "the model declares masks (model_needs) but its outputs hold no 'pred_masks'"
            )
        for i, logits in zip(inputs["index"].tolist(), outputs["pred_masks"]):
            inter, union = mask_intersection_union(
                original_mask(self.dataset, i, logits), self.dataset.gt_mask(i)
            )
            self._inter.append(inter)
            self._union.append(union)

    def per_sample(self) -> dict[str, np.ndarray]:
        return {"mask_inter": np.asarray(self._inter), "mask_union": np.asarray(self._union)}

    def evaluate(self) -> dict:
        return {"mask": summarize_mask_metrics(self._inter, self._union)}
