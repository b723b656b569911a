"""QRNet: QD-ATT gates (they suppress as well as keep, and follow the sentence), that the expression
really reaches the backbone, the paper's fusion (top-down + gated bottom-up, tokens of two scales
into the fusion transformer), the ablation switch, the pretrained path, and that it trains through
the shared TransVG loss."""

import pytest
import torch
from transformers import BertConfig, BertModel, SwinConfig, SwinModel

from refvg.config import Config
from refvg.models import build_model
from refvg.models.qrnet import (
    QRNet,
    QueryDynamicAttention,
    QueryFPN,
)
from tests.helpers import PAD, VOCAB, as_trained, make_batch


def make_qrnet(qd_att=True, kind="swin", out_stages=(1, 2), **qrnet) -> QRNet:
    torch.manual_seed(0)
    cfg = Config.model_validate(
        {
            "model": {
                "visual": {
                    "kind": kind,
                    "out_stages": list(out_stages),
                    "hidden_sizes": [16, 32, 64],
                    "embed_dim": 16,
                },
                "text": {"hidden_size": 32, "num_layers": 1, "intermediate_size": 64},
                "fusion": {"d_model": 64, "num_layers": 1, "num_heads": 2, "ffn_dim": 128},
            },
            "method": {"model": "qrnet", "config": {"qd_att": qd_att, **qrnet}},
        }
    )
    return build_model("qrnet", cfg, VOCAB, PAD)


