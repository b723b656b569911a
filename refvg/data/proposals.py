"""Candidate boxes per image, for the methods that rank candidates instead of regressing a box
(MAttNet-style matching, CM-Erase) or that score them (weakly supervised localisation by CAM mass).

Two sources, chosen by `proposals.source` in params.yaml:
- `gt`: every annotated object of the image (the "ground-truth proposals" setting of the papers),
written by
  the `prepare` stage as `<split>/candidates.json`, one list per row of `images.npy`;
- `detections`: a detector's output as a COCO results JSON (read with pycocotools `loadRes`), see
  `detection_candidates`.

Which candidate is the target is decided by geometry, the same way for both sources: the candidate
with the highest IoU with the target box, when that IoU is at least `match_iou` (0.5, the accuracy
criterion); otherwise the target is not among the candidates (-1) and no ranking can be right for
that sample.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

    from refvg.config import ProposalsConfig
    from refvg.data.refer import ReferDataset, SkipLog
    from refvg.data.transforms import Letterbox

CANDIDATES = "candidates.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageCandidates:
    """One image's candidate boxes, in original pixels."""

    boxes_xyxy: np.ndarray  # float [K, 4]
    category_ids: np.ndarray  # int [K]
    scores: np.ndarray  # float [K]: 1 for ground-truth boxes, the detector's confidence otherwise
    ann_ids: np.ndarray  # int [K]: the annotation a gt candidate is; -1 for a detection

    def __len__(self) -> int:
        return len(self.boxes_xyxy)

    def to_json(self) -> list[dict]:
        return [
            {
                "ann_id": int(a),
                "category_id": int(c),
                "score": float(s),
                "bbox_xyxy": [float(v) for v in b],
            }
            for b, c, s, a in zip(self.boxes_xyxy, self.category_ids, self.scores, self.ann_ids)
        ]

    @classmethod
    def from_json(cls, rows: list[dict], where: str) -> "ImageCandidates":
        try:
            boxes = np.asarray([r["bbox_xyxy"] for r in rows], dtype=np.float64).reshape(-1, 4)
            return cls(
                boxes,
                np.asarray([int(r["category_id"]) for r in rows], dtype=np.int64),
                np.asarray([float(r["score"]) for r in rows], dtype=np.float64),
                np.asarray([int(r["ann_id"]) for r in rows], dtype=np.int64),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{where}: malformed candidate list ({type(err).__name__}: {err})"
            ) from None


def candidates_from_detections(rows: list[dict], where: str) -> ImageCandidates:
    """One image's detections in the COCO results format ({"bbox": [x, y, w, h], "category_id",
    "score"}, as a detector writes them), e.g. the `--candidates` file of `refvg predict`."""
    try:
        xywh = np.asarray([[float(v) for v in r["bbox"]] for r in rows], dtype=np.float64).reshape(
            -1, 4
        )
        cats = np.asarray([int(r.get("category_id", 0)) for r in rows], dtype=np.int64)
        scores = np.asarray([float(r.get("score", 1.0)) for r in rows], dtype=np.float64)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"{where}: not a list of COCO detections ({type(err).__name__}: {err})"
        ) from None
    bad = np.flatnonzero(~(xywh[:, 2:] > 0).all(1))
    if bad.size:
        raise ValueError(
            f"{where}: detection {int(bad[0])} has a box of zero or "
            f"negative size: {rows[bad[0]]['bbox']}"
        )
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return ImageCandidates(boxes, cats, scores, np.full(len(boxes), -1, dtype=np.int64))


def gt_candidates(refer: ReferDataset, image_id: int, skips: SkipLog) -> ImageCandidates:
    """Every annotated object of the image. A box outside the image or of zero area (real COCO has a
    few) is dropped and counted in `skips`: it could never be the right answer, and it must not
    crash a ranking."""
    img = refer.coco.imgs[image_id]
    w, h = float(img["width"]), float(img["height"])
    boxes, cats, ann_ids = [], [], []
    for ann in refer.coco.imgToAnns.get(image_id, []):
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        box = [max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)]
        if not (box[2] > box[0] and box[3] > box[1]):
            skips.add(
                "candidate_box_outside_image",
                f"{refer.instances_path.name}: ann {ann['id']} (image "
                f"{image_id}): bbox {ann['bbox']}",
            )
            continue
        boxes.append(box)
        cats.append(int(ann["category_id"]))
        ann_ids.append(int(ann["id"]))
    return ImageCandidates(
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(cats, dtype=np.int64),
        np.ones(len(boxes)),
        np.asarray(ann_ids, dtype=np.int64),
    )


