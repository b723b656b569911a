"""What a user finds in MLflow: the pipeline's parent run closed with its stages' outcome and
carrying the report, an experiment that opens as a model-training one, the store of the repository
whichever DVC workspace a stage runs in, and a registered model version per training run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from refvg.config import load_config
from refvg.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, _run_spec, stage_run
from tests.helpers import write_params


def _parent(client: MlflowClient, run_id: str):
    return client.get_run(client.get_run(run_id).data.tags["mlflow.parentRunId"])


def test_parent_run_takes_the_outcome_of_its_latest_stage(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_params(tmp_path))
    client = MlflowClient(mlflow_uri)
    with stage_run(cfg, "prepare") as first:
        assert _parent(client, first.run_id).info.status == "RUNNING"
    parent = _parent(client, first.run_id)
    assert parent.info.status == "FINISHED" and parent.info.end_time >= parent.info.start_time

    with pytest.raises(RuntimeError):
        with stage_run(cfg, "train@transvg") as failing:
            assert _parent(client, failing.run_id).info.status == "RUNNING"  # reopened
            raise RuntimeError("a stage fails")
    assert client.get_run(failing.run_id).info.status == "FAILED"
    assert _parent(client, failing.run_id).info.status == "FAILED"

    with stage_run(cfg, "train@transvg") as again:  # a rerun: same commit and params, same parent
        pass
    parent = _parent(client, again.run_id)
    assert parent.info.run_id == _parent(client, first.run_id).info.run_id
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time >= client.get_run(again.run_id).info.end_time

    exp = client.get_experiment_by_name("refvg")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_experiment_kind_set_on_an_old_experiment_and_a_users_choice_kept(
    tmp_path, monkeypatch, mlflow_uri
):
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(mlflow_uri)
    client.create_experiment("refvg")  # as an earlier refvg (or MLflow's UI) created it: no kind
    client.create_experiment("mine", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    with stage_run(load_config(write_params(tmp_path)), "prepare"):
        pass
    with stage_run(load_config(write_params(tmp_path, tracking={"experiment": "mine"})), "prepare"):
        pass
    kind = client.get_experiment_by_name("refvg").tags[EXPERIMENT_KIND_TAG]
    assert kind == "custom_model_development"
    assert client.get_experiment_by_name("mine").tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_every_workspace_of_a_repository_logs_to_its_store(tmp_path, monkeypatch):
    """DVC runs a queued or --temp experiment in .dvc/tmp/exps/<tmp>/ and deletes it afterwards;
    DVC_ROOT names the repository there. A relative store, artifact root and unlogged folder are the
    repository's."""
    repo = tmp_path / "repo"
    workspace = repo / ".dvc" / "tmp" / "exps" / "tmpabc"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(write_params(workspace))
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("DVC_EXP_NAME", "lr-up")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)
    spec = _run_spec(cfg, "train@transvg", None)
    assert spec["uri"] == f"sqlite:///{repo.resolve() / 'mlruns.db'}"
    assert spec["artifact_location"] == (repo.resolve() / "mlartifacts").as_uri()
    assert spec["unlogged_dir"] == str(repo.resolve() / ".refvg" / "unlogged")

    with stage_run(cfg, "train@transvg") as tracker:
        pass
    client = MlflowClient(spec["uri"])
    run = client.get_run(tracker.run_id)
    parent = _parent(client, tracker.run_id)
    for r in (run, parent):
        assert r.data.tags["dvc.exp_name"] == "lr-up"
        assert r.data.tags["dvc.exp_baseline"] == "0" * 40
    assert parent.info.run_name.startswith("lr-up (pipeline ")
    assert parent.data.params["train.lr"] == str(cfg.train.lr)
    assert not list(workspace.glob("*.db")) and not (workspace / "mlartifacts").exists()

    # Another experiment with the same params is another parent; outside DVC the cwd is the root.
    monkeypatch.setenv("DVC_EXP_NAME", "lr-up-again")
    with stage_run(cfg, "train@transvg") as other:
        pass
    assert _parent(client, other.run_id).info.run_id != parent.info.run_id
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)  # (mlflow.set_tracking_uri exports the last one)
    assert _run_spec(cfg, "x", None)["uri"] == f"sqlite:///{Path(os.getcwd()) / 'mlruns.db'}"


@pytest.mark.e2e
def test_pipeline_parent_run_is_finished_with_the_report_and_models_registered(
    in_tiny, prefect_api, mlflow_uri
):
    import mlflow

    from flows.pipeline import pipeline_flow

    write_params(in_tiny, train={"epochs": 1}, methods={"transvg": {"model": "transvg"}})
    state = pipeline_flow(params="params.yaml", generate=False, return_state=True)
    assert state.is_completed(), state.message

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("refvg")
    assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("refvg.kind") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time == max(r.info.end_time for r in children)  # by the last stage

    summary = (in_tiny / "reports" / "summary.md").read_text()
    assert "| transvg |" in parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["mlflow.note.content"] == summary
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} == {
        "report/summary.md",
        "report/comparison.png",
    }
    local = client.download_artifacts(parent.info.run_id, "report/summary.md", str(in_tiny / "dl"))
    assert Path(local).read_text() == summary
    evaluate = next(r for r in children if r.data.tags["refvg.stage"] == "evaluate@transvg")
    assert parent.data.metrics["transvg.val.acc_at_0.5"] == evaluate.data.metrics["val.acc_at_0.5"]

    # The README's models:/refvg-transvg/1 exists, tagged with the run's val accuracy, and loads.
    train = next(r for r in children if r.data.tags["refvg.stage"] == "train@transvg")
    version = client.get_model_version("refvg-transvg", "1")
    assert version.run_id == train.info.run_id
    assert float(version.tags["val_acc_at_0.5"]) == train.data.metrics["best_val_acc_at_0.5"]
    assert mlflow.pyfunc.load_model("models:/refvg-transvg/1").metadata.signature is not None
