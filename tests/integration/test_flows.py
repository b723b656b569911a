"""The Prefect flows against Prefect's test harness, logging to a real MLflow sqlite store."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from refvg.config import load_config
from refvg.data.dataset import PreparedSplit
from refvg.data.prepare import prepared_path


def test_pipeline_flow_logs_everything_to_mlflow(in_tiny, prefect_api, mlflow_uri):
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    from flows.pipeline import pipeline_flow

    state = pipeline_flow(params="params.yaml", generate=False, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert set(result["metrics"]) == {"transvg", "transvg_blind"} and result["work_seconds"] > 0

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("refvg")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("refvg.kind") == "pipeline"]
    assert len(parents) == 1, "one pipeline = one parent run"
    children = {
        r.data.tags["refvg.stage"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    assert set(children) == {
        "pretrain",
        "prepare",
        "detections",
        "train@transvg",
        "evaluate@transvg",
        "train@transvg_blind",
        "evaluate@transvg_blind",
        "report",
    }
    assert all(r.info.status == "FINISHED" for r in children.values())
    pretrain = children["pretrain"].data.metrics
    assert 0 <= pretrain["final/resnet/mAP"] <= 1 and 0 <= pretrain["final/text/masked_acc"] <= 1

    train = children["train@transvg"]
    assert (
        train.data.params["train.lr"] == str(load_config("params.yaml").train.lr)
        and train.data.tags["git.commit"]
    )
    history = client.get_metric_history(train.info.run_id, "val/acc_at_0.5")
    assert [m.step for m in history] == [1, 2]  # one point per epoch
    evaluate = children["evaluate@transvg"]
    assert "val.acc_at_0.5" in evaluate.data.metrics
    artifacts = {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    assert {"transvg.json", "acc_vs_iou.png", "qualitative.png"} <= artifacts
    assert "skipped.total" in children["prepare"].data.metrics

    # The logged model is a pyfunc: image + expression -> box, loaded without unpickling anything.
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    model = next(m for m in models if m.source_run_id == train.info.run_id)
    pyfunc = mlflow.pyfunc.load_model(model.model_uri)
    cfg = load_config("params.yaml")
    rec = PreparedSplit(prepared_path(cfg), "val").records[0]
    image = Path(cfg.data.image_dir, rec["file_name"]).read_bytes()  # paths are off unless allowed
    out = pyfunc.predict(pd.DataFrame({"image": [image], "expression": [rec["sentence"]]}))
    assert list(out.columns) == ["x0", "y0", "x1", "y1"] and len(out) == 1

    # This pipeline's own flow runs, not every run on the session's shared server (earlier tests
    # fail some on purpose): the pipeline run and its subflows.
    pipeline_run = state.state_details.flow_run_id
    with get_client(sync_client=True) as prefect:
        flow_runs = [
            prefect.read_flow_run(pipeline_run),
            *prefect.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[pipeline_run])
                ),
                limit=200,
                sort=FlowRunSort.START_TIME_ASC,
            ),
        ]
        names = [prefect.read_flow(r.flow_id).name for r in flow_runs]
    assert all(r.state.is_completed() for r in flow_runs)
    assert sorted(names) == sorted(
        [
            "refvg-pipeline",
            "pretrain",
            "prepare",
            "detections",
            "train",
            "evaluate",
            "train",
            "evaluate",
            "report",
        ]
    )


def test_unreachable_tracking_store_does_not_stop_a_stage(
    in_tiny, prefect_api, monkeypatch, caplog
):
    from flows.stages import report_flow

    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", "http://127.0.0.1:9/"
    )  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    out = report_flow(params="params.yaml")
    assert os.path.exists(out["summary"])
    assert "runs untracked" in caplog.text


def test_unreachable_tracking_store_does_not_stop_training(
    in_tiny, prefect_api, monkeypatch, caplog, tmp_path
):
    """Every stage with params used to crash here (AttributeError in log_params) instead of running
    untracked."""
    import json

    from flows.stages import train_flow
    from refvg import stages
    from refvg.engine.checkpoint import load_checkpoint
    from tests.helpers import write_params

    unlogged = tmp_path / "unlogged"
    write_params(
        in_tiny,
        train={"epochs": 1},
        tracking={"unlogged_dir": str(unlogged), "http_retries": 0, "http_timeout_s": 2},
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/")
    out = train_flow(method="transvg", params="params.yaml")
    assert out["best_epoch"] == 1
    ckpt = stages.checkpoint_dir(load_config("params.yaml"), "transvg")
    assert load_checkpoint(ckpt / "best.pt")["best_epoch"] == 1
    assert "runs untracked" in caplog.text and "not uploaded (still on disk)" in caplog.text
    [saved] = unlogged.glob("train_transvg-no-run-*.json")
    calls = json.loads(saved.read_text())["pending"]
    assert {m[0] for c in calls if c["kind"] == "metrics" for m in c["metrics"]} >= {
        "val/acc_at_0.5",
        "train/loss",
    }
    assert any(p[0] == "train.lr" for c in calls if c["kind"] == "params" for p in c["params"])


def test_pipeline_runs_the_stages_of_dvc_yaml_in_dvc_repro_order(tmp_path):
    """flows/pipeline.py keeps no list of its own: its plan is dvc.yaml's stages for the params it
    is given."""
    import shutil

    import yaml

    from flows.pipeline import DVC_YAML, STAGE_FUNCTIONS, stage_call, stage_plan
    from tests.helpers import write_params

    params = write_params(
        tmp_path,
        methods={"a": {"model": "transvg"}, "b": {"model": "cmsa"}},
        distill_methods={"d": {"model": "epmvg"}},
    )
    plan = [name for name, _ in stage_plan(str(params))]
    stages = yaml.safe_load(DVC_YAML.read_text())["stages"]
    expanded = {
        f"{g}@{m}"
        for g, s in stages.items()
        if "foreach" in s
        for m in (["a", "b"] if s["foreach"] == "${methods}" else ["d"])
    }
    assert set(plan) == {g for g, s in stages.items() if "foreach" not in s} | expanded
    for before, after in [
        ("generate", "prepare"),
        ("pretrain", "prepare"),  # the text model's tokenizer
        ("pretrain", "train@a"),
        ("prepare", "train@a"),
        ("resolve", "train@b"),
        ("detections", "train@a"),
        ("teacher", "train_distill@d"),
        ("train@a", "evaluate@a"),
        ("evaluate@b", "report"),
        ("evaluate_distill@d", "report"),
    ]:
        assert plan.index(before) < plan.index(after), (before, after)
    assert [stage_call(n, c) for n, c in stage_plan(str(params)) if n.endswith("@b")] == [
        ("flows.train", {"method": "b"}),
        ("flows.evaluate", {"method": "b"}),
    ]
    assert all(stage_call(n, c)[0] in STAGE_FUNCTIONS for n, c in stage_plan(str(params)))

    other = tmp_path / "other.yaml"  # any params file name
    shutil.move(params, other)
    assert [name for name, _ in stage_plan(str(other))] == plan
