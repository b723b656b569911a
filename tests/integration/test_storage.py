"""S3 through a real local S3-compatible server (moto's standalone server on loopback): the DVC
remote, MLflow's artifact store, predict from a registered model whose files live there, an endpoint
that fails in the middle of an upload, and credentials that never reach logs, params, tags or
files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from refvg import storage
from refvg.config import ConfigError, load_config
from refvg.data.dataset import PreparedSplit
from refvg.data.prepare import prepared_path
from tests.helpers import ROOT, S3_CREDENTIALS, untrained_checkpoint, write_params
from tests.faulty_endpoint import FaultyEndpoint

ONE_EPOCH = {"epochs": 1, "batch_size": 16, "warmup_steps": 2}
ONLY_TRANSVG = {"transvg": {"model": "transvg"}}


def _assert_no_secret(text: str | bytes, where: str) -> None:
    for secret in S3_CREDENTIALS.values():
        needle = secret.encode() if isinstance(text, bytes) else secret
        assert needle not in text, f"a credential leaked into {where}"


def _val_sample(cfg) -> tuple[str, str]:
    rec = PreparedSplit(prepared_path(cfg), "val").records[0]
    return os.path.join(cfg.data.image_dir, rec["file_name"]), rec["sentence"]


def _predict(args: list[str], capsys) -> dict:
    from refvg.cli import main

    main(["predict", *args])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_params_never_hold_credentials(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("storage:\n  endpoint_url: http://AKIA:secret@127.0.0.1:9000\n")
    with pytest.raises(ConfigError, match="storage.endpoint_url: .*must not carry credentials"):
        load_config(params)
    params.write_text("storage:\n  bucket: b\n  aws_secret_access_key: x\n")
    with pytest.raises(ConfigError, match="storage.aws_secret_access_key: Extra inputs"):
        load_config(params)


def test_store_uris_are_logged_without_their_password():
    from refvg.tracking import display_uri

    assert (
        display_uri("http://alice:s3cret@mlflow.internal:5000/api")
        == "http://***@mlflow.internal:5000/api"
    )
    assert display_uri("sqlite:///mlruns.db") == "sqlite:///mlruns.db"


@pytest.mark.e2e
def test_model_artifacts_in_s3_and_predict_from_the_registry(
    in_tiny, prefect_api, mlflow_uri, s3_bucket, capsys, caplog
):
    import mlflow

    from flows.stages import train_flow

    loc = s3_bucket["location"]
    write_params(in_tiny, storage=s3_bucket["settings"], train=ONE_EPOCH, methods=ONLY_TRANSVG)
    state = train_flow(method="transvg", params="params.yaml", return_state=True)
    assert state.is_completed(), state.message

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("refvg")
    assert exp.artifact_location == f"s3://{loc.bucket}/refvg/mlflow"
    [model] = client.search_logged_models([exp.experiment_id])
    assert str(model.status) == "READY" and model.artifact_location.startswith(
        exp.artifact_location
    )
    keys = storage.list_keys(loc, model.artifact_location)
    assert any(k.endswith("/MLmodel") for k in keys) and any(k.endswith("/best.pt") for k in keys)

    # Registered, then loaded by name from the registry: its files come from the S3 server.
    version = mlflow.register_model(f"models:/{model.model_id}", "refvg-transvg").version
    image_path, sentence = _val_sample(load_config("params.yaml"))
    drawn = in_tiny / "drawn.png"
    out = _predict(
        [image_path, sentence, "--model", f"models:/refvg-transvg/{version}", "--out", str(drawn)],
        capsys,
    )
    image = Image.open(image_path)
    x0, y0, x1, y1 = out["box_xyxy"]
    assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height and "mask" not in out
    assert Image.open(drawn).size == image.size

    # Credentials: nowhere in the tracking store (params, tags, metrics), the uploaded files, or the
    # logs.
    _assert_no_secret(Path(mlflow_uri[len("sqlite:///") :]).read_bytes(), "the MLflow store")
    for run in client.search_runs([exp.experiment_id]):
        _assert_no_secret(json.dumps([run.data.params, run.data.tags]), f"run {run.info.run_id}")
    s3 = storage.client(loc)
    for key in keys:
        _assert_no_secret(
            s3.get_object(Bucket=loc.bucket, Key=key)["Body"].read(), f"s3://{loc.bucket}/{key}"
        )
    _assert_no_secret(caplog.text + capsys.readouterr().err, "the logs")
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(state.state_details.flow_run_id)
    assert flow_run.parameters == {"method": "transvg", "params": "params.yaml"}
    _assert_no_secret(
        json.dumps([flow_run.parameters, flow_run.tags, flow_run.state.message]),
        "Prefect's run record",
    )


def test_endpoint_failing_mid_upload_retries_then_fails_clearly(
    in_tiny, mlflow_uri, s3_server, s3_bucket, capsys, caplog
):
    from refvg.tracking import stage_run

    endpoint = FaultyEndpoint(s3_server)
    try:
        settings = {**s3_bucket["settings"], "endpoint_url": endpoint.url}
        cfg = load_config(write_params(in_tiny, storage=settings, methods=ONLY_TRANSVG))
        ckpt = untrained_checkpoint(cfg, in_tiny / "model")
        tokenizer = ckpt.parent / "tokenizer"
        with stage_run(cfg, "train@transvg") as tracker:
            # A blip: two requests dropped, then the endpoint answers again; the retries carry the
            # upload.
            endpoint.fail_next = 2
            good_uri = tracker.log_model(ckpt, tokenizer)
            assert sum(failed for *_, failed in endpoint.log) == 2

            # The endpoint dies after three more requests, in the middle of the model's files.
            endpoint.reset()
            endpoint.fail_from = 3
            with pytest.raises(storage.StorageError) as failure:
                tracker.log_model(ckpt, tokenizer)
            uploads = [
                (method, path)
                for method, path, failed in endpoint.log
                if failed and method == "PUT"
            ]
            endpoint.reset()  # the endpoint is back

        # Retried: the upload that hit the dead endpoint was sent max_attempts times, then given up.
        assert uploads and max(Counter(uploads).values()) == settings["max_attempts"], uploads
        message = str(failure.value)
        assert (
            f"s3://{s3_bucket['location'].bucket}/refvg/mlflow/" in message and "failed" in message
        )
        _assert_no_secret(message, "the error")
        # The store was down for the cleanup too; the FAILED mark is what says the files are
        # incomplete.
        assert "could not delete the partial upload" in caplog.text

        client = MlflowClient(mlflow_uri)
        models = {
            str(m.status): m
            for m in client.search_logged_models(
                [client.get_experiment_by_name("refvg").experiment_id]
            )
        }
        assert set(models) == {"READY", "FAILED"}, "the half-uploaded model must not look complete"
        assert good_uri == f"models:/{models['READY'].model_id}"

        image_path, sentence = _val_sample(cfg)
        with pytest.raises(SystemExit, match="FAILED, not READY"):
            _predict(
                [image_path, sentence, "--model", f"models:/{models['FAILED'].model_id}"], capsys
            )
        out = _predict(
            [image_path, sentence, "--model", good_uri, "--out", str(in_tiny / "ok.png")], capsys
        )
        assert len(out["box_xyxy"]) == 4
    finally:
        endpoint.close()


def test_dvc_push_and_pull_through_the_s3_remote(tmp_path, s3_bucket):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    outputs = []

    def sh(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, (
            f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
        return proc.stdout

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("dvc", "config", "core.analytics", "false")
    write_params(repo, storage=s3_bucket["settings"])
    data = repo / "data" / "raw"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {
        f"part{i}.bin": rng.integers(0, 256, size=50_000 * (i + 1), dtype=np.uint8).tobytes()
        for i in range(3)
    }
    for name, blob in files.items():
        (data / name).write_bytes(blob)
    sh("dvc", "add", "data/raw")
    print(sh(sys.executable, "-m", "refvg.cli", "storage", "setup"))
    sh("dvc", "push")
    loc = s3_bucket["location"]
    assert (
        len(storage.list_keys(loc, loc.dvc_url)) >= len(files) + 1
    )  # the files and the directory listing

    # As on another machine: no cache, no data; pulled back from the bucket, byte for byte.
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(data)
    sh("dvc", "pull")
    assert {p.name: p.read_bytes() for p in data.iterdir()} == files

    config = (repo / ".dvc" / "config").read_text()
    assert loc.dvc_url in config and loc.endpoint_url in config
    _assert_no_secret(config, ".dvc/config")
    _assert_no_secret("\n".join(outputs), "the DVC and refvg output")
