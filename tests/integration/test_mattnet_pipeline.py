"""MAttNet + CM-Erase end to end on the tiny set, through the Prefect flows (test harness) and a
real MLflow sqlite store: the detections stage (stand-in file + per-method stamps), then train and
evaluate mattnet_erase on those detections -> metrics JSON with the candidate recall per split, the
attention figure, the report's ranking table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlflow.tracking import MlflowClient

from refvg import stages
from refvg.config import load_config
from tests.helpers import write_params

DETS = {
    "source": "detections",
    "detections_file": "dets/refshapes.json",
}  # not under data/: the shared tiny set
METHODS = {
    "transvg": {"model": "transvg"},
    "mattnet_erase_det": {
        "model": "mattnet",
        "config": {"d_model": 16},
        "overrides": {"proposals": DETS},
    },
}


def _runs(client: MlflowClient, stage: str):
    experiment = client.get_experiment_by_name("refvg").experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`refvg.stage` = '{stage}'")


def test_detections_then_mattnet_erase_train_evaluate_report(in_tiny, prefect_api, mlflow_uri):
    from flows.stages import detections_flow, evaluate_flow, train_flow

    write_params(
        Path.cwd(),
        methods=METHODS,
        train={"epochs": 1},
        detections={"dir": "dets", "drop_rate": 0.2, "false_positives": 2},
    )
    cfg = load_config("params.yaml")

    out = detections_flow(params="params.yaml")
    summary = out["summary"]
    assert Path(summary["file"]).is_file() and 0 < summary["object_recall"] < 1
    stamps = Path(cfg.detections.dir) / "methods"
    det_stamp = json.loads((stamps / "mattnet_erase_det.json").read_text())
    assert det_stamp["source"] == "detections" and len(det_stamp["sha256"]) == 64
    assert json.loads((stamps / "transvg.json").read_text()) == {
        "source": "gt"
    }  # untouched by new detections

    trained = train_flow(method="mattnet_erase_det", params="params.yaml")
    assert 0 <= trained["best_score"] <= 1
    evaluate_flow(method="mattnet_erase_det", params="params.yaml")
    payload = json.loads((Path(cfg.eval.metrics_dir) / "mattnet_erase_det.json").read_text())
    assert payload["proposals"]["source"] == "detections"
    misses = 0
    for split in ("val", "testA", "testB"):
        m = payload["splits"][split]
        c = m["candidates"]
        assert 0 < c["target_recall"] <= 1
        assert c["target_recall"] == pytest.approx(1 - c["misses"] / m["n"])
        # a missed target can never be ranked first
        assert m["acc@0.5"] <= c["target_recall"] + 1e-9
        misses += c["misses"]
    assert misses > 0  # drop_rate 0.2: some targets were not detected (a tiny split may miss none)
    assert (Path(cfg.eval.plots_dir) / "mattnet_erase_det" / "qualitative.png").stat().st_size > 0

    client = MlflowClient(mlflow_uri)
    det_run = _runs(client, "detections")[0]
    assert det_run.data.metrics["object_recall"] == summary["object_recall"]
    train_run = _runs(client, "train@mattnet_erase_det")[0]
    history = client.get_metric_history(train_run.info.run_id, "train/erased_ce")
    assert len(history) == 1 and history[0].value > 0  # it trained on erased copies too
    eval_run = _runs(client, "evaluate@mattnet_erase_det")[0]
    recall = payload["splits"]["val"]["candidates"]["target_recall"]
    assert eval_run.data.metrics["val.candidates.target_recall"] == recall
    artifacts = {a.path for a in client.list_artifacts(eval_run.info.run_id)}
    assert "qualitative.png" in artifacts  # the attention figure

    report = stages.report(cfg).read_text()
    v = payload["splits"]["val"]
    assert (
        f"| mattnet_erase_det | detections | {v['acc@0.5']:.3f} / "
        f"{v['candidates']['target_recall']:.3f} |" in report
    )