def write_gt_candidates(
    split_dir: Path, image_ids: Sequence[int], refer: ReferDataset, skips: SkipLog
) -> None:
    """`<split>/candidates.json`: the gt candidates of each image, in `images.npy` row order."""
    rows = [refer.candidates(image_id, skips).to_json() for image_id in image_ids]
    (Path(split_dir) / CANDIDATES).write_text(json.dumps(rows), encoding="utf-8")


def read_gt_candidates(split_dir: Path) -> list[ImageCandidates]:
    path = Path(split_dir) / CANDIDATES
    if not path.exists():
        raise FileNotFoundError(f"{path}: no candidate boxes here; re-run the `prepare` stage")
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [ImageCandidates.from_json(r, f"{path}: image row {i}") for i, r in enumerate(rows)]


def match_target(
    candidates_xyxy: np.ndarray, target_xyxy: np.ndarray, match_iou: float = 0.5
) -> int:
    """Index of the candidate that is the target (highest IoU, at least `match_iou`), or -1."""
    from refvg.metrics import box_iou

    if len(candidates_xyxy) == 0:
        return -1
    ious = np.asarray(
        box_iou(candidates_xyxy, np.broadcast_to(target_xyxy, candidates_xyxy.shape))
    ).reshape(-1)
    best = int(ious.argmax())
    return best if ious[best] >= match_iou else -1


def load_candidates(
    pcfg: ProposalsConfig, split_dir: Path, instances_path: Path | None = None
) -> list[ImageCandidates]:
    """The candidates of each image row of a prepared split, from the source params.yaml chooses
    (`instances_path`: the dataset's COCO instances file, which a detections file is read
    against)."""
    if pcfg.source == "gt":
        return read_gt_candidates(split_dir)
    if pcfg.source == "detections":
        if instances_path is None:
            raise ValueError("proposals.source 'detections' needs the dataset's instances.json")
        return detection_candidates(
            Path(pcfg.detections_file), Path(instances_path), split_dir, pcfg.min_score
        )
    raise ValueError(f"proposals.source {pcfg.source!r} is not known")


# -------------------------------------------------------------------------------------------
# detections

DETECTION_KEYS = ("image_id", "category_id", "bbox", "score")


