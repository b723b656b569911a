import contextlib
import io
import json
import pickle
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from refvg.config import SyntheticConfig
from refvg.data import refshapes_language as lang
from refvg.data.refshapes_check import check_refshapes
from refvg.data.statistics import dataset_statistics
from refvg.data.synthetic import (
    CATEGORIES,
    COLOURS,
    MARGIN,
    TEST_A_CATEGORIES,
    dominant_test_split,
    generate_refshapes,
    objects_from_annotations,
    parse_expression,
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


def test_every_expression_is_true_and_unique(generated):
    """The checker, from the files alone: every expression names its target and nothing else, a
    relation's context object is unique, a location or relation is needed unless the expression is
    over-specified."""
    out, _, _, refs = generated
    report = check_refshapes(out)
    assert report.problems == []
    assert (
        report.sentences
        == sum(len(r["sentences"]) for r in refs)
        == CFG.expressions_per_ref * len(refs)
    )
    assert set(report.kinds) == {"attribute", "location", "relation"}
    assert 0 < report.overspecified < report.sentences
    assert report.refs == len(refs) and report.refs_of_mixed_kinds > len(refs) / 2


def test_checker_finds_what_is_wrong(generated, tmp_path):
    """A false expression, one outside the language, an object alone of its category and a location
    that decorates a description that is unique already: each is reported, naming its ref."""
    out, _, coco, refs = generated
    broken = [dict(r, sentences=[dict(s) for s in r["sentences"]]) for r in refs]
    names = {c["id"]: c["name"] for c in coco.cats.values()}
    # A ref's annotation moved to another object of its image: its texts now name someone else.
    moved = broken[0]
    moved["ann_id"] = next(
        a["id"] for a in coco.imgToAnns[moved["image_id"]] if a["id"] != moved["ann_id"]
    )
    broken[1]["sentences"][0]["sent"] = "the man in the red hat"
    # An object alone of its category (a context object), referred to by a bare attribute text (true
    # and unique, but against the collection rule) and by a location its description does not need.
    image, alone = next(
        (i, a)
        for i in coco.imgs
        for a in coco.imgToAnns[i]
        if sum(b["category_id"] == a["category_id"] for b in coco.imgToAnns[i]) == 1
    )
    shape = names[alone["category_id"]]
    broken.append(
        {
            **refs[2],
            "ref_id": 10**6,
            "image_id": image,
            "ann_id": alone["id"],
            "category_id": alone["category_id"],
            "sentences": [
                {"sent": f"the {shape}", "tokens": ["the", shape], "raw": "", "sent_id": 0},
                {"sent": f"the {shape} that is at the top", "tokens": [], "raw": "", "sent_id": 1},
            ],
        }
    )
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "instances.json").write_bytes((out / "instances.json").read_bytes())
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(broken, f, protocol=2)
    problems = check_refshapes(folder).problems
    assert any(
        p.startswith(f"ref {moved['ref_id']} ") and "not the target" in p for p in problems
    ), problems
    assert any(
        p.startswith(f"ref {broken[1]['ref_id']} ") and "man in the red hat" in p for p in problems
    )
    mine = [p for p in problems if p.startswith(f"ref {10**6} ")]
    assert any(f"the only {shape}" in p for p in mine)
    assert any("at the top" in p and "not needed" in p for p in mine), mine


def _scenes(coco, refs):
    names = {c["id"]: c["name"] for c in coco.cats.values()}
    for r in refs:
        anns = coco.imgToAnns[r["image_id"]]
        img = coco.imgs[r["image_id"]]
        yield (
            r,
            objects_from_annotations(anns, names),
            [a["id"] for a in anns].index(r["ann_id"]),
            MARGIN * min(img["width"], img["height"]),
        )


