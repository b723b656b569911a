"""The blind controls' inputs: `image_blind` blanks every image (to what letterbox padding is) and
its padding mask, `language_blind` empties every expression; the box targets stay. A checkpoint
written before `image_blind` existed still loads, as not image-blind."""

import json

import numpy as np
import pytest
import torch

from refvg.config import Config
from refvg.data.dataset import MANIFEST, PreparedSplit, collate
from refvg.data.weak import WeakSplit

SIZE, PAD_ID = 16, 0


@pytest.fixture
def prepared(tmp_path):
    """A prepared split by hand: 3 images (one wide, so letterboxed with padding), 4 samples."""
    rng = np.random.default_rng(0)
    split = tmp_path / "train"
    split.mkdir()
    images = rng.integers(1, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)  # no pixel is zero
    np.save(split / "images.npy", images)
    ids = np.zeros((4, 6), np.int32)
    mask = np.zeros((4, 6), np.int32)
    for i, n in enumerate((4, 5, 3, 6)):
        ids[i, :n] = [101, *rng.integers(5, 50, n - 2), 102]
        mask[i, :n] = 1
    np.save(split / "tokens.npy", np.stack([ids, mask], axis=1))
    sizes = [(32, 16), (20, 20), (20, 20)]  # (w, h): the first is letterboxed with padding
    records = [
        {
            "sample_id": i,
            "image_index": img,
            "image_width": sizes[img][0],
            "image_height": sizes[img][1],
            "bbox_xyxy": [2.0 + i, 3.0, 10.0 + i, 12.0],
        }
        for i, img in enumerate((0, 0, 1, 2))
    ]
    (split / "samples.json").write_text(json.dumps(records))
    (tmp_path / MANIFEST).write_text(json.dumps({"pad_token_id": PAD_ID}))
    return tmp_path


def test_image_blind_blanks_every_image_and_its_padding_mask(prepared):
    seen = collate([PreparedSplit(prepared, "train")[i] for i in range(4)])
    blind_split = PreparedSplit(prepared, "train", image_blind=True)
    blind = collate([blind_split[i] for i in range(4)])
    assert (seen["image"] > 0).all() and seen["pixel_mask"][0].any()  # the check can fail
    assert blind["image"].shape == seen["image"].shape and blind["image"].dtype == torch.uint8
    assert (blind["image"] == 0).all()  # what letterbox padding is
    assert not blind["pixel_mask"].any()  # its extent would tell the aspect ratio
    for key in ("box", "input_ids", "attention_mask", "index"):  # targets and text unchanged
        torch.testing.assert_close(blind[key], seen[key], rtol=0, atol=0)
    assert not blind_split.images.flags.writeable  # the pixels on disk were not touched
    assert (PreparedSplit(prepared, "train")[0]["image"] > 0).all()


def test_both_controls_compose(prepared):
    both = collate([PreparedSplit(prepared, "train", True, image_blind=True)[i] for i in range(4)])
    assert (both["image"] == 0).all() and (both["attention_mask"].sum(1) == 2).all()


def test_weak_split_is_blinded_too(prepared):
    weak = WeakSplit(PreparedSplit(prepared, "train", image_blind=True))
    item = weak[0]
    assert (item["image"] == 0).all() and not item["pixel_mask"].any()
    seen = WeakSplit(PreparedSplit(prepared, "train"))[0]
    assert (seen["image"] > 0).all() and seen["pixel_mask"].any()


def test_open_split_passes_the_flag(prepared, monkeypatch):
    from refvg.stages import splits

    monkeypatch.setattr("refvg.data.prepare.prepared_path", lambda cfg: prepared)
    cfg = Config.model_validate({"methods": {"transvg": {"model": "transvg"}}})
    cfg = cfg.for_method("transvg")
    ds = splits.open_split(cfg, "transvg", "train", image_blind=True)
    assert ds.image_blind and (ds[1]["image"] == 0).all()
    assert not splits.open_split(cfg, "transvg", "train").image_blind


def test_image_blind_is_a_method_flag_read_from_params():
    from refvg.config import load_config
    from tests.helpers import ROOT

    cfg = load_config(ROOT / "params.yaml")
    control, model = cfg.declared_methods["transvg_image_blind"], cfg.declared_methods["transvg"]
    assert control.image_blind and not control.language_blind and not model.image_blind
    assert control.model_dump(exclude={"image_blind"}) == model.model_dump(exclude={"image_blind"})


def test_checkpoint_without_image_blind_loads_as_not_blind(tmp_path):
    """Checkpoints written before the flag hold no `image_blind` key (nor the method field)."""
    from refvg.engine.checkpoint import load_trained, save_checkpoint
    from refvg.models import build_model

    cfg = Config.model_validate({"method": {"model": "transvg"}})
    torch.manual_seed(0)
    model = build_model("transvg", cfg, 100, PAD_ID)
    config = cfg.model_dump(mode="json")
    del config["method"]["image_blind"]
    state = {
        "model": model.state_dict(),
        "config": config,
        "model_name": "transvg",
        "vocab_size": 100,
        "pad_token_id": PAD_ID,
        "language_blind": False,
        "best_epoch": 0,
    }
    save_checkpoint(state, tmp_path / "old.pt")
    _, loaded_cfg, loaded = load_trained(tmp_path / "old.pt")
    assert loaded["image_blind"] is False and not loaded_cfg.method.image_blind
    save_checkpoint(state | {"image_blind": True}, tmp_path / "new.pt")
    assert load_trained(tmp_path / "new.pt")[2]["image_blind"] is True
