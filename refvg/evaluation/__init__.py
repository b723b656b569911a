"""Evaluation as composable evaluators (reset / process / evaluate), chosen per model from what it
declares."""

from __future__ import annotations

from refvg.evaluation.base import DatasetEvaluator, DatasetEvaluators, flatten
from refvg.evaluation.box import BoxEvaluator
from refvg.evaluation.candidates import CandidateRecallEvaluator
from refvg.evaluation.mask import MaskEvaluator, original_mask
from refvg.evaluation.matching import MatchEvaluator
from refvg.metrics import IOU_THRESHOLDS

__all__ = [
    "BoxEvaluator",
    "CandidateRecallEvaluator",
    "DatasetEvaluator",
    "DatasetEvaluators",
    "MaskEvaluator",
    "MatchEvaluator",
    "evaluators_for",
    "flatten",
    "original_mask",
]


def evaluators_for(
    model_name: str, cfg, dataset, thresholds=IOU_THRESHOLDS, validation: bool = False
) -> DatasetEvaluators:
    """The evaluators of model `model_name` (its run config `cfg`) on `dataset`, from what the model
    declares (refvg.models.registry): every model is scored by its box; one that trains on masks by
    its mask too; one that ranks candidates also reports their recall.

    `validation`: the per-epoch scores the trainer selects best.pt by. A weakly supervised model's
    val split holds no box (refvg.data.weak.WeakSplit): it is scored by matching alone. The
    candidates' recall is left out there: it is the data's, not the model's, the same every
    epoch."""
    from refvg.models import model_needs
    from refvg.models.registry import is_weakly_supervised

    if validation and is_weakly_supervised(model_name):
        return DatasetEvaluators([MatchEvaluator()])
    needs = model_needs(model_name, cfg)
    evaluators = [BoxEvaluator(dataset, thresholds)]
    if "masks" in needs:
        evaluators.append(MaskEvaluator(dataset))
    if "candidates" in needs and not validation:
        evaluators.append(CandidateRecallEvaluator())
    return DatasetEvaluators(evaluators)
