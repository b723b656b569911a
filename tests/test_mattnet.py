"""MAttNet + CM-Erase: RoI align on a hand case, the modules' shapes, the erasing (the erased input lacks exactly
the most attended word / region), the ranking loss, and candidates from a detections file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from refvg import stages
from refvg.config import Config, DetectionsConfig, load_config
from refvg.data.dataset import PreparedSplit
from refvg.data.detections import detection_recall, stand_in_detections
from refvg.data.prepare import prepared_path
from refvg.data.proposals import detection_candidates, read_detections
from refvg.models.mattnet import (
    MAttNet, candidate_cross_entropy, erase_cells, erase_contexts, erase_words, ranking_loss, real_words, roi_align,
)
from tests.conftest import TINY

MASK_ID = 4  # [MASK] of the locally built tokenizer (refvg.data.text.SPECIAL_TOKENS)


def test_roi_align_matches_a_hand_computed_case():
    # A map whose value is its column index (x ramp) or row index (y ramp): bilinear sampling of a linear
    # function is exact, so a bin's value is (its mean sample position) * 8 - 0.5 (pixel centres at j + 0.5).
    xs = torch.arange(8.0).expand(8, 8)
    fmap = torch.stack([xs, xs.T])[None]  # [1, 2, 8, 8]: channel 0 = x, channel 1 = y
    boxes = torch.tensor([[[0.25, 0.25, 0.75, 0.75], [0.0, 0.5, 1.0, 1.0]]])
    out = roi_align(fmap, boxes, size=2, samples=2)
    assert out.shape == (1, 2, 2, 2, 2)
    # box 0, x bins [0.25, 0.5] and [0.5, 0.75]: samples at 0.3125, 0.4375 -> 2.5 and 0.5625, 0.6875 -> 4.5
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([[2.5, 4.5], [2.5, 4.5]]))
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([[2.5, 2.5], [4.5, 4.5]]))
    # box 1, y from 0.5 to 1: bins [0.5, 0.75] -> 4.5 and [0.75, 1] -> samples 0.8125, 0.9375 -> 6.5
    torch.testing.assert_close(out[0, 1, 1], torch.tensor([[4.5, 4.5], [6.5, 6.5]]))
    torch.testing.assert_close(out[0, 1, 0], torch.tensor([[1.5, 5.5], [1.5, 5.5]]))  # x: 0.125..0.375 and 0.625..0.875


def _tiny_cfg(**mattnet) -> Config:
    raw = {"model": {**TINY["model"], "mattnet": {"d_model": 16, **mattnet}}, "data": {"image_size": 64}}
    return Config.model_validate(raw)


def _batch(b: int = 4, k: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(b, k, 2, generator=g) * 0.6 + 0.2
    size = torch.rand(b, k, 2, generator=g) * 0.15 + 0.15
    valid = torch.ones(b, k, dtype=torch.bool)
    valid[0, 3:] = False  # padding candidates
    ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 13, 14, 3, 0, 0], [2, 15, 16, 17, 18, 3], [2, 19, 3, 0, 0, 0]])[:b]
    return {
        "image": torch.randn(b, 3, 64, 64, generator=g), "pixel_mask": torch.zeros(b, 64, 64, dtype=torch.bool),
        "input_ids": ids, "attention_mask": (ids != 0).long(),
        "cand_boxes": torch.cat([centre, size], -1), "cand_valid": valid,
        "cand_category": torch.randint(1, 4, (b, k), generator=g), "cand_target": torch.tensor([1, 0, -1, 4])[:b],
    }


def _model(**mattnet) -> MAttNet:
    torch.manual_seed(0)
    model = MAttNet(_tiny_cfg(**mattnet), vocab_size=50, pad_token_id=0)
    model.erase_token_id = MASK_ID
    return model


def test_modules_shapes_prediction_and_loss():
    model, batch = _model(), _batch()
    model.eval()
    out = model(batch)
    b, k = batch["cand_valid"].shape
    assert out["scores"].shape == (b, k) and out["module_scores"].shape == (b, k, 3)
    assert out["cell_attention"].shape == (b, k, 9) and out["context_scores"].shape == (b, k, 5)
    torch.testing.assert_close(out["module_weights"].sum(1), torch.ones(b))
    assert (out["best"][0] < 3).all()  # a padding candidate is never chosen
    torch.testing.assert_close(out["pred_boxes"], batch["cand_boxes"][torch.arange(b), out["best"]])
    # attention only on the expression's words, never on [CLS], [SEP] or padding
    words = real_words(batch["input_ids"], batch["attention_mask"])
    assert (out["word_attention"][~words] == 0).all()
    torch.testing.assert_close(out["word_attention"].sum(1), torch.ones(b))

    model.train()
    losses = model.compute_loss(model(batch), batch)
    assert set(losses) == {"loss", "ce", "rank", "erased_ce", "erased_rank", "auxiliary"}
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for name in ("cell.weight", "location_out.0.weight", "context_out.0.weight", "language.attend.weight",
                 "visual.body.embedder.embedder.convolution.weight", "text.body.embeddings.word_embeddings.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_cross_entropy_ignores_samples_whose_target_is_missing():
    logits = torch.tensor([[2.0, 0.0, 5.0], [0.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    ce = candidate_cross_entropy(logits, valid, torch.tensor([0, -1]))
    torch.testing.assert_close(ce, -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0])  # padding excluded
    assert candidate_cross_entropy(logits, valid, torch.tensor([-1, -1])) == 0


def test_ranking_loss_on_a_hand_case():
    pos = torch.tensor([0.5, 0.2, 0.9])
    neg_expression = torch.tensor([0.45, -0.5, 5.0])
    neg_image = torch.tensor([0.1, 0.3, 5.0])
    keep = torch.tensor([True, True, False])  # the third has no target: not counted
    # sample 0: max(0, .1 - .5 + .45) + max(0, .1 - .5 + .1) = .05; sample 1: 0 + max(0, .1 - .2 + .3) = .2
    torch.testing.assert_close(ranking_loss(pos, neg_expression, neg_image, keep, 0.1), torch.tensor(0.125))
    met = ranking_loss(torch.tensor([1.0, 0.8]), torch.tensor([0.5, 0.7]), torch.tensor([0.2, 0.69]),
                       torch.tensor([True, True]), 0.1)
    assert met == 0  # every positive beats every negative by more than the margin
    assert ranking_loss(pos, neg_expression, neg_image, torch.zeros(3, dtype=torch.bool), 0.1) == 0


def test_erase_helpers_remove_exactly_the_argmax():
    ids = torch.tensor([[2, 10, 11, 3], [2, 12, 13, 3]])
    att = torch.tensor([[0.0, 0.3, 0.7, 0.0], [0.0, 0.6, 0.4, 0.0]])
    erased = erase_words(ids, att, torch.tensor([True, False]), MASK_ID)
    assert erased.tolist() == [[2, 10, MASK_ID, 3], [2, 12, 13, 3]] and ids[0, 2] == 11  # input untouched

    rois = torch.rand(2, 3, 4, 9) + 1  # no zeros to begin with
    cells = torch.rand(2, 3, 9)
    out = erase_cells(rois, cells, torch.tensor([True, False]))
    zero = (out == 0).all(2)  # [B,K,cells]
    assert (zero[0] == torch.nn.functional.one_hot(cells[0].argmax(-1), 9).bool()).all()
    kept = ~zero[:, :, None, :].expand_as(out)
    assert not zero[1].any() and torch.equal(out[kept], rois[kept])

    ctx = torch.rand(2, 3, 5, 7) + 1
    scores = torch.rand(2, 3, 5)
    scores[0, :, 0] = -float("inf")  # not a context object: never the erased one
    out = erase_contexts(ctx, scores, torch.tensor([True, True]))
    zero = (out == 0).all(-1)
    assert (zero == torch.nn.functional.one_hot(scores.argmax(-1), 5).bool()).all() and not zero[0, :, 0].any()


def _spy_training_step(model: MAttNet, batch: dict) -> tuple[dict, list, list]:
    """One training forward, recording what the text encoder and the scorer were given."""
    texts, scored = [], []
    encode, score = model.encode_language, model.score
    model.encode_language = lambda ids, mask: texts.append(ids.clone()) or encode(ids, mask)
    model.score = lambda vis, lang: scored.append({k: v.clone() for k, v in vis.items()}) or score(vis, lang)
    model.train()
    out = model(batch)
    return out, texts, scored


def test_language_erasing_masks_the_most_attended_word():
    model, batch = _model(erase={"type": "language", "rate": 1.0}), _batch()
    out, texts, _ = _spy_training_step(model, batch)
    assert len(texts) == 2  # the sample, then its erased copy
    erased, original = texts[1], batch["input_ids"][out["erased_rows"]]
    top = out["word_attention"][out["erased_rows"]].argmax(1)
    rows = torch.arange(len(top))
    assert (erased[rows, top] == MASK_ID).all() and (original[rows, top] != MASK_ID).all()
    assert real_words(batch["input_ids"], batch["attention_mask"])[out["erased_rows"]][rows, top].all()  # a word
    changed = erased != original
    assert changed.sum() == len(top) and changed[rows, top].all()  # nothing else changed


def test_visual_erasing_zeroes_the_most_attended_region_or_context():
    model, batch = _model(erase={"type": "visual", "rate": 1.0}), _batch(seed=1)
    out, _, scored = _spy_training_step(model, batch)
    original, erased = scored[0], scored[3]  # the sample, its mismatched pairs (2), then the erased copy
    rows = out["erased_rows"]
    w = out["module_weights"][rows]
    on_subject = w[:, 0] >= w[:, 2]
    for i, r in enumerate(rows.tolist()):
        if on_subject[i]:  # the subject module outweighs the relation module: its top cell, per candidate
            top = out["cell_attention"][r].argmax(-1)  # [K]
            dropped = torch.zeros_like(erased["rois"][i], dtype=torch.bool)
            dropped[torch.arange(len(top)), :, top] = True
            assert (erased["rois"][i][dropped] == 0).all() and (original["rois"][r][dropped] != 0).any()
            assert torch.equal(erased["rois"][i][~dropped], original["rois"][r][~dropped])
            assert torch.equal(erased["contexts"][i], original["contexts"][r])
        else:  # its top context object, per candidate
            top = out["context_scores"][r].argmax(-1)
            dropped = torch.zeros_like(erased["contexts"][i], dtype=torch.bool)
            dropped[torch.arange(len(top)), top] = True
            assert (erased["contexts"][i][dropped] == 0).all()
            assert torch.equal(erased["contexts"][i][~dropped], original["contexts"][r][~dropped])
            assert torch.equal(erased["rois"][i], original["rois"][r])
    assert on_subject.any()  # the case the loop checks first must occur (seeded)


def test_no_erase_is_the_ablation():
    model, batch = _model(erase={"type": "none"}), _batch()
    out, texts, scored = _spy_training_step(model, batch)
    assert len(texts) == 1 and len(scored) == 3 and "erased_logits" not in out
    assert model.compute_loss(out, batch)["erased_ce"] == 0


# ------------------------------------------------------------------------------------------- detections

def _gt_rows(cfg, split_dir) -> list[dict]:
    """A 'perfect detector': every gt object of the split's images as a COCO result row."""
    from pycocotools.coco import COCO

    coco = COCO(str(stages.instances_path(cfg)))
    images = {r["image_id"] for r in json.loads((split_dir / "samples.json").read_text())}
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9,
             "ann_id": a["id"]}
            for a in coco.dataset["annotations"] if a["image_id"] in images]