def test_overspecified_expressions_survive_erasing_a_word(generated):
    """CM-Erase's premise, on the text: in an over-specified expression, delete its colour or size
    word or its location phrase, and what is left still names the target alone."""
    _, _, coco, refs = generated
    phrases = sorted(
        {
            w
            for table in (
                lang.SIZE_WORDS,
                lang.COLOUR_WORDS,
                lang.LOCATION_PREFIX,
                lang.LOCATION_SUFFIX,
            )
            for ws in table.values()
            for w in ws
        },
        key=len,
        reverse=True,
    )
    erased = 0
    for r, objs, t, margin in _scenes(coco, refs):
        for s in r["sentences"]:
            expr = parse_expression(s["sent"])
            if not lang.is_overspecified(expr, objs, margin):
                continue
            head, tail = f" {s['sent']} ", ""
            shorter = []
            if (
                expr.relation
            ):  # the target's words come before the relation; erase it whole, context included
                words = next(
                    w
                    for w in sorted(lang.RELATION_WORDS[expr.relation], key=len, reverse=True)
                    if f" {w} the " in head
                )
                i = head.index(f" {words} the ")
                head, tail = head[:i] + " ", head[i:]
                shorter.append(head.replace(" that is ", " ").replace(" which is ", " "))
            found = [p for p in phrases if f" {p} " in head]
            # A cue is a whole phrase: "top left", never its "left" alone.
            found = [p for p in found if not any(p != q and f" {p} " in f" {q} " for q in found)]
            shorter += [head.replace(f" {p} ", " ", 1) + tail for p in found]
            for text in shorter:
                text = " ".join(text.split()).removesuffix(
                    " that is"
                )  # "that is <suffix>" lost its suffix
                erased_expr = parse_expression(text)
                assert lang.resolve(erased_expr, objs, margin) == t, (s["sent"], text)
                erased += 1
    assert erased > 20


def test_relations_need_their_context_object(generated):
    """A relation that is not over-specified names a target whose description fits several objects:
    without its context object the expression would be ambiguous."""
    _, _, coco, refs = generated
    relations = 0
    for r, objs, _, margin in _scenes(coco, refs):
        for s in r["sentences"]:
            expr = parse_expression(s["sent"])
            if expr.relation and not lang.is_overspecified(expr, objs, margin):
                relations += 1
                assert (
                    len(lang.referents(replace(expr, relation=None, anchor=None), objs, margin))
                    >= 2
                ), s["sent"]
    assert relations > 10


def test_language_reads_back_what_it_writes():
    """Every meaning, written with random synonyms and templates, parses back to itself."""
    rng = np.random.default_rng(0)
    descs = [
        lang.Desc(s, c, sh)
        for s in (None, *lang.SIZES)
        for c in (None, *lang.COLOUR_WORDS)
        for sh in (None, *CATEGORIES)
    ]
    texts = set()
    for _ in range(3000):
        d = descs[int(rng.integers(len(descs)))]
        kind = rng.integers(3)
        if kind == 0 and d != lang.Desc():
            e = lang.Expr(d)
        elif kind == 1:
            e = lang.Expr(d, location=lang.LOCATIONS[int(rng.integers(len(lang.LOCATIONS)))])
        else:
            e = lang.Expr(
                d,
                relation=lang.RELATIONS[int(rng.integers(len(lang.RELATIONS)))],
                anchor=descs[int(rng.integers(1, len(descs)))],
            )
        text = lang.render(e, rng)
        texts.add(text)
        assert parse_expression(text) == e, text
    assert {w for t in texts for w in t.split()} == lang.vocabulary()  # every synonym gets written
    with pytest.raises(ValueError, match="not a RefShapes expression"):
        parse_expression("the man in the red hat")


def test_every_referred_object_has_a_same_category_other(generated):
    """RefCOCO's collection rule: the noun alone never names the target."""
    _, _, coco, refs = generated
    names = {c["id"]: c["name"] for c in coco.cats.values()}
    for img_id in coco.imgs:
        objs = objects_from_annotations(coco.imgToAnns[img_id], names)
        assert CFG.min_objects <= len(objs) <= CFG.max_objects
        assert max(Counter(o.shape for o in objs).values()) >= 2
    for r in refs:
        categories = [a["category_id"] for a in coco.imgToAnns[r["image_id"]]]
        assert categories.count(r["category_id"]) >= 2


