"""The `detections` stage: a detector's results file (the stand-in by default) and each method's
candidate stamp."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from refvg.config import Config
from refvg.stages.paths import instances_path


def detections(cfg: Config) -> dict:
    """The `detections` stage: the stand-in detections file (refvg.data.detections) at
    `<detections.dir>/<dataset>.json`, and `<detections.dir>/methods/<method>.json` for every
    method: the candidates it ranks (its proposals settings and its detections file's hash). A
    method's training depends on its own such file (dvc.yaml), so new detections rerun only the
    methods that rank them."""
    import hashlib

    from refvg.data.detections import detection_recall, stand_in_detections, write_detections

    out = Path(cfg.detections.dir)
    # Split files carry no instances file to perturb: no stand-in then, a real detector's file is
    # the user's.
    stand_in = cfg.data.format == "refer"
    rows = stand_in_detections(instances_path(cfg), cfg.detections) if stand_in else []
    path = write_detections(rows, out / f"{cfg.data.dataset}.json")
    stamps = out / "methods"
    shutil.rmtree(stamps, ignore_errors=True)
    stamps.mkdir(parents=True)
    for method in cfg.all_methods:
        pcfg = cfg.for_method(method).proposals
        stamp = {"source": pcfg.source}
        if pcfg.source == "detections":
            det = Path(pcfg.detections_file)
            if not det.is_file():
                raise FileNotFoundError(
                    f"methods.{method}: proposals.detections_file {det} does not exist"
                )
            stamp |= {
                "detections_file": str(det),
                "sha256": hashlib.sha256(det.read_bytes()).hexdigest(),
                "min_score": pcfg.min_score,
            }
        (stamps / f"{method}.json").write_text(json.dumps(stamp, indent=1) + "\n")
    recall = detection_recall(instances_path(cfg), rows) if stand_in else {}
    return {"file": path, "detections": len(rows), **recall}
