import contextlib
import io
import json
import pickle
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from refvg.config import SyntheticConfig
from refvg.data.synthetic import (
    CATEGORIES,
    COLOURS,
    TEST_A_CATEGORIES,
    dominant_test_split,
    generate_refshapes,
    objects_from_annotations,
    parse_expression,
    referents,
    MARGIN,
)

CFG = SyntheticConfig(num_images=40, image_size=96, val_fraction=0.2, test_fraction=0.25, seed=3)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("refshapes")
    summary = generate_refshapes(out, CFG)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out / "instances.json"))
    with open(out / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    return out, summary, coco, refs


def test_layout_written(generated):
    out, summary, coco, refs = generated
    assert (out / "instances.json").is_file() and (out / "refs(unc).p").is_file()
    assert len(coco.imgs) == CFG.num_images == summary["num_images"]
    assert {c["name"] for c in coco.cats.values()} == set(CATEGORIES)
    widths = set()
    for img in coco.imgs.values():
        with Image.open(out / "images" / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"])
        widths.add(img["width"])
    assert len(widths) > 1  # non-square images exist, so letterboxing gets exercised
    ref_keys = {
        "ref_id",
        "ann_id",
        "image_id",
        "category_id",
        "split",
        "file_name",
        "sent_ids",
        "sentences",
    }
    for r in refs:
        assert set(r) == ref_keys
        assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]]
        for s in r["sentences"]:
            assert set(s) == {"raw", "sent", "tokens", "sent_id"}
            assert s["tokens"] == s["sent"].split() and all(t == t.lower() for t in s["tokens"])
    assert summary["num_refs"] == len(refs)
    assert summary["num_sentences"] == sum(len(r["sentences"]) for r in refs)


def test_polygon_masks_match_drawn_shapes(generated):
    out, _, coco, _ = generated
    for img_id in list(coco.imgs)[:10]:
        img = coco.imgs[img_id]
        pixels = np.asarray(
            Image.open(out / "images" / img["file_name"]).convert("RGB"), dtype=np.float64
        )
        for ann in coco.imgToAnns[img_id]:
            m = coco.annToMask(ann)
            assert m.shape == (img["height"], img["width"])
            assert abs(m.sum() - ann["area"]) < 0.15 * ann["area"] + 10
            ys, xs = np.nonzero(m)
            x, y, w, h = ann["bbox"]
            assert (
                xs.min() >= x - 1
                and xs.max() <= x + w + 1
                and ys.min() >= y - 1
                and ys.max() <= y + h + 1
            )
            # The drawn pixels under the polygon are the object's colour (noise and jitter aside).
            mean = pixels[m.astype(bool)].mean(axis=0)
            assert np.abs(mean - np.array(COLOURS[ann["attributes"]["colour"]])).max() < 30


def test_deterministic(tmp_path):
    cfg = CFG.model_copy(update={"num_images": 12})
    a, b = tmp_path / "a", tmp_path / "b"
    generate_refshapes(a, cfg)
    generate_refshapes(b, cfg)
    for name in ["instances.json", "refs(unc).p"] + [
        f"images/{p.name}" for p in (a / "images").iterdir()
    ]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = tmp_path / "c"
    generate_refshapes(c, cfg.model_copy(update={"seed": cfg.seed + 1}))
    assert (a / "refs(unc).p").read_bytes() != (c / "refs(unc).p").read_bytes()


def test_every_expression_is_unique_in_its_scene(generated):
    _, _, coco, refs = generated
    names = {c["id"]: c["name"] for c in coco.cats.values()}
    kinds = Counter()
    for r in refs:
        anns = coco.imgToAnns[r["image_id"]]
        objs = objects_from_annotations(anns, names)
        target = [a["id"] for a in anns].index(r["ann_id"])
        img = coco.imgs[r["image_id"]]
        texts = [s["sent"] for s in r["sentences"]]
        assert len(texts) == CFG.expressions_per_ref and len(set(texts)) == len(texts)
        for text in texts:
            expr = parse_expression(text)
            kinds[expr.kind] += 1
            assert referents(expr, objs, MARGIN * min(img["width"], img["height"])) == [target], (
                text
            )
    assert set(kinds) == {"attr", "extreme", "relation"}


def test_distractors_share_shape_and_colour(generated):
    _, _, coco, _ = generated
    names = {c["id"]: c["name"] for c in coco.cats.values()}
    for img_id in coco.imgs:
        objs = objects_from_annotations(coco.imgToAnns[img_id], names)
        assert CFG.min_objects <= len(objs) <= CFG.max_objects
        assert max(Counter(o.shape for o in objs).values()) >= 2
        assert max(Counter(o.colour for o in objs).values()) >= 2
        assert len({(o.shape, o.colour, o.size) for o in objs}) == len(objs)


def test_splits_like_refcoco_unc(generated):
    _, summary, coco, refs = generated
    names = {c["id"]: c["name"] for c in coco.cats.values()}
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
    images_of = {
        s: {r["image_id"] for r in refs if r["split"] == s}
        for s in ("train", "val", "testA", "testB")
    }
    test_images = images_of["testA"] | images_of["testB"]
    assert not (images_of["train"] & images_of["val"]) and not (images_of["train"] & test_images)
    assert not (images_of["val"] & test_images)
    assert not (images_of["testA"] & images_of["testB"])  # image-disjoint, as in RefCOCO
    for r in refs:
        if r["split"] == "testA":
            assert names[r["category_id"]] in TEST_A_CATEGORIES
        if r["split"] == "testB":
            assert names[r["category_id"]] not in TEST_A_CATEGORIES
    # Each test image is decided by its objects: a strict majority of its split's categories.
    for split in ("testA", "testB"):
        for image_id in images_of[split]:
            shapes = [names[a["category_id"]] for a in coco.imgToAnns[image_id]]
            assert dominant_test_split(shapes) == split, (image_id, shapes)
    assert summary["image_splits"] == {"train": 22, "val": 8, "testA": 5, "testB": 5}
    assert summary["vocabulary_size"] > 20


def test_instances_json_is_plain_coco(generated):
    out, *_ = generated
    data = json.loads((out / "instances.json").read_text())
    ann = data["annotations"][0]
    assert ann["iscrowd"] == 0 and len(ann["bbox"]) == 4
    assert isinstance(ann["segmentation"], list) and len(ann["segmentation"][0]) >= 6
