"""Candidate-recall evaluator (ranking methods): how often the target is among the candidates at
all. A ranking method cannot score a sample whose target is missing (it counts as a miss in
Acc@0.5): this is its ceiling."""

from __future__ import annotations

import torch

from refvg.evaluation.base import DatasetEvaluator


class CandidateRecallEvaluator(DatasetEvaluator):
    """Reads the batch's "cand_target" (-1: the target is not among them) and "cand_valid"; no model
    output.
    Results: {"candidates": {"target_recall", "misses", "mean_candidates"}}."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._target: list[torch.Tensor] = []
        self._valid: list[torch.Tensor] = []

    def process(self, inputs, outputs) -> None:
        self._target.append(inputs["cand_target"].cpu())
        self._valid.append(inputs["cand_valid"].cpu())

    def evaluate(self) -> dict:
        found = torch.cat(self._target) >= 0 if self._target else torch.zeros(0, dtype=torch.bool)
        if not len(found):
            return {"candidates": {"target_recall": 0.0, "misses": 0, "mean_candidates": 0.0}}
        count = torch.cat(self._valid).sum(1).float()
        return {
            "candidates": {
                "target_recall": float(found.float().mean()),
                "misses": int((~found).sum()),
                "mean_candidates": float(count.mean()),
            }
        }
