"""Matching evaluator: box-free validation of a weakly supervised matcher (refvg.models.weak_cam) on
image-sentence pairs, e.g. a refvg.data.weak.WeakSplit, which holds no box. Its outputs come from
the model's `match_scores`: each expression's logit against its own image ("pos") and against
another image of the batch ("neg", where "neg_valid")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refvg.evaluation.base import DatasetEvaluator


class MatchEvaluator(DatasetEvaluator):
    """Results: "match_acc", the share of pairs classified right (logit > 0 = match), "match_loss",
    their mean BCE, and "match_pairs", their count."""

    output_keys = ("pos", "neg", "neg_valid")
    forward = "match_scores"
    # A split lists an image's expressions together: a seeded permutation mixes images within a
    # batch (the negatives are the batch's other images), and every epoch meets the same negatives.
    order_seed = 0

    def __init__(self, seed: int = 0):
        self.order_seed = seed
        self.reset()

    def reset(self) -> None:
        self._correct = self._loss = self._count = 0.0

    def process(self, inputs, outputs) -> None:
        pos = outputs["pos"]
        logits = torch.cat([pos, outputs["neg"][outputs["neg_valid"]]]).float()
        labels = torch.cat([torch.ones_like(pos), torch.zeros_like(logits[len(pos) :])])
        self._correct += float(((logits > 0) == (labels > 0)).sum())
        self._loss += float(
            F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
        )
        self._count += len(logits)

    def evaluate(self) -> dict:
        n = max(self._count, 1)
        return {
            "match_acc": self._correct / n,
            "match_loss": self._loss / n,
            "match_pairs": self._count,
        }
