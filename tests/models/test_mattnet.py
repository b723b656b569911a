"""MAttNet + CM-Erase: RoI align on a hand case, the modules' shapes, the erasing (what is erased is
drawn from the attention, over the subject, location and relation modules; argmax as an option), the
losses, the category input (off: the output ignores candidate categories), and candidates from a
(stand-in) detections file."""

from __future__ import annotations

import dataclasses
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
from refvg.evaluation import CandidateRecallEvaluator
from refvg.models.mattnet import (
    MAttNet,
    candidate_cross_entropy,
    choose,
    erase_cells,
    erase_items,
    erase_words,
    ranking_loss,
    real_words,
    roi_align,
)
from tests.helpers import TINY

MASK_ID = 4  # [MASK] of the locally built tokenizer (refvg.data.text.SPECIAL_TOKENS)


def test_roi_align_matches_a_hand_computed_case():
    # A map whose value is its column index (x ramp) or row index (y ramp): bilinear sampling of a
    # linear function is exact, so a bin's value is (its mean sample position) * 8 - 0.5 (pixel
    # centres at j + 0.5).
    xs = torch.arange(8.0).expand(8, 8)
    fmap = torch.stack([xs, xs.T])[None]  # [1, 2, 8, 8]: channel 0 = x, channel 1 = y
    boxes = torch.tensor([[[0.25, 0.25, 0.75, 0.75], [0.0, 0.5, 1.0, 1.0]]])
    out = roi_align(fmap, boxes, size=2, samples=2)
    assert out.shape == (1, 2, 2, 2, 2)
    # box 0, x bins [0.25, 0.5] and [0.5, 0.75]: samples at 0.3125, 0.4375 -> 2.5 and 0.5625, 0.6875
    # -> 4.5
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([[2.5, 4.5], [2.5, 4.5]]))
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([[2.5, 2.5], [4.5, 4.5]]))
    # box 1, y from 0.5 to 1: bins [0.5, 0.75] -> 4.5 and [0.75, 1] -> samples 0.8125, 0.9375 -> 6.5
    torch.testing.assert_close(out[0, 1, 1], torch.tensor([[4.5, 4.5], [6.5, 6.5]]))
    torch.testing.assert_close(
        out[0, 1, 0], torch.tensor([[1.5, 5.5], [1.5, 5.5]])
    )  # x: 0.125..0.375 and 0.625..0.875


def _tiny_cfg(**mattnet) -> Config:
    raw = {
        "model": TINY["model"],
        "data": {"image_size": 64},
        "method": {"model": "mattnet", "config": {"d_model": 16, **mattnet}},
    }
    return Config.model_validate(raw)


