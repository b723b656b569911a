"""The MLflow pyfunc flavour of a refvg model: image + expression -> box.

Logged as "models from code": MLflow stores this file and our checkpoint (a weights-only file), and
loading the model runs this file, so nothing is unpickled on load. Input: a DataFrame with columns
`image` (the encoded image's bytes) and `expression`, and for a model that ranks candidate boxes
(mattnet) `candidates`, the image's detections as a JSON list in the COCO results format; output:
columns x0, y0, x1, y1 in the image's pixels.

The signature declares `image` binary, so `mlflow models serve` decodes the base64 text of a JSON
request into bytes. A path in `image` is opened only when whoever loads the model allows it
(model_config `{"allow_image_paths": true}` at load, or in MLflow's MLFLOW_PYFUNC_INFERENCE_CONFIG
for a server): otherwise a client of a served model could make the server open any file it can read.
A bad row is answered with a short error naming the row, not a traceback.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

# Logged with the model: MLflow lets a loader override only the keys declared here.
MODEL_CONFIG = {"allow_image_paths": False}


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema(
        [
            ColSpec("binary", "image"),
            ColSpec("string", "expression"),
            ColSpec("string", "candidates", required=False),
        ]
    )
    outputs = Schema([ColSpec("double", c) for c in ("x0", "y0", "x1", "y1")])
    return ModelSignature(inputs=inputs, outputs=outputs)


class GroundingPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from refvg.engine.predict import Grounder

        self.allow_paths = bool((context.model_config or {}).get("allow_image_paths", False))
        self.grounder = Grounder(
            Path(context.artifacts["checkpoint"]), Path(context.artifacts["tokenizer"])
        )

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            return self._predict(model_input)
        except ValueError as err:  # the caller's input: a 400 with our message, not a stack trace
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None

    def _predict(self, model_input: pd.DataFrame) -> pd.DataFrame:
        for column in ("image", "expression"):
            if column not in model_input:
                raise ValueError(f"no column {column!r} (columns: {list(model_input.columns)})")
        allow_paths = getattr(self, "allow_paths", False)
        images = [_image(i, v, allow_paths) for i, v in enumerate(model_input["image"])]
        candidates = None
        if "candidates" in model_input and model_input["candidates"].notna().any():
            from refvg.data.proposals import candidates_from_detections

            candidates = [
                candidates_from_detections(_json(i, v), f"row {i}: candidates")
                for i, v in enumerate(model_input["candidates"])
            ]
        boxes = self.grounder.predict(
            images, [str(e) for e in model_input["expression"]], candidates
        )
        return pd.DataFrame(boxes, columns=["x0", "y0", "x1", "y1"])


def _image(row: int, value, allow_paths: bool) -> Image.Image:
    if isinstance(value, str) and not allow_paths:
        raise ValueError(
            f"row {row}: image must be the image file's bytes (base64 text in a JSON "
            f"request); paths are not accepted by this model"
        )
    if not isinstance(value, (str, bytes, bytearray)):
        raise ValueError(f"row {row}: image must be bytes, not {type(value).__name__}")
    return _open(row, value)


def _open(row: int, value) -> Image.Image:
    from refvg.data.images import ImageReadError, open_photo

    try:  # as `refvg predict` opens it: upright by EXIF, alpha composited, bombs refused
        return open_photo(value if isinstance(value, (bytes, bytearray)) else str(value))
    # missing, truncated or not an image: say which row, not only PIL's words
    except ImageReadError as err:
        raise ValueError(f"row {row}: cannot read the image {err}") from None


def _json(row: int, value) -> list:
    try:
        return json.loads(value) if isinstance(value, (str, bytes)) else list(value)
    except (ValueError, TypeError) as err:
        raise ValueError(f"row {row}: candidates are not a JSON list: {err}") from None


def log_grounding_model(run_id: str, checkpoint: Path, tokenizer_dir: Path, name: str = "model"):
    import refvg

    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # No input example: it would store an image with every model and make MLflow run the model
        # at log time; the signature is declared instead, which is what the warning wants it for.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=__file__,
            artifacts={"checkpoint": str(checkpoint), "tokenizer": str(tokenizer_dir)},
            signature=signature(),
            model_config=MODEL_CONFIG,
            # Explicit requirements: inferring them would import-scan the environment (slow, and
            # offline here).
            pip_requirements=[
                f"refvg=={refvg.__version__}",
                "torch",
                "transformers",
                "pillow",
                "pandas",
            ],
        )


mlflow.models.set_model(GroundingPyfunc())
