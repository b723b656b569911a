"""The `evaluate@<method>` stage: a trained method scored on every evaluation split by its
evaluators."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refvg.config import Config
from refvg.data.text import TOKENIZER_DIR
from refvg.stages.paths import checkpoint_dir
from refvg.stages.splits import open_split


@dataclass
class EvalReport:
    method: str
    metrics: dict  # split -> summary
    metrics_path: Path
    figures: list[Path] = field(default_factory=list)
    plot_data: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def evaluate_method(cfg: Config, method: str) -> EvalReport:
    """Score the method's best.pt on every evaluation split with the evaluators its model declares
    (refvg.evaluation.evaluators_for): metrics/<method>.json, the accuracy-vs-IoU data and the
    figures."""
    from refvg.data.dataset import read_manifest
    from refvg.data.prepare import prepared_path
    from refvg.engine.checkpoint import load_trained
    from refvg.engine.evaluator import SplitPredictions, inference_on_dataset
    from refvg.engine.runtime import resolve_device
    from refvg.engine.trainer import BEST
    from refvg.evaluation import evaluators_for
    from refvg.models.registry import is_weakly_supervised
    from refvg.visualize import evaluation_figures

    t0 = time.perf_counter()
    device = resolve_device(cfg.train.device)
    model, _, state = load_trained(checkpoint_dir(cfg, method) / BEST, device)
    rcfg = cfg.for_method(
        method
    )  # the data it is scored on: today's prepared split, its method's candidates
    prepared = prepared_path(cfg)
    manifest = read_manifest(prepared)
    ecfg = cfg.eval
    preds, datasets, metrics = [], {}, {}
    for split in eval_splits(ecfg, manifest):
        ds = datasets[split] = open_split(
            rcfg,
            state["model_name"],
            split,
            state["language_blind"],
            image_blind=state["image_blind"],
        )
        evaluator = evaluators_for(state["model_name"], rcfg, ds, ecfg.iou_thresholds)
        metrics[split] = inference_on_dataset(
            model, ds, evaluator, ecfg.batch_size, device, cfg.train.amp
        )
        preds.append(SplitPredictions(split, **evaluator.per_sample()))
    payload = {
        "method": method,
        "model": state["model_name"],
        "language_blind": state["language_blind"],
        "image_blind": state["image_blind"],
        "best_epoch": state["best_epoch"],
        "dataset": manifest["dataset"],
        "splits": metrics,
        "supervision": "weak" if is_weakly_supervised(state["model_name"]) else "full",
    }
    if any("candidates" in m for m in metrics.values()):
        payload["proposals"] = rcfg.proposals.model_dump(mode="json")
    metrics_path = Path(ecfg.metrics_dir) / f"{method}.json"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(payload, indent=2) + "\n")

    plots = Path(ecfg.plots_dir) / method
    plots.mkdir(parents=True, exist_ok=True)
    curve = plots / "acc_vs_iou.json"
    curve.write_text(
        json.dumps(
            [
                {"split": p.split, "threshold": t, "accuracy": a}
                for p in preds
                for t, a in _acc_curve(p.ious, ecfg.iou_thresholds).items()
            ],
            indent=1,
        )
    )
    val = next((p for p in preds if p.split == "val"), preds[0])
    figures = evaluation_figures(
        model,
        state["model_name"],
        preds,
        datasets[val.split],
        ecfg,
        f"{method} on {manifest['dataset']}",
        checkpoint_dir(cfg, method) / TOKENIZER_DIR,
        plots,
        device,
        cfg.train.amp,
    )
    return EvalReport(method, metrics, metrics_path, figures, [curve], time.perf_counter() - t0)


def eval_splits(ecfg, manifest: dict) -> list[str]:
    """`eval.splits`, or every prepared split but train. A split named there that was not prepared
    is an
    error: a results table silently missing a split reads as if it were complete."""
    prepared = list(manifest["splits"])
    if ecfg.splits is None:
        return [s for s in prepared if s != "train"]
    missing = [s for s in ecfg.splits if s not in prepared]
    if missing:
        raise ValueError(
            f"eval.splits names {missing}, which prepare did not write (prepared: {prepared}); "
            "add them to data.splits or drop them from eval.splits"
        )
    return list(ecfg.splits)


def _acc_curve(ious: np.ndarray, thresholds) -> dict:
    from refvg.metrics import accuracy_at_iou

    return {float(t): float(a) for t, a in accuracy_at_iou(ious, thresholds).items()}
