"""RefShapes: a procedurally generated referring-expression dataset written in the RefCOCO layout.

Each scene is a noisy, textured background with `min_objects..max_objects` non-overlapping shapes
(6 shapes = 6 COCO categories, 6 colours, 2 sizes). As RefCOCO's images were chosen to hold several
objects of one category, the objects come in groups of one category (2 or 3 of it), and only objects
with another of their category in the image are referred to: the noun never suffices. The rest of
the scene (objects alone of their category) is context: anchors for relations, distractors by colour
or size.

Each ref gets `expressions_per_ref` different texts, of different kinds where the scene allows
(refvg.data.refshapes_language has the words, the templates and the meaning):
- attribute:       "the big red circle", "little violet rhombus"
- location:        "the left disc", "the square at the top", "the upper right plus sign"
- relation:        "the circle left of the blue square", "the box that is next to the star", only
where
                   the target's description fits two objects or more, so the context object is
                   needed
- over-specified:  an attribute and a location or relation that each name the target alone
                   ("the red circle on the left"), so erasing either still leaves a valid
                   expression.
Every text is parsed back and resolved against the scene before it is written; the dataset checker
(refvg.data.refshapes_check) verifies the written files the same way, from the annotations alone.

Splits follow RefCOCO unc: whole images go to train / val / test (`val_fraction`, `test_fraction`),
and each test image to exactly one of testA / testB, as RefCOCO splits images of people from images
of other objects: half the test images are testA, drawn so that most of their objects (a strict
majority) are of the first half of CATEGORIES (circle, square, triangle), the other half testB, most
of their objects of the second half (diamond, cross, star). A test image's refs are those of its
split's categories, as RefCOCO's testA refers to people only.

Files written (what `refvg.data.refer.ReferDataset` reads): `instances.json` (COCO; each annotation
also carries `attributes: {colour, size}`, which COCO readers ignore), `refs(<split_by>).p` (pickle
protocol 2 of plain dicts in REFER's schema) and `images/<file_name>`.
"""

from __future__ import annotations

import json
import math
import pickle
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from refvg.config import SyntheticConfig
from refvg.data.refshapes_language import (  # noqa: F401 - re-exported: the generator's public names
    CATEGORIES,
    LOCATIONS,
    MARGIN,
    RELATIONS,
    SIZE_WORDS,
    SIZES,
    Desc,
    Expr,
    Obj,
    is_overspecified,
    objects_from_annotations,
    parse_expression,
    referents,
    render,
    resolve,
    strictly,
)

