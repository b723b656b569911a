"""The pretrain stage end to end at tiny sizes: save_pretrained folders that a method loads exactly
(through `pretrained:`, as it would microsoft/resnet-50), trains from, and whose trained checkpoint
then loads without them."""

import json
import shutil

import torch
import yaml
from PIL import Image

from refvg import stages
from refvg.config import Config, VisualConfig, load_config
from refvg.engine.hooks import BEST
from tests.helpers import tiny_params

PRETRAINED = {
    "visual": {"pretrained": "data/pretrained/resnet"},
    "text": {"pretrained": "data/pretrained/text"},
}


def test_pretrain_then_ground_from_its_weights(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, BertForMaskedLM, ResNetModel, SwinModel

    from refvg.engine.predict import Grounder
    from refvg.models import build_model
    from refvg.models.backbones import TextEncoder, VisualBackbone, build_visual_backbone

    monkeypatch.chdir(tmp_path)
    params = tiny_params(model=PRETRAINED, train={"epochs": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cfg = load_config("params.yaml")
    result = stages.pretrain(cfg)
    out = tmp_path / "data" / "pretrained"
    assert {p.name for p in out.iterdir()} == {"resnet", "swin", "text", "metrics.json"}
    figures = json.loads((out / "metrics.json").read_text())
    assert 0 <= figures["resnet"]["mAP"] <= 1 and 0 <= figures["text"]["masked_acc"] <= 1
    assert result["text"]["vocab_size"] == len(AutoTokenizer.from_pretrained(out / "text"))
    assert not list(tmp_path.glob("data/.pretrained*"))  # no temp sibling left

    # A method built with those paths holds exactly those weights.
    tokenizer = AutoTokenizer.from_pretrained(out / "text")
    model = build_model("transvg", cfg, len(tokenizer), tokenizer.pad_token_id)
    visual = next(m for m in model.modules() if isinstance(m, VisualBackbone))
    text = next(m for m in model.modules() if isinstance(m, TextEncoder))
    saved = ResNetModel.from_pretrained(out / "resnet")
    assert torch.equal(
        visual.body.embedder.embedder.convolution.weight,
        saved.embedder.embedder.convolution.weight,
    )
    mlm = BertForMaskedLM.from_pretrained(out / "text")
    assert torch.equal(
        text.body.embeddings.word_embeddings.weight, mlm.bert.embeddings.word_embeddings.weight
    )
    swin = build_visual_backbone(
        VisualConfig(kind="swin", pretrained=str(out / "swin"), out_stages=(0, 1)), 64
    )
    saved_swin = SwinModel.from_pretrained(out / "swin")
    assert torch.equal(
        swin.body.embeddings.patch_embeddings.projection.weight,
        saved_swin.embeddings.patch_embeddings.projection.weight,
    )

    # prepare tokenises with the pretrained tokenizer; a method trains from the weights ...
    stages.generate(cfg)
    manifest = stages.prepare(cfg)
    assert manifest["vocab_size"] == len(tokenizer)
    stages.train_method(cfg, "transvg")
    checkpoint = stages.checkpoint_dir(cfg, "transvg") / BEST
    image = Image.new("RGB", (80, 64), (200, 30, 30))
    before = Grounder(checkpoint, device="cpu").ground(image, "the big red circle").box_xyxy

    # ... and its checkpoint loads with the pretrained folders gone, from another folder.
    shutil.rmtree(out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    after = (
        Grounder(tmp_path / checkpoint, device="cpu").ground(image, "the big red circle").box_xyxy
    )
    assert (before == after).all()


def test_pretrain_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny_params(pretrain={"models": ["resnet", "text"], "out_dir": "a"})
    first = stages.pretrain(Config.model_validate(raw))
    raw["pretrain"]["out_dir"] = "b"
    second = stages.pretrain(Config.model_validate(raw))
    for kind in ("resnet", "text"):
        assert first[kind] == second[kind]
        a = (tmp_path / "a" / kind / "model.safetensors").read_bytes()
        assert a == (tmp_path / "b" / kind / "model.safetensors").read_bytes()
