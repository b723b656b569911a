import pytest
import torch
from transformers import BertConfig, BertModel, ResNetConfig, ResNetModel, SwinConfig, SwinModel

from refvg.config import Config, TextConfig, VisualConfig
from refvg.data.transforms import cxcywh_to_xyxy
from refvg.models import build_model, list_models, register_model
from refvg.models.backbones import build_text_encoder, build_visual_backbone
from refvg.models.transvg import TransVG
from refvg.models.transvg_config import TransVGConfig
from tests.helpers import PAD, ROOT, VOCAB, make_batch


def make_model(kind="resnet", **fusion):
    torch.manual_seed(0)
    cfg = Config.model_validate(
        {"model": {"visual": {"kind": kind}, "fusion": {"dropout": 0.0, **fusion}}}
    )
    return build_model("transvg", cfg, VOCAB, PAD)


@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_transvg_shapes_loss_and_grads(kind):
    model = make_model(kind)
    batch = make_batch()
    out = model(batch)
    pred = out.pred_boxes
    assert pred.shape == (4, 4) and pred.dtype == torch.float32
    assert ((pred >= 0) & (pred <= 1)).all()
    losses = model.compute_loss(out, batch)
    assert set(losses) == {"loss", "l1", "giou"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for part in (model.visual, model.visual_encoder, model.text, model.vl, model.head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part


def test_default_transvg_is_the_papers():
    """CNN + visual transformer, BERT, [REG], fusion transformer with learned positions on queries
    and keys, an MLP head on [REG], and L1 + GIoU only."""
    from refvg.models.vl import BoxHead, VisualEncoder

    model = make_model().eval()
    assert isinstance(model.visual_encoder, VisualEncoder) and len(model.visual_encoder.layers) == 2
    assert all(layer.post_norm for layer in (*model.visual_encoder.layers, *model.vl.layers))
    assert type(model.head) is BoxHead  # the MLP, not the attention head
    assert not model.vl.cell_coords and model.vl.visual_proj.in_features == model.vl.d_model
    assert (
        model.vl.visual_pos.num_embeddings == 64
    )  # 64 px at stride 8: one learned position per cell

    # The visual transformer mixes the whole map: a change in the top-left corner of the image moves
    # the bottom-right cell's features after the encoder, though not the CNN's, whose receptive
    # field ends early.
    batch = make_batch(2)
    batch["pixel_mask"][:] = False
    other = dict(batch, image=batch["image"].clone())
    other["image"][:, :, :8, :8] += 3.0
    with torch.no_grad():
        cnn = [model.visual(b["image"])[-1][..., -1, -1] for b in (batch, other)]
        enc = [model.visual_features(b, None)[..., -1, -1] for b in (batch, other)]
    torch.testing.assert_close(cnn[0], cnn[1])
    assert not torch.allclose(enc[0], enc[1])

    # The loss is the unweighted L1 + GIoU (TransVGConfig: l1_weight = giou_weight = 1).
    out = model(batch)
    losses = model.compute_loss(out, batch)
    torch.testing.assert_close(losses["loss"], losses["l1"] + losses["giou"])


def test_transvg_attn_is_the_same_class_configured(tmp_path):
    """params.yaml's transvg_attn: no visual encoder, cell coordinates, positions in the tokens,
    attention box head and its attention-in-box loss, DETR's 5:2 box loss weights."""
    import yaml

    from refvg.config import load_config
    from refvg.models.vl import AttentionBoxHead

    # its configuration, not the pretrain stage's weights: the small configs from scratch
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["visual"]["pretrained"] = raw["model"]["text"]["pretrained"] = None
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(tmp_path / "params.yaml").for_method("transvg_attn")
    torch.manual_seed(0)
    model = build_model("transvg", cfg, VOCAB, PAD)
    assert model.visual_encoder is None and isinstance(model.head, AttentionBoxHead)
    assert model.vl.cell_coords and model.vl.position == "tokens"
    assert model.vl.visual_proj.in_features == model.visual.out_channels[-1] + 8
    batch = make_batch(2)
    out = model(batch)
    losses = model.compute_loss(out, batch)
    assert set(losses) == {"loss", "l1", "giou", "attention"}
    torch.testing.assert_close(
        losses["loss"], 5 * losses["l1"] + 2 * losses["giou"] + losses["attention"]
    )


def test_transvg_overfits_one_batch():
    model = make_model()
    batch = make_batch()
    opt = torch.optim.AdamW(model.param_groups(1e-3, 1e-3, 0.0))
    first = None
    for _ in range(25):
        loss = model.compute_loss(model(batch), batch)["loss"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first


def test_prediction_depends_on_expression():
    model = make_model().eval()
    batch = make_batch()
    other = dict(batch, input_ids=batch["input_ids"].roll(1, dims=1) * batch["attention_mask"])
    with torch.no_grad():
        assert not torch.allclose(model(batch).pred_boxes, model(other).pred_boxes)


def test_transvg_bf16_autocast():
    from refvg.engine.runtime import autocast

    model = make_model()
    batch = make_batch()
    dtypes = []  # what each Linear computed in: the matmuls are where bf16 saves the time
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with autocast(torch.device("cpu"), "bf16"):  # train.amp=bf16, as the trainer enters it
        out = model(batch)
        loss = model.compute_loss(out, batch)["loss"]
    for hook in hooks:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}, dtypes
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # the loss itself in fp32
    loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_param_groups_split_backbone_and_decay():
    model = make_model()
    groups = {g["name"]: g for g in model.param_groups(lr=1e-3, lr_backbone=1e-4, weight_decay=0.1)}
    assert groups["backbone_decay"]["lr"] == 1e-4 and groups["head_decay"]["lr"] == 1e-3
    assert (
        groups["head_no_decay"]["weight_decay"] == 0.0
        and groups["backbone_decay"]["weight_decay"] == 0.1
    )
    assert all(p.ndim <= 1 for g in groups.values() if "no_decay" in g["name"] for p in g["params"])
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(list(model.parameters()))


def test_frozen_backbones_stay_frozen_and_eval():
    vis = build_visual_backbone(VisualConfig(freeze=True))
    txt = build_text_encoder(TextConfig(freeze=True), VOCAB, PAD)
    for enc in (vis, txt):
        enc.train()
        assert not any(p.requires_grad for p in enc.parameters())
        assert not any(m.training for m in enc.modules())


def test_visual_backbone_stages():
    vis = build_visual_backbone(VisualConfig(out_stages=(0, 1, 2)))
    maps = vis(torch.randn(2, 3, 64, 64))
    assert [m.shape[1] for m in maps] == vis.out_channels == [32, 64, 128]
    assert [64 // m.shape[-1] for m in maps] == vis.strides == [4, 8, 16]
    swin = build_visual_backbone(VisualConfig(kind="swin", out_stages=(0, 2)), image_size=64)
    maps = swin(torch.randn(2, 3, 64, 64))
    assert [m.shape[1] for m in maps] == swin.out_channels == [32, 128]
    assert [64 // m.shape[-1] for m in maps] == swin.strides == [4, 16]
    with pytest.raises(ValueError, match="out_stages"):
        build_visual_backbone(VisualConfig(out_stages=(3,)))


def _assert_same_weights(saved: torch.nn.Module, loaded: torch.nn.Module):
    ref, got = saved.state_dict(), loaded.state_dict()
    shared = [k for k in got if k in ref]
    assert len(shared) >= len(got) * 0.9
    for k in shared:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


def test_pretrained_resnet_from_local_folder(tmp_path):
    torch.manual_seed(1)
    ref = ResNetModel(
        ResNetConfig(embedding_size=16, hidden_sizes=[16, 24], depths=[1, 1], layer_type="basic")
    )
    ref.save_pretrained(tmp_path / "resnet")
    vis = build_visual_backbone(VisualConfig(pretrained=str(tmp_path / "resnet"), out_stages=(1,)))
    _assert_same_weights(ref, vis.body)
    assert vis.out_channels == [24] and vis(torch.randn(1, 3, 64, 64))[0].shape == (1, 24, 8, 8)


def test_pretrained_swin_from_local_folder(tmp_path):
    torch.manual_seed(1)
    ref = SwinModel(
        SwinConfig(image_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
    )
    ref.save_pretrained(tmp_path / "swin")
    vis = build_visual_backbone(
        VisualConfig(kind="swin", pretrained=str(tmp_path / "swin"), out_stages=(1,))
    )
    _assert_same_weights(ref, vis.body)
    assert vis(torch.randn(1, 3, 64, 64))[0].shape == (1, 32, 8, 8)


def test_pretrained_text_encoder_from_local_folder(tmp_path):
    torch.manual_seed(1)
    ref = BertModel(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    ref.save_pretrained(tmp_path / "bert")
    txt = build_text_encoder(TextConfig(pretrained=str(tmp_path / "bert")), VOCAB, PAD)
    _assert_same_weights(ref, txt.body)
    assert txt.hidden_size == 32
    ids = torch.randint(1, VOCAB, (2, 7))
    assert txt(ids, torch.ones_like(ids)).shape == (2, 7, 32)
    with pytest.raises(ValueError, match="tokenizer"):
        build_text_encoder(TextConfig(pretrained=str(tmp_path / "bert")), VOCAB + 1, PAD)


def test_registry():
    assert "transvg" in list_models()
    with pytest.raises(ValueError) as err:
        build_model("nope", Config(), VOCAB, PAD)
    assert "nope" in str(err.value) and "transvg" in str(err.value)
    with pytest.raises(ValueError, match="already registered"):
        register_model("transvg", config=TransVGConfig)(type("Other", (TransVG,), {}))
    with pytest.raises(TypeError, match="GroundingModel"):
        register_model("plain", config=TransVGConfig)(torch.nn.Module)


def test_box_heads_and_grounding_attention_loss():
    from refvg.models.vl import attention_in_box_loss

    # The attention head (transvg_attn) adds its read-out attention and the attention-in-box term.
    model = make_model(box_head="attention")
    b = make_batch(2)
    out = model(b)
    assert out.readout_attention.shape == (2, 64) and out.grid == (8, 8)
    assert set(model.compute_loss(out, b)) == {"loss", "l1", "giou", "attention"}

    # All attention on the cell holding the box centre -> ~0 loss; all of it elsewhere -> large.
    grid = (4, 4)
    box = torch.tensor([[0.3, 0.3, 0.1, 0.1]])  # centre in cell (row 1, col 1)
    on = torch.zeros(1, 16)
    on[0, 5] = 1.0
    off = torch.zeros(1, 16)
    off[0, 15] = 1.0
    assert attention_in_box_loss(on, grid, box) < 1e-5
    assert attention_in_box_loss(off, grid, box) > 10
    # A big box counts every cell whose centre it covers.
    spread = torch.full((1, 16), 1 / 16)
    assert torch.isclose(
        attention_in_box_loss(spread, grid, torch.tensor([[0.5, 0.5, 1.0, 1.0]])),
        torch.tensor(0.0),
        atol=1e-5,
    )


def test_local_readout_picks_the_peak_object_not_the_midpoint():
    from refvg.models.vl import local_attention

    # Attention split between two objects (cells (0,0) and (3,3) of a 4x4 map), slightly more on the
    # first.
    attn = torch.zeros(2, 16)
    attn[:, 0], attn[:, 15] = 0.55, 0.45
    attn[1, 1] = 0.0
    local = local_attention(attn, 4, 4, radius=1)
    assert torch.allclose(local.sum(-1), torch.ones(2))
    assert local[:, 15].eq(0).all() and torch.allclose(local[:, 0], torch.ones(2))
    # Neighbours of the peak keep their share; farther cells are dropped.
    spread = torch.tensor([[0.4, 0.2, 0.2, 0.0] + [0.1, 0.0, 0.0, 0.0] + [0.1] + [0.0] * 7])
    kept = local_attention(spread, 4, 4, radius=1)
    assert (
        torch.allclose(kept[0, [0, 1, 4]], torch.tensor([0.4, 0.2, 0.1]) / 0.7)
        and kept[0, [2, 8]].eq(0).all()
    )
    # Gradients reach the kept attention weights. (A plain sum of the kept weights is always 1 after
    # the renormalisation, so it has no gradient: take a position-weighted sum.)
    logits = torch.randn(1, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (local_attention(logits.softmax(-1), 4, 4, radius=1) * torch.arange(16.0)).sum().backward()
    assert logits.grad.abs().sum() > 0

    # The head's centre follows the local read-out: on the stronger object, not between the two.
    head = make_model(box_head="attention").head
    assert head.readout_radius == 1
    d = head.query.in_features
    with torch.no_grad():
        head.query.weight.zero_(), head.query.bias.fill_(1.0)  # q = ones
        head.key.weight.copy_(torch.eye(d)), head.key.bias.zero_()  # k = token
        (
            head.mlp[-1].weight.zero_(),
            head.mlp[-1].bias.zero_(),
        )  # no offset: the centre is the read-out alone
        tokens = torch.zeros(1, 16, d)
        tokens[0, 0], tokens[0, 15] = (
            2.0,
            2.0 - 0.4 / d**0.5,
        )  # logits 0.4 apart, others ~0: 0.6 / 0.4 of the mass
        args = (torch.zeros(1, d), tokens, torch.zeros(1, 16, dtype=torch.bool), (4, 4))
        local_box = head(*args)
        head.readout_radius = None
        global_box = head(*args)
    assert (local_box[0, :2] < 0.2).all(), local_box  # cell (0,0) has its centre at 0.125
    assert (global_box[0, :2] > 0.35).all(), global_box  # the soft average lands mid-way (~0.43)


# ------------------------------------------------------------------ CMSA


def make_cmsa(out_stages=(1, 2), **knobs):
    torch.manual_seed(0)
    small = {"visual_dim": 16, "word_dim": 16, "d_model": 32, "ffn_dim": 32}
    cfg = Config.model_validate(
        {
            "model": {"visual": {"out_stages": list(out_stages)}},
            "method": {"model": "cmsa", "config": small | knobs},
        }
    )
    return build_model("cmsa", cfg, VOCAB, PAD)


def make_mask_batch(b=4, size=64, seed=0):
    batch = make_batch(b, size, seed=seed)
    mask = torch.zeros(b, size, size, dtype=torch.uint8)
    for i, (cx, cy, w, h) in enumerate((batch["box"] * size).round().long().tolist()):
        mask[i, cy - h // 2 : cy + h // 2, cx - w // 2 : cx + w // 2] = 1
    return {**batch, "mask": mask * ~batch["pixel_mask"]}


def test_cmsa_shapes_loss_and_grads():
    from refvg.models import model_needs

    assert model_needs("cmsa") == {"masks"} and model_needs("transvg") == set()
    model = make_cmsa()
    assert len(model.levels) == 2
    batch = make_mask_batch()
    out = model(batch)
    assert out.pred_masks.shape == (4, 64, 64) and out.pred_boxes.shape == (4, 4)
    box = out.pred_boxes
    assert ((box >= 0) & (box <= 1)).all() and (box[:, 2:] > 0).all()
    losses = model.compute_loss(out, batch)
    assert set(losses) == {"loss", "bce", "dice"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for part in (
        model.visual,
        model.text,
        *model.levels,
        model.fusion.memory,
        model.fusion.reset,
        model.decoder,
    ):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part
    assert model.fusion.gamma.grad.abs().sum() > 0
    one_level = make_cmsa(out_stages=(1,))  # the gated fusion also works with a single level
    assert one_level(batch).pred_masks.shape == (4, 64, 64)


def test_cmsa_mask_depends_on_expression():
    model = make_cmsa().eval()
    batch = make_mask_batch()
    other = dict(batch, input_ids=batch["input_ids"].roll(1, dims=1) * batch["attention_mask"])
    with torch.no_grad():
        a, b = model(batch).pred_masks, model(other).pred_masks
    assert (a - b).abs().max() > 1e-3


def test_cmsa_learns_one_batch():
    model = make_cmsa()
    batch = make_mask_batch()
    opt = torch.optim.AdamW(model.param_groups(3e-3, 3e-3, 0.0))
    losses = []
    for _ in range(15):
        loss = model.compute_loss(model(batch), batch)["loss"]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.7 * losses[0], losses


def test_mask_to_box_is_the_tight_box_outside_padding():
    from refvg.models.layers import mask_to_box

    logits = -torch.ones(3, 8, 8)
    logits[0, 2:4, 1:6] = 1.0  # rows 2-3, cols 1-5 -> xyxy (1, 2, 6, 4) / 8
    logits[1, :, 6:] = 1.0  # only on padding: treated as empty
    logits[1, 5, 2] = -0.5  # the highest-scoring pixel outside the padding -> a one-pixel box
    logits[2, 0, 0] = logits[2, 7, 5] = 1.0  # two blobs: the box spans both
    pad = torch.zeros(3, 8, 8, dtype=torch.bool)
    pad[1, :, 6:] = True
    boxes = cxcywh_to_xyxy(mask_to_box(logits, pad)) * 8
    torch.testing.assert_close(boxes, torch.tensor([[1.0, 2, 6, 4], [2, 5, 3, 6], [0, 0, 6, 8]]))


def test_peak_component_keeps_the_region_around_the_most_confident_pixel():
    from refvg.models.layers import peak_component

    logits = -torch.ones(2, 6, 6)
    logits[0, 0:2, 0:2] = 1.0  # big blob
    logits[0, 2, 2] = 1.0  # touches the big blob diagonally: same region
    logits[0, 4:6, 4:6] = 2.0  # a separate, more confident blob wins
    logits[0, 5, 5] = 3.0
    logits[1, 3, 3] = -0.2  # nothing positive: the best pixel alone
    pad = torch.zeros(2, 6, 6, dtype=torch.bool)
    region = peak_component(logits, pad)
    expected = torch.zeros(2, 6, 6, dtype=torch.bool)
    expected[0, 4:6, 4:6] = True
    expected[1, 3, 3] = True
    assert torch.equal(region, expected)
    logits[0, 3, 3] = 1.0  # now the diagonal chain links both blobs into one region
    assert region.sum() < peak_component(logits, pad)[0].sum() == 4 + 1 + 1 + 4


def test_cmsa_prediction_is_one_region_its_loss_the_raw_logits():
    model = make_cmsa()
    batch = make_mask_batch()
    train_out = model(batch)
    assert torch.equal(
        train_out.pred_masks, train_out.mask_logits
    )  # nothing post-processed in training
    model.eval()
    with torch.no_grad():
        out = model(batch)
    from refvg.models.layers import peak_component

    raw, fg = out.mask_logits > 0, out.pred_masks > 0
    assert (
        raw & ~fg
    ).any()  # the untrained model has several regions; the prediction drops all but one
    some = fg.flatten(1).any(1)  # (a sample with nothing positive keeps nothing)
    assert torch.equal(
        peak_component(out.pred_masks, batch["pixel_mask"])[some], fg[some]
    )  # one region
    assert torch.equal(out.pred_masks.abs(), out.mask_logits.abs())  # only signs change


def test_cmsa_attention_ignores_text_padding():
    """A sample's map is the same alone (its own length) as in a batch padded to a longer
    expression."""
    block = make_cmsa().levels[0].eval()
    g = torch.Generator().manual_seed(0)
    visual = torch.randn(3, 64, 8, 8, generator=g)
    pad = torch.zeros(3, 8, 8, dtype=torch.bool)
    pad[:, :, 6:] = True
    words = torch.randn(3, 7, 64, generator=g)
    word_mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2])
    with torch.no_grad():
        batched = block(visual, pad, words, word_mask)
        for i, n in enumerate((7, 3, 5)):
            alone = block(
                visual[i : i + 1], pad[i : i + 1], words[i : i + 1, :n], word_mask[i : i + 1, :n]
            )
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        changed = words.clone()
        changed[1, 3:] = 100.0  # padding content must not matter
        torch.testing.assert_close(block(visual, pad, changed, word_mask), batched)
    with pytest.raises(ValueError, match="real tokens first"):
        block(visual, pad, words, word_mask.flip(1))


def test_cmsa_concat_is_the_baseline_without_cross_modal_attention():
    """fusion: concat (cmsa_concat): the same levels, gated fusion and decoder, each level a 1x1
    conv over [visual, sentence, coordinates]; no attention parameter anywhere, and the mask still
    reads the expression."""
    from refvg.models.cmsa import ConcatFusion, CrossModalSelfAttention, MaskDecoder
    from refvg.models.vl import TransformerLayer

    model = make_cmsa(fusion="concat")
    reference = make_cmsa()
    assert len(model.levels) == 2 and all(isinstance(lv, ConcatFusion) for lv in model.levels)
    attention = (CrossModalSelfAttention, TransformerLayer, torch.nn.MultiheadAttention)
    assert not any(isinstance(m, attention) for m in model.modules())
    assert any(isinstance(m, attention) for m in reference.modules())  # the check can fail
    assert {n.split(".")[1] for n, _ in model.levels.named_parameters()} == {
        "visual",
        "sentence",
        "joint_pixel",
        "joint_sentence",
    }
    assert isinstance(model.decoder, MaskDecoder)
    same = ("visual.", "text.", "fusion.", "decoder.")
    shapes = {n: p.shape for n, p in model.named_parameters() if n.startswith(same)}
    assert shapes == {n: p.shape for n, p in reference.named_parameters() if n.startswith(same)}

    batch = make_mask_batch()
    out = model(batch)
    assert out.pred_masks.shape == (4, 64, 64) and out.pred_boxes.shape == (4, 4)
    assert out.mask_logits.shape == (4, 64, 64)
    losses = model.compute_loss(out, batch)
    assert set(losses) == {"loss", "bce", "dice"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for part in (model.visual, model.text, *model.levels, model.fusion.memory, model.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part
    model.eval()
    other = dict(batch, input_ids=batch["input_ids"].roll(1, dims=1) * batch["attention_mask"])
    with torch.no_grad():
        assert (model(batch).mask_logits - model(other).mask_logits).abs().max() > 1e-4


def test_cmsa_concat_sentence_ignores_text_padding():
    from refvg.models.cmsa import ConcatFusion
    from refvg.models.cmsa_config import CMSAConfig

    torch.manual_seed(0)
    level = ConcatFusion(8, 12, CMSAConfig(visual_dim=4, word_dim=4, d_model=6)).eval()
    visual, pad = torch.randn(2, 8, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool)
    words, mask = torch.randn(2, 5, 12), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    noisy = words.clone()
    noisy[0, 3:] = 100.0  # what lies under padding must not count
    a, b = level(visual, pad, words, mask), level(visual, pad, noisy, mask)
    assert a.shape == (2, 6, 4, 4)
    torch.testing.assert_close(a, b)
    noisy[0, 0] += 1.0  # a real token does
    assert (level(visual, pad, noisy, mask)[0] - a[0]).abs().max() > 1e-4


def test_transvg_swin_builds_from_params_and_trains_a_step():
    """params.yaml's transvg_swin: TransVG (its visual transformer, no QRNet module) on qrnet's
    Swin backbone settings, reading the last out stage; one optimizer step on the tiny config moves
    it."""
    from refvg.config import load_config
    from refvg.models.vl import VisualEncoder
    from tests.helpers import tiny_params

    params = load_config(ROOT / "params.yaml")
    swin, qrnet = params.declared_methods["transvg_swin"], params.declared_methods["qrnet"]
    assert swin.model == "transvg" and not swin.image_blind and not swin.language_blind
    assert swin.overrides["model"]["visual"] == qrnet.overrides["model"]["visual"]
    assert params.for_method("transvg_swin").train.epochs == params.for_method("qrnet").train.epochs

    entry = swin.model_dump(mode="json")
    entry["overrides"]["model"]["visual"]["pretrained"] = None  # the tiny sizes, from scratch
    raw = tiny_params(methods={"transvg_swin": entry})
    cfg = Config.model_validate(raw).for_method("transvg_swin")
    assert cfg.model.visual.kind == "swin" and cfg.model.visual.out_stages == (0, 1)
    torch.manual_seed(0)
    model = build_model("transvg", cfg, VOCAB, PAD)
    assert type(model) is TransVG and isinstance(model.visual_encoder, VisualEncoder)
    assert not any("qd_att" in n or "multiscale" in n for n, _ in model.named_parameters())
    assert model.visual_grids() == [(8, 8)]  # stage 1 at stride 8 of the 64-px letterbox
    batch = make_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.param_groups(1e-3, 1e-3, 0.0))
    losses = model.compute_loss(model(batch), batch)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for prefix in ("visual.", "visual_encoder.", "text.", "vl.", "head."):
        assert any(n.startswith(prefix) for n in moved), prefix