TEST_A_CATEGORIES = CATEGORIES[: len(CATEGORIES) // 2]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
_COLOUR_NAMES = tuple(COLOURS)
# Side of an object's box as a fraction of the image's shorter side; the gap keeps "small"/"big"
# unambiguous.
SIZE_RANGES = {"small": (0.18, 0.24), "big": (0.32, 0.40)}
STYLES = ("attribute", "location", "relation", "overspecified")


# ---------------------------------------------------------------- choosing expressions


def _descriptions(o: Obj) -> list[Desc]:
    return [
        Desc(
            o.size if mask & 1 else None,
            o.colour if mask & 2 else None,
            o.shape if mask & 4 else None,
        )
        for mask in range(8)
    ]


def _minimal_unique(o: Obj, objs: list[Obj]) -> Optional[Desc]:
    # Fewest attributes that pick the anchor out; ties prefer ones naming the shape (reads
    # naturally).
    best = None
    for d in _descriptions(o):
        if d == Desc() or sum(d.matches(x) for x in objs) != 1:
            continue
        cost = sum(v is not None for v in vars(d).values()) - 0.5 * (d.shape is not None)
        if best is None or cost < best[0]:
            best = (cost, d)
    return best[1] if best else None


class _Choices:
    """Draws expressions of a style that name objs[t]: the style's candidates in a random order, the
    first that is true and unique. That is a uniform draw among the ones that fit, without testing
    them all for the styles a ref never uses."""

    def __init__(self, t: int, objs: list[Obj], margin: float, anchor_descs: list[Optional[Desc]]):
        self.t, self.objs, self.margin = t, objs, margin
        descs = _descriptions(objs[t])
        self.ambiguous = [d for d in descs if sum(d.matches(o) for o in objs) >= 2]
        self.unique = [d for d in descs if d != Desc() and self._names(Expr(d))]
        self.relations = [
            (rel, ad)
            for a, ad in enumerate(anchor_descs)
            if a != t and ad is not None
            for rel in RELATIONS
            if strictly(rel, objs[t], objs[a], margin)
        ]

    def _names(self, e: Expr) -> bool:
        return resolve(e, self.objs, self.margin) == self.t

    def _candidates(self, style: str) -> list[tuple]:
        if style == "attribute":
            return [(d, None, None) for d in self.unique]
        descs = (
            self.ambiguous
            if style in ("location", "relation")
            else [d for d in self.unique if d.size or d.colour]
        )
        located = (
            [(d, loc, None) for d in descs for loc in LOCATIONS] if style != "relation" else []
        )
        related = (
            [(d, None, r) for d in descs for r in self.relations] if style != "location" else []
        )
        return located + related

    def draw(self, style: str, rng: np.random.Generator) -> Optional[Expr]:
        cands = self._candidates(style)
        for i in rng.permutation(len(cands)):
            d, loc, rel = cands[int(i)]
            e = Expr(d, location=loc) if rel is None else Expr(d, relation=rel[0], anchor=rel[1])
            if self._names(e) and (
                style != "overspecified" or is_overspecified(e, self.objs, self.margin)
            ):
                return e
        return None


def choose_expressions(
    t: int,
    objs: list[Obj],
    n: int,
    margin: float,
    rng: np.random.Generator,
    anchor_descs: Optional[list[Optional[Desc]]] = None,
) -> list[str]:
    """Up to `n` different texts naming objs[t] uniquely, of as many different styles as the scene
    allows. `anchor_descs`: each object's shortest unique description (None: it has none), when the
    caller has them."""
    if anchor_descs is None:
        anchor_descs = [_minimal_unique(o, objs) for o in objs]
    choices = _Choices(t, objs, margin, anchor_descs)
    styles = [STYLES[i] for i in rng.permutation(len(STYLES))]
    texts: list[str] = []
    for attempt in range(8 * n):
        if len(texts) == n or not styles:
            break
        style = styles[attempt % len(styles)]
        expr = choices.draw(style, rng)
        if expr is None:
            styles.remove(style)
            continue
        text = render(expr, rng)
        if text not in texts and resolve(parse_expression(text), objs, margin) == t:
            texts.append(text)
    return texts


# ---------------------------------------------------------------- scenes and drawing


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of a shape centred at (cx, cy) with half-extent r (the same polygon is drawn and
    stored)."""
    if shape == "circle":
        pts = [(math.cos(2 * math.pi * k / 32), math.sin(2 * math.pi * k / 32)) for k in range(32)]
    elif shape == "square":
        pts = [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    elif shape == "triangle":
        pts = [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)]
    elif shape == "cross":
        a = 0.33
        pts = [
            (-a, -1),
            (a, -1),
            (a, -a),
            (1, -a),
            (1, a),
            (a, a),
            (a, 1),
            (-a, 1),
            (-a, a),
            (-1, a),
            (-1, -a),
            (-a, -a),
        ]
    elif shape == "star":
        pts = [
            (
                (1.0 if k % 2 == 0 else 0.45) * math.sin(math.pi * k / 5),
                -(1.0 if k % 2 == 0 else 0.45) * math.cos(math.pi * k / 5),
            )
            for k in range(10)
        ]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(round(cx + r * x, 2), round(cy + r * y, 2)) for x, y in pts]


def _attributes(n: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(shape, colour, size) of `n` objects: a group of 2-3 of one category first (RefCOCO's rule:
    several objects of the target's category), then more such groups or objects alone of their
    category."""
    shapes: list[str] = []
    while len(shapes) < n:
        left = n - len(shapes)
        k = 1 if left == 1 else 3 if left >= 3 and rng.random() < 0.25 else 2
        if shapes and k > 1 and rng.random() < 0.35:
            k = 1  # a context object alone of its category: an anchor, never referred to
        unused = [c for c in CATEGORIES if c not in shapes]
        if not unused:  # more objects than categories can group: join a group already there
            unused, k = [shapes[int(rng.integers(len(shapes)))]], 1
        shapes += [unused[int(rng.integers(len(unused)))]] * k
    out: list[tuple[str, str, str]] = []
    for shape in shapes:
        colour, size = (
            _COLOUR_NAMES[int(rng.integers(len(COLOURS)))],
            SIZES[int(rng.integers(len(SIZES)))],
        )
        # Half the time a colour (a size) repeats one already there, so neither alone tells the
        # objects apart; identical twins are allowed: their place tells them apart, as in RefCOCO's
        # "left guy".
        if out and rng.random() < 0.5:
            colour = out[int(rng.integers(len(out)))][1]
        if out and rng.random() < 0.5:
            size = out[int(rng.integers(len(out)))][2]
        out.append((shape, colour, size))
    return out


def _place(attrs, w: int, h: int, rng: np.random.Generator):
    """Non-overlapping objects and their polygons, or None when they do not fit (the caller
    redraws)."""
    side = min(w, h)
    objs: list[Obj] = []
    polys: list[list[tuple[float, float]]] = []
    boxes: list[tuple[float, float, float]] = []
    for shape, colour, size in attrs:
        for _ in range(60):
            r = side * rng.uniform(*SIZE_RANGES[size]) / 2
            cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
            if all(
                abs(cx - bx) >= r + br + 2 or abs(cy - by) >= r + br + 2 for bx, by, br in boxes
            ):
                break
        else:
            return None
        boxes.append((cx, cy, r))
        poly = shape_polygon(shape, cx, cy, r)
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        bbox = (min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2))
        objs.append(Obj(shape, colour, size, bbox))
        polys.append(poly)
    return objs, polys