def test_statistics_of_a_refer_dataset(tmp_path):
    """Hand-counted figures of a small REFER dataset (the same function reads the real RefCOCO)."""
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1},
        {"id": 2, "image_id": 1, "category_id": 1},
        {"id": 3, "image_id": 1, "category_id": 2},
        {"id": 4, "image_id": 2, "category_id": 2},
        {"id": 5, "image_id": 3, "category_id": 1},
    ]  # image 3 holds no ref: not counted
    (tmp_path / "instances.json").write_text(
        json.dumps({"annotations": anns, "images": [], "categories": []})
    )
    refs = [
        {
            "ref_id": 0,
            "image_id": 1,
            "ann_id": 1,
            "category_id": 1,
            "split": "train",
            "sentences": [
                {"sent": "left man", "tokens": ["left", "man"]},
                {"sent": "Man on left", "tokens": ["man", "on", "left"]},
            ],
        },
        {
            "ref_id": 1,
            "image_id": 2,
            "ann_id": 4,
            "category_id": 2,
            "split": "val",
            "sentences": [{"sent": "the dog", "tokens": ["the", "dog"]}],
        },
    ]
    with open(tmp_path / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    s = dataset_statistics(tmp_path, "unc")
    assert (s["images"], s["refs"], s["expressions"]) == (2, 2, 3)
    assert s["objects_per_image"] == pytest.approx((3 + 1) / 2)
    assert s["same_category_per_ref"] == pytest.approx((2 + 1) / 2)
    assert s["share_refs_with_same_category_other"] == pytest.approx(0.5)
    assert s["words_per_expression"] == pytest.approx(7 / 3)
    assert s["expressions_per_ref"] == pytest.approx(1.5)
    assert s["vocabulary_size"] == 5  # left, man, on, the, dog
    assert s["splits"] == {"train": 1, "val": 1}


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


def test_meaning_on_hand_built_scenes():
    """What the words mean, on scenes placed by hand (margin 8 px): the generator and the checker
    share these readings, so they are pinned here on their own."""

    def obj(shape, colour, cx, cy, size="small"):
        return lang.Obj(shape, colour, size, (cx - 5.0, cy - 5.0, 10.0, 10.0))

    def named(text, objs):
        return lang.resolve(parse_expression(text), objs, 8.0)

    square = obj("square", "blue", 50, 50)
    near_and_far = [obj("circle", "red", 30, 50), obj("circle", "red", 50, 110), square]
    assert named("the circle next to the square", near_and_far) == 0
    too_close_to_call = [obj("circle", "red", 30, 50), obj("circle", "red", 50, 74), square]
    assert named("the circle next to the square", too_close_to_call) is None  # 20 px vs 24 px
    far = [
        obj("circle", "red", 0, 0),
        obj("circle", "red", 100, 100),
        obj("square", "blue", 200, 200),
    ]
    assert (
        named("the disc beside the box", far) is None
    )  # the nearer one is 141 px (> 6 margins) away
    diagonal = [obj("circle", "red", 10, 10), obj("circle", "red", 50, 50)]
    assert (
        named("the top left circle", diagonal) == 0
        and named("the round shape in the bottom right", diagonal) == 1
    )
    crossed = [obj("circle", "red", 10, 50), obj("circle", "red", 50, 10)]
    assert named("the top left circle", crossed) is None  # neither beats the other on both axes
    assert named("the top circle", crossed) == 1 and named("the leftmost circle", crossed) == 0
    side_by_side = [obj("circle", "red", 10, 10), obj("circle", "red", 16, 40)]
    assert named("the left circle", side_by_side) is None  # 6 px apart: within the margin
    two_squares = [
        obj("circle", "red", 10, 50),
        obj("circle", "red", 90, 50),
        obj("square", "blue", 50, 50),
        obj("square", "green", 50, 90),
    ]
    assert named("the circle left of the square", two_squares) is None  # which square?
    assert named("the circle left of the blue square", two_squares) == 0
    coloured = [obj("circle", "red", 10, 50), obj("circle", "blue", 90, 50)]
    over = parse_expression("the red circle on the left")
    assert lang.is_overspecified(over, coloured, 8.0) and not lang.is_overspecified(
        over, diagonal, 8.0
    )
