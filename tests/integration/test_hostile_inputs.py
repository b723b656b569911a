"""Hostile and broken inputs at the library's edges: checkpoints that are not ours, truncated JPEGs,
expressions that are not text or absurdly long at inference, and real photos (EXIF orientation,
greyscale, CMYK, alpha, non-images, decompression bombs, image symlinks leading out of the dataset).
Each ends in a clear error naming the input, or a counted skip; none in a traceback from deep inside
torch or PIL. (Reader-level cases: test_refer.py; params.yaml: test_config.py.)"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from refvg import stages
from refvg.cli import main as cli
from refvg.config import load_config
from refvg.data.dataset import read_manifest
from refvg.data.prepare import prepare_dataset, prepared_path
from refvg.data.refer import BadRecordError, load_refs
from refvg.engine.checkpoint import CheckpointError, load_checkpoint, load_trained, save_checkpoint
from refvg.engine.predict import Grounder
from refvg.models import build_model
from tests.helpers import write_params
from tests.faults import truncated_jpeg

RED = (255, 0, 0)


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def untrained(in_tiny):
    """A checkpoint exactly as training writes best.pt (untrained weights: its content is not the
    point), beside the prepared tokenizer."""
    cfg = load_config("params.yaml")
    manifest = read_manifest(prepared_path(cfg))
    torch.manual_seed(0)
    model = build_model("transvg", cfg, manifest["vocab_size"], manifest["pad_token_id"])
    state = {
        "model": model.state_dict(),
        "config": cfg.model_dump(mode="json"),
        "model_name": "transvg",
        "vocab_size": manifest["vocab_size"],
        "pad_token_id": manifest["pad_token_id"],
        "language_blind": False,
        "best_epoch": 1,
        "epoch": 1,
    }
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


def test_a_checkpoint_that_carries_code_is_refused_everywhere_it_is_read(
    untrained, tmp_path, capsys
):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save(
        {"format": "refvg-checkpoint-v1", "model": _Exploit(marker)}, evil
    )  # torch's own zip format
    with pytest.raises(CheckpointError, match="evil.pt: not a refvg checkpoint"):
        load_trained(evil)
    with pytest.raises(SystemExit, match="evil.pt: not a refvg checkpoint"):
        cli(
            [
                "predict",
                str(next((untrained[0].parents[1] / "data/raw/refshapes/images").iterdir())),
                "a circle",
                "--model",
                str(evil),
            ]
        )
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage",
    ["truncated", "missing_keys", "wrong_shapes", "config_of_another_version", "not_a_dict"],
)
def test_a_damaged_or_foreign_checkpoint_is_named_not_a_torch_traceback(
    untrained, tmp_path, damage
):
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
        bad = _tampered(
            untrained,
            tmp_path,
            config={**state["config"], "train": {**state["config"]["train"], "lrr": 1}},
        )
        match = (
            r"tampered\.pt: cannot rebuild its 'transvg' model: its "
            r"config: invalid configuration train\.lrr"
        )
    else:
        bad = _tampered(untrained, tmp_path, model=[1, 2, 3])
        match = r"tampered\.pt: cannot rebuild its 'transvg' model"
    with pytest.raises(CheckpointError, match=match):
        load_trained(bad)
    with pytest.raises(CheckpointError, match=match):
        Grounder(bad)
    model, cfg, _ = load_trained(path)  # control: the undamaged one loads
    assert cfg.model.fusion.d_model == state["config"]["model"]["fusion"]["d_model"]


def test_evaluate_with_a_foreign_best_checkpoint_names_it(in_tiny):
    cfg = load_config("params.yaml")
    best = stages.checkpoint_dir(cfg, "transvg") / "best.pt"
    best.parent.mkdir(parents=True)
    torch.save({"weights": torch.zeros(3)}, best)
    with pytest.raises(CheckpointError, match=r"transvg/best\.pt: not a refvg checkpoint"):
        stages.evaluate_method(cfg, "transvg")


# ---------------------------------------------------------------- truncated JPEGs


@pytest.mark.parametrize(
    "keep", [0.05, 0.6]
)  # cut inside the headers; cut in the middle of the scan data
def test_truncated_jpeg_is_a_counted_skip_or_a_named_error(
    tiny_workdir, tmp_path, monkeypatch, keep
):
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
    on_victim = sum(
        len(r["sentences"]) for r in load_refs(raw / "refs(unc).p") if r["image_id"] == victim["id"]
    )
    total = lambda m: sum(c["samples"] for c in m["splits"].values())  # noqa: E731
    assert (
        on_victim > 0 and total(manifest) == total(baseline) - on_victim
    )  # that image's samples only

    with pytest.raises(
        BadRecordError, match=rf"{jpeg.name}: image {victim['id']} cannot be decoded"
    ):
        prepare_dataset(
            load_config(write_params(tmp_path, data={"image_size": 64, "on_bad_record": "error"}))
        )


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
    image = Image.open(next((path.parents[1] / "data/raw/refshapes/images").iterdir())).convert(
        "RGB"
    )
    limit = grounder.cfg.data.max_expression_chars
    with pytest.raises(
        ValueError, match=rf"expression #1: expression_too_long \({10**6} > {limit} chars\)"
    ):
        grounder.predict([image, image], ["the red circle", "x" * 10**6])
    # What Python makes of undecodable bytes in argv or a file read with surrogateescape.
    with pytest.raises(ValueError, match="expression #0: non_utf8_expression"):
        grounder.predict([image], [b"caf\xe9".decode("utf-8", errors="surrogateescape")])
    with pytest.raises(ValueError, match="expression #0: empty_expression"):
        grounder.predict([image], ["   "])
    with pytest.raises(SystemExit, match="refvg predict: expression #0: expression_too_long"):
        cli(
            [
                "predict",
                str(next((path.parents[1] / "data/raw/refshapes/images").iterdir())),
                "y" * (limit + 1),
                "--model",
                str(path),
            ]
        )
    box = grounder.predict([image], ["  the red circle  "])[0]  # control
    assert box.shape == (4,) and 0 <= box[0] <= box[2] <= image.width


# ---------------------------------------------------------------- real photos (refvg.data.images)

ORIENTATION = 0x0112  # EXIF tag; 6: "turn 90 degrees clockwise to view"


def _landscape_with_red_corner() -> np.ndarray:
    """40 wide x 20 high, black, a red 8x8 block top-left (big enough to survive JPEG)."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:8, :8] = RED
    return a


