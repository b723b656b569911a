"""Candidate boxes: what `prepare` writes, how a split hands them to a ranking model, which one is
the target."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from refvg.config import load_config
from refvg.data.dataset import PreparedSplit, collate
from refvg.data.prepare import prepared_path
from refvg.data.proposals import (
    CANDIDATES,
    ImageCandidates,
    candidates_from_detections,
    match_target,
    read_gt_candidates,
)
from refvg.data.refer import ReferDataset
from refvg.data.transforms import cxcywh_to_xyxy


def test_prepare_writes_every_object_of_each_image(in_tiny):
    cfg = load_config("params.yaml")
    refer = ReferDataset(cfg.data.root, cfg.data.dataset, image_dir=cfg.data.image_dir)
    split = PreparedSplit(prepared_path(cfg), "val")
    per_image = read_gt_candidates(split.split_dir)
    assert len(per_image) == split.images.shape[0]
    for rec in split.records:
        cands = per_image[rec["image_index"]]
        anns = refer.coco.imgToAnns[rec["image_id"]]
        assert sorted(cands.ann_ids.tolist()) == sorted(a["id"] for a in anns)
        row = cands.ann_ids.tolist().index(rec["ann_id"])
        np.testing.assert_allclose(cands.boxes_xyxy[row], rec["bbox_xyxy"])
        assert cands.category_ids[row] == rec["category_id"]


def test_split_items_carry_padded_candidates_and_the_target(in_tiny):
    cfg = load_config("params.yaml")
    prepared = prepared_path(cfg)
    per_image = read_gt_candidates(prepared / "val")
    split = PreparedSplit(prepared, "val", candidates=per_image, max_candidates=6)
    batch = collate([split[i] for i in range(4)])
    assert batch["cand_boxes"].shape == (4, 6, 4) and batch["cand_valid"].shape == (4, 6)
    for b in range(4):
        n = len(per_image[split.records[b]["image_index"]])
        assert batch["cand_valid"][b].sum() == min(n, 6)
        t = int(batch["cand_target"][b])
        # The target's candidate is the target box (gt proposals), in the same square frame as
        # "box".
        torch.testing.assert_close(batch["cand_boxes"][b, t], batch["box"][b], atol=1e-5, rtol=0)
        assert (cxcywh_to_xyxy(batch["cand_boxes"][b, :n]) >= -1e-6).all()


def test_target_outside_the_kept_candidates_is_minus_one(in_tiny):
    cfg = load_config("params.yaml")
    prepared = prepared_path(cfg)
    split = PreparedSplit(prepared, "val")
    rec = split.records[0]
    # One image's list holds only a far-away box: the target cannot be ranked first, and says so.
    far = ImageCandidates(
        np.array([[0.0, 0.0, 1.0, 1.0]]), np.array([1]), np.array([1.0]), np.array([-1])
    )
    lists = [far] * split.images.shape[0]
    split = PreparedSplit(prepared, "val", candidates=lists, max_candidates=3)
    assert int(split[0]["cand_target"]) == -1 and int(split[0]["cand_valid"].sum()) == 1
    assert match_target(np.array([rec["bbox_xyxy"]]), np.array(rec["bbox_xyxy"])) == 0


def test_match_target_takes_the_best_overlap_above_the_threshold():
    target = np.array([10.0, 10.0, 20.0, 20.0])
    cands = np.array([[0, 0, 5, 5], [11, 11, 21, 21], [10, 10, 19, 20]], dtype=float)
    assert match_target(cands, target) == 2  # IoU 0.9 beats 0.68
    assert match_target(cands[:1], target) == -1
    assert match_target(np.zeros((0, 4)), target) == -1
    assert match_target(cands[1:2], target, match_iou=0.7) == -1


def test_malformed_candidate_file_names_the_row(in_tiny, tmp_path):
    cfg = load_config("params.yaml")
    rows = json.loads((prepared_path(cfg) / "val" / CANDIDATES).read_text())
    del rows[1][0]["bbox_xyxy"]
    (tmp_path / CANDIDATES).write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"candidates.json: image row 1: malformed"):
        read_gt_candidates(tmp_path)


def test_detections_in_coco_results_format():
    dets = [
        {"bbox": [10, 20, 30, 40], "category_id": 3, "score": 0.9},
        {"bbox": [0, 0, 5, 5], "category_id": 1, "score": 0.2},
    ]
    c = candidates_from_detections(dets, "dets.json")
    np.testing.assert_allclose(c.boxes_xyxy, [[10, 20, 40, 60], [0, 0, 5, 5]])
    assert (
        c.category_ids.tolist() == [3, 1]
        and c.scores.tolist() == [0.9, 0.2]
        and (c.ann_ids == -1).all()
    )
    with pytest.raises(ValueError, match=r"dets.json: detection 1 has a box of zero"):
        candidates_from_detections([dets[0], {"bbox": [0, 0, 0, 5]}], "dets.json")
    with pytest.raises(ValueError, match=r"dets.json: not a list of COCO detections"):
        candidates_from_detections([{"box": [0, 0, 1, 1]}], "dets.json")
