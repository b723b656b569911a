"""weak_cam end to end on the tiny set: train_method (whose every training batch is checked for any
trace of the target, and whose validation and best.pt selection must read no box) -> the evaluate
flow (Prefect test harness, real MLflow sqlite store) -> metrics, the Grad-CAM figure as an MLflow
artifact, the report's weak-supervision note."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from refvg import stages
from refvg.config import load_config
from refvg.data.weak import WEAK_KEYS, WeakSplit
from refvg.evaluation import BoxEvaluator, CandidateRecallEvaluator, MaskEvaluator, MatchEvaluator
from tests.helpers import write_params

WEAK = {
    "weak_cam": {"model": "weak_cam", "config": {"localisation": "candidates"}},
    "transvg": {"model": "transvg"},
}


def test_weak_cam_trains_without_targets_and_is_evaluated(
    in_tiny, prefect_api, mlflow_uri, monkeypatch
):
    import refvg.engine.evaluator as evaluator
    import refvg.engine.trainer as trainer
    from flows.stages import evaluate_flow

    write_params(Path.cwd(), methods=WEAK, train={"epochs": 1, "batch_size": 16, "warmup_steps": 2})
    cfg = load_config("params.yaml")
    seen_keys, datasets = [], []
    real_step, real_train = trainer._train_step, trainer.train

    def spy_step(
        model, step_model, batch, *args
    ):  # the batches the trainer's DataLoader actually yields
        seen_keys.append(set(batch))
        return real_step(model, step_model, batch, *args)

    def spy_train(model, train_set, *args, **kwargs):
        datasets.append(train_set)
        return real_train(model, train_set, *args, **kwargs)

    validated = []
    real_inference = evaluator.inference_on_dataset

    def spy_inference(model, dataset, evaluators, *args, **kwargs):
        validated.append((dataset, evaluators))
        return real_inference(model, dataset, evaluators, *args, **kwargs)

    def no_boxes(*args, **kwargs):
        raise AssertionError("a weak method's training read val boxes")

    monkeypatch.setattr(trainer, "_train_step", spy_step)
    monkeypatch.setattr(trainer, "train", spy_train)
    epochs = []
    with monkeypatch.context() as during_training:  # validation and best.pt selection included
        during_training.setattr(evaluator, "inference_on_dataset", spy_inference)
        for name in ("predict_split", "predict_batches"):
            during_training.setattr(evaluator, name, no_boxes)
        for scorer in (BoxEvaluator, MaskEvaluator, CandidateRecallEvaluator):
            during_training.setattr(scorer, "process", no_boxes)
        result = stages.train_method(cfg, "weak_cam", on_epoch_end=lambda m, e: epochs.append(m))
    assert result.best_checkpoint.exists() and len(epochs) == 1
    assert {"train/itc", "train/itm", "train/itm_cam", "train/mining", "val/match_acc"} <= set(
        epochs[0]
    )
    assert not any(k.startswith("val/acc") for k in epochs[0])
    # best.pt is chosen by the box-free matching accuracy on val image-sentence pairs
    assert result.select_metric == "match_acc" and result.best_score == epochs[0]["val/match_acc"]
    ((val_pairs, val_evaluators),) = validated
    assert isinstance(val_pairs, WeakSplit)
    assert [type(e) for e in val_evaluators.evaluators] == [MatchEvaluator]
    assert seen_keys and all(
        keys == set(WEAK_KEYS) for keys in seen_keys
    )  # no box, mask, ann id, candidate
    (train_set,) = datasets
    assert isinstance(train_set, WeakSplit)
    assert not {"records", "boxes", "masks", "candidates"} & set(
        vars(train_set)
    )  # nothing to reach the target with

    out = evaluate_flow(method="weak_cam", params="params.yaml")
    payload = json.loads((Path(cfg.eval.metrics_dir) / "weak_cam.json").read_text())
    assert payload["supervision"] == "weak" and set(payload["splits"]) == {"val", "testA", "testB"}
    assert all(0 <= m["acc@0.5"] <= 1 for m in payload["splits"].values())
    assert out["metrics"]["val"]["acc@0.5"] == payload["splits"]["val"]["acc@0.5"]
    cams = Path(cfg.eval.plots_dir) / "weak_cam" / "cams.png"
    assert cams.stat().st_size > 0

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("refvg").experiment_id],
        filter_string="tags.`refvg.stage` = 'evaluate@weak_cam'",
    )
    assert runs[0].data.metrics["val.acc_at_0.5"] == payload["splits"]["val"]["acc@0.5"]
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert "cams.png" in logged

    summary = stages.report(cfg).read_text()
    assert (
        "| weak_cam | weak_cam | yes |" in summary
        and "Weakly supervised" in summary
        and ": weak_cam." in summary
    )