def _phone_jpeg(path) -> np.ndarray:
    """A JPEG as a phone writes it: the sensor's (landscape) pixels and orientation 6; returns
    the pixels."""
    stored = _landscape_with_red_corner()
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[ORIENTATION] = 6
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return stored


def _red_at(img: Image.Image) -> tuple[float, float]:
    a = np.asarray(img).astype(int)
    rows, cols = np.nonzero((a[..., 0] > 150) & (a[..., 1] < 100))
    return rows.mean(), cols.mean()


def test_a_phone_photo_is_turned_upright_for_predict_but_not_for_prepare(tmp_path):
    from refvg.data.images import open_dataset_image, open_photo

    stored = _phone_jpeg(tmp_path / "phone.jpg")
    upright = open_photo(tmp_path / "phone.jpg")
    # shown portrait, as every viewer shows it
    assert upright.mode == "RGB" and upright.size == (20, 40)
    # the stored top-left, turned clockwise
    expected = Image.fromarray(np.rot90(stored, k=-1).copy())
    assert _red_at(upright) == pytest.approx(_red_at(expected), abs=0.5)
    assert _red_at(upright)[1] > 10  # moved to the right-hand side
    # The dataset frame: COCO boxes refer to the stored pixel array, so no turn there.
    as_stored = open_dataset_image(tmp_path / "phone.jpg", tmp_path)
    assert as_stored.size == (40, 20) and _red_at(as_stored) == pytest.approx((3.5, 3.5), abs=0.5)


def test_greyscale_cmyk_16_bit_and_transparent_images_become_the_rgb_they_show(tmp_path):
    from refvg.data.images import open_photo

    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    rgb = np.asarray(open_photo(tmp_path / "grey.png"))
    assert rgb.shape == (8, 16, 3) and (rgb == grey[..., None]).all()

    # red ink
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", "JPEG", quality=95)
    assert np.abs(np.asarray(open_photo(tmp_path / "cmyk.jpg")).astype(int) - RED).max() <= 3

    deep = Image.fromarray(np.full((4, 4), 32896, np.uint16))  # mid-grey in 16 bits
    deep.save(tmp_path / "deep.png")
    # not clipped white
    assert np.asarray(open_photo(tmp_path / "deep.png"))[0, 0].tolist() == [128, 128, 128]

    rgba = np.zeros((4, 12, 4), np.uint8)
    rgba[:, :4] = (0, 255, 0, 0)  # fully transparent; the green under it must not show
    rgba[:, 4:8] = (255, 0, 0, 255)  # opaque red
    rgba[:, 8:] = (0, 0, 0, 128)  # half-transparent black over the white background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = np.asarray(open_photo(tmp_path / "alpha.png")).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 5].tolist() == list(RED)
    assert np.abs(out[0, 9] - 127).max() <= 1