def _batch(b: int = 4, k: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(b, k, 2, generator=g) * 0.6 + 0.2
    size = torch.rand(b, k, 2, generator=g) * 0.15 + 0.15
    valid = torch.ones(b, k, dtype=torch.bool)
    valid[0, 3:] = False  # padding candidates
    ids = torch.tensor(
        [[2, 10, 11, 12, 3, 0], [2, 13, 14, 3, 0, 0], [2, 15, 16, 17, 18, 3], [2, 19, 3, 0, 0, 0]]
    )[:b]
    return {
        "image": torch.randn(b, 3, 64, 64, generator=g),
        "pixel_mask": torch.zeros(b, 64, 64, dtype=torch.bool),
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "cand_boxes": torch.cat([centre, size], -1),
        "cand_valid": valid,
        "cand_category": torch.randint(1, 4, (b, k), generator=g),
        "cand_target": torch.tensor([1, 0, -1, 4])[:b],
    }


def _model(**mattnet) -> MAttNet:
    torch.manual_seed(0)
    model = MAttNet.from_config(_tiny_cfg(**mattnet), vocab_size=50, pad_token_id=0)
    model.erase_token_id = MASK_ID
    return model


def test_modules_shapes_prediction_and_loss():
    model, batch = _model(), _batch()
    model.eval()
    out = model(batch)
    b, k = batch["cand_valid"].shape
    assert out.scores.shape == (b, k) and out.module_scores.shape == (b, k, 3)
    assert out.cell_attention.shape == (b, k, 9) and out.context_attention.shape == (b, k, 5)
    assert out.location_attention.shape == (b, k, 6)  # own geometry + 5 neighbours' offsets
    torch.testing.assert_close(out.module_weights.sum(1), torch.ones(b))
    assert (out.best[0] < 3).all()  # a padding candidate is never chosen
    torch.testing.assert_close(out.pred_boxes, batch["cand_boxes"][torch.arange(b), out.best])
    # attention only on the expression's words, never on [CLS], [SEP] or padding
    words = real_words(batch["input_ids"], batch["attention_mask"])
    assert (out.word_attention[~words] == 0).all()
    torch.testing.assert_close(out.word_attention.sum(1), torch.ones(b))
    # location and relation attention: only over real neighbours / context objects (sample 0 has 3
    # candidates)
    assert (out.location_attention[0, :3, 3:] == 0).all()
    assert (out.context_attention[0, :3, 2:] == 0).all()
    torch.testing.assert_close(out.location_attention.sum(-1), torch.ones(b, k))
    torch.testing.assert_close(out.context_attention[1:].sum(-1), torch.ones(b - 1, k))

    model.train()
    losses = model.compute_loss(model(batch), batch)
    assert set(losses) == {"loss", "ce", "rank", "erased_ce", "erased_rank", "auxiliary"}
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for name in (
        "cell.weight",
        "location_out.0.weight",
        "location_attend_offset.0.weight",
        "context_in.weight",
        "context_attend.0.weight",
        "language.attend.weight",
        "visual.body.embedder.embedder.convolution.weight",
        "text.body.embeddings.word_embeddings.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_cross_entropy_ignores_samples_whose_target_is_missing():
    logits = torch.tensor([[2.0, 0.0, 5.0], [0.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    ce = candidate_cross_entropy(logits, valid, torch.tensor([0, -1]))
    torch.testing.assert_close(
        ce, -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0]
    )  # padding excluded
    assert candidate_cross_entropy(logits, valid, torch.tensor([-1, -1])) == 0


def test_ranking_loss_on_a_hand_case():
    pos = torch.tensor([0.5, 0.2, 0.9])
    neg_expression = torch.tensor([0.45, -0.5, 5.0])
    neg_image = torch.tensor([0.1, 0.3, 5.0])
    keep = torch.tensor([True, True, False])  # the third has no target: not counted
    # sample 0: max(0, .1 - .5 + .45) + max(0, .1 - .5 + .1) = .05; sample 1: 0 + max(0, .1 - .2 +
    # .3) = .2
    torch.testing.assert_close(
        ranking_loss(pos, neg_expression, neg_image, keep, 0.1), torch.tensor(0.125)
    )
    # one negative only (an erased copy's term): sample 0 .05, sample 1 0 / sample 0 0, sample 1 .2
    one = ranking_loss(pos, neg_expression, None, keep, 0.1)
    torch.testing.assert_close(one, torch.tensor(0.025))
    torch.testing.assert_close(ranking_loss(pos, None, neg_image, keep, 0.1), torch.tensor(0.1))
    met = ranking_loss(
        torch.tensor([1.0, 0.8]),
        torch.tensor([0.5, 0.7]),
        torch.tensor([0.2, 0.69]),
        torch.tensor([True, True]),
        0.1,
    )
    assert met == 0  # every positive beats every negative by more than the margin
    assert ranking_loss(pos, neg_expression, neg_image, torch.zeros(3, dtype=torch.bool), 0.1) == 0


# ------------------------------------------------------------------------------------------ erasing

DRAWS = 4000  # rows drawn at once: a frequency's standard error is at most 0.008


def _frequencies(index: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(index.flatten(), minlength=n).float() / index.numel()


def test_choose_draws_in_proportion_and_never_a_zero_weight():
    torch.manual_seed(0)
    w = torch.tensor([0.0, 0.1, 0.3, 0.6, 0.0])
    idx, has = choose(w.expand(DRAWS, 5))
    assert has.all()
    freq = _frequencies(idx, 5)
    assert freq[0] == 0 and freq[4] == 0
    torch.testing.assert_close(freq, w, atol=0.04, rtol=0)
    idx, has = choose(torch.tensor([[0.2, 0.5, 0.3], [0.0, 0.0, 0.0]]), "argmax")
    assert idx.tolist() == [1, 0] and has.tolist() == [True, False]  # empty row: nothing to choose
    idx, has = choose(torch.zeros(3, 4))
    assert not has.any()
    with pytest.raises(ValueError, match="sample' or 'argmax"):
        choose(w, "max")


def test_erased_words_follow_the_word_attention():
    torch.manual_seed(0)
    ids = torch.tensor([2, 10, 11, 12, 3, 0]).expand(DRAWS, 6)
    att = torch.tensor([0.0, 0.2, 0.0, 0.8, 0.0, 0.0])  # word 11: unattended; [CLS], [SEP], pad: 0
    rows = torch.ones(DRAWS, dtype=torch.bool)
    rows[-1] = False  # not erased
    erased = erase_words(ids, att.expand(DRAWS, 6), rows, MASK_ID)
    changed = erased != ids
    assert (changed.sum(1)[:-1] == 1).all() and not changed[-1].any()  # one word per erased row
    assert (erased[changed] == MASK_ID).all() and ids[0, 1] == 10  # the input is untouched
    freq = changed[:-1].float().mean(0)
    assert freq[2] == 0 and freq[[0, 4, 5]].sum() == 0  # zero weight: never erased
    torch.testing.assert_close(freq, att, atol=0.04, rtol=0)
    argmax = erase_words(ids[:2], att.expand(2, 6), torch.tensor([True, True]), MASK_ID, "argmax")
    assert argmax.tolist() == [[2, 10, 11, MASK_ID, 3, 0]] * 2


def test_erased_cells_follow_the_cell_attention_window_by_window():
    torch.manual_seed(0)
    rois = torch.rand(DRAWS, 2, 4, 9) + 1  # no zeros to begin with; 2 candidates, 3x3 cells
    att = torch.zeros(DRAWS, 2, 9)
    att[:, 0, [0, 4, 8]] = torch.tensor([0.5, 0.3, 0.2])  # candidate 0: the diagonal
    att[:, 1, 5] = 1.0  # candidate 1: one cell
    rows = torch.ones(DRAWS, dtype=torch.bool)
    rows[0] = False
    out = erase_cells(rois, att, rows)
    zero = (out == 0).all(2)  # [B,K,cells]
    assert not zero[0].any() and (zero[1:].sum(-1) == 1).all()  # 1 cell per candidate, erased rows
    kept = ~zero[:, :, None, :].expand_as(out)
    assert torch.equal(out[kept], rois[kept])  # nothing else changes
    torch.testing.assert_close(zero[1:, 0].float().mean(0), att[0, 0], atol=0.04, rtol=0)
    assert zero[1:, 1, 5].all()
    # 2x2 windows: drawn in proportion to the window averages of the attention (the official rule)
    out = erase_cells(rois, att, rows, window=2)
    zero = (out == 0).all(2)[1:, 0].view(-1, 3, 3)
    assert (zero.flatten(1).sum(1) == 4).all()
    corners = [zero[:, :2, :2], zero[:, :2, 1:], zero[:, 1:, :2], zero[:, 1:, 1:]]  # TL, TR, BL, BR
    corner = torch.stack([c.all((1, 2)) for c in corners], 1).float().mean(0)
    # the windows hold attention .8, .3, .3 and .5: drawn with probabilities .8/1.9, .3/1.9, ...
    expect = torch.tensor([0.8, 0.3, 0.3, 0.5]) / 1.9
    torch.testing.assert_close(corner, expect, atol=0.04, rtol=0)
    argmax = (erase_cells(rois[:2], att[:2], rows[:2] | True, rule="argmax") == 0).all(2)
    assert argmax[:, 0, 0].all() and argmax[:, 1, 5].all() and argmax.sum() == 4


def test_erased_items_follow_their_attention_and_skip_non_items():
    torch.manual_seed(0)
    items = torch.rand(DRAWS, 1, 4, 7) + 1
    att = torch.tensor([0.1, 0.0, 0.6, 0.3]).expand(DRAWS, 1, 4)  # item 1: padding
    out = erase_items(items, att, torch.ones(DRAWS, dtype=torch.bool))
    zero = (out == 0).all(-1)[:, 0]  # [B,M]
    assert (zero.sum(1) == 1).all() and not zero[:, 1].any()
    torch.testing.assert_close(zero.float().mean(0), att[0, 0], atol=0.04, rtol=0)
    # a candidate without any item keeps everything
    none = erase_items(items[:2], torch.zeros(2, 1, 4), torch.tensor([True, True]))
    assert torch.equal(none, items[:2])


def _spy_training_step(model: MAttNet, batch: dict) -> tuple[dict, list, list]:
    """One training forward, recording what the text encoder and the scorer were given."""
    texts, scored = [], []
    encode, score = model.encode_language, model.score
    model.encode_language = lambda ids, mask: texts.append(ids.clone()) or encode(ids, mask)
    model.score = lambda vis, lang: (
        scored.append({k: v.clone() for k, v in vis.items()}) or score(vis, lang)
    )
    model.train()
    out = model(batch)
    return out, texts, scored


def test_language_copy_masks_a_word_drawn_from_the_attention():
    model, batch = _model(erase={"type": "language", "rate": 1.0}), _batch()
    torch.manual_seed(0)
    out, texts, scored = _spy_training_step(model, batch)
    assert len(texts) == 2 and len(scored) == 3 + 2  # sample + its pairs, then copy + its one pair
    erased, original = texts[1], batch["input_ids"][out.erased_rows]
    changed = erased != original
    words = real_words(batch["input_ids"], batch["attention_mask"])[out.erased_rows]
    long_enough = words.sum(1) >= 3  # the paper leaves expressions under 3 words whole
    assert (changed.sum(1) == long_enough.long()).all() and not long_enough.all()  # 1 word or 0
    assert (erased[changed] == MASK_ID).all() and words[changed].all()  # never [CLS]/[SEP]/padding
    assert out.word_attention[out.erased_rows][changed].gt(0).all()
    # its hinge term
    assert out.erased_language.neg_image is not None and out.erased_language.neg_expression is None
    losses = model.compute_loss(out, batch)
    assert losses["erased_ce"] > 0 and torch.isfinite(losses["loss"])


def test_visual_erasing_draws_the_module_then_its_item_location_included():
    model, batch = _model(erase={"type": "visual"}), _batch(b=2, seed=1)
    model.eval()
    with torch.no_grad():
        vis = model.encode_visual(batch)
        out = model.score(vis, model.encode_language(batch["input_ids"], batch["attention_mask"]))
    attention = {k: out[k] for k in ("cell_attention", "location_attention", "context_attention")}
    n = 3000  # copies of sample 1 (5 real candidates), erased independently
    rep = {k: v[[1]].expand(n, *v.shape[1:]) for k, v in vis.items()}
    att = {k: v[[1]].expand(n, *v.shape[1:]) for k, v in attention.items()}
    weights = torch.tensor([[0.2, 0.5, 0.3]]).expand(n, 3)
    torch.manual_seed(0)
    erased = model.erase_visual(rep, weights, att)
    hit = {
        key: (erased[key] != rep[key]).flatten(1).any(1) for key in ("rois", "location", "contexts")
    }
    assert (sum(h.long() for h in hit.values()) == 1).all()  # one module per copy
    freq = torch.stack([hit["rois"], hit["location"], hit["contexts"]], 1).float().mean(0)
    torch.testing.assert_close(freq, weights[0], atol=0.05, rtol=0)  # the module weights
    # location: every candidate loses one item (own geometry or a neighbour's offset), in proportion
    # to its location attention
    loc = erased["location"][hit["location"]]
    zeroed = (loc == 0).all(-1) & ~(rep["location"][: len(loc)] == 0).all(-1)  # [n',K,S]
    assert (zeroed.sum(-1) == 1).all()
    torch.testing.assert_close(
        zeroed.float().mean(0), att["location_attention"][0], atol=0.06, rtol=0
    )
    ctx = erased["contexts"][hit["contexts"]]
    zeroed = (ctx == 0).all(-1) & vis["context_valid"][1]
    torch.testing.assert_close(
        zeroed.float().mean(0), att["context_attention"][0], atol=0.06, rtol=0
    )
    assert (zeroed.sum(-1) == 1).all()  # one real context object per candidate (slot 4: none)

    # in training: a visual copy per sample, scored with its one mismatched pair (an expression)
    torch.manual_seed(0)
    out, texts, scored = _spy_training_step(model, _batch())
    assert len(texts) == 1 and len(scored) == 3 + 2
    assert out.erased_visual.neg_expression is not None and out.erased_visual.neg_image is None


def test_both_trains_a_language_and_a_visual_copy_of_every_sample():
    model, batch = _model(), _batch()  # the default: type both, rate 1
    assert model.config.erase.type == "both" and model.config.erase.rule == "sample"
    torch.manual_seed(0)
    out, texts, scored = _spy_training_step(model, batch)
    assert len(texts) == 2 and len(scored) == 3 + 2 + 2
    assert len(out.erased_rows) == len(batch["input_ids"])
    shape = out.logits.shape
    assert out.erased_language.logits.shape == out.erased_visual.logits.shape == shape
    both = model.compute_loss(out, batch)
    only_lang = dataclasses.replace(out, erased_visual=None)
    assert both["erased_ce"] > model.compute_loss(only_lang, batch)["erased_ce"] > 0


def test_argmax_rule_erases_the_most_attended_items():
    model, batch = _model(erase={"type": "both", "rule": "argmax"}), _batch(seed=1)
    torch.manual_seed(0)
    out, texts, scored = _spy_training_step(model, batch)
    rows = out.erased_rows
    erased = texts[1]
    top = out.word_attention[rows].argmax(1)
    long_enough = real_words(batch["input_ids"], batch["attention_mask"])[rows].sum(1) >= 3
    r = torch.arange(len(rows))
    assert (erased[r, top] == MASK_ID).eq(long_enough).all()
    # the sample, its 2 pairs, the language copy + its pair, then the visual copy
    original, vis_e = scored[0], scored[5]
    module = out.module_weights[rows].argmax(1)
    for i in r.tolist():
        key, att = {
            0: ("rois", "cell_attention"),
            1: ("location", "location_attention"),
            2: ("contexts", "context_attention"),
        }[int(module[i])]
        top = getattr(out, att)[rows[i]].argmax(-1)  # [K]
        if key == "rois":
            assert (vis_e["rois"][i][torch.arange(len(top)), :, top] == 0).all()
        else:
            assert (vis_e[key][i][torch.arange(len(top)), top] == 0).all()
        for other in {"rois", "location", "contexts"} - {key}:
            assert torch.equal(vis_e[other][i], original[other][rows[i]])


@pytest.mark.parametrize(
    "mattnet",
    [
        {"neighbours": 0},
        {"roi_size": 1, "erase": {"cell_window": 2}},
        {"erase": {"rule": "argmax"}},
        {},
    ],
)
def test_erasing_edge_cases_train(mattnet):
    batch = _batch()
    if not mattnet:  # one candidate per image: no neighbour, no context object to erase
        batch["cand_valid"][:] = False
        batch["cand_valid"][:, 0] = True
        batch["cand_target"] = torch.tensor([0, 0, -1, 0])
    model = _model(**mattnet)
    model.train()
    losses = model.compute_loss(model(batch), batch)
    assert torch.isfinite(losses["loss"]) and losses["erased_ce"] >= 0
    losses["loss"].backward()


def test_category_input_off_ignores_candidate_categories():
    batch = _batch()
    # every category changed, and all alike
    other = {**batch, "cand_category": torch.full_like(batch["cand_category"], 7)}
    assert (other["cand_category"] != batch["cand_category"]).all()
    for setting, depends in (("none", False), ("neighbours", True), ("embedding", True)):
        model = _model(category_input=setting)
        model.eval()
        a, b = model(batch), model(other)
        model.train()
        torch.manual_seed(0)
        la = model.compute_loss(model(batch), batch)["loss"]
        torch.manual_seed(0)
        lb = model.compute_loss(model(other), other)["loss"]
        same = torch.equal(a.logits, b.logits) and torch.equal(la, lb)
        assert same != depends, setting
    assert _model().category is None
    assert not any("category" in n for n, _ in _model().named_parameters())


def test_no_erase_is_the_ablation():
    model, batch = _model(erase={"type": "none"}), _batch()
    out, texts, scored = _spy_training_step(model, batch)
    assert len(texts) == 1 and len(scored) == 3 and out.erased_rows is None
    assert model.compute_loss(out, batch)["erased_ce"] == 0


# -------------------------------------------------------------------------------------------
# detections


def _gt_rows(cfg, split_dir) -> list[dict]:
    """A 'perfect detector': every gt object of the split's images as a COCO result row."""
    from pycocotools.coco import COCO

    coco = COCO(str(stages.instances_path(cfg)))
    images = {r["image_id"] for r in json.loads((split_dir / "samples.json").read_text())}
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
            "ann_id": a["id"],
        }
        for a in coco.dataset["annotations"]
        if a["image_id"] in images
    ]


def test_detections_file_gives_candidates_and_a_missing_target_is_a_miss(in_tiny):
    cfg = load_config("params.yaml")
    split_dir = prepared_path(cfg) / "val"
    rows = _gt_rows(cfg, split_dir)
    split = PreparedSplit(prepared_path(cfg), "val")
    target = split.records[0]
    # the detector misses sample 0's target; an image the dataset lacks is skipped
    rows = [
        r for r in rows if r["ann_id"] != target["ann_id"]
    ]  # extra keys are allowed (and ignored)
    rows.append({"image_id": 10**9, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5})
    path = in_tiny / "dets.json"
    path.write_text(json.dumps(rows))
    cands = detection_candidates(path, stages.instances_path(cfg), split_dir)
    ds = PreparedSplit(prepared_path(cfg), "val", candidates=cands)
    found = ds.candidates["cand_target"] >= 0
    same_ref = [i for i, r in enumerate(ds.records) if r["ann_id"] == target["ann_id"]]
    assert not found[same_ref].any() and found.sum() == len(ds) - len(same_ref)
    assert (ds.candidates["cand_category"][ds.candidates["cand_valid"]] > 0).all()
    recall = CandidateRecallEvaluator()
    recall.process(ds.candidates, {})  # the whole split as one batch
    m = recall.evaluate()["candidates"]
    assert m["misses"] == len(same_ref) and m["target_recall"] == pytest.approx(
        1 - len(same_ref) / len(ds)
    )


@pytest.mark.parametrize(
    "row, message",
    [
        ({"image_id": 1, "category_id": 1, "score": 0.5}, "detection row 1: missing bbox"),
        (
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, "x", 1], "score": 0.5},
            "detection row 1: could not convert",
        ),
        (
            {"image_id": 1.5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5},
            "detection row 1: expected an integer",
        ),
        (
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 0.5},
            "detection row 1: bbox must be 4",
        ),
    ],
)
def test_bad_detection_row_names_the_file_and_row(tmp_path, row, message):
    path = tmp_path / "dets.json"
    path.write_text(
        json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}, row])
    )
    with pytest.raises(ValueError, match=f"dets.json: {message}"):
        read_detections(path)


