"""QRNet: QD-ATT shapes, that the expression really reaches the backbone, the ablation switch, the
pretrained path, and that it trains through the shared TransVG loss."""
import pytest
import torch
from transformers import BertConfig, BertModel, SwinConfig, SwinModel

from refvg.config import Config
from refvg.models import build_model
from refvg.models.qrnet import QRNet, QueryDynamicAttention, QueryMultiscaleFusion, masked_mean
from tests.test_models import PAD, VOCAB, make_batch


def make_qrnet(qd_att=True, kind="swin", out_stages=(1, 2)) -> QRNet:
    torch.manual_seed(0)
    cfg = Config.model_validate({"model": {
        "visual": {"kind": kind, "out_stages": list(out_stages), "hidden_sizes": [16, 32, 64], "embed_dim": 16},
        "text": {"hidden_size": 32, "num_layers": 1, "intermediate_size": 64},
        "fusion": {"d_model": 64, "num_layers": 1, "num_heads": 2, "ffn_dim": 128},
        "qrnet": {"qd_att": qd_att}}})
    return build_model("qrnet", cfg, VOCAB, PAD)


def stage_maps(model: QRNet, batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each backbone stage's raw output, and the map the next stage sees (after QD-ATT when it is on)."""
    raw, refined = [], []
    text = model.text(batch["input_ids"], batch["attention_mask"])
    query = model.query_norm(masked_mean(text, batch["attention_mask"]))

    def record(stage, fmap):
        raw.append(fmap)
        if model.qd_att is not None:
            valid = torch.ones(fmap.shape[0], fmap.shape[-2] * fmap.shape[-1], dtype=torch.bool)
            fmap = model.qd_att[stage](fmap, query, valid)
        refined.append(fmap)
        return fmap

    model.visual(batch["image"], modulate=record)
    return raw, refined


def test_qd_att_shapes_and_range():
    att = QueryDynamicAttention(channels=24, query_dim=16, key_dim=8, rank=4)
    fmap, query = torch.randn(3, 24, 5, 7), torch.randn(3, 16)
    valid = torch.ones(3, 35, dtype=torch.bool)
    channel, spatial = att.attention(fmap, query, valid)
    assert channel.shape == (3, 24) and spatial.shape == (3, 35)
    assert ((channel > 0) & (channel < 1)).all() and ((spatial > 0) & (spatial < 1)).all()
    assert att(fmap, query, valid).shape == fmap.shape


def test_qd_att_pools_only_real_pixels():
    att = QueryDynamicAttention(channels=8, query_dim=4, key_dim=8, rank=4)
    fmap, query = torch.randn(1, 8, 4, 4), torch.randn(1, 4)
    valid = torch.ones(1, 16, dtype=torch.bool)
    valid[:, 12:] = False  # the last row is letterbox padding
    noisy = fmap.clone()
    noisy[..., 3, :] = 100.0
    c1, s1 = att.attention(fmap, query, valid)
    c2, s2 = att.attention(noisy, query, valid)
    torch.testing.assert_close(c1, c2)  # padding does not move the channel attention
    torch.testing.assert_close(s1[:, :12], s2[:, :12])


def test_query_changes_the_backbone_features():
    model = make_qrnet().eval()
    batch = make_batch()
    other = dict(batch, input_ids=batch["input_ids"].roll(1, dims=1) * batch["attention_mask"])
    with torch.no_grad():
        (raw_a, a), (raw_b, b) = stage_maps(model, batch), stage_maps(model, other)
    assert len(a) == model.visual.num_stages == 3
    torch.testing.assert_close(raw_a[0], raw_b[0])  # the first stage reads only pixels ...
    for stage, (x, y) in enumerate(zip(a, b)):
        assert not torch.allclose(x, y), f"stage {stage}'s refined map ignores the expression"
    for stage in (1, 2):  # ... later stages compute on query-refined input: different before their own QD-ATT
        assert not torch.allclose(raw_a[stage], raw_b[stage]), stage
    with torch.no_grad():
        ablated = make_qrnet(qd_att=False).eval()
        assert ablated.qd_att is None
        (_, x), (_, y) = stage_maps(ablated, batch), stage_maps(ablated, other)
    for u, v in zip(x, y):
        torch.testing.assert_close(u, v)  # without QD-ATT the backbone never sees the expression


def test_multiscale_fusion_weights_follow_the_query():
    fusion = QueryMultiscaleFusion([8, 16], query_dim=4, out_dim=6)
    maps = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    out = fusion(maps, torch.randn(2, 4))
    assert out.shape == (2, 6, 8, 8)
    with torch.no_grad():
        fusion.level_logits.weight.zero_()
        fusion.level_logits.bias.copy_(torch.tensor([50.0, -50.0]))  # all weight on the finest level
    torch.testing.assert_close(fusion(maps, torch.randn(2, 4)), fusion.proj[0](maps[0]))


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
            for part in (model.visual, model.text, model.qd_att, model.multiscale, model.vl, model.head):
                assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part
        opt.step()
    assert out["pred_boxes"].shape == (4, 4) and {"l1", "giou", "attention"} <= set(losses)
    assert losses["loss"].item() < 0.7 * first
    names = {g["name"]: g for g in model.param_groups(1e-3, 1e-4, 0.1)}
    qd = {id(p) for p in model.qd_att.parameters()}
    assert qd <= {id(p) for g in ("head_decay", "head_no_decay") for p in names[g]["params"]}


def test_qrnet_rejects_unordered_levels_and_a_fusion_grid_it_does_not_have():
    with pytest.raises(ValueError, match="finest first"):
        make_qrnet(out_stages=(2, 1))
    cfg = Config.model_validate({"model": {"visual": {"kind": "swin", "out_stages": [1, 2]},
                                           "qrnet": {"fusion_stage": 0}}})
    with pytest.raises(ValueError, match="fusion_stage 0"):
        build_model("qrnet", cfg, VOCAB, PAD)
    cfg = Config.model_validate({"model": {"visual": {"kind": "swin", "out_stages": [0, 1, 2]},
                                           "qrnet": {"fusion_stage": 2}}})
    assert build_model("qrnet", cfg, VOCAB, PAD)(make_batch(2))["pred_boxes"].shape == (2, 4)  # fused on 4x4


def test_qrnet_from_pretrained_folders(tmp_path):
    """The real path (microsoft/swin-tiny..., bert-base-uncased) is the same code: here with small models saved
    by the test and loaded by path."""
    torch.manual_seed(1)
    SwinModel(SwinConfig(image_size=64, embed_dim=16, depths=[1, 1, 1], num_heads=[1, 2, 4], window_size=4)
              ).save_pretrained(tmp_path / "swin")
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    cfg = Config.model_validate({"model": {
        "visual": {"kind": "swin", "pretrained": str(tmp_path / "swin"), "out_stages": [1, 2]},
        "text": {"pretrained": str(tmp_path / "bert")}}})
    model = build_model("qrnet", cfg, VOCAB, PAD)
    ref = SwinModel.from_pretrained(tmp_path / "swin")
    torch.testing.assert_close(model.visual.body.embeddings.patch_embeddings.projection.weight,
                               ref.embeddings.patch_embeddings.projection.weight)
    assert [q.key.u.in_features for q in model.qd_att] == [16, 32, 64]
    out = model(make_batch(2))
    assert out["pred_boxes"].shape == (2, 4)