def stage_maps(model: QRNet, batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each backbone stage's raw output, and the map the next stage sees (after QD-ATT when it is
    on)."""
    raw, refined = [], []
    query = model.query(model.text(batch["input_ids"], batch["attention_mask"]))

    def record(stage, fmap):
        raw.append(fmap)
        if model.qd_att is not None:
            valid = torch.ones(fmap.shape[0], fmap.shape[-2] * fmap.shape[-1], dtype=torch.bool)
            fmap = model.qd_att[stage](fmap, query, valid)
        refined.append(fmap)
        return fmap

    model.visual(batch["image"], modulate=record)
    return raw, refined


def test_qd_att_starts_at_half_and_gates_multiply():
    torch.manual_seed(0)
    att = QueryDynamicAttention(channels=24, query_dim=16, rank=4, reduction=4)
    fmap, query = torch.randn(3, 24, 5, 7), torch.randn(3, 16)
    valid = torch.ones(3, 35, dtype=torch.bool)
    channel, spatial = att.gates(fmap, query, valid)
    assert channel.shape == (3, 24) and spatial.shape == (3, 35)
    torch.testing.assert_close(
        att(fmap, query, valid), fmap * 0.25
    )  # two gates at sigmoid(0) = 0.5
    as_trained(att)
    channel, spatial = att.gates(fmap, query, valid)
    out = att(fmap, query, valid)
    torch.testing.assert_close(out, fmap * channel[:, :, None, None] * spatial.view(3, 1, 5, 7))


def test_qd_att_suppresses_and_follows_the_sentence():
    torch.manual_seed(0)
    att = as_trained(QueryDynamicAttention(channels=32, query_dim=16, rank=8, reduction=4))
    fmap = torch.randn(2, 32, 6, 6, generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, 36, dtype=torch.bool)
    q1, q2 = torch.randn(2, 16, generator=torch.Generator().manual_seed(2)).chunk(2)
    q1, q2 = q1.expand(2, -1), q2.expand(2, -1)
    c1, s1 = att.gates(fmap, q1, valid)
    c2, s2 = att.gates(fmap, q2, valid)
    # Gates in [0, 1] (a sigmoid, saturating to 1.0 in float32), well below 1 for some channels and
    # pixels: features are suppressed, never amplified.
    for gate in (c1, s1, c2, s2):
        assert (gate <= 1).all() and (gate >= 0).all()
    assert (c1 < 0.1).any() and (s1 < 0.1).any()
    out = att(fmap, q1, valid)
    assert (out.abs() <= fmap.abs()).all()
    assert ((out.abs() < 0.05 * fmap.abs()) & (fmap.abs() > 0.5)).any()
    # Another sentence, the same map: other channels and pixels kept.
    assert (c1 - c2).abs().max() > 0.2 and (s1 - s2).abs().max() > 0.2


def test_qd_att_pools_only_real_pixels():
    torch.manual_seed(0)
    att = as_trained(QueryDynamicAttention(channels=8, query_dim=4, rank=4, reduction=2))
    fmap, query = torch.randn(1, 8, 4, 4), torch.randn(1, 4)
    valid = torch.ones(1, 16, dtype=torch.bool)
    valid[:, 12:] = False  # the last row is letterbox padding
    noisy = fmap.clone()
    noisy[..., 3, :] = 100.0  # would dominate both the average and the max pooling
    c1, s1 = att.gates(fmap, query, valid)
    c2, s2 = att.gates(noisy, query, valid)
    torch.testing.assert_close(c1, c2)  # padding does not move the channel gate
    torch.testing.assert_close(s1[:, :12], s2[:, :12])


def test_query_changes_the_backbone_features():
    model = as_trained(make_qrnet()).eval()
    batch = make_batch()
    other = dict(batch, input_ids=batch["input_ids"].roll(1, dims=1) * batch["attention_mask"])
    with torch.no_grad():
        (raw_a, a), (raw_b, b) = stage_maps(model, batch), stage_maps(model, other)
    assert len(a) == model.visual.num_stages == 3
    torch.testing.assert_close(raw_a[0], raw_b[0])  # the first stage reads only pixels ...
    for stage, (x, y) in enumerate(zip(a, b)):
        assert not torch.allclose(x, y), f"stage {stage}'s refined map ignores the expression"
    for stage in (
        1,
        2,
    ):  # ... later stages compute on query-refined input: different before their own QD-ATT
        assert not torch.allclose(raw_a[stage], raw_b[stage]), stage
    with torch.no_grad():
        ablated = make_qrnet(qd_att=False).eval()
        assert ablated.qd_att is None and ablated.multiscale.qd_att is None
        (_, x), (_, y) = stage_maps(ablated, batch), stage_maps(ablated, other)
        for u, v in zip(x, y):
            torch.testing.assert_close(
                u, v
            )  # without QD-ATT the backbone never sees the expression
        fused = [
            ablated.visual_features(b, ablated.text(b["input_ids"], b["attention_mask"]))
            for b in (batch, other)
        ]
    for u, v in zip(*fused):
        torch.testing.assert_close(u, v)  # ... nor does the fusion


def test_fpn_fusion_top_down_and_gated_bottom_up():
    torch.manual_seed(0)
    maps = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 32, 2, 2)]
    query, no_pad = torch.randn(2, 4), torch.zeros(2, 16, 16, dtype=torch.bool)
    plain = QueryFPN([8, 16, 32], out_dim=6, qd_att=None)
    with torch.no_grad():
        for conv in plain.lateral:
            conv.bias.zero_()
    out = plain(maps, query, no_pad)
    assert [o.shape for o in out] == [
        (2, 6, 2, 2),
        (2, 6, 1, 1),
    ]  # the last level and one at stride x2
    torch.testing.assert_close(out[1], out[0][..., :1, :1])
    zero = [torch.zeros_like(m) for m in maps]
    # Top-down then bottom-up: the coarsest map comes back from each finer level it was added to
    # (x3).
    torch.testing.assert_close(
        plain([*zero[:2], maps[2]], query, no_pad)[0], 3 * plain.lateral[2](maps[2])
    )
    # Bottom-up: the finest map reaches the coarsest output, 2x2-averaged at every merge.
    torch.testing.assert_close(
        plain([maps[0], *zero[1:]], query, no_pad)[0],
        torch.nn.functional.avg_pool2d(plain.lateral[0](maps[0]), 4),
    )
    # With QD-ATT on the merges, what the finer levels pass on depends on the sentence.
    gated = QueryFPN(
        [8, 16, 32],
        out_dim=6,
        qd_att=as_trained(
            torch.nn.ModuleList(
                QueryDynamicAttention(6, query_dim=4, rank=4, reduction=2) for _ in range(2)
            )
        ),
    )
    a, b = gated(maps, query, no_pad)[0], gated(maps, torch.randn(2, 4), no_pad)[0]
    assert not torch.allclose(a, b)


def test_two_token_scales_enter_the_fusion_transformer():
    model = make_qrnet(
        out_stages=(1, 2)
    )  # Swin stages at strides 8, 16 of 64 px -> tokens 4x4 and 2x2
    assert model.visual_grids() == [(4, 4), (2, 2)]
    assert model.vl.scale_embed.shape[0] == 2 and model.vl.visual_pos.num_embeddings == 20
    seen = {}
    model.vl.register_forward_hook(lambda m, args, out: seen.update(maps=args[0], tokens=out[1]))
    batch = make_batch(2)
    model(batch)
    assert [tuple(m.shape[-2:]) for m in seen["maps"]] == [(4, 4), (2, 2)]
    assert seen["tokens"].shape[1] == 1 + batch["input_ids"].shape[1] + 16 + 4
    attention_head = Config.model_validate(
        {
            "model": {
                "visual": {"kind": "swin", "out_stages": [1, 2]},
                "fusion": {"box_head": "attention"},
            }
        }
    )
    with pytest.raises(ValueError, match="one grid"):
        build_model("qrnet", attention_head, VOCAB, PAD)


@pytest.mark.parametrize("kind", ["swin", "resnet"])
def test_qrnet_trains_through_the_transvg_loss(kind):
    model = make_qrnet(kind=kind)
    batch = make_batch()
    opt = torch.optim.AdamW(model.param_groups(1e-3, 1e-3, 0.0))
    first = None
    for _ in range(15):
        out = model(batch)
        losses = model.compute_loss(out, batch)
        first = losses["loss"].item() if first is None else first
        opt.zero_grad()
        losses["loss"].backward()
        if first == losses["loss"].item():
            for part in (
                model.visual,
                model.text,
                model.qd_att,
                model.multiscale,
                model.vl,
                model.head,
            ):
                assert any(
                    p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()
                ), part
        opt.step()
    assert out.pred_boxes.shape == (4, 4) and set(losses) == {"loss", "l1", "giou"}
    assert losses["loss"].item() < 0.7 * first
    names = {g["name"]: g for g in model.param_groups(1e-3, 1e-4, 0.1)}
    qd = {id(p) for p in model.qd_att.parameters()}
    assert qd <= {id(p) for g in ("head_decay", "head_no_decay") for p in names[g]["params"]}


def test_qrnet_rejects_unordered_or_skipped_levels():
    with pytest.raises(ValueError, match="finest first"):
        make_qrnet(out_stages=(2, 1))
    with pytest.raises(ValueError, match="consecutive"):
        make_qrnet(out_stages=(0, 2))


def test_qrnet_from_pretrained_folders(tmp_path):
    """The real path (microsoft/swin-tiny..., bert-base-uncased) is the same code: here with small
    models saved by the test and loaded by path."""
    torch.manual_seed(1)
    SwinModel(
        SwinConfig(
            image_size=64, embed_dim=16, depths=[1, 1, 1], num_heads=[1, 2, 4], window_size=4
        )
    ).save_pretrained(tmp_path / "swin")
    BertModel(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(tmp_path / "bert")
    cfg = Config.model_validate(
        {
            "model": {
                "visual": {
                    "kind": "swin",
                    "pretrained": str(tmp_path / "swin"),
                    "out_stages": [1, 2],
                },
                "text": {"pretrained": str(tmp_path / "bert")},
            }
        }
    )
    model = build_model("qrnet", cfg, VOCAB, PAD)
    ref = SwinModel.from_pretrained(tmp_path / "swin")
    torch.testing.assert_close(
        model.visual.body.embeddings.patch_embeddings.projection.weight,
        ref.embeddings.patch_embeddings.projection.weight,
    )
    assert [q.channel_in.in_dim for q in model.qd_att] == [16, 32, 64]
    out = model(make_batch(2))
    assert out.pred_boxes.shape == (2, 4)