def _draw(objs: list[Obj], polys, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    base = rng.integers(80, 170) + rng.integers(-15, 16, size=3)
    # Mostly brightness texture with a little tint, so the background never passes for an object
    # colour.
    blobs = rng.normal(0, 22, size=(5, 5, 1)) + rng.normal(0, 6, size=(5, 5, 3))
    coarse = np.clip(base + blobs, 0, 255).astype(np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for o, poly in zip(objs, polys):
        rgb = np.clip(np.array(COLOURS[o.colour]) + rng.integers(-15, 16, size=3), 0, 255)
        draw.polygon(poly, fill=tuple(int(c) for c in rgb))
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-14, 15, size=(h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def random_scene(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[Image.Image, list[Obj]]:
    """One scene drawn from `rng` as `generate_refshapes` draws its images (width, objects, texture,
    noise), with no expression and no file: for a caller that needs scenes from a random stream of
    its own."""
    h = cfg.image_size
    w = int(round(cfg.image_size * rng.uniform(0.8, 1.2)))
    placed = None
    while placed is None:
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        placed = _place(_attributes(n, rng), w, h, rng)
    objs, polys = placed
    return _draw(objs, polys, w, h, rng), objs


def _polygon_area(poly) -> float:
    xs, ys = np.array([p[0] for p in poly]), np.array([p[1] for p in poly])
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def _split_images(n: int, cfg: SyntheticConfig, rng: np.random.Generator) -> list[str]:
    n_val = max(1, round(n * cfg.val_fraction)) if n >= 4 else 0
    n_test = max(2, round(n * cfg.test_fraction)) if n >= 4 else 0
    n_a = (n_test + 1) // 2
    splits = (
        ["val"] * n_val
        + ["testA"] * n_a
        + ["testB"] * (n_test - n_a)
        + ["train"] * (n - n_val - n_test)
    )
    return [splits[i] for i in rng.permutation(n)]


def dominant_test_split(shapes: list[str]) -> Optional[str]:
    """testA when a strict majority of the objects are of TEST_A_CATEGORIES, testB when a strict
    majority are not, None on a tie (such an image is never a test image)."""
    a = sum(shape in TEST_A_CATEGORIES for shape in shapes)
    return "testA" if 2 * a > len(shapes) else "testB" if 2 * a < len(shapes) else None


def generate_refshapes(out_dir: Path, cfg: SyntheticConfig, split_by: str = "unc") -> dict:
    """Write RefShapes to `out_dir` (instances.json, refs(<split_by>).p, images/); return a
    summary."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    cat_ids = {name: i + 1 for i, name in enumerate(CATEGORIES)}
    images, annotations, refs = [], [], []
    image_splits = _split_images(cfg.num_images, cfg, rng)
    ann_id = sent_id = 0
    for image_id, image_split in enumerate(image_splits, start=1):
        h = cfg.image_size
        w = int(
            round(cfg.image_size * rng.uniform(0.8, 1.2))
        )  # non-square, so letterboxing is exercised
        placed = None
        while placed is None:
            n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
            attrs = _attributes(n, rng)
            if (
                image_split.startswith("test")
                and dominant_test_split([a[0] for a in attrs]) != image_split
            ):
                # a testA image is mostly of testA's categories, as RefCOCO's testA is of people
                continue
            placed = _place(attrs, w, h, rng)
        objs, polys = placed
        file_name = f"refshapes_{image_id:06d}.png"
        _draw(objs, polys, w, h, rng).save(
            out_dir / "images" / file_name, format="PNG", compress_level=1
        )
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        margin = MARGIN * min(w, h)
        per_category = Counter(o.shape for o in objs)
        anchor_descs = [_minimal_unique(o, objs) for o in objs]
        for t, (o, poly) in enumerate(zip(objs, polys)):
            ann_id += 1
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat_ids[o.shape],
                    "bbox": list(o.bbox),
                    "area": round(_polygon_area(poly), 2),
                    "iscrowd": 0,
                    "segmentation": [[c for p in poly for c in p]],
                    "attributes": {"colour": o.colour, "size": o.size},
                }
            )
            if per_category[o.shape] < 2:
                # alone of its category: context only (RefCOCO refers to objects with a
                # same-category other)
                continue
            split = image_split
            if split.startswith("test") and (o.shape in TEST_A_CATEGORIES) != (split == "testA"):
                # testA refers to testA's categories only (RefCOCO: people), testB to the others
                continue
            texts = choose_expressions(t, objs, cfg.expressions_per_ref, margin, rng, anchor_descs)
            if not texts:
                continue
            sentences = []
            for text in texts:
                sentences.append(
                    {"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text}
                )
                sent_id += 1
            refs.append(
                {
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "file_name": f"refshapes_{image_id:06d}_{ann_id}.png",
                    "ann_id": ann_id,
                    "ref_id": len(refs),
                    "image_id": image_id,
                    "split": split,
                    "sentences": sentences,
                    "category_id": cat_ids[o.shape],
                }
            )
    categories = [{"id": i, "name": n, "supercategory": "shape"} for n, i in cat_ids.items()]
    instances = {
        "info": {"description": "RefShapes", "seed": cfg.seed},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (out_dir / "instances.json").write_text(json.dumps(instances), encoding="utf-8")
    with open(out_dir / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return _summary(refs, images, image_splits)


def _summary(refs, images, image_splits) -> dict:
    per_split: dict[str, dict[str, int]] = {}
    for r in refs:
        s = per_split.setdefault(r["split"], {"images": 0, "refs": 0, "sentences": 0})
        s["refs"] += 1
        s["sentences"] += len(r["sentences"])
    for split in per_split:
        per_split[split]["images"] = len({r["image_id"] for r in refs if r["split"] == split})
    vocab = {tok for r in refs for s in r["sentences"] for tok in s["tokens"]}
    return {
        "num_images": len(images),
        "num_refs": len(refs),
        "num_sentences": sum(len(r["sentences"]) for r in refs),
        "image_splits": {k: image_splits.count(k) for k in ("train", "val", "testA", "testB")},
        "splits": per_split,
        "categories": list(CATEGORIES),
        "test_categories": {
            "testA": list(TEST_A_CATEGORIES),
            "testB": [c for c in CATEGORIES if c not in TEST_A_CATEGORIES],
        },
        "vocabulary_size": len(vocab),
    }
