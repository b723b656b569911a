"""A STAND-IN for a real detector's output: the ground-truth boxes of a COCO instances file,
perturbed, written as a COCO results JSON ([{image_id, category_id, bbox: [x, y, w, h], score},
...]), the format a detector's evaluation writes and `proposals.source: detections` reads
(refvg.data.proposals).

It only exists so the detection-proposal setting of the ranking methods runs end to end without a
detector (none can be trained or downloaded here). What it imitates: localisation error (each box
edge moves by N(0, jitter x box side), so some boxes fall below IoU 0.5 with their object), missed
objects (`drop_rate`), false positives (`false_positives` per image: random boxes of object size,
some over parts of objects, with a random category and a lower score), and classification errors
(`confusion_rate` of the found objects reported as another of the dataset's categories, drawn
uniformly; a real detector confuses similar classes more). For real use, point
`proposals.detections_file` at a detector's results file for the dataset's images instead (e.g. Mask
R-CNN's, as MAttNet does).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from refvg.config import DetectionsConfig


def stand_in_detections(instances_path: Path, dcfg: DetectionsConfig) -> list[dict]:
    """The perturbed gt boxes and false positives of every image of `instances_path`, seeded by
    `dcfg.seed`."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(instances_path))
    rng = np.random.default_rng(dcfg.seed)
    confuse = np.random.default_rng([dcfg.seed, 1])  # own stream: the same boxes at every rate
    cat_ids = sorted(coco.getCatIds()) or [1]
    rows: list[dict] = []
    for image_id in sorted(coco.getImgIds()):
        img = coco.imgs[image_id]
        w, h = float(img["width"]), float(img["height"])
        sides = []
        for ann in sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a["id"]):
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            sides.append((bw, bh))
            if rng.random() < dcfg.drop_rate:
                continue
            dx0, dx1 = rng.normal(0.0, dcfg.jitter * bw, 2)
            dy0, dy1 = rng.normal(0.0, dcfg.jitter * bh, 2)
            box = _clip([x + dx0, y + dy0, x + bw + dx1, y + bh + dy1], w, h)
            if box is not None:
                category = int(ann["category_id"])
                others = [c for c in cat_ids if c != category]
                if confuse.random() < dcfg.confusion_rate and others:
                    category = int(confuse.choice(others))
                rows.append(_row(image_id, category, box, rng.uniform(dcfg.true_score_min, 1.0)))
        for _ in range(dcfg.false_positives):
            bw, bh = sides[rng.integers(len(sides))] if sides else (0.25 * w, 0.25 * h)
            bw, bh = bw * rng.uniform(0.6, 1.2), bh * rng.uniform(0.6, 1.2)
            x, y = rng.uniform(0, max(w - bw, 1.0)), rng.uniform(0, max(h - bh, 1.0))
            box = _clip([x, y, x + bw, y + bh], w, h)
            if box is not None:
                rows.append(
                    _row(
                        image_id,
                        int(rng.choice(cat_ids)),
                        box,
                        rng.uniform(0.05, dcfg.true_score_min),
                    )
                )
    return rows


def _clip(xyxy: list[float], w: float, h: float) -> list[float] | None:
    x0, y0, x1, y1 = max(xyxy[0], 0.0), max(xyxy[1], 0.0), min(xyxy[2], w), min(xyxy[3], h)
    return [x0, y0, x1, y1] if x1 - x0 >= 1 and y1 - y0 >= 1 else None


def _row(image_id: int, category_id: int, xyxy: list[float], score: float) -> dict:
    x0, y0, x1, y1 = xyxy
    return {
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
        "score": round(float(score), 4),
    }


def write_detections(rows: list[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows), encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a file
    return path


def detection_recall(instances_path: Path, rows: list[dict], iou: float = 0.5) -> dict:
    """How good the detections are as proposals: the fraction of annotated objects that some
    detection of their image covers with IoU >= `iou` (the ceiling of a ranking method on them), and
    detections per image."""
    from pycocotools.coco import COCO

    from refvg.metrics import box_iou

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(instances_path))
    dets: dict[int, list] = {}
    for r in rows:
        x, y, w, h = r["bbox"]
        dets.setdefault(r["image_id"], []).append([x, y, x + w, y + h])
    found = total = 0
    for image_id, anns in coco.imgToAnns.items():
        gt = np.asarray(
            [
                [
                    a["bbox"][0],
                    a["bbox"][1],
                    a["bbox"][0] + a["bbox"][2],
                    a["bbox"][1] + a["bbox"][3],
                ]
                for a in anns
            ],
            dtype=np.float64,
        ).reshape(-1, 4)
        d = np.asarray(dets.get(image_id, []), dtype=np.float64).reshape(-1, 4)
        total += len(gt)
        if len(d) and len(gt):  # every (object, detection) pair at once
            ious = np.asarray(box_iou(np.repeat(gt, len(d), 0), np.tile(d, (len(gt), 1)))).reshape(
                len(gt), len(d)
            )
            found += int((ious.max(1) >= iou).sum())
    images = max(len(coco.getImgIds()), 1)
    return {"object_recall": found / max(total, 1), "per_image": len(rows) / images}