def test_detections_file_gives_candidates_and_a_missing_target_is_a_miss(in_tiny):
    cfg = load_config("params.yaml")
    split_dir = prepared_path(cfg) / "val"
    rows = _gt_rows(cfg, split_dir)
    split = PreparedSplit(prepared_path(cfg), "val")
    target = split.records[0]
    # the detector misses sample 0's target; an image the dataset lacks is skipped
    rows = [r for r in rows if r["ann_id"] != target["ann_id"]]  # extra keys are allowed (and ignored)
    rows.append({"image_id": 10**9, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5})
    path = in_tiny / "dets.json"
    path.write_text(json.dumps(rows))
    cands = detection_candidates(path, stages.instances_path(cfg), split_dir)
    ds = PreparedSplit(prepared_path(cfg), "val", candidates=cands)
    found = ds.candidates["cand_target"] >= 0
    same_ref = [i for i, r in enumerate(ds.records) if r["ann_id"] == target["ann_id"]]
    assert not found[same_ref].any() and found.sum() == len(ds) - len(same_ref)
    assert (ds.candidates["cand_category"][ds.candidates["cand_valid"]] > 0).all()
    m = stages.candidate_metrics(ds)
    assert m["misses"] == len(same_ref) and m["target_recall"] == pytest.approx(1 - len(same_ref) / len(ds))


