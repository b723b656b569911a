"""Running a model over a prepared split and feeding its outputs to evaluators (refvg.evaluation):
boxes (and masks, for mask methods) are scored back in the original image, not in the padded
square."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from refvg.data.dataset import PreparedSplit, collate
from refvg.engine.runtime import autocast, to_device
from refvg.evaluation import BoxEvaluator, DatasetEvaluator, original_mask
from refvg.metrics import summarize_box_metrics


def read_outputs(outputs, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The outputs named in `keys` that a model's forward (or `match_scores`) returned. The one
    place that knows how a model holds its outputs: evaluation and inference read them through
    here."""
    if isinstance(outputs, dict):  # match_scores' pair logits
        return {k: outputs[k] for k in keys if k in outputs}
    return {k: v for k in keys if (v := getattr(outputs, k, None)) is not None}


@dataclass
class SplitPredictions:
    split: str
    pred_xyxy: np.ndarray  # [N, 4] original pixels
    gt_xyxy: np.ndarray  # [N, 4] original pixels
    ious: np.ndarray  # [N]
    # Mask methods only: per-sample pixel counts at the original resolution.
    mask_inter: Optional[np.ndarray] = None  # [N]
    mask_union: Optional[np.ndarray] = None  # [N]

    @property
    def has_masks(self) -> bool:
        return self.mask_inter is not None


@torch.no_grad()
def _run(
    model: torch.nn.Module,
    dataset,
    batch_size: int,
    device: torch.device,
    amp: str,
    keys: Sequence[str],
    forward: Optional[str] = None,
    order_seed: Optional[int] = None,
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """(the collated batch on the CPU, the model's outputs of `keys` on the CPU) batch by batch; the
    model in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    if order_seed is not None:
        order = torch.randperm(
            len(dataset), generator=torch.Generator().manual_seed(order_seed)
        ).tolist()
        dataset = Subset(dataset, order)
    call = model if forward is None else getattr(model, forward)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    try:
        for batch in loader:
            with autocast(device, amp):
                out = call(to_device(batch, device))
            outputs = read_outputs(out, keys)
            yield (
                batch,
                {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in outputs.items()},
            )
    finally:
        model.train(was_training)


def inference_on_dataset(
    model: torch.nn.Module,
    dataset,
    evaluator: DatasetEvaluator,
    batch_size: int,
    device: torch.device,
    amp: str = "auto",
) -> dict:
    """Reset `evaluator`, show it every batch of `dataset` with the model's outputs, return its
    results."""
    evaluator.reset()
    for inputs, outputs in _run(
        model,
        dataset,
        batch_size,
        device,
        amp,
        evaluator.output_keys,
        evaluator.forward,
        evaluator.order_seed,
    ):
        evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def predict_batches(
    model: torch.nn.Module,
    dataset,
    batch_size: int,
    device: torch.device,
    amp: str = "auto",
    keys: Sequence[str] = ("pred_boxes", "pred_masks"),
) -> Iterator[dict[str, torch.Tensor]]:
    """The model's outputs (those of `keys` it has) batch by batch, in dataset order, as float32 on
    the CPU."""
    for _, outputs in _run(model, dataset, batch_size, device, amp, keys):
        yield outputs


def predict_split(
    model, dataset: PreparedSplit, batch_size: int, device, amp: str = "auto"
) -> SplitPredictions:
    """Every sample's box in original pixels and its IoU with the target."""
    boxes = BoxEvaluator(dataset)
    inference_on_dataset(model, dataset, boxes, batch_size, device, amp)
    return SplitPredictions(dataset.split, **boxes.per_sample())


def predict_masks(
    model,
    dataset: PreparedSplit,
    indices: Sequence[int],
    batch_size: int,
    device,
    amp: str = "auto",
) -> list[np.ndarray]:
    """Predicted masks (bool, original resolution) of a few samples, e.g. for the qualitative
    figure."""
    indices = [int(i) for i in indices]
    logits = [
        m
        for out in predict_batches(model, Subset(dataset, indices), batch_size, device, amp)
        for m in out["pred_masks"]
    ]
    return [original_mask(dataset, i, m) for i, m in zip(indices, logits)]


def box_metrics(pred: SplitPredictions, thresholds) -> dict:
    return summarize_box_metrics(pred.ious, thresholds)
