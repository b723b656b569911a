"""`refvg`: the stages without the orchestration (no Prefect, no MLflow), for quick local work.

    refvg generate | prepare | report            [--params params.yaml]
    refvg train --method transvg                 [--params params.yaml]
    refvg evaluate --method transvg              [--params params.yaml]
    refvg predict IMAGE "expression" --model checkpoints/transvg/best.pt [--out drawn.png]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from refvg.config import ConfigError, load_config


def _predict(args) -> None:
    from PIL import Image, ImageDraw

    from refvg.engine.checkpoint import CheckpointError
    from refvg.engine.predict import Grounder

    try:
        image = Image.open(args.image).convert("RGB")
    except OSError as err:
        raise SystemExit(f"refvg predict: cannot read image {args.image}: {err}") from None
    try:
        box = Grounder(Path(args.model)).predict([image], [args.expression])[0]
    except (CheckpointError, ValueError) as err:  # a file that is not our checkpoint; an unusable expression
        raise SystemExit(f"refvg predict: {err}") from None
    print(json.dumps({"image": str(args.image), "expression": args.expression,
                      "box_xyxy": [round(float(v), 1) for v in box]}))
    if args.out:
        ImageDraw.Draw(image).rectangle([float(v) for v in box], outline=(255, 0, 0), width=3)
        image.save(args.out)
        print(f"drawn: {args.out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="refvg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("generate", "prepare", "report", "train", "evaluate"):
        p = sub.add_parser(name)
        p.add_argument("--params", default="params.yaml")
        if name in ("train", "evaluate"):
            p.add_argument("--method", required=True)
    p = sub.add_parser("predict", help="ground one expression in one image")
    p.add_argument("image")
    p.add_argument("expression")
    p.add_argument("--model", required=True, help="a checkpoint (checkpoints/<method>/best.pt)")
    p.add_argument("--out", help="write the image with the box drawn here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "predict":
        return _predict(args)
    from refvg import stages

    try:
        cfg = load_config(args.params)
    except ConfigError as err:
        raise SystemExit(f"refvg: {err}") from None
    if args.command == "train":
        result = stages.train_method(cfg, args.method)
        print(json.dumps({"best_val_acc@0.5": result.best_score, "best_epoch": result.best_epoch}))
    elif args.command == "evaluate":
        print(json.dumps(stages.evaluate_method(cfg, args.method).metrics, indent=2))
    elif args.command == "report":
        print(stages.report(cfg).read_text())
    else:
        print(json.dumps(getattr(stages, args.command)(cfg), indent=2, default=str))


if __name__ == "__main__":
    main()