def test_stand_in_detections_are_seeded_and_imperfect(in_tiny):
    cfg = load_config("params.yaml")
    dcfg = DetectionsConfig(drop_rate=0.2, false_positives=2)
    rows = stand_in_detections(stages.instances_path(cfg), dcfg)
    assert rows == stand_in_detections(stages.instances_path(cfg), dcfg)
    assert rows != stand_in_detections(
        stages.instances_path(cfg), dcfg.model_copy(update={"seed": 1})
    )
    scores = np.array([r["score"] for r in rows])
    assert (scores < dcfg.true_score_min).sum() >= 2 * 48 * 0.9  # the false positives, scored lower
    recall = detection_recall(stages.instances_path(cfg), rows)["object_recall"]
    assert 0.5 < recall < 0.9  # some objects dropped or badly localised, most found
    perfect = detection_recall(
        stages.instances_path(cfg),
        stand_in_detections(
            stages.instances_path(cfg),
            DetectionsConfig(jitter=0.0, drop_rate=0.0, false_positives=0),
        ),
    )
    assert perfect["object_recall"] == 1.0


def test_stand_in_detections_confuse_categories_at_the_configured_rate(in_tiny):
    from pycocotools.coco import COCO

    instances = stages.instances_path(cfg := load_config("params.yaml"))
    coco = COCO(str(instances))
    truth = [
        a["category_id"]
        for i in sorted(coco.getImgIds())
        for a in sorted(coco.imgToAnns.get(i, []), key=lambda a: a["id"])
    ]
    assert len(set(truth)) > 1 and cfg.detections.confusion_rate > 0  # the default confuses some

    def categories(rate: float, **other) -> list[int]:
        rows = stand_in_detections(
            instances,
            DetectionsConfig(
                jitter=0.0, drop_rate=0.0, false_positives=0, confusion_rate=rate, **other
            ),
        )
        assert len(rows) == len(truth)  # one row per object, in the same order
        return [r["category_id"] for r in rows]

    assert categories(0.0) == truth
    for rate in (0.3, 0.7):
        cats = categories(rate)
        wrong = np.mean([c != t for c, t in zip(cats, truth)])
        assert abs(wrong - rate) < 0.1, (rate, wrong)  # ~170 objects: standard error <= 0.04
        assert set(cats) <= set(coco.getCatIds()) and cats == categories(rate)  # seeded
        assert cats != categories(rate, seed=1)
    assert all(c != t for c, t in zip(categories(1.0), truth))
    # the boxes and scores do not depend on the rate: only the categories change
    jittered = [
        stand_in_detections(instances, DetectionsConfig(confusion_rate=r)) for r in (0.0, 0.5)
    ]
    strip = [
        [{k: v for k, v in row.items() if k != "category_id"} for row in rows] for rows in jittered
    ]
    assert strip[0] == strip[1] and jittered[0] != jittered[1]