def read_detections(path: Path) -> list[dict]:
    """A COCO results JSON, checked row by row (pycocotools would fail on a bad row with a bare
    KeyError): every row needs an integer image_id and category_id, a finite bbox [x, y, w, h] and a
    finite score."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no detections file (proposals.detections_file); the "
            f"`detections` stage "
            "writes a stand-in one"
        )
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON file: {err}") from None
    if not isinstance(rows, list):
        raise ValueError(
            f"{path}: a COCO results file is a JSON list of detections, got {type(rows).__name__}"
        )
    out = []
    for i, row in enumerate(rows):
        try:
            missing = [k for k in DETECTION_KEYS if k not in row]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            box = [float(v) for v in row["bbox"]]
            score = float(row["score"])
            if len(box) != 4 or not np.isfinite(box + [score]).all():
                raise ValueError(
                    f"bbox must be 4 finite numbers [x, y, w, h] and score "
                    f"finite, got "
                    f"{row['bbox']!r}, {row['score']!r}"
                )
            image_id, category_id = _integer(row["image_id"]), _integer(row["category_id"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: detection row {i}: {err}") from None
        out.append({"image_id": image_id, "category_id": category_id, "bbox": box, "score": score})
    return out


def _integer(value) -> int:
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError(f"expected an integer id, got {value!r}")
    return int(float(value))


@functools.lru_cache(maxsize=4)
def _results_by_image(path: str, instances: str, stamp: tuple) -> tuple[dict, dict]:
    """(image id -> [(bbox xywh, category, score)], skip counts) of a detections file, through
    pycocotools' loadRes against the dataset's instances; cached per (files, their sizes and
    mtimes): a stage reads it per split."""
    from pycocotools.coco import COCO

    rows = read_detections(Path(path))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco = COCO(instances)
        known = set(coco.getImgIds())
        kept = [r for r in rows if r["image_id"] in known]
        skips = {"unknown_image": len(rows) - len(kept)}
        # loadRes refuses a file with an image the dataset lacks, and adds area / id to each box
        results = coco.loadRes(kept) if kept else None
    by_image: dict[int, list] = {}
    if results is not None:
        for ann in results.anns.values():
            by_image.setdefault(ann["image_id"], []).append(
                (ann["bbox"], ann["category_id"], ann["score"])
            )
    return by_image, skips


def detection_candidates(
    path: Path, instances_path: Path, split_dir: Path, min_score: float = 0.0
) -> list[ImageCandidates]:
    """The candidates of each image row of a prepared split from a detector's COCO results file.
    Boxes are clipped to the image; boxes with nothing left, scored below `min_score`, or of images
    the dataset does not hold are dropped and counted (logged). Ann ids are -1: a detection is not
    an annotation."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: no detections file (proposals.detections_file); the "
            f"`detections` stage "
            "writes a stand-in one"
        )
    stamp = tuple(
        (p.stat().st_size, p.stat().st_mtime_ns) for p in (Path(path), Path(instances_path))
    )
    by_image, skips = _results_by_image(str(path), str(instances_path), stamp)
    skips = dict(skips, empty_box=0, low_score=0)
    records = json.loads((Path(split_dir) / "samples.json").read_text(encoding="utf-8"))
    rows = int(np.load(Path(split_dir) / "images.npy", mmap_mode="r", allow_pickle=False).shape[0])
    row_image: dict[int, dict] = {r["image_index"]: r for r in records}
    out = []
    for row in range(rows):
        rec = row_image.get(row)  # an image row no sample uses needs no candidates
        dets = by_image.get(rec["image_id"], []) if rec is not None else []
        boxes, cats, scores = [], [], []
        for (x, y, w, h), cat, score in dets:
            box = [
                max(x, 0.0),
                max(y, 0.0),
                min(x + w, rec["image_width"]),
                min(y + h, rec["image_height"]),
            ]
            if score < min_score:
                skips["low_score"] += 1
            elif not (box[2] > box[0] and box[3] > box[1]):
                skips["empty_box"] += 1
            else:
                boxes.append(box)
                cats.append(int(cat))
                scores.append(float(score))
        out.append(
            ImageCandidates(
                np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                np.asarray(cats, dtype=np.int64),
                np.asarray(scores, dtype=np.float64),
                np.full(len(boxes), -1, dtype=np.int64),
            )
        )
    if any(skips.values()):
        log.info("%s (%s): dropped detections: %s", path, Path(split_dir).name, skips)
    return out


def candidate_tensors(
    cands: ImageCandidates,
    lb: Letterbox,
    k: int,
    target_xyxy: np.ndarray | None = None,
    match_iou: float = 0.5,
) -> dict[str, torch.Tensor]:
    """One sample's candidates as the fixed-size tensors a ranking model reads (see
    refvg.data.dataset): the `k` highest-scoring, letterboxed like the image; "cand_target" when the
    target box is known."""
    import torch

    from refvg.data.transforms import xyxy_to_cxcywh

    keep = np.argsort(-cands.scores, kind="stable")[:k]
    boxes, valid = torch.zeros(k, 4), torch.zeros(k, dtype=torch.bool)
    category = torch.zeros(k, dtype=torch.long)
    if len(keep):
        boxes[: len(keep)] = torch.from_numpy(
            xyxy_to_cxcywh(lb.box_to_square(cands.boxes_xyxy[keep]))
        ).float()
        category[: len(keep)] = torch.from_numpy(cands.category_ids[keep])
        valid[: len(keep)] = True
    out = {"cand_boxes": boxes, "cand_valid": valid, "cand_category": category}
    if target_xyxy is not None:
        out["cand_target"] = torch.tensor(
            match_target(cands.boxes_xyxy[keep], target_xyxy, match_iou)
        )
    return out


def candidate_batch(cands: ImageCandidates, lb: Letterbox, k: int) -> dict[str, torch.Tensor]:
    """A batch of one image's candidates, for inference on raw input."""
    return {name: t[None] for name, t in candidate_tensors(cands, lb, k).items()}