@pytest.mark.parametrize("row, message", [
    ({"image_id": 1, "category_id": 1, "score": 0.5}, "detection row 1: missing bbox"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, "x", 1], "score": 0.5}, "detection row 1: could not convert"),
    ({"image_id": 1.5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}, "detection row 1: expected an integer"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 0.5}, "detection row 1: bbox must be 4"),
])
def test_bad_detection_row_names_the_file_and_row(tmp_path, row, message):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}, row]))
    with pytest.raises(ValueError, match=f"dets.json: {message}"):
        read_detections(path)


def test_stand_in_detections_are_seeded_and_imperfect(in_tiny):
    cfg = load_config("params.yaml")
    dcfg = DetectionsConfig(drop_rate=0.2, false_positives=2)
    rows = stand_in_detections(stages.instances_path(cfg), dcfg)
    assert rows == stand_in_detections(stages.instances_path(cfg), dcfg)
    assert rows != stand_in_detections(stages.instances_path(cfg), dcfg.model_copy(update={"seed": 1}))
    scores = np.array([r["score"] for r in rows])
    assert (scores < dcfg.true_score_min).sum() >= 2 * 48 * 0.9  # the false positives, scored lower
    recall = detection_recall(stages.instances_path(cfg), rows)["object_recall"]
    assert 0.5 < recall < 0.9  # some objects dropped or badly localised, most found
    perfect = detection_recall(stages.instances_path(cfg), stand_in_detections(
        stages.instances_path(cfg), DetectionsConfig(jitter=0.0, drop_rate=0.0, false_positives=0)))
    assert perfect["object_recall"] == 1.0


