"""The MLflow pyfunc flavour of a refvg model: image + expression -> box.

Logged as "models from code": MLflow stores this file and our checkpoint (a weights-only file), and loading
the model runs this file, so nothing is unpickled on load. Input: a DataFrame with columns `image` (a path or
the encoded image bytes) and `expression`, and for a model that ranks candidate boxes (mattnet) `candidates`, the
image's detections as a JSON list in the COCO results format; output: columns x0, y0, x1, y1 in the image's pixels.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from PIL import Image


class GroundingPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from refvg.engine.predict import Grounder

        self.grounder = Grounder(Path(context.artifacts["checkpoint"]), Path(context.artifacts["tokenizer"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = [_open(i, v) for i, v in enumerate(model_input["image"])]
        candidates = None
        if "candidates" in model_input:
            from refvg.data.proposals import candidates_from_detections

            candidates = [candidates_from_detections(_json(i, v), f"row {i}: candidates")
                          for i, v in enumerate(model_input["candidates"])]
        boxes = self.grounder.predict(images, [str(e) for e in model_input["expression"]], candidates)
        return pd.DataFrame(boxes, columns=["x0", "y0", "x1", "y1"])


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

    with mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=__file__,
            artifacts={"checkpoint": str(checkpoint), "tokenizer": str(tokenizer_dir)},
            # Explicit requirements: inferring them would import-scan the environment (slow, and offline here).
            pip_requirements=[f"refvg=={refvg.__version__}", "torch", "transformers", "pillow", "pandas"],
        )


mlflow.models.set_model(GroundingPyfunc())
