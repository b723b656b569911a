"""`refvg predict IMAGE "expression" --model ...`: the box (and the mask of a segmenting model)
printed in the image's pixels and drawn on it. Loading a registered MLflow model is covered in
test_storage (its files in S3)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from refvg.cli import main
from refvg.config import load_config
from refvg.data.dataset import PreparedSplit
from refvg.data.prepare import prepared_path
from refvg.data.transforms import Letterbox
from refvg.engine.predict import mask_to_original
from refvg.models.registry import register_model
from refvg.models.transvg import TransVG
from refvg.models.transvg_config import TransVGConfig
from tests.helpers import untrained_checkpoint

RED = (255, 0, 0)


@register_model("test_segmenting_transvg", config=TransVGConfig)
class _SegmentingTransVG(TransVG):
    """TransVG plus a mask output in the CMSA convention ("pred_masks": logits over the letterboxed
    square): here, positive exactly inside the predicted box, so the printed mask can be checked
    against the box."""

    def forward(self, batch):
        out = super().forward(batch)
        s = batch["image"].shape[-2]
        cx, cy, w, h = out.pred_boxes.unbind(-1)
        grid = (torch.arange(s, dtype=torch.float32) + 0.5) / s
        inside_x = (grid[None] - cx[:, None]).abs() <= w[:, None] / 2
        inside_y = (grid[None] - cy[:, None]).abs() <= h[:, None] / 2
        out.pred_masks = torch.where(inside_y[:, :, None] & inside_x[:, None, :], 10.0, -10.0)
        return out


def _sample(cfg):
    rec = PreparedSplit(prepared_path(cfg), "val").records[0]
    return os.path.join(cfg.data.image_dir, rec["file_name"]), rec["sentence"]


def _predict(capsys, *args) -> dict:
    main(["predict", *args])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_predict_prints_the_box_and_draws_it(in_tiny, capsys):
    cfg = load_config("params.yaml")
    ckpt = untrained_checkpoint(cfg, in_tiny / "ckpt")
    image_path, sentence = _sample(cfg)
    out = _predict(
        capsys, image_path, sentence, "--model", str(ckpt.parent)
    )  # the folder works too
    image = Image.open(image_path)
    x0, y0, x1, y1 = out["box_xyxy"]
    assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height and "mask" not in out
    drawn = np.asarray(Image.open(out["drawn"]))
    assert (
        out["drawn"] == f"outputs/predict/{os.path.splitext(os.path.basename(image_path))[0]}.png"
    )
    assert drawn.shape[:2] == (image.height, image.width)
    # What changed is the outline of the printed box, red along all four sides, and nothing else
    # (the image is full of red shapes: one red pixel proves nothing).
    changed = (drawn.astype(int) != np.asarray(image.convert("RGB")).astype(int)).any(-1)
    ys, xs = np.nonzero(changed)
    band = max(image.size) / 150 + 2  # the line's width, drawn inwards, and rounding
    depth = np.minimum.reduce([xs - x0, x1 - xs, ys - y0, y1 - ys])
    assert len(xs) and (depth >= -1).all() and (depth <= band).all(), "drawn off the box's outline"
    h, w = image.height, image.width
    red = (drawn == RED).all(-1)

    def near(v, n):  # where the line's edge lies
        return {min(max(int(v) + d, 0), n - 1) for d in (-1, 0, 1)}

    cols, rows = slice(int(x0) + 1, int(x1)), slice(int(y0) + 1, int(y1))
    sides = [
        max(red[y, cols].mean() for y in near(y0, h)),
        max(red[y, cols].mean() for y in near(y1, h)),
        max(red[rows, x].mean() for x in near(x0, w)),
        max(red[rows, x].mean() for x in near(x1, w)),
    ]
    assert all(side == 1.0 for side in sides if not np.isnan(side)), (
        "outline along all four sides",
        sides,
    )


def test_predict_prints_and_draws_the_mask_of_a_segmenting_model(in_tiny, capsys):
    from pycocotools import mask as mask_utils

    cfg = load_config("params.yaml")
    ckpt = untrained_checkpoint(cfg, in_tiny / "seg", model_name="test_segmenting_transvg")
    image_path, sentence = _sample(cfg)
    out = _predict(
        capsys, image_path, sentence, "--model", str(ckpt), "--out", str(in_tiny / "seg.png")
    )
    image = Image.open(image_path)
    mask = mask_utils.decode(
        {"size": out["mask"]["size"], "counts": out["mask"]["counts"].encode()}
    )
    assert mask.shape == (image.height, image.width) and mask.sum() == out["mask"]["area"] > 0
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = out["box_xyxy"]
    # The mask was the box in the square: back in the image, it lies on the printed box (within a
    # pixel or two of resampling).
    assert (
        abs(xs.min() - x0) <= 2
        and abs(xs.max() + 1 - x1) <= 2
        and abs(ys.min() - y0) <= 2
        and abs(ys.max() + 1 - y1) <= 2
    )
    drawn = np.asarray(Image.open(in_tiny / "seg.png")).astype(int)
    inner = mask.astype(bool).copy()
    inner[:, : int(x0) + 3] = inner[:, int(x1) - 3 :] = False  # away from the outline
    inner[: int(y0) + 3] = inner[int(y1) - 3 :] = False
    assert inner.sum() > 10, (
        out
    )  # seeded: the untrained model's box is large enough to have an inside
    original = np.asarray(image.convert("RGB")).astype(int)
    assert (drawn[inner][:, 0] >= original[inner][:, 0]).all(), "the mask is tinted red"
    assert (drawn[inner] != original[inner]).any()


def test_mask_goes_back_to_the_original_pixels():
    lb = Letterbox(100, 50, 64)  # content 64 x 32 in the square
    logits = torch.full((64, 64), -10.0)
    logits[8:16, 16:32] = 10.0  # square pixels -> original x 25..50, y 12.5..25
    mask = mask_to_original(logits, lb)
    ys, xs = np.nonzero(mask)
    assert mask.shape == (50, 100)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == pytest.approx((25, 49, 12, 24), abs=1)
    low_res = mask_to_original(
        logits[::4, ::4], lb
    )  # a coarser mask head gives the same region, roughly
    assert (low_res & mask).sum() / (low_res | mask).sum() > 0.7


def test_predict_names_what_is_wrong_with_its_input(in_tiny, capsys):
    cfg = load_config("params.yaml")
    image_path, sentence = _sample(cfg)
    with pytest.raises(SystemExit, match="no-such.pt: no such checkpoint"):
        main(["predict", image_path, sentence, "--model", "no-such.pt"])
    with pytest.raises(SystemExit, match="cannot read image nothing.png"):
        main(["predict", "nothing.png", sentence, "--model", "no-such.pt"])
    foreign = in_tiny / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(SystemExit, match="foreign.pt: not a refvg checkpoint"):
        main(["predict", image_path, sentence, "--model", str(foreign)])


def test_a_blind_control_predicts_as_it_was_trained(in_tiny):
    """A language-blind checkpoint answers without the words, an image-blind one without the
    pixels (blank square, no padding), as PreparedSplit fed them in training and evaluation."""
    from refvg.engine.predict import Grounder

    cfg = load_config("params.yaml")
    image_path, sentence = _sample(cfg)
    image = Image.open(image_path).convert("RGB")
    other = Image.fromarray(np.asarray(image)[::-1].copy())  # other pixels, the same size

    def boxes(**flags):
        grounder = Grounder(untrained_checkpoint(cfg, in_tiny / str(flags), **flags), device="cpu")
        return [
            grounder.ground(img, text).box_xyxy
            for img, text in [(image, sentence), (image, "the big blue square"), (other, sentence)]
        ]

    seeing, words, pixels = boxes()
    assert not np.allclose(seeing, words) and not np.allclose(seeing, pixels)  # it reads both
    seeing, words, pixels = boxes(language_blind=True)
    assert np.array_equal(seeing, words) and not np.allclose(seeing, pixels)
    seeing, words, pixels = boxes(image_blind=True)
    assert np.array_equal(seeing, pixels) and not np.allclose(seeing, words)
