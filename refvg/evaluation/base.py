"""The evaluator protocol: an evaluator is reset, shown every batch (the model's inputs and
outputs), and asked for its metrics at the end; `DatasetEvaluators` runs several as one. Which
evaluators apply to a model comes from what the model declares (refvg.evaluation.evaluators_for);
refvg.engine.evaluator runs a model over a split and feeds them."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


class DatasetEvaluator:
    """Accumulates what it needs from each batch; `evaluate` summarises the split.

    `process(inputs, outputs)`: `inputs` is the collated batch on the CPU
    (refvg.data.dataset.collate; its "index" is each sample's row in the split), `outputs` the model
    outputs named in `output_keys`, on the CPU (floating point ones as float32). What produces them
    is `forward` (None: `model(batch)`, else that method of the model), over the split in its own
    order or, with `order_seed`, a permutation seeded by it."""

    output_keys: tuple[str, ...] = ()
    forward: Optional[str] = None
    order_seed: Optional[int] = None

    def reset(self) -> None:
        pass

    def process(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        pass

    def evaluate(self) -> dict:
        return {}

    def per_sample(self) -> dict[str, np.ndarray]:
        """Per-sample results in the order processed (e.g. for figures); {} for an evaluator without
        any."""
        return {}


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators over one pass: each sees every batch; their results (and per-sample
    arrays) are merged in order. They must agree on how the outputs are produced, and no two may
    report the same key."""

    def __init__(self, evaluators: Sequence[DatasetEvaluator]):
        self.evaluators = list(evaluators)
        self.output_keys = tuple(dict.fromkeys(k for e in self.evaluators for k in e.output_keys))
        self.forward = _common(self.evaluators, "forward")
        self.order_seed = _common(self.evaluators, "order_seed")

    def reset(self) -> None:
        for e in self.evaluators:
            e.reset()

    def process(self, inputs, outputs) -> None:
        for e in self.evaluators:
            e.process(inputs, outputs)

    def evaluate(self) -> dict:
        return _merge([e.evaluate() for e in self.evaluators], "metric")

    def per_sample(self) -> dict[str, np.ndarray]:
        return _merge([e.per_sample() for e in self.evaluators], "per-sample array")


def _common(evaluators: Sequence[DatasetEvaluator], attr: str):
    values = {getattr(e, attr) for e in evaluators}
    if len(values) > 1:
        names = ", ".join(f"{type(e).__name__}: {getattr(e, attr)!r}" for e in evaluators)
        raise ValueError(f"evaluators disagree on {attr} ({names}); run them in separate passes")
    return values.pop() if values else None


def _merge(parts: list[dict], what: str) -> dict:
    out: dict = {}
    for part in parts:
        clash = set(out) & set(part)
        if clash:
            raise ValueError(f"two evaluators report the {what} {sorted(clash)}")
        out |= part
    return out


def flatten(results: dict, sep: str = "/") -> dict:
    """{"acc@0.5": a, "mask": {"oIoU": o}} -> {"acc@0.5": a, "mask/oIoU": o} (what the trainer logs
    per epoch)."""
    out = {}
    for k, v in results.items():
        if isinstance(v, dict):
            out |= {f"{k}{sep}{kk}": vv for kk, vv in flatten(v, sep).items()}
        else:
            out[k] = v
    return out
