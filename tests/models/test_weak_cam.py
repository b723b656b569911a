"""weak_cam's parts: Grad-CAM against a hand-computed case, the attention-mining loss's effect on
the gradients (through the differentiable Grad-CAM), and both ways of reading a box off a CAM."""

from __future__ import annotations

import pytest
import torch

from refvg.config import Config
from refvg.models import build_model
from refvg.models.weak_cam import candidate_scores, cam_to_square, grad_cam, threshold_box
from tests.helpers import TINY


def test_grad_cam_matches_hand_computation():
    # score_b = sum(W_b * A_b): d score / d A = W, so alpha_c = mean(W_c) and cam = ReLU(sum_c
    # alpha_c A_c) / peak.
    fmap = torch.tensor(
        [
            [[[1.0, 2.0], [3.0, 4.0]], [[4.0, 0.0], [0.0, 1.0]]],
            [[[0.0, 1.0], [2.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]],
        ],
        requires_grad=True,
    )
    w = torch.tensor(
        [
            [[[1.0, 1.0], [1.0, 1.0]], [[-2.0, -2.0], [-2.0, 2.0]]],  # alpha = (1, -1)
            [[[2.0, 2.0], [2.0, 2.0]], [[0.5, 0.5], [0.5, 0.5]]],
        ]
    )  # alpha = (2, 0.5)
    score = (w * fmap).sum((1, 2, 3))
    cam = grad_cam(score, fmap)
    # sample 0: A0 - A1 = [[-3, 2], [3, 3]] -> ReLU -> / 3;  sample 1: 2 A0 + 0.5 A1 = [[0.5, 2.5],
    # [4.5, 0.5]] / 4.5
    expected = torch.tensor(
        [[[0.0, 2 / 3], [1.0, 1.0]], [[0.5 / 4.5, 2.5 / 4.5], [1.0, 0.5 / 4.5]]]
    )
    torch.testing.assert_close(cam, expected)

    valid = torch.tensor([[[True, True], [True, False]], [[True, True], [False, True]]])
    masked = grad_cam(
        (w * fmap).sum((1, 2, 3)), fmap, valid
    )  # excluded cells are 0, the peak is re-taken
    torch.testing.assert_close(
        masked, torch.tensor([[[0.0, 2 / 3], [1.0, 0.0]], [[0.2, 1.0], [0.0, 0.2]]])
    )

    # per_cell (HiResCAM): each cell's own gradient weighs its channels: sample 0 is W0*A0 + W1*A1
    # per cell
    per_cell = grad_cam((w * fmap).sum((1, 2, 3)), fmap, per_cell=True)
    torch.testing.assert_close(
        per_cell, torch.tensor([[[0.0, 2 / 6], [3 / 6, 1.0]], expected[1].tolist()])
    )

    # create_graph: the CAM is a differentiable function of the weights that made the score
    wp = w.clone().requires_grad_(True)
    cam = grad_cam((wp * fmap).sum((1, 2, 3)), fmap, create_graph=True)
    (grad_w,) = torch.autograd.grad(
        cam[0, 0, 1], wp
    )  # cam[0,0,1] = (a0*2 + a1*0) / (a0*3 + a1*0), peak cell (1,0)
    assert grad_w.abs().sum() > 0
    with pytest.raises(RuntimeError):  # without create_graph there is no graph to differentiate
        torch.autograd.grad(grad_cam((wp * fmap).sum((1, 2, 3)), fmap)[0, 0, 1], wp)


def _tiny_cfg(mining_weight: float, **weak) -> Config:
    return Config.model_validate(
        {
            "model": TINY["model"],
            "method": {"model": "weak_cam", "config": {"mining_weight": mining_weight, **weak}},
        }
    )


def _weak_batch(b: int = 6, size: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (b, 7), generator=g)
    ids[:, 0] = 2
    pad = torch.zeros(b, size, size, dtype=torch.bool)
    pad[:, 48:] = True  # letterbox padding at the bottom
    return {
        "image": torch.randn(b, 3, size, size, generator=g),
        "pixel_mask": pad,
        "input_ids": ids,
        "attention_mask": torch.ones(b, 7, dtype=torch.long),
        "image_index": torch.tensor([0, 0, 1, 2, 3, 4])[:b],
        "index": torch.arange(b),
    }


def _grads(mining_weight: float, terms=("loss",)) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = build_model("weak_cam", _tiny_cfg(mining_weight), vocab_size=60, pad_token_id=0).train()
    batch = _weak_batch()
    torch.manual_seed(1)  # the same hard negatives for both
    losses = model.compute_loss(model(batch), batch)
    sum(losses[t] for t in terms).backward()
    return {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in model.named_parameters()
    }, losses


def test_mining_loss_changes_the_gradients():
    with_mining, losses = _grads(1.0)
    without, losses0 = _grads(0.0)
    assert "mining" in losses and "mining" not in losses0
    for k in (
        "itc",
        "itm",
        "itm_cam",
    ):  # same weights, same negatives: the other terms are identical
        torch.testing.assert_close(losses[k], losses0[k])
    diff = {n: (with_mining[n] - without[n]).abs().max().item() for n in with_mining}
    assert (
        diff["match_head.out.weight"] > 1e-6
        and diff["visual.body.embedder.embedder.convolution.weight"] > 0
    )
    # The mined pass reads the visual map without the CAM embedding, so the CAM encoder is reached
    # only through the mask, i.e. through the differentiable Grad-CAM of the second pass (a
    # second-order path).
    mining_only, _ = _grads(1.0, terms=("mining",))
    assert mining_only["cam_encoder.body.2.weight"].abs().sum() > 0
    assert mining_only["fusion.layers.0.qkv.weight"].abs().sum() > 0


def test_threshold_box_keeps_the_region_around_the_peak():
    cam = torch.zeros(1, 8, 8)
    cam[0, 1:3, 1:4] = 0.9
    cam[0, 2, 2] = 1.0  # the peak's blob: rows 1-2, columns 1-3
    cam[0, 5:7, 5:7] = 0.8  # a weaker blob, apart from it
    pad = torch.zeros(1, 8, 8, dtype=torch.bool)
    box = threshold_box(cam, pad, threshold=0.5)
    torch.testing.assert_close(
        box, torch.tensor([[2.5 / 8, 2 / 8, 3 / 8, 2 / 8]])
    )  # cxcywh of x 1..4, y 1..3
    loose = threshold_box(
        cam + 0.6 * (cam == 0), pad, threshold=0.5
    )  # everything above: the whole square
    torch.testing.assert_close(loose, torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
    # CAM on the letterbox padding is ignored (cam_to_square zeroes it before the read-out)
    pad[0, 4:] = True
    sq = cam_to_square(cam + 0.6 * (cam == 0), pad)
    assert sq[0, 4:].max() == 0
    torch.testing.assert_close(threshold_box(sq, pad, 0.5), torch.tensor([[0.5, 0.25, 1.0, 0.5]]))


def test_candidate_scores_rank_by_cam_mass_over_area():
    cam = torch.zeros(1, 16, 16)
    cam[0, 4:8, 4:8] = 1.0  # the object
    cam[0, 12:14, 12:14] = 0.5
    tight = [6 / 16, 6 / 16, 4 / 16, 4 / 16]  # exactly the object
    large = [0.5, 0.5, 1.0, 1.0]  # the whole image: the most mass, spread thin
    distractor = [13 / 16, 13 / 16, 2 / 16, 2 / 16]
    boxes = torch.tensor([[distractor, tight, large, tight]])
    valid = torch.tensor([[True, True, True, False]])
    mean = candidate_scores(cam, boxes, valid, area_power=1.0)
    torch.testing.assert_close(mean[0, :3], torch.tensor([0.5, 1.0, 18 / 256]))
    assert mean[0, 3] == float("-inf") and mean.argmax(1).item() == 1
    mass = candidate_scores(cam, boxes, valid, area_power=0.0)
    torch.testing.assert_close(mass[0, :3], torch.tensor([2.0, 16.0, 18.0]))
    assert mass.argmax(1).item() == 2


def test_localisation_modes_in_the_model():
    torch.manual_seed(0)
    cfg = _tiny_cfg(1.0)
    batch = _weak_batch(2)
    batch["cand_boxes"] = torch.tensor([[[0.25, 0.25, 0.2, 0.2], [0.75, 0.3, 0.2, 0.2]]] * 2)
    batch["cand_valid"] = torch.tensor([[True, True], [True, False]])
    outs = {}
    for mode in ("candidates", "threshold"):
        torch.manual_seed(0)
        model = build_model(
            "weak_cam", _tiny_cfg(1.0, localisation=mode), vocab_size=60, pad_token_id=0
        ).eval()
        with torch.no_grad():  # as under the evaluator: Grad-CAM turns gradients back on itself
            outs[mode] = model(batch)
    cand = outs["candidates"]
    scores = candidate_scores(
        cand.cam, batch["cand_boxes"], batch["cand_valid"], cfg.family.candidate_area_power
    )
    torch.testing.assert_close(cand.pred_boxes[0], batch["cand_boxes"][0, scores[0].argmax()])
    torch.testing.assert_close(cand.pred_boxes[1], batch["cand_boxes"][1, 0])  # the only valid one
    thr = outs["threshold"]
    torch.testing.assert_close(
        thr.cam, cand.cam
    )  # same weights, same CAM; only the read-out differs
    assert (
        cand.cam.shape == (2, 64, 64)
        and cand.cam[:, 48:].max() == 0
        and cand.cam.amax((1, 2)).min() > 0.99
    )
    torch.testing.assert_close(
        thr.pred_boxes, threshold_box(thr.cam, batch["pixel_mask"], cfg.family.box_threshold)
    )
    with pytest.raises(KeyError, match="cand_boxes"):
        model_c = build_model("weak_cam", cfg, vocab_size=60, pad_token_id=0).eval()
        model_c({k: v for k, v in batch.items() if not k.startswith("cand_")})


def _tiny_model(**weak) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("weak_cam", _tiny_cfg(1.0, **weak), vocab_size=60, pad_token_id=0)


def test_match_fraction_limits_the_fusion_rows_not_the_contrastive_grid():
    batch = _weak_batch()
    out = _tiny_model(match_fraction=0.5).train()(batch)
    assert out.contrastive_logits.shape == (6, 6)  # every expression in the contrastive loss
    assert out.match1.shape == out.match2.shape == (6,)  # 3 positives + their 3 negative images
    assert out.mined.shape == out.cam.shape[:1] == (3,)
    assert out.match_labels.tolist() == [1, 1, 1, 0, 0, 0]
    assert _tiny_model(match_fraction=1.0).train()(batch).match1.shape == (12,)


def test_contrastive_in_score_adds_the_pair_similarity():
    batch = _weak_batch()
    model = _tiny_model(contrastive_in_score=False).eval()
    with_sim = _tiny_model(contrastive_in_score=True).eval()  # same seed: same weights
    visual = model.visual(batch["image"])[-1]
    words = model.text(batch["input_ids"], batch["attention_mask"])
    args = (visual, batch["pixel_mask"], words, batch["attention_mask"])
    diagonal = model._contrastive_logits(*args).diagonal()
    torch.testing.assert_close(with_sim.score(*args), model.score(*args) + diagonal)
    # ...so its Grad-CAM now depends on the contrastive embeddings
    v = visual.detach().requires_grad_(True)
    cam = grad_cam(with_sim.score(v, *args[1:]), v, create_graph=True)
    (g,) = torch.autograd.grad(cam.sum(), with_sim.image_embed.weight)
    assert g.abs().sum() > 0


def test_mining_on_the_image_reaches_the_cam_through_the_backbone():
    batch = _weak_batch()
    scores = {}
    for where in ("feature", "image"):
        model = _tiny_model(mining_on=where).train()
        torch.manual_seed(1)  # the same hard negatives
        losses = model.compute_loss(model(batch), batch)
        scores[where] = losses["mining"].detach()
        if where == "image":
            losses["mining"].backward()
            # the mask is the second pass's differentiable Grad-CAM, applied to the pixels: the CAM
            # encoder gets gradients only through it (second order), the backbone through both of
            # its passes
            assert model.cam_encoder.body[2].weight.grad.abs().sum() > 0
            assert model.visual.body.embedder.embedder.convolution.weight.grad.abs().sum() > 0
    assert not torch.allclose(scores["feature"], scores["image"])


def test_the_matcher_learns_on_real_pairs(tiny_workdir, monkeypatch):
    """The fusion's matching loss leaves ln 2 under the default objective (random negative images,
    the contrastive loss at 0.1): a fixed batch of the tiny RefShapes pairs, seeded, full-batch
    steps. On RefShapes with same-category look-alikes it stays near ln 2 for ~50 steps, then falls
    (last 10 of 100: mean 0.28)."""
    import math

    from refvg import stages
    from refvg.config import load_config
    from refvg.data.dataset import collate, read_manifest
    from refvg.data.prepare import prepared_path
    from refvg.engine.runtime import to_device

    monkeypatch.chdir(tiny_workdir)
    cfg = load_config("params.yaml")
    raw = cfg.model_dump(mode="python")
    raw["method"] = {"model": "weak_cam", "config": {"mining_weight": 0.0, "match_fraction": 1.0}}
    cfg = Config.model_validate(raw)
    assert cfg.family.negatives == "random" and not cfg.family.contrastive_in_score
    pairs = stages.open_split(cfg, "weak_cam", "train", training=True)
    batch = to_device(collate([pairs[i] for i in range(0, 64, 4)]), torch.device("cpu"))
    manifest = read_manifest(prepared_path(cfg))
    torch.manual_seed(0)
    model = build_model("weak_cam", cfg, manifest["vocab_size"], manifest["pad_token_id"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    itm = []
    for _ in range(100):
        losses = model.compute_loss(model(batch), batch)
        opt.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        itm.append(float(losses["itm"].detach()))
    assert abs(itm[0] - math.log(2)) < 0.05  # starts at chance
    assert sum(itm[-10:]) / 10 < 0.5, itm  # and learns: clearly below ln 2


def test_match_scores_pair_each_expression_with_another_image():
    batch = _weak_batch()
    model = _tiny_model().eval()
    out = model.match_scores(batch)
    visual = model.visual(batch["image"])[-1]
    words = model.text(batch["input_ids"], batch["attention_mask"])
    pos = model.score(visual, batch["pixel_mask"], words, batch["attention_mask"])
    torch.testing.assert_close(out["pos"], pos)
    neg = model.score(
        visual[[5, 0, 1, 2, 3, 4]], batch["pixel_mask"], words, batch["attention_mask"]
    )
    torch.testing.assert_close(out["neg"], neg)
    assert out["neg_valid"].tolist() == [
        True,
        False,
        True,
        True,
        True,
        True,
    ]  # rows 0, 1 show image 0


def test_negative_images_random_or_by_similarity():
    from refvg.models.weak_cam import _hard_negatives

    image = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    same = image[:, None] == image[None, :]
    sim = torch.zeros(8, 8)
    sim[:, 3] = 50.0  # image 2 looks like every expression's match
    torch.manual_seed(0)
    hard = torch.stack([_hard_negatives(sim, same)[0] for _ in range(50)])
    rand = torch.stack([_hard_negatives(torch.zeros_like(sim), same)[0] for _ in range(50)])
    assert (hard[:, [0, 1, 2, 4, 5, 6, 7]] == 3).all()  # "hard": the most similar other image
    assert (
        image[rand] != image
    ).all()  # "random" (zero similarities): never the pair's own image...
    assert rand[:, 0].unique().tolist() == [2, 3, 4, 5, 6, 7]  # ...and any other one
