"""One contract for every registered model (as timm's tests/models/test_models.py does over
list_models()): built from a small config, a forward on a tiny batch with what the model needs from
the data, a finite loss whose backward reaches the backbones and the head, optimizer groups that
hold every trainable parameter once, a state-dict round trip into a fresh model, and a config class
that round-trips."""

import pytest
import torch

from refvg.config import Config, ConfigError, _validate
from refvg.models import GroundingModel, GroundingOutput, build_model, list_models, model_needs
from refvg.models.registry import config_class, is_weakly_supervised

VOCAB, PAD, B, K, LENGTH, SIZE = 60, 0, 4, 5, 10, 64
SMALL_SHARED = {
    "data": {"image_size": SIZE},
    "model": {
        "visual": {"hidden_sizes": [8, 16, 32], "depths": [1, 1, 1]},
        "text": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
        "fusion": {"d_model": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64},
    },
    "teacher": {"projection_dim": 16},
}
SWIN = {"model": {"visual": {"kind": "swin", "embed_dim": 8, "out_stages": [0, 1]}}}
# Per family: what makes it small, or the shared sections it needs (QRNet: Swin and consecutive
# stages).
SMALL_FAMILY = {
    "cmsa": (
        {"visual_dim": 8, "word_dim": 8, "d_model": 16, "ffn_dim": 16, "decoder_channels": [8]},
        {"model": {"visual": {"out_stages": [1, 2]}}},
    ),
    "mattnet": ({"d_model": 16}, {}),
    "qrnet": ({"qd_att_rank": 4}, SWIN),
    "weak_cam": ({"embed_dim": 16, "cam_channels": 4}, {}),
}


# Methods of params.yaml that take another code path through the same contract: case -> (model,
# family knobs over its SMALL_FAMILY ones, shared sections instead of its SMALL_FAMILY ones).
VARIANTS = {
    "cmsa_concat": ("cmsa", {"fusion": "concat"}, None),
    "transvg_swin": ("transvg", {}, SWIN),  # TransVG reading the last of qrnet's Swin stages
}


def model_of(case: str) -> str:
    return VARIANTS[case][0] if case in VARIANTS else case


def run_config(name: str) -> Config:
    model, knobs, own_shared = VARIANTS.get(name, (name, {}, None))
    config, shared = SMALL_FAMILY.get(model, ({}, {}))
    shared = shared if own_shared is None else own_shared
    raw = {
        **SMALL_SHARED,
        "methods": {name: {"model": model, "config": config | knobs, "overrides": shared}},
    }
    return _validate(raw, source="test").for_method(name)


