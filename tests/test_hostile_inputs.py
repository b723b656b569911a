"""Hostile and broken inputs at the library's edges: checkpoints that are not ours, truncated JPEGs, and
expressions that are not text or absurdly long at inference. Each ends in a clear error naming the input, or
a counted skip; none in a traceback from deep inside torch or PIL. (Reader-level cases: test_refer.py;
params.yaml: test_config.py.)"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from refvg import stages
from refvg.cli import main as cli
from refvg.config import load_config
from refvg.data.dataset import read_manifest
from refvg.data.prepare import prepare_dataset, prepared_path
from refvg.data.refer import BadRecordError, load_refs
from refvg.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from refvg.engine.predict import Grounder
from refvg.models import build_model
from tests.conftest import write_params
from tests.faults import truncated_jpeg


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def untrained(in_tiny):
    """A checkpoint exactly as training writes best.pt (untrained weights: its content is not the point),
    beside the prepared tokenizer."""
    cfg = load_config("params.yaml")
    manifest = read_manifest(prepared_path(cfg))
    torch.manual_seed(0)
    model = build_model("transvg", cfg, manifest["vocab_size"], manifest["pad_token_id"])
    state = {"model": model.state_dict(), "config": cfg.model_dump(mode="json"), "model_name": "transvg",
             "vocab_size": manifest["vocab_size"], "pad_token_id": manifest["pad_token_id"],
             "language_blind": False, "best_epoch": 1, "epoch": 1}
    folder = in_tiny / "ckpt"
    save_checkpoint(state, folder / "best.pt")
    shutil.copytree(prepared_path(cfg) / "tokenizer", folder / "tokenizer")
    return folder / "best.pt", state


def _tampered(untrained, tmp_path, **changes):
    path, state = untrained
    state = {**state, **changes}
    out = tmp_path / "tampered.pt"
    save_checkpoint(state, out)
    shutil.copytree(path.parent / "tokenizer", tmp_path / "tokenizer", dirs_exist_ok=True)
    return out


def test_a_checkpoint_that_carries_code_is_refused_everywhere_it_is_read(untrained, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "refvg-checkpoint-v1", "model": _Exploit(marker)}, evil)  # torch's own zip format
    with pytest.raises(CheckpointError, match="evil.pt: not a refvg checkpoint"):
        stages.load_trained(evil)
    with pytest.raises(SystemExit, match="evil.pt: not a refvg checkpoint"):
        cli(["predict", str(next((untrained[0].parents[1] / "data/raw/refshapes/images").iterdir())), "a circle",
             "--model", str(evil)])
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "missing_keys", "wrong_shapes", "config_of_another_version", "not_a_dict"])
def test_a_damaged_or_foreign_checkpoint_is_named_not_a_torch_traceback(untrained, tmp_path, damage):
    path, state = untrained
    if damage == "truncated":
        bad = tmp_path / "half.pt"
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        match = r"half\.pt: not a refvg checkpoint"
    elif damage == "missing_keys":
        bad = _tampered(untrained, tmp_path)
        stripped = load_checkpoint(bad)
        del stripped["vocab_size"], stripped["model_name"]
        save_checkpoint(stripped, bad)
        match = r"tampered\.pt: a refvg checkpoint without model_name, vocab_size"
    elif damage == "wrong_shapes":
        weights = dict(state["model"])
        name = next(k for k, v in weights.items() if v.ndim == 2)
        weights[name] = torch.zeros(3, 3)
        bad = _tampered(untrained, tmp_path, model=weights)
        match = rf"tampered\.pt: cannot rebuild its 'transvg' model: .*{name}"
    elif damage == "config_of_another_version":
        bad = _tampered(untrained, tmp_path, config={**state["config"], "train": {**state["config"]["train"], "lrr": 1}})
        match = r"tampered\.pt: cannot rebuild its 'transvg' model: its config: invalid configuration train\.lrr"
    else:
        bad = _tampered(untrained, tmp_path, model=[1, 2, 3])
        match = r"tampered\.pt: cannot rebuild its 'transvg' model"
    with pytest.raises(CheckpointError, match=match):
        stages.load_trained(bad)
    with pytest.raises(CheckpointError, match=match):
        Grounder(bad)
    model, cfg, _ = stages.load_trained(path)  # control: the undamaged one loads
    assert cfg.model.fusion.d_model == state["config"]["model"]["fusion"]["d_model"]


def test_evaluate_with_a_foreign_best_checkpoint_names_it(in_tiny):
    cfg = load_config("params.yaml")
    best = stages.checkpoint_dir(cfg, "transvg") / "best.pt"
    best.parent.mkdir(parents=True)
    torch.save({"weights": torch.zeros(3)}, best)
    with pytest.raises(CheckpointError, match=r"transvg/best\.pt: not a refvg checkpoint"):
        stages.evaluate_method(cfg, "transvg")


# ---------------------------------------------------------------- truncated JPEGs


@pytest.mark.parametrize("keep", [0.05, 0.6])  # cut inside the headers; cut in the middle of the scan data
def test_truncated_jpeg_is_a_counted_skip_or_a_named_error(tiny_workdir, tmp_path, monkeypatch, keep):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_workdir / "data" / "raw", tmp_path / "data" / "raw")
    raw = tmp_path / "data/raw/refshapes"
    instances = json.loads((raw / "instances.json").read_text())
    victim = instances["images"][0]
    png = raw / "images" / victim["file_name"]
    jpeg = png.with_suffix(".jpg")
    jpeg.write_bytes(truncated_jpeg(png, keep))
    png.unlink()
    victim["file_name"] = jpeg.name
    (raw / "instances.json").write_text(json.dumps(instances))

    manifest = prepare_dataset(load_config(write_params(tmp_path)))
    assert manifest["skipped"]["counts"].get("corrupt_image", 0) >= 1
    assert any(jpeg.name in e for e in manifest["skipped"]["examples"])
    baseline = read_manifest(tiny_workdir / "data/prepared/refshapes")
    on_victim = sum(len(r["sentences"]) for r in load_refs(raw / "refs(unc).p") if r["image_id"] == victim["id"])
    total = lambda m: sum(c["samples"] for c in m["splits"].values())  # noqa: E731
    assert on_victim > 0 and total(manifest) == total(baseline) - on_victim  # that image's samples only

    with pytest.raises(BadRecordError, match=rf"{jpeg.name}: image {victim['id']} cannot be decoded"):
        prepare_dataset(load_config(write_params(tmp_path, data={"image_size": 64, "on_bad_record": "error"})))


def test_truncated_jpeg_at_inference(untrained, tmp_path):
    path, _ = untrained
    source = next((path.parents[1] / "data/raw/refshapes/images").iterdir())
    data = truncated_jpeg(source, 1.0)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match=r"cannot read image .*cut\.jpg: image file is truncated"):
        cli(["predict", str(cut), "the red circle", "--model", str(path)])
    from refvg.mlflow_model import _open

    with pytest.raises(ValueError, match=r"row 3: cannot read the image .*cut\.jpg"):
        _open(3, str(cut))
    with pytest.raises(ValueError, match=r"row 0: cannot read the image"):
        _open(0, data[: len(data) // 2])
    assert _open(1, data).size == Image.open(source).size  # control: the whole file decodes


# ---------------------------------------------------------------- expressions at inference


def test_expressions_that_are_not_text_or_absurdly_long_at_inference(untrained):
    path, state = untrained
    grounder = Grounder(path)
    image = Image.open(next((path.parents[1] / "data/raw/refshapes/images").iterdir())).convert("RGB")
    limit = grounder.cfg.data.max_expression_chars
    with pytest.raises(ValueError, match=rf"expression #1: expression_too_long \({10 ** 6} > {limit} chars\)"):
        grounder.predict([image, image], ["the red circle", "x" * 10 ** 6])
    # What Python makes of undecodable bytes in argv or a file read with surrogateescape.
    with pytest.raises(ValueError, match="expression #0: non_utf8_expression"):
        grounder.predict([image], [b"caf\xe9".decode("utf-8", errors="surrogateescape")])
    with pytest.raises(ValueError, match="expression #0: empty_expression"):
        grounder.predict([image], ["   "])
    with pytest.raises(SystemExit, match="refvg predict: expression #0: expression_too_long"):
        cli(["predict", str(next((path.parents[1] / "data/raw/refshapes/images").iterdir())), "y" * (limit + 1),
             "--model", str(path)])
    box = grounder.predict([image], ["  the red circle  "])[0]  # control
    assert box.shape == (4,) and 0 <= box[0] <= box[2] <= image.width

