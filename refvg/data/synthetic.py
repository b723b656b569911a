"""RefShapes: a procedurally generated referring-expression dataset written in the RefCOCO layout.

Each scene is a noisy, textured background with `min_objects..max_objects` non-overlapping shapes (6
shapes = 6 COCO categories, 6 colours, 2 sizes). Distractors deliberately share the target's shape
or colour, so the image alone never tells which object is meant: the expression has to be read.

Expression kinds, all checked for uniqueness against the scene by parsing the rendered text back
(:func:`parse_expression`) and resolving it (:func:`referents`) before it is emitted:
- attributes:        "the big red circle", "the green shape"
- absolute location: "the leftmost square", "the circle on the left", "the top blue shape"
- relations:         "the square left of the green star", "the triangle below the red circle"

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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from refvg.config import SyntheticConfig

CATEGORIES = ("circle", "square", "triangle", "diamond", "cross", "star")
TEST_A_CATEGORIES = CATEGORIES[: len(CATEGORIES) // 2]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SIZES = ("small", "big")
# Side of an object's box as a fraction of the image's shorter side; the gap keeps "small"/"big"
# unambiguous.
SIZE_RANGES = {"small": (0.18, 0.24), "big": (0.32, 0.40)}
SIZE_WORDS = {"small": ("small", "little"), "big": ("big", "large")}
NOUNS = ("shape", "object")
EXTREME_DIRS = ("left", "right", "top", "bottom")
RELATIONS = ("left", "right", "above", "below")
MARGIN = 0.08  # of the shorter image side: closer than this along an axis counts as "same place"


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    bbox: tuple[float, float, float, float]  # xywh

    @property
    def cx(self) -> float:
        return self.bbox[0] + self.bbox[2] / 2

    @property
    def cy(self) -> float:
        return self.bbox[1] + self.bbox[3] / 2


@dataclass(frozen=True)
class Desc:
    size: Optional[str] = None
    colour: Optional[str] = None
    shape: Optional[str] = None

    def matches(self, o: Obj) -> bool:
        return ((self.size is None or self.size == o.size) and (self.colour is None or self.colour == o.colour)
                and (self.shape is None or self.shape == o.shape))


@dataclass(frozen=True)
class Expr:
    kind: str  # "attr" | "extreme" | "relation"
    target: Desc
    direction: Optional[str] = None
    anchor: Optional[Desc] = None


# ---------------------------------------------------------------- the uniqueness checker


def referents(expr: Expr, objs: list[Obj], margin: float) -> list[int]:
    """Indices of every object the expression could reasonably mean (unique iff length 1).

    Readings are deliberately loose (any object clearly on the named side counts), so an expression
    that resolves to one object is unambiguous for a human too.
    """
    cands = [i for i, o in enumerate(objs) if expr.target.matches(o)]
    if expr.kind == "attr":
        return cands
    if expr.kind == "extreme":
        key = {"left": lambda o: o.cx, "right": lambda o: -o.cx, "top": lambda o: o.cy, "bottom": lambda o: -o.cy}
        f = key[expr.direction]
        if not cands:
            return []
        best = min(f(objs[i]) for i in cands)
        return [i for i in cands if f(objs[i]) < best + margin]
    anchors = [i for i, o in enumerate(objs) if expr.anchor.matches(o)]
    if len(anchors) != 1:
        return cands  # the anchor itself is ambiguous, so is the whole expression
    a = objs[anchors[0]]
    return [i for i in cands if i != anchors[0] and _loosely(expr.direction, objs[i], a, margin)]


def _loosely(rel: str, t: Obj, a: Obj, margin: float) -> bool:
    dx, dy = t.cx - a.cx, t.cy - a.cy
    return {"left": dx < -margin, "right": dx > margin, "above": dy < -margin, "below": dy > margin}[rel]


def _strictly(rel: str, t: Obj, a: Obj, margin: float) -> bool:
    # The intended target must also lie mostly in that direction, not just slightly past the anchor.
    dx, dy = t.cx - a.cx, t.cy - a.cy
    along = abs(dx) if rel in ("left", "right") else abs(dy)
    across = abs(dy) if rel in ("left", "right") else abs(dx)
    return _loosely(rel, t, a, margin) and across < along


# ---------------------------------------------------------------- text <-> Expr

_EXTREME_PREFIX = {"leftmost": "left", "rightmost": "right", "top": "top", "topmost": "top",
                   "bottom": "bottom", "lowest": "bottom"}
_EXTREME_SUFFIX = {"on the left": "left", "on the right": "right", "furthest left": "left",
                   "furthest right": "right", "at the top": "top", "at the bottom": "bottom"}
_REL_WORDS = {"left of": "left", "to the left of": "left", "right of": "right", "to the right of": "right",
              "above": "above", "over": "above", "below": "below", "under": "below"}
_REL_RE = re.compile(r"^(.+?) (to the left of|to the right of|left of|right " r"of|above|over|below|under) the (.+)$")


def render(expr: Expr, rng: np.random.Generator) -> str:
    d = _desc_text(expr.target, rng)
    if expr.kind == "attr":
        return str(rng.choice([f"the {d}", d]))
    if expr.kind == "extreme":
        pre = [w for w, v in _EXTREME_PREFIX.items() if v == expr.direction]
        suf = [w for w, v in _EXTREME_SUFFIX.items() if v == expr.direction]
        forms = [f"the {w} {d}" for w in pre] + [f"the {d} {w}" for w in suf]
        return str(rng.choice(forms))
    words = [w for w, v in _REL_WORDS.items() if v == expr.direction]
    return f"the {d} {rng.choice(words)} the {_desc_text(expr.anchor, rng)}"


def _desc_text(d: Desc, rng: np.random.Generator) -> str:
    words = []
    if d.size:
        words.append(str(rng.choice(SIZE_WORDS[d.size])))
    if d.colour:
        words.append(d.colour)
    words.append(d.shape or str(rng.choice(NOUNS)))
    return " ".join(words)


def parse_expression(text: str) -> Expr:
    """Inverse of :func:`render`; raises ValueError on anything outside the RefShapes grammar."""
    t = " ".join(text.lower().split())
    m = _REL_RE.match(t)
    if m:
        return Expr("relation", _parse_desc(m.group(1)), _REL_WORDS[m.group(2)], _parse_desc(m.group(3)))
    body = t[4:] if t.startswith("the ") else t
    first, _, rest = body.partition(" ")
    if first in _EXTREME_PREFIX and rest:
        return Expr("extreme", _parse_desc(rest), _EXTREME_PREFIX[first])
    for suffix, direction in _EXTREME_SUFFIX.items():
        if body.endswith(" " + suffix):
            return Expr("extreme", _parse_desc(body[: -len(suffix) - 1]), direction)
    return Expr("attr", _parse_desc(body))


def _parse_desc(text: str) -> Desc:
    words = text.split()
    if words and words[0] == "the":
        words = words[1:]
    size = colour = None
    if words and any(words[0] in ws for ws in SIZE_WORDS.values()):
        size = next(s for s, ws in SIZE_WORDS.items() if words[0] in ws)
        words = words[1:]
    if words and words[0] in COLOURS:
        colour, words = words[0], words[1:]
    if len(words) != 1 or (words[0] not in CATEGORIES and words[0] not in NOUNS):
        raise ValueError(f"not a RefShapes description: {text!r}")
    return Desc(size, colour, words[0] if words[0] in CATEGORIES else None)


# ---------------------------------------------------------------- choosing expressions


def _subsets(o: Obj) -> list[Desc]:
    out = []
    for mask in range(8):
        out.append(Desc(o.size if mask & 1 else None, o.colour if mask & 2 else None, o.shape if mask & 4 else None))
    return out


def _candidates(t: int, objs: list[Obj], margin: float) -> dict[str, list[Expr]]:
    target = objs[t]
    subsets = _subsets(target)
    anchor_descs = [_minimal_unique(o, objs) for o in objs]
    by_kind: dict[str, list[Expr]] = {"attr": [], "extreme": [], "relation": []}
    for d in subsets:
        n_match = sum(d.matches(o) for o in objs)
        if n_match == 1 and d != Desc():
            by_kind["attr"].append(Expr("attr", d))
        if n_match < 2:
            continue  # location/relation words only where the description alone is not enough
        for direction in EXTREME_DIRS:
            e = Expr("extreme", d, direction)
            if referents(e, objs, margin) == [t]:
                by_kind["extreme"].append(e)
        for a, anchor in enumerate(objs):
            if a == t:
                continue
            for rel in RELATIONS:
                e = Expr("relation", d, rel, anchor_descs[a])
                if _strictly(rel, target, anchor, margin) and referents(e, objs, margin) == [t]:
                    by_kind["relation"].append(e)
    return {k: v for k, v in by_kind.items() if v}


def _minimal_unique(o: Obj, objs: list[Obj]) -> Desc:
    # Fewest attributes that pick the anchor out; ties prefer ones naming the shape (reads
    # naturally).
    best = None
    for d in _subsets(o):
        if d == Desc() or sum(d.matches(x) for x in objs) != 1:
            continue
        cost = sum(v is not None for v in vars(d).values()) - 0.5 * (d.shape is not None)
        if best is None or cost < best[0]:
            best = (cost, d)
    return best[1]


def choose_expressions(t: int, objs: list[Obj], n: int, margin: float, rng: np.random.Generator) -> list[str]:
    """Up to `n` different texts naming objs[t] uniquely, spread over expression kinds."""
    cands = _candidates(t, objs, margin)
    kinds = [k for k in ("attr", "extreme", "relation") if k in cands]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    texts: list[str] = []
    for attempt in range(8 * n):
        if len(texts) == n or not kinds:
            break
        pool = cands[kinds[attempt % len(kinds)]]
        text = render(pool[int(rng.integers(len(pool)))], rng)
        if text not in texts and referents(parse_expression(text), objs, margin) == [t]:
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
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.sin(math.pi * k / 5),
                -(1.0 if k % 2 == 0 else 0.45) * math.cos(math.pi * k / 5)) for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(round(cx + r * x, 2), round(cy + r * y, 2)) for x, y in pts]


def _attributes(n: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    # Object 1 shares object 0's shape and object 2 shares a colour, so shape or colour alone is
    # never enough to find the target; later objects copy an attribute with high probability.
    out: list[tuple[str, str, str]] = []
    while len(out) < n:
        shape, colour, size = rng.choice(CATEGORIES), rng.choice(list(COLOURS)), rng.choice(SIZES)
        k = len(out)
        if k == 1 or (k > 2 and rng.random() < 0.4):
            shape = out[0 if k == 1 else int(rng.integers(k))][0]
        elif k == 2 or (k > 2 and rng.random() < 0.7):
            colour = out[int(rng.integers(k))][1]
        triple = (str(shape), str(colour), str(size))
        if triple not in out:  # identical twins could never be told apart
            out.append(triple)
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
            if all(abs(cx - bx) >= r + br + 2 or abs(cy - by) >= r + br + 2 for bx, by, br in boxes):
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
    splits = ["val"] * n_val + ["testA"] * n_a + ["testB"] * (n_test - n_a) + ["train"] * (n - n_val - n_test)
    return [splits[i] for i in rng.permutation(n)]


def dominant_test_split(shapes: list[str]) -> Optional[str]:
    """testA when a strict majority of the objects are of TEST_A_CATEGORIES, testB when a strict
    majority are not, None on a tie (such an image is never a test image)."""
    a = sum(shape in TEST_A_CATEGORIES for shape in shapes)
    return "testA" if 2 * a > len(shapes) else "testB" if 2 * a < len(shapes) else None


def objects_from_annotations(anns: list[dict], categories: dict[int, str]) -> list[Obj]:
    """Rebuild a scene's objects from its COCO annotations (what the checker needs)."""
    return [Obj(categories[a["category_id"]], a["attributes"]["colour"], a["attributes"]["size"],
                tuple(a["bbox"])) for a in anns]


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
        # non-square, so letterboxing is exercised
        w = int(round(cfg.image_size * rng.uniform(0.8, 1.2)))
        placed = None
        while placed is None:
            n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
            attrs = _attributes(n, rng)
            if image_split.startswith("test") and dominant_test_split([a[0] for a in attrs]) != image_split:
                # a testA image is mostly of testA's categories, as RefCOCO's testA is of people
                continue
            placed = _place(attrs, w, h, rng)
        objs, polys = placed
        file_name = f"refshapes_{image_id:06d}.png"
        _draw(objs, polys, w, h, rng).save(out_dir / "images" / file_name, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        margin = MARGIN * min(w, h)
        for t, (o, poly) in enumerate(zip(objs, polys)):
            ann_id += 1
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": cat_ids[o.shape],
                "bbox": list(o.bbox), "area": round(_polygon_area(poly), 2), "iscrowd": 0,
                "segmentation": [[c for p in poly for c in p]],
                "attributes": {"colour": o.colour, "size": o.size},
            })
            split = image_split
            if split.startswith("test") and (o.shape in TEST_A_CATEGORIES) != (split == "testA"):
                # testA refers to testA's categories only (RefCOCO: people), testB to the others
                continue
            texts = choose_expressions(t, objs, cfg.expressions_per_ref, margin, rng)
            if not texts:
                continue
            sentences = []
            for text in texts:
                sentences.append({"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text})
                sent_id += 1
            refs.append({
                "sent_ids": [s["sent_id"] for s in sentences], "file_name": f"refshapes_{image_id:06d}_{ann_id}.png",
                "ann_id": ann_id, "ref_id": len(refs), "image_id": image_id, "split": split,
                "sentences": sentences, "category_id": cat_ids[o.shape],
            })
    categories = [{"id": i, "name": n, "supercategory": "shape"} for n, i in cat_ids.items()]
    instances = {"info": {"description": "RefShapes", "seed": cfg.seed}, "images": images,
                 "annotations": annotations, "categories": categories}
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
        "num_images": len(images), "num_refs": len(refs),
        "num_sentences": sum(len(r["sentences"]) for r in refs),
        "image_splits": {k: image_splits.count(k) for k in ("train", "val", "testA", "testB")},
        "splits": per_split, "categories": list(CATEGORIES),
        "test_categories": {"testA": list(TEST_A_CATEGORIES),
                            "testB": [c for c in CATEGORIES if c not in TEST_A_CATEGORIES]},
        "vocabulary_size": len(vocab),
    }