def test_grounder_picks_one_of_the_given_detections(in_tiny, tmp_path):
    from PIL import Image

    from refvg.data.proposals import candidates_from_detections
    from refvg.engine.predict import Grounder
    from tests.conftest import untrained_checkpoint

    cfg = load_config("params.yaml")
    grounder = Grounder(untrained_checkpoint(cfg, tmp_path / "ckpt", "mattnet"), device="cpu")
    image = Image.new("RGB", (120, 80), (200, 200, 200))
    dets = [{"bbox": [5, 5, 30, 20], "category_id": 1, "score": 0.9},
            {"bbox": [60, 30, 40, 40], "category_id": 2, "score": 0.8}]
    box = grounder.ground(image, "the red circle", candidates_from_detections(dets, "dets")).box_xyxy
    given = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)]
    assert any(np.allclose(box, g, atol=1e-3) for g in given)  # in the image's own pixels


def test_new_detections_change_only_the_stamps_of_methods_that_rank_them(in_tiny):
    from tests.conftest import write_params

    methods = {"transvg": {"model": "transvg"}, "mattnet_erase": {"model": "mattnet"},
               "mattnet_erase_det": {"model": "mattnet", "overrides": {"proposals": {
                   "source": "detections", "detections_file": "dets/refshapes.json"}}}}

    def stamps(**detections) -> dict:  # (not under data/: that is the session's shared tiny dataset)
        write_params(in_tiny, methods=methods, detections={"dir": "dets", **detections})
        stages.detections(load_config("params.yaml"))
        return {m: (in_tiny / "dets/methods" / f"{m}.json").read_bytes() for m in methods}

    before, after = stamps(seed=0), stamps(seed=1)
    assert after["mattnet_erase_det"] != before["mattnet_erase_det"]  # dvc.yaml: its training reruns
    assert after["transvg"] == before["transvg"] and after["mattnet_erase"] == before["mattnet_erase"]  # theirs not
