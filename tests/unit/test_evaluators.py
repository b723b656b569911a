"""The evaluators (refvg.evaluation) on hand-made predictions with known answers, their composition,
which apply to which model, and the loop that feeds them
(refvg.engine.evaluator.inference_on_dataset)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from refvg.config import load_config
from refvg.data.transforms import Letterbox, xyxy_to_cxcywh
from refvg.engine.evaluator import inference_on_dataset
from refvg.evaluation import (
    BoxEvaluator,
    CandidateRecallEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    MaskEvaluator,
    MatchEvaluator,
    evaluators_for,
    flatten,
)

# A 200x100 image letterboxed into a 64 px square: content 64x32 at the top, padding below
# (normalised y > 0.5).
BOX_LB = Letterbox(200, 100, 64)
GT_BOXES = [[0, 0, 100, 50], [100, 50, 200, 100], [0, 0, 100, 100]]
# Normalised xyxy in the square. Sample 1 reaches into the padding: clipped to the image it is the
# target (IoU 1 in original pixels; 0.5 in the square, where the padding counts). Sample 2 covers
# half its target.
SQUARE_PRED = [[0.0, 0.0, 0.5, 0.25], [0.5, 0.25, 1.0, 0.75], [0.0, 0.0, 0.25, 0.5]]


class FakeSplit(torch.utils.data.Dataset):
    """What evaluators and the loop read of a PreparedSplit: letterboxes, records, gt_mask and
    items."""

    split = "val"

    def __init__(self, letterbox: Letterbox, boxes, masks=None):
        self.letterboxes = [letterbox] * len(boxes)
        self.records = [{"bbox_xyxy": b} for b in boxes]
        self.masks = masks

    def gt_mask(self, i: int) -> np.ndarray:
        return self.masks[i]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        size = self.letterboxes[i].size
        return {
            "image": torch.zeros(size, size, 3, dtype=torch.uint8),
            "pixel_mask": torch.zeros(size, size, dtype=torch.bool),
            "input_ids": torch.tensor([1, 2]),
            "attention_mask": torch.tensor([1, 1]),
            "index": torch.tensor(i),
        }


def _boxes(rows: list[int]) -> dict[str, torch.Tensor]:
    return {
        "pred_boxes": torch.from_numpy(
            xyxy_to_cxcywh(np.asarray([SQUARE_PRED[i] for i in rows]))
        ).float()
    }


def test_box_evaluator_scores_in_original_pixels_across_batches_in_any_order():
    ev = BoxEvaluator(FakeSplit(BOX_LB, GT_BOXES), thresholds=(0.5, 0.75))
    ev.process({"index": torch.tensor([2, 0])}, _boxes([2, 0]))
    ev.process({"index": torch.tensor([1])}, _boxes([1]))
    out = ev.evaluate()
    assert out["acc@0.5"] == 1.0 and out["acc@0.75"] == pytest.approx(2 / 3) and out["n"] == 3
    assert out["mean_iou"] == pytest.approx(2.5 / 3)
    assert out["acc@0.5:0.95"] == pytest.approx(
        (1 + 9 * 2 / 3) / 10
    )  # the ten COCO thresholds, always
    samples = ev.per_sample()
    np.testing.assert_allclose(
        samples["ious"], [0.5, 1.0, 1.0], atol=1e-6
    )  # in the order processed
    np.testing.assert_allclose(samples["gt_xyxy"], [GT_BOXES[2], GT_BOXES[0], GT_BOXES[1]])
    np.testing.assert_allclose(
        samples["pred_xyxy"][2], GT_BOXES[1], atol=1e-4
    )  # clipped to the image

    ev.reset()
    ev.process({"index": torch.tensor([2])}, _boxes([2]))
    assert ev.evaluate()["n"] == 1 and ev.evaluate()["acc@0.75"] == 0.0


# An 8x4 image in a 4 px square: content 4x2 (rows 0-1), rows 2-3 padding.
MASK_LB = Letterbox(8, 4, 4)


def _gt(cols: int) -> np.ndarray:
    m = np.zeros((4, 8), dtype=bool)
    m[:, :cols] = True
    return m


def _logits(left_cols: int) -> torch.Tensor:
    """Square logits: foreground in the content's first `left_cols` of 4 columns, and everywhere in
    the padding (which must never count)."""
    x = torch.full((4, 4), -10.0)
    x[:2, :left_cols] = 10.0
    x[2:] = 10.0
    return x


def test_mask_evaluator_gives_oiou_miou_and_precision_at_the_original_resolution():
    # predicted: the left half (16 px) twice, nothing once; targets: the left half, all 32 px, two
    # columns
    split = FakeSplit(MASK_LB, [[0, 0, 8, 4]] * 3, masks=[_gt(4), _gt(8), _gt(2)])
    ev = MaskEvaluator(split)
    ev.process(
        {"index": torch.tensor([0, 1])}, {"pred_masks": torch.stack([_logits(2), _logits(2)])}
    )
    ev.process({"index": torch.tensor([2])}, {"pred_masks": _logits(0)[None]})
    out = ev.evaluate()["mask"]
    assert out["oIoU"] == pytest.approx((16 + 16 + 0) / (16 + 32 + 8))  # IoUs 1, 0.5, 0
    assert out["mIoU"] == pytest.approx(0.5) and out["n"] == 3
    assert out["prec@0.5"] == pytest.approx(2 / 3) and out["prec@0.9"] == pytest.approx(1 / 3)
    assert ev.per_sample()["mask_inter"].tolist() == [16, 16, 0]
    assert ev.per_sample()["mask_union"].tolist() == [16, 32, 8]


def test_mask_evaluator_names_a_model_without_masks():
    ev = MaskEvaluator(FakeSplit(MASK_LB, [[0, 0, 8, 4]], masks=[_gt(4)]))
    with pytest.raises(ValueError, match="pred_masks"):
        ev.process({"index": torch.tensor([0])}, {"pred_boxes": torch.zeros(1, 4)})


def test_candidate_recall_evaluator():
    ev = CandidateRecallEvaluator()
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    ev.process({"cand_target": torch.tensor([0, -1]), "cand_valid": valid[:2]}, {})
    ev.process({"cand_target": torch.tensor([1]), "cand_valid": valid[2:]}, {})
    assert ev.evaluate() == {
        "candidates": {"target_recall": pytest.approx(2 / 3), "misses": 1, "mean_candidates": 2.0}
    }
    ev.reset()
    assert ev.evaluate() == {
        "candidates": {"target_recall": 0.0, "misses": 0, "mean_candidates": 0.0}
    }


def test_match_evaluator_counts_only_valid_negatives():
    ev = MatchEvaluator()
    # pairs: (2, match) right, (-1, match) wrong, (-3, mismatch) right; the second row's negative is
    # invalid
    ev.process(
        {},
        {
            "pos": torch.tensor([2.0, -1.0]),
            "neg": torch.tensor([-3.0, 1.0]),
            "neg_valid": torch.tensor([True, False]),
        },
    )
    out = ev.evaluate()

    def softplus(
        x: float,
    ) -> float:  # BCE of logit x: softplus(-x) for a match, softplus(x) for a mismatch
        return math.log1p(math.exp(x))

    assert out["match_acc"] == pytest.approx(2 / 3) and out["match_pairs"] == 3
    assert out["match_loss"] == pytest.approx((softplus(-2) + softplus(1) + softplus(-3)) / 3)


def test_combined_evaluators_merge_in_order_and_refuse_clashes():
    class Fixed(DatasetEvaluator):
        def __init__(self, result, forward=None, keys=()):
            self.result, self.forward, self.output_keys = result, forward, keys

        def evaluate(self):
            return self.result

    both = DatasetEvaluators(
        [
            Fixed({"a": 1}, keys=("pred_boxes",)),
            Fixed({"mask": {"oIoU": 0.5}}, keys=("pred_masks", "pred_boxes")),
        ]
    )
    assert list(both.evaluate()) == ["a", "mask"] and both.output_keys == (
        "pred_boxes",
        "pred_masks",
    )
    assert flatten(both.evaluate()) == {"a": 1, "mask/oIoU": 0.5}
    with pytest.raises(ValueError, match=r"the metric \['a'\]"):
        DatasetEvaluators([Fixed({"a": 1}), Fixed({"a": 2})]).evaluate()
    with pytest.raises(ValueError, match="disagree on forward"):
        DatasetEvaluators([Fixed({}), Fixed({}, forward="match_scores")])


@pytest.mark.parametrize(
    "model, validation, expected",
    [
        ("transvg", False, [BoxEvaluator]),
        ("cmsa", False, [BoxEvaluator, MaskEvaluator]),
        ("cmsa", True, [BoxEvaluator, MaskEvaluator]),
        ("mattnet", False, [BoxEvaluator, CandidateRecallEvaluator]),
        ("mattnet", True, [BoxEvaluator]),  # recall is the data's: not logged every epoch
        ("weak_cam", False, [BoxEvaluator, CandidateRecallEvaluator]),
        ("weak_cam", True, [MatchEvaluator]),  # its val split holds no box
    ],
)
def test_evaluators_follow_what_the_model_declares(model, validation, expected):
    cfg = load_config(Path(__file__).parents[2] / "params.yaml")
    found = evaluators_for(model, cfg, FakeSplit(BOX_LB, GT_BOXES), validation=validation)
    assert [type(e) for e in found.evaluators] == expected


class TableModel(torch.nn.Module):
    """Predicts SQUARE_PRED[index]; `match_scores` gives each row's index as its positive logit."""

    def __init__(self):
        super().__init__()
        self.table = torch.from_numpy(xyxy_to_cxcywh(np.asarray(SQUARE_PRED))).float()

    def forward(self, batch):
        assert not self.training  # the loop evaluates in eval mode
        return {"pred_boxes": self.table[batch["index"]], "unread": torch.zeros(1)}

    def match_scores(self, batch):
        pos = batch["index"].float() - 0.5
        return {"pos": pos, "neg": -pos, "neg_valid": torch.ones_like(pos, dtype=torch.bool)}


def test_inference_on_dataset_feeds_every_sample_and_restores_training_mode():
    model, split = TableModel().train(), FakeSplit(BOX_LB, GT_BOXES)
    boxes = BoxEvaluator(split)
    out = inference_on_dataset(
        model,
        split,
        DatasetEvaluators([boxes]),
        batch_size=2,
        device=torch.device("cpu"),
        amp="off",
    )
    assert out["n"] == 3 and out["mean_iou"] == pytest.approx(2.5 / 3) and model.training
    np.testing.assert_allclose(
        boxes.per_sample()["ious"], [1.0, 1.0, 0.5], atol=1e-6
    )  # the split's order

    seen = []

    class Order(MatchEvaluator):
        def process(self, inputs, outputs):
            seen.extend(inputs["index"].tolist())
            super().process(inputs, outputs)

    out = inference_on_dataset(
        model, split, Order(seed=3), batch_size=2, device=torch.device("cpu"), amp="off"
    )
    assert (
        sorted(seen) == [0, 1, 2]
        and seen == torch.randperm(3, generator=torch.Generator().manual_seed(3)).tolist()
    )
    assert out["match_pairs"] == 6 and out["match_acc"] == pytest.approx(
        4 / 6
    )  # index 0: both of its pairs wrong
