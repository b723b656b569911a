"""A ranking model (mattnet) logged as an MLflow pyfunc: its `candidates` column, and loading it by
a `runs:/` URI, or by the bare `s3://` URI of its files when the artifact store is S3 (a real local
S3-compatible server), both through MLflow and through `refvg predict --model ... --candidates`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from refvg.config import load_config
from refvg.data.dataset import PreparedSplit
from refvg.data.prepare import prepared_path
from refvg.data.proposals import read_gt_candidates
from tests.helpers import ROOT, untrained_checkpoint, write_params


def _sample(cfg, folder):
    """A val image's bytes, its expression, and its objects as a detector's results (the
    candidates)."""
    split = PreparedSplit(prepared_path(cfg), "val")
    rec = split.records[0]
    cands = read_gt_candidates(prepared_path(cfg) / "val")[rec["image_index"]]
    detections = [
        {"bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "category_id": int(c), "score": 0.9}
        for b, c in zip(cands.boxes_xyxy.tolist(), cands.category_ids)
    ]
    image = (folder / cfg.data.image_dir / rec["file_name"]).read_bytes()
    return rec, image, detections, cands


@pytest.fixture
def logged_ranker(in_tiny, mlflow_uri, tmp_path):
    from refvg.mlflow_model import log_grounding_model

    cfg = load_config(write_params(in_tiny, methods={"mattnet": {"model": "mattnet"}}))
    ckpt = untrained_checkpoint(cfg, tmp_path / "mattnet", "mattnet")
    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run() as run:
        pass
    log_grounding_model(run.info.run_id, ckpt, ckpt.parent / "tokenizer")
    return (f"runs:/{run.info.run_id}/model", *_sample(cfg, in_tiny))


@pytest.fixture
def ranker_in_s3(in_tiny, mlflow_uri, s3_bucket, tmp_path):
    """The ranker logged as a pipeline stage logs it with `storage` set: its files on the S3 server.
    The fixture's own process then forgets the endpoint it exported, as a fresh process that has
    only params.yaml and the credentials would."""
    from refvg import storage
    from refvg.tracking import stage_run

    cfg = load_config(
        write_params(
            in_tiny, storage=s3_bucket["settings"], methods={"mattnet": {"model": "mattnet"}}
        )
    )
    ckpt = untrained_checkpoint(cfg, tmp_path / "mattnet", "mattnet")
    with stage_run(cfg, "train@mattnet") as tracker:
        model_id = tracker.log_model(ckpt, ckpt.parent / "tokenizer")[len("models:/") :]
    uri = MlflowClient(mlflow_uri).get_logged_model(model_id).artifact_location
    assert uri.startswith(f"s3://{s3_bucket['location'].bucket}/")
    assert any(k.endswith("/MLmodel") for k in storage.list_keys(s3_bucket["location"], uri))
    for key in storage.client_env(s3_bucket["location"]):
        os.environ.pop(key, None)  # restored by s3_bucket's monkeypatch where it had set them
    return (uri, *_sample(cfg, in_tiny))


@pytest.fixture(params=["runs", "s3"])
def model_by_uri(request):
    return request.getfixturevalue({"runs": "logged_ranker", "s3": "ranker_in_s3"}[request.param])


def test_the_pyfunc_ranks_the_candidates_column(model_by_uri):
    uri, rec, image, detections, cands = model_by_uri
    if uri.startswith(
        "s3://"
    ):  # MLflow reads the endpoint from its variable; refvg exports it from params
        from refvg import storage

        storage.apply_client_env(load_config("params.yaml"))
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(
        pd.DataFrame(
            {
                "image": [image],
                "expression": [rec["sentence"]],
                "candidates": [json.dumps(detections)],
            }
        )
    )
    box = [float(out[c][0]) for c in ("x0", "y0", "x1", "y1")]
    assert any(
        box == pytest.approx(c, abs=1e-3) for c in cands.boxes_xyxy.tolist()
    )  # one of them, exactly
    with pytest.raises(MlflowException, match="candidates"):
        model.predict(pd.DataFrame({"image": [image], "expression": [rec["sentence"]]}))


def test_refvg_predict_loads_the_uri(model_by_uri, tmp_path):
    # Its own process, as a user runs it (loading a model also sets MLflow's HTTP settings
    # process-wide). For s3:// it has params.yaml's `storage` and the credentials in its
    # environment, nothing else.
    uri, rec, image, detections, cands = model_by_uri
    photo, dets = tmp_path / "photo.png", tmp_path / "dets.json"
    Image.open(io.BytesIO(image)).save(photo)
    dets.write_text(json.dumps(detections))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "refvg.cli",
            "predict",
            str(photo),
            rec["sentence"],
            "--model",
            uri,
            "--candidates",
            str(dets),
            "--out",
            str(tmp_path / "drawn.png"),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(payload["box_xyxy"] == pytest.approx(c, abs=0.06) for c in cands.boxes_xyxy.tolist())
    assert (tmp_path / "drawn.png").stat().st_size > 0