def tiny_batch(cfg: Config, name: str, seed: int = 0) -> dict:
    name = model_of(name)
    g = torch.Generator().manual_seed(seed)
    pixel_mask = torch.zeros(B, SIZE, SIZE, dtype=torch.bool)
    pixel_mask[:, :, SIZE * 3 // 4 :] = True
    attention_mask = torch.ones(B, LENGTH, dtype=torch.long)
    attention_mask[:, LENGTH // 2 :] = 0
    box = torch.tensor(
        [[0.3, 0.4, 0.2, 0.3], [0.5, 0.5, 0.3, 0.2], [0.4, 0.3, 0.2, 0.2], [0.6, 0.6, 0.25, 0.3]]
    )
    batch = {
        "image": torch.randn(B, 3, SIZE, SIZE, generator=g),
        "pixel_mask": pixel_mask,
        "input_ids": torch.randint(5, VOCAB, (B, LENGTH), generator=g) * attention_mask,
        "attention_mask": attention_mask,
        "index": torch.arange(B),
    }
    if is_weakly_supervised(name):
        batch["image_index"] = torch.tensor([0, 0, 1, 2])  # image-sentence pairs: no target
    else:
        batch["box"] = box
    needs = model_needs(name, cfg)
    if "masks" in needs:
        mask = torch.zeros(B, SIZE, SIZE)
        mask[:, 10:30, 12:34] = 1
        batch["mask"] = mask
    if "candidates" in needs:
        cand = torch.cat(
            [
                0.2 + 0.5 * torch.rand(B, K, 2, generator=g),
                0.1 + 0.2 * torch.rand(B, K, 2, generator=g),
            ],
            -1,
        )
        cand[:, 1] = box
        valid = torch.ones(B, K, dtype=torch.bool)
        valid[0, 3:] = False
        batch |= {
            "cand_boxes": cand,
            "cand_valid": valid,
            "cand_category": torch.randint(1, 4, (B, K), generator=g),
            "cand_target": torch.ones(B, dtype=torch.long),
        }
    if "teacher" in needs:
        batch |= {
            "teacher_patch": torch.randn(B, 64, 16, generator=g),
            "teacher_sentence": torch.randn(B, 16, generator=g),
        }
    return batch


def build(name: str, seed: int = 0):
    cfg = run_config(name)
    torch.manual_seed(seed)
    model = build_model(model_of(name), cfg, VOCAB, PAD)
    if hasattr(model, "erase_token_id"):
        model.erase_token_id = 3  # mattnet's [MASK] (from the prepared tokenizer in a real run)
    return model, cfg


@pytest.fixture(params=list_models() + list(VARIANTS))
def name(request):
    return request.param


def test_every_family_is_registered():
    assert set(list_models()) >= {"transvg", "qrnet", "epmvg", "cmsa", "mattnet", "weak_cam"}


def test_built_from_config_with_its_family_config(name):
    model, cfg = build(name)
    family = config_class(model_of(name))
    assert isinstance(model, GroundingModel) and type(model).config_class is family
    assert model.config is cfg.family and type(cfg.family) is family


def test_forward_loss_and_backward(name):
    model, cfg = build(name)
    batch = tiny_batch(cfg, name)
    model.train()
    torch.manual_seed(1)
    out = model(batch)
    if not is_weakly_supervised(model_of(name)):  # a weak model's training pass predicts no box
        assert isinstance(out, GroundingOutput) and out.pred_boxes.shape == (B, 4)
    losses = model.compute_loss(out, batch)
    assert "loss" in losses and losses["loss"].dim() == 0 and torch.isfinite(losses["loss"])
    if model.auxiliary_loss:  # what the trainer clips apart
        assert "auxiliary" in losses
    losses["loss"].backward()
    moved = {
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    for prefix in ("visual.", "text."):
        assert any(n.startswith(prefix) for n in moved), prefix
    assert any(not n.startswith(("visual.", "text.")) for n in moved)


def test_param_groups_hold_every_trainable_parameter_once(name):
    model, _ = build(name)
    groups = model.param_groups(lr=1e-3, lr_backbone=1e-4, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        backbone = all(names[id(p)].startswith(("visual.", "text.")) for p in g["params"])
        assert g["lr"] == (1e-4 if backbone else 1e-3)
        assert g["weight_decay"] == (0.1 if all(p.ndim > 1 for p in g["params"]) else 0.0)


def test_state_dict_round_trip_gives_identical_outputs(name):
    model, cfg = build(name, seed=0)
    fresh, _ = build(name, seed=1)
    batch = tiny_batch(cfg, name)
    model.eval()
    fresh.eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = model(batch), fresh(batch)
    torch.testing.assert_close(a.pred_boxes, b.pred_boxes, rtol=0, atol=0)
    if a.pred_masks is not None:
        torch.testing.assert_close(a.pred_masks, b.pred_masks, rtol=0, atol=0)


def test_config_class_round_trips(name):
    cfg = run_config(name)
    family = cfg.family
    assert config_class(model_of(name)).model_validate(family.model_dump(mode="json")) == family
    dumped = cfg.model_dump(mode="json")  # what a run's checkpoint and its DVC stamp hold
    assert dumped["method"]["config"] == family.model_dump(mode="json")
    assert _validate(dumped, source="dump").family == family


def test_unknown_family_key_is_rejected_with_its_path(name):
    with pytest.raises(ConfigError, match=r"methods\.m\.config\.no_such_knob"):
        _validate(
            {"methods": {"m": {"model": model_of(name), "config": {"no_such_knob": 1}}}},
            source="test",
        )
