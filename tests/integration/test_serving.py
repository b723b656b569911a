"""The registered model served by `mlflow models serve`: a JSON request carrying the image as base64
gets a box; a path, which would let any client make the server open any file it can read, is
refused, and so is a row that is not an image, each with a short error."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from refvg.config import load_config
from refvg.tracking import stage_run
from tests.helpers import ROOT, untrained_checkpoint

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300  # imports torch, mlflow and the model: slow when loaded
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        tail = log.read_text()[-3000:]
        assert proc.poll() is None, f"mlflow models serve exited with {proc.returncode}:\n{tail}"
        assert time.monotonic() < deadline, f"mlflow models serve did not answer:\n{tail}"
        time.sleep(0.5)


@pytest.fixture
def registered_model(in_tiny, mlflow_uri) -> dict:
    cfg = load_config("params.yaml")
    folder = in_tiny / "checkpoints" / "transvg"
    folder.mkdir(parents=True)
    ckpt = untrained_checkpoint(cfg, folder)
    with stage_run(cfg, "train@transvg") as tracker:
        uri = tracker.log_model(ckpt, folder / "tokenizer")
        version = tracker.register_model(uri, "refvg-transvg", {"val_acc_at_0.5": 0.25})
    assert version == 1
    image = next((in_tiny / "data/raw/refshapes/images").iterdir())
    return {"uri": "models:/refvg-transvg/1", "image": image, "tracking_uri": mlflow_uri}


def test_paths_only_when_the_operator_allows_them(registered_model):
    import mlflow

    image = registered_model["image"]
    served = mlflow.pyfunc.load_model(registered_model["uri"])  # as the server loads it
    with pytest.raises(MlflowException, match="row 0: image must be the image file's bytes"):
        served.predict(pd.DataFrame({"image": [str(image)], "expression": ["the red circle"]}))
    by_bytes = served.predict(
        pd.DataFrame({"image": [image.read_bytes()], "expression": ["the red circle"]})
    )
    trusted = mlflow.pyfunc.load_model(
        registered_model["uri"], model_config={"allow_image_paths": True}
    )
    by_path = trusted.predict(
        pd.DataFrame({"image": [str(image)], "expression": ["the red circle"]})
    )
    assert by_path.equals(by_bytes) and list(by_path.columns) == ["x0", "y0", "x1", "y1"]


def test_mlflow_models_serve_answers_a_base64_image(registered_model, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registered_model["tracking_uri"],
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("MLFLOW_PYFUNC_INFERENCE_CONFIG", None)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "models",
                "serve",
                "-m",
                registered_model["uri"],
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-w",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        _wait_until_up(url, proc, log)
        image = registered_model["image"]
        b64 = base64.b64encode(image.read_bytes()).decode()
        status, body = _post(
            f"{url}/invocations",
            {
                "dataframe_split": {
                    "columns": ["image", "expression"],
                    "data": [[b64, "the red circle"], [b64, "the blue square"]],
                }
            },
        )
        assert status == 200, body
        rows = body["predictions"]
        assert len(rows) == 2 and set(rows[0]) == {"x0", "y0", "x1", "y1"}
        from PIL import Image

        width, height = Image.open(image).size
        assert all(
            0 <= r["x0"] <= r["x1"] <= width and 0 <= r["y0"] <= r["y1"] <= height for r in rows
        )

        # A path is not opened: base64 of the path's text, as a client would send it, is no image.
        secret = tmp_path / "secret.png"
        secret.write_bytes(image.read_bytes())
        b64_path = base64.b64encode(str(secret).encode()).decode()
        status, body = _post(
            f"{url}/invocations",
            {
                "dataframe_split": {
                    "columns": ["image", "expression"],
                    "data": [[b64, "the red circle"], [b64_path, "the red circle"]],
                }
            },
        )
        assert status == 400 and "row 1: cannot read the image" in body["message"], body
        assert "Traceback" not in json.dumps(body) and len(body["message"]) < 2000
        status, body = _post(
            f"{url}/invocations",
            {
                "dataframe_split": {  # the path as plain text
                    "columns": ["image", "expression"],
                    "data": [[str(secret), "the red circle"]],
                }
            },
        )
        assert status == 400 and "predictions" not in body, body
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