def test_grounder_picks_one_of_the_given_detections(in_tiny, tmp_path):
    from PIL import Image

    from refvg.data.proposals import candidates_from_detections
    from refvg.engine.predict import Grounder
    from tests.helpers import untrained_checkpoint

    cfg = load_config("params.yaml")
    grounder = Grounder(untrained_checkpoint(cfg, tmp_path / "ckpt", "mattnet"), device="cpu")
    image = Image.new("RGB", (120, 80), (200, 200, 200))
    dets = [
        {"bbox": [5, 5, 30, 20], "category_id": 1, "score": 0.9},
        {"bbox": [60, 30, 40, 40], "category_id": 2, "score": 0.8},
    ]
    box = grounder.ground(
        image, "the red circle", candidates_from_detections(dets, "dets")
    ).box_xyxy
    given = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)]
    assert any(np.allclose(box, g, atol=1e-3) for g in given)  # in the image's own pixels


def test_new_detections_change_only_the_stamps_of_methods_that_rank_them(in_tiny):
    from tests.helpers import write_params

    methods = {
        "transvg": {"model": "transvg"},
        "mattnet_erase": {"model": "mattnet"},
        "mattnet_erase_det": {
            "model": "mattnet",
            "overrides": {
                "proposals": {"source": "detections", "detections_file": "dets/refshapes.json"}
            },
        },
    }

    def stamps(
        **detections,
    ) -> dict:  # (not under data/: that is the session's shared tiny dataset)
        write_params(in_tiny, methods=methods, detections={"dir": "dets", **detections})
        stages.detections(load_config("params.yaml"))
        return {m: (in_tiny / "dets/methods" / f"{m}.json").read_bytes() for m in methods}

    before, after = stamps(seed=0), stamps(seed=1)
    assert (
        after["mattnet_erase_det"] != before["mattnet_erase_det"]
    )  # dvc.yaml: its training reruns
    assert (
        after["transvg"] == before["transvg"] and after["mattnet_erase"] == before["mattnet_erase"]
    )  # theirs not