def test_a_non_image_or_a_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch):
    from refvg.data.images import ImageReadError, open_photo

    fake = tmp_path / "holiday.jpg"
    fake.write_text("these are my holiday notes, not a photo\n")
    with pytest.raises(ImageReadError, match=r"holiday\.jpg: not an image"):
        open_photo(fake)
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")  # 10 000 pixels
    Image.new("RGB", (40, 40)).save(tmp_path / "fair.png")  # 1 600: PIL itself would only warn
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for name in ("big.png", "fair.png"):
        bomb = rf"{name}: refused as a possible decompression bomb.*1000"
        with pytest.raises(ImageReadError, match=bomb):
            open_photo(tmp_path / name)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    assert open_photo(tmp_path / "big.png").size == (100, 100)  # control: under the limit it opens


def test_predict_on_a_phone_photo_answers_in_the_upright_frame(untrained, tmp_path, capsys):
    path, _ = untrained
    _phone_jpeg(tmp_path / "phone.jpg")
    cli(
        [
            "predict",
            str(tmp_path / "phone.jpg"),
            "the red square",
            "--model",
            str(path),
            "--out",
            str(tmp_path / "drawn.png"),
        ]
    )
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    x0, y0, x1, y1 = payload["box_xyxy"]
    assert 0 <= x0 <= x1 <= 20 and 0 <= y0 <= y1 <= 40  # clipped to the upright 20 x 40 image
    assert Image.open(tmp_path / "drawn.png").size == (20, 40)
    (tmp_path / "notes.jpg").write_text("not a photo")
    with pytest.raises(SystemExit, match=r"cannot read image .*notes\.jpg: not an image"):
        cli(["predict", str(tmp_path / "notes.jpg"), "the red square", "--model", str(path)])


def test_prepare_refuses_an_image_symlink_leading_out_of_the_image_folder(
    tiny_workdir, tmp_path, monkeypatch
):
    from refvg.data.images import UnsafeImagePath, open_dataset_image
    from refvg.data.prepare import ImageJob, Shard, letterbox_shard

    images = tmp_path / "images"
    images.mkdir()
    source = sorted((tiny_workdir / "data/raw/refshapes/images").iterdir())[0]
    outside = tmp_path / "secret.png"
    shutil.copy(source, outside)  # a readable image: only where it lives is wrong
    # leads out too: the dataset's own folder is elsewhere
    (images / "inside.png").symlink_to(source)
    (images / "escape.png").symlink_to(outside)
    (images / "sub").mkdir()
    shutil.copy(source, images / "sub" / "ok.png")
    (images / "alias.png").symlink_to(images / "sub" / "ok.png")  # a link that stays inside is fine
    with pytest.raises(UnsafeImagePath, match=r"escape\.png: resolves to .*secret\.png, outside"):
        open_dataset_image(images / "escape.png", images)
    assert open_dataset_image(images / "alias.png", images).size == Image.open(source).size

    w, h = Image.open(source).size
    jobs = tuple(
        ImageJob(i, str(images / n), w, h, str(images))
        for i, n in enumerate(["alias.png", "escape.png", "inside.png"])
    )
    result = letterbox_shard(Shard("train", 0, jobs, 32, str(tmp_path / "s.npy"), strict=False))
    assert result.image_ids == [0] and {k: v[0] for k, v in result.bad.items()} == {
        1: "unsafe_image_path",
        2: "unsafe_image_path",
    }
    with pytest.raises(BadRecordError, match=r"image 1: unsafe_image_path: .*escape\.png"):
        letterbox_shard(Shard("train", 0, jobs[:2], 32, str(tmp_path / "s.npy"), strict=True))

    # Through prepare itself: one image of the raw dataset replaced by a link to a file outside its
    # folder.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_workdir / "data" / "raw", tmp_path / "data" / "raw")
    raw = tmp_path / "data/raw/refshapes"
    victim = json.loads((raw / "instances.json").read_text())["images"][0]["file_name"]
    shutil.move(raw / "images" / victim, tmp_path / "moved.png")
    (raw / "images" / victim).symlink_to(tmp_path / "moved.png")
    manifest = prepare_dataset(load_config(write_params(tmp_path)))
    # counted per sample of it
    assert manifest["skipped"]["counts"].get("unsafe_image_path", 0) >= 1
    assert any(victim in e for e in manifest["skipped"]["examples"])
