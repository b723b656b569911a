"""Candidate boxes per image, for the methods that rank candidates instead of regressing a box (MAttNet-style
matching, CM-Erase) or that score them (weakly supervised localisation by CAM mass).

Two sources, chosen by `proposals.source` in params.yaml:
- `gt`: every annotated object of the image (the "ground-truth proposals" setting of the papers), written by
  the `prepare` stage as `<split>/candidates.json`, one list per row of `images.npy`;
- `detections`: a detector's output as a COCO results JSON (read with pycocotools `loadRes`), see
  `detection_candidates`.

Which candidate is the target is decided by geometry, the same way for both sources: the candidate with the
highest IoU with the target box, when that IoU is at least `match_iou` (0.5, the accuracy criterion);
otherwise the target is not among the candidates (-1) and no ranking can be right for that sample.
"""
from __future__ import annotations

import json
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
        return [{"ann_id": int(a), "category_id": int(c), "score": float(s), "bbox_xyxy": [float(v) for v in b]}
                for b, c, s, a in zip(self.boxes_xyxy, self.category_ids, self.scores, self.ann_ids)]

    @classmethod
    def from_json(cls, rows: list[dict], where: str) -> "ImageCandidates":
        try:
            boxes = np.asarray([r["bbox_xyxy"] for r in rows], dtype=np.float64).reshape(-1, 4)
            return cls(boxes, np.asarray([int(r["category_id"]) for r in rows], dtype=np.int64),
                       np.asarray([float(r["score"]) for r in rows], dtype=np.float64),
                       np.asarray([int(r["ann_id"]) for r in rows], dtype=np.int64))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: malformed candidate list ({type(err).__name__}: {err})") from None


def candidates_from_detections(rows: list[dict], where: str) -> ImageCandidates:
    """One image's detections in the COCO results format ({"bbox": [x, y, w, h], "category_id", "score"}, as
    a detector writes them), e.g. the `--candidates` file of `refvg predict`."""
    try:
        xywh = np.asarray([[float(v) for v in r["bbox"]] for r in rows], dtype=np.float64).reshape(-1, 4)
        cats = np.asarray([int(r.get("category_id", 0)) for r in rows], dtype=np.int64)
        scores = np.asarray([float(r.get("score", 1.0)) for r in rows], dtype=np.float64)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{where}: not a list of COCO detections ({type(err).__name__}: {err})") from None
    bad = np.flatnonzero(~(xywh[:, 2:] > 0).all(1))
    if bad.size:
        raise ValueError(f"{where}: detection {int(bad[0])} has a box of zero or negative size: {rows[bad[0]]['bbox']}")
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return ImageCandidates(boxes, cats, scores, np.full(len(boxes), -1, dtype=np.int64))


def gt_candidates(refer: ReferDataset, image_id: int, skips: SkipLog) -> ImageCandidates:
    """Every annotated object of the image. A box outside the image or of zero area (real COCO has a few) is
    dropped and counted in `skips`: it could never be the right answer, and it must not crash a ranking."""
    img = refer.coco.imgs[image_id]
    w, h = float(img["width"]), float(img["height"])
    boxes, cats, ann_ids = [], [], []
    for ann in refer.coco.imgToAnns.get(image_id, []):
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        box = [max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)]
        if not (box[2] > box[0] and box[3] > box[1]):
            skips.add("candidate_box_outside_image",
                      f"{refer.instances_path.name}: ann {ann['id']} (image {image_id}): bbox {ann['bbox']}")
            continue
        boxes.append(box)
        cats.append(int(ann["category_id"]))
        ann_ids.append(int(ann["id"]))
    return ImageCandidates(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(cats, dtype=np.int64),
                           np.ones(len(boxes)), np.asarray(ann_ids, dtype=np.int64))


def write_gt_candidates(split_dir: Path, image_ids: Sequence[int], refer: ReferDataset, skips: SkipLog) -> None:
    """`<split>/candidates.json`: the gt candidates of each image, in `images.npy` row order."""
    rows = [gt_candidates(refer, image_id, skips).to_json() for image_id in image_ids]
    (Path(split_dir) / CANDIDATES).write_text(json.dumps(rows), encoding="utf-8")


def read_gt_candidates(split_dir: Path) -> list[ImageCandidates]:
    path = Path(split_dir) / CANDIDATES
    if not path.exists():
        raise FileNotFoundError(f"{path}: no candidate boxes here; re-run the `prepare` stage")
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [ImageCandidates.from_json(r, f"{path}: image row {i}") for i, r in enumerate(rows)]


def match_target(candidates_xyxy: np.ndarray, target_xyxy: np.ndarray, match_iou: float = 0.5) -> int:
    """Index of the candidate that is the target (highest IoU, at least `match_iou`), or -1."""
    from refvg.metrics import box_iou

    if len(candidates_xyxy) == 0:
        return -1
    ious = np.asarray(box_iou(candidates_xyxy, np.broadcast_to(target_xyxy, candidates_xyxy.shape))).reshape(-1)
    best = int(ious.argmax())
    return best if ious[best] >= match_iou else -1


def load_candidates(pcfg: ProposalsConfig, split_dir: Path) -> list[ImageCandidates]:
    """The candidates of each image row of a prepared split, from the source params.yaml chooses."""
    if pcfg.source == "gt":
        return read_gt_candidates(split_dir)
    raise ValueError(f"proposals.source {pcfg.source!r} is not known")


def candidate_tensors(cands: ImageCandidates, lb: Letterbox, k: int, target_xyxy: np.ndarray | None = None,
                      match_iou: float = 0.5) -> dict[str, torch.Tensor]:
    """One sample's candidates as the fixed-size tensors a ranking model reads (see refvg.data.dataset): the
    `k` highest-scoring, letterboxed like the image; "cand_target" when the target box is known."""
    import torch

    from refvg.data.transforms import xyxy_to_cxcywh

    keep = np.argsort(-cands.scores, kind="stable")[:k]
    boxes, valid = torch.zeros(k, 4), torch.zeros(k, dtype=torch.bool)
    category = torch.zeros(k, dtype=torch.long)
    if len(keep):
        boxes[: len(keep)] = torch.from_numpy(xyxy_to_cxcywh(lb.box_to_square(cands.boxes_xyxy[keep]))).float()
        category[: len(keep)] = torch.from_numpy(cands.category_ids[keep])
        valid[: len(keep)] = True
    out = {"cand_boxes": boxes, "cand_valid": valid, "cand_category": category}
    if target_xyxy is not None:
        out["cand_target"] = torch.tensor(match_target(cands.boxes_xyxy[keep], target_xyxy, match_iou))
    return out


def candidate_batch(cands: ImageCandidates, lb: Letterbox, k: int) -> dict[str, torch.Tensor]:
    """A batch of one image's candidates, for inference on raw input."""
    return {name: t[None] for name, t in candidate_tensors(cands, lb, k).items()}
