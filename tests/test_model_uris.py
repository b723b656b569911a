"""A ranking model (mattnet) logged as an MLflow pyfunc: its `candidates` column, and loading it by a
`runs:/` URI both through MLflow and through `refvg predict --model runs:/... --candidates`."""
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
from PIL import Image

from refvg.config import load_config
from refvg.data.dataset import PreparedSplit
from refvg.data.prepare import prepared_path
from refvg.data.proposals import read_gt_candidates
from tests.conftest import ROOT, untrained_checkpoint, write_params


@pytest.fixture
def logged_ranker(in_tiny, mlflow_uri, tmp_path):
    from refvg.mlflow_model import log_grounding_model

    cfg = load_config(write_params(in_tiny, methods={"mattnet": {"model": "mattnet"}}))
    ckpt = untrained_checkpoint(cfg, tmp_path / "mattnet", "mattnet")
    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run() as run:
        pass
    log_grounding_model(run.info.run_id, ckpt, ckpt.parent / "tokenizer")
    split = PreparedSplit(prepared_path(cfg), "val")
    rec = split.records[0]
    cands = read_gt_candidates(prepared_path(cfg) / "val")[rec["image_index"]]
    detections = [{"bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "category_id": int(c), "score": 0.9}
                  for b, c in zip(cands.boxes_xyxy.tolist(), cands.category_ids)]
    image = (in_tiny / cfg.data.image_dir / rec["file_name"]).read_bytes()
    return f"runs:/{run.info.run_id}/model", rec, image, detections, cands


def test_the_pyfunc_ranks_the_candidates_column(logged_ranker):
    uri, rec, image, detections, cands = logged_ranker
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(pd.DataFrame({"image": [image], "expression": [rec["sentence"]],
                                      "candidates": [json.dumps(detections)]}))
    box = [float(out[c][0]) for c in ("x0", "y0", "x1", "y1")]
    assert any(box == pytest.approx(c, abs=1e-3) for c in cands.boxes_xyxy.tolist())  # one of them, exactly
    with pytest.raises(MlflowException, match="candidates"):
        model.predict(pd.DataFrame({"image": [image], "expression": [rec["sentence"]]}))


def test_refvg_predict_loads_a_runs_uri(logged_ranker, tmp_path):
    # Its own process, as a user runs it (loading a model also sets MLflow's HTTP settings process-wide).
    uri, rec, image, detections, cands = logged_ranker
    photo, dets = tmp_path / "photo.png", tmp_path / "dets.json"
    Image.open(io.BytesIO(image)).save(photo)
    dets.write_text(json.dumps(detections))
    proc = subprocess.run([sys.executable, "-m", "refvg.cli", "predict", str(photo), rec["sentence"], "--model", uri,
                           "--candidates", str(dets), "--out", str(tmp_path / "drawn.png")],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(payload["box_xyxy"] == pytest.approx(c, abs=0.06) for c in cands.boxes_xyxy.tolist())
    assert (tmp_path / "drawn.png").stat().st_size > 0
