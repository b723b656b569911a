"""Box evaluator: Acc@IoU (and mean IoU) of the predicted box against the target, both in the
original image's
pixels: the letterboxed square's padding must neither help nor hurt."""

from __future__ import annotations

import numpy as np

from refvg.data.transforms import cxcywh_to_xyxy
from refvg.evaluation.base import DatasetEvaluator
from refvg.metrics import IOU_THRESHOLDS, box_iou, summarize_box_metrics


class BoxEvaluator(DatasetEvaluator):
    """Reads "pred_boxes" (cxcywh, normalised to the square) of samples of `dataset` (a
    PreparedSplit: their letterboxes and target boxes). Results: refvg.metrics.summarize_box_metrics
    over `thresholds`."""

    output_keys = ("pred_boxes",)

    def __init__(self, dataset, thresholds=IOU_THRESHOLDS):
        self.dataset = dataset
        self.thresholds = thresholds
        self.reset()

    def reset(self) -> None:
        self._rows: list[int] = []
        self._pred: list[np.ndarray] = []

    def process(self, inputs, outputs) -> None:
        square = cxcywh_to_xyxy(outputs["pred_boxes"]).numpy()
        for i, box in zip(inputs["index"].tolist(), square):
            self._rows.append(i)
            self._pred.append(self.dataset.letterboxes[i].box_from_square(box))

    def per_sample(self) -> dict[str, np.ndarray]:
        """ "pred_xyxy", "gt_xyxy" [N, 4] in original pixels and their "ious" [N]."""
        pred = np.stack(self._pred) if self._pred else np.zeros((0, 4))
        gt = np.asarray(
            [self.dataset.records[i]["bbox_xyxy"] for i in self._rows], dtype=np.float64
        ).reshape(-1, 4)
        return {"pred_xyxy": pred, "gt_xyxy": gt, "ious": np.asarray(box_iou(pred, gt)).reshape(-1)}

    def evaluate(self) -> dict:
        return summarize_box_metrics(self.per_sample()["ious"], self.thresholds)
