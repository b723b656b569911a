"""`refvg`: the stages without the orchestration (no Prefect, no MLflow runs), for quick local work.

refvg generate | pretrain | prepare | detections | teacher | report   [--params params.yaml]
refvg train --method transvg                 [--params params.yaml]
refvg evaluate --method transvg              [--params params.yaml] refvg predict IMAGE "expression"
--model checkpoints/transvg/best.pt | models:/refvg-transvg/1 [--out drawn.png]
                                             [--candidates detections.json]  (ranking models)
refvg storage setup [--create-bucket]        point DVC (and MLflow artifacts) at storage.* of
params.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from refvg.config import Config, ConfigError, load_config


def _predict(args) -> None:
    from refvg.data.images import ImageReadError, open_photo
    from refvg.engine.checkpoint import CheckpointError
    from refvg.engine.predict import Grounder
    from refvg.engine.trainer import BEST
    from refvg.visualize import draw_grounding

    try:
        image = open_photo(args.image)  # upright by its EXIF orientation; the box is in that frame
    except ImageReadError as err:
        raise SystemExit(f"refvg predict: cannot read image {err}") from None
    local = Path(args.model)
    if local.is_dir() and (local / BEST).exists():
        local = local / BEST
    if local.is_file():
        try:
            grounder = Grounder(local)
        except CheckpointError as err:
            raise SystemExit(f"refvg predict: {err}") from None
    elif (
        "://" in args.model
        or args.model.startswith(("models:/", "runs:/"))
        or (local / "MLmodel").exists()
    ):
        from refvg.tracking import load_grounder

        try:
            grounder = load_grounder(args.model, _load_cfg(args.params))
        except Exception as err:  # noqa: BLE001 - any loading failure is the user's input: say which and why
            raise SystemExit(
                f"refvg predict: cannot load model {args.model}: {type(err).__name__}: {err}"
            ) from None
    else:
        raise SystemExit(
            f"refvg predict: {args.model}: no such checkpoint, and not an MLflow model URI "
            "(models:/name/version, runs:/<run id>/model, s3://...)"
        )
    candidates = None
    if args.candidates:
        from refvg.data.proposals import candidates_from_detections

        try:
            candidates = candidates_from_detections(
                json.loads(Path(args.candidates).read_text()), args.candidates
            )
        except (OSError, ValueError) as err:
            raise SystemExit(f"refvg predict: {err}") from None
    try:
        result = grounder.ground(image, args.expression, candidates)
    except (
        ValueError
    ) as err:  # an unusable expression (empty, too long, not text), no candidates for a ranker
        raise SystemExit(f"refvg predict: {err}") from None
    payload = {
        "image": str(args.image),
        "expression": args.expression,
        "box_xyxy": [round(float(v), 1) for v in result.box_xyxy],
    }
    if result.mask is not None:
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(result.mask.astype(np.uint8)))
        payload["mask"] = {
            "area": int(result.mask.sum()),
            "size": rle["size"],
            "counts": rle["counts"].decode(),
        }
    out = Path(args.out) if args.out else Path("outputs/predict") / f"{Path(args.image).stem}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_grounding(image, result.box_xyxy, result.mask).save(out)
    payload["drawn"] = str(out)
    print(json.dumps(payload))


def _load_cfg(params: str):
    try:
        return load_config(params) if Path(params).exists() else Config()
    except ConfigError as err:
        raise SystemExit(f"refvg: {err}") from None


def _storage(args) -> None:
    from refvg import storage

    try:
        loc = storage.setup(_load_cfg(args.params), create_bucket=args.create_bucket)
    except storage.StorageError as err:
        raise SystemExit(f"refvg storage: {err}") from None
    print(
        f"DVC remote {loc.dvc_remote!r} (default) = {loc.dvc_url}; "
        f"MLflow artifacts of new experiments: "
        f"{loc.mlflow_url if loc.mlflow_artifacts else 'local'} ({loc.where})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="refvg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in (
        "generate",
        "pretrain",
        "prepare",
        "detections",
        "teacher",
        "report",
        "train",
        "evaluate",
    ):
        p = sub.add_parser(name)
        p.add_argument("--params", default="params.yaml")
        if name in ("train", "evaluate"):
            p.add_argument("--method", required=True)
    p = sub.add_parser("predict", help="ground one expression in one image")
    p.add_argument("image")
    p.add_argument("expression")
    p.add_argument(
        "--model",
        required=True,
        help="a checkpoint (checkpoints/<method>/best.pt, or its folder) or an "
        "MLflow model URI (models:/<name>/<version>, runs:/<run id>/model, s3://...)",
    )
    p.add_argument(
        "--out",
        help="where to write the image with the box (and mask) drawn "
        "(default: outputs/predict/<image name>.png)",
    )
    p.add_argument(
        "--params",
        default="params.yaml",
        help="for an MLflow URI: the tracking store and S3 settings",
    )
    p.add_argument(
        "--candidates",
        help="for a model that ranks candidate boxes (mattnet): a JSON list of the "
        'image\'s detections in the COCO results format [{"bbox": [x, y, w, h], "category_id": .., '
        '"score": ..}, ...]',
    )
    p = sub.add_parser("storage", help="S3: make storage.* of params.yaml the DVC remote")
    p.add_argument("action", choices=["setup"])
    p.add_argument("--params", default="params.yaml")
    p.add_argument(
        "--create-bucket",
        action="store_true",
        help="create the bucket if missing (MinIO, a test server)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "predict":
        return _predict(args)
    if args.command == "storage":
        return _storage(args)
    from refvg import stages

    try:
        cfg = load_config(args.params)
    except ConfigError as err:
        raise SystemExit(f"refvg: {err}") from None
    if args.command == "train":
        from refvg.engine.distributed import env_rank

        result = stages.train_method(cfg, args.method)  # under torchrun: one rank of a DDP run
        if env_rank() == 0:
            print(
                json.dumps(
                    {
                        f"best_val_{result.select_metric}": result.best_score,
                        "best_epoch": result.best_epoch,
                    }
                )
            )
    elif args.command == "evaluate":
        print(json.dumps(stages.evaluate_method(cfg, args.method).metrics, indent=2))
    elif args.command == "report":
        print(stages.report(cfg).read_text())
    else:
        print(json.dumps(getattr(stages, args.command)(cfg), indent=2, default=str))


if __name__ == "__main__":
    main()
