"""The RefShapes expression language: its words, how an expression is written, read back and
resolved.

An expression names a target description (size, colour, shape or a generic noun) and at most one
spatial
cue: an absolute location among the objects it describes ("the leftmost circle", "the disc in the
top right") or a relation to one other object ("the square left of the blue star", "the box next to
the disc"). Every word has synonyms and every kind several templates, so the same meaning is written
in many ways:

- attribute: "the big red circle", "little violet rhombus"
- location:  "the left circle", "the round shape on the left side", "the upper right plus sign"
- relation:  "the square that is beneath the green star", "the disc closest to the box"

Readings are deliberately loose (any object not clearly beaten counts), so an expression that
resolves to one object under them is unambiguous for a human too. :func:`parse_expression` reads any
text :func:`render` writes; :func:`resolve` is what both the generator and the dataset checker
(refvg.data.refshapes_check) decide truth and uniqueness with.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

CATEGORIES = ("circle", "square", "triangle", "diamond", "cross", "star")
SHAPE_WORDS = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular shape"),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
    "star": ("star", "star shape"),
}
NOUNS = ("shape", "object", "one", "thing")  # name no category
COLOUR_WORDS = {
    "red": ("red",),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
}
SIZES = ("small", "big")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large", "huge")}

# Absolute locations, read among the objects the description fits: a side is the extreme one, a
# corner the one beyond every other on both of its axes.
LOCATIONS = (
    "left",
    "right",
    "top",
    "bottom",
    "top left",
    "top right",
    "bottom left",
    "bottom right",
)
LOCATION_PREFIX = {
    "left": ("leftmost", "left"),
    "right": ("rightmost", "right"),
    "top": ("top", "topmost", "upper"),
    "bottom": ("bottom", "lowest", "lower"),
    "top left": ("top left", "upper left"),
    "top right": ("top right", "upper right"),
    "bottom left": ("bottom left", "lower left"),
    "bottom right": ("bottom right", "lower right"),
}
LOCATION_SUFFIX = {
    "left": ("on the left", "on the left side", "furthest left"),
    "right": ("on the right", "on the right side", "furthest right"),
    "top": ("at the top", "highest up"),
    "bottom": ("at the bottom", "lowest down"),
    "top left": ("in the top left", "in the top left corner"),
    "top right": ("in the top right", "in the top right corner"),
    "bottom left": ("in the bottom left", "in the bottom left corner"),
    "bottom right": ("in the bottom right", "in the bottom right corner"),
}
RELATIONS = ("left", "right", "above", "below", "near")
RELATION_WORDS = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "lower than"),
    "near": ("next to", "near", "beside", "closest to"),
}
MARGIN = 0.08  # of the shorter image side: closer than this along an axis counts as "same place"
NEAR_RATIO = (
    1.5  # "next to": every other candidate is at least this much farther from the anchor ...
)
NEAR_LIMIT = 6.0  # ... and the target at most this many margins (0.48 of the shorter side) from it


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
        return (
            (self.size is None or self.size == o.size)
            and (self.colour is None or self.colour == o.colour)
            and (self.shape is None or self.shape == o.shape)
        )


@dataclass(frozen=True)
class Expr:
    target: Desc
    location: Optional[str] = None  # one of LOCATIONS
    relation: Optional[str] = None  # one of RELATIONS, with `anchor`
    anchor: Optional[Desc] = None

    @property
    def kind(self) -> str:
        return "relation" if self.relation else "location" if self.location else "attribute"

    def without_each_cue(self) -> list["Expr"]:
        """The expression with one cue (size, colour, location, relation) erased, for each cue it
        has. The head noun is not a cue: erasing it leaves a description of the same objects or
        more."""
        t = self.target
        out = [replace(self, target=replace(t, size=None))] if t.size else []
        out += [replace(self, target=replace(t, colour=None))] if t.colour else []
        out += [replace(self, location=None)] if self.location else []
        out += [replace(self, relation=None, anchor=None)] if self.relation else []
        return out


def objects_from_annotations(anns: list[dict], categories: dict[int, str]) -> list[Obj]:
    """A scene's objects from its COCO annotations (RefShapes keeps colour and size under
    `attributes`)."""
    return [
        Obj(
            categories[a["category_id"]],
            a["attributes"]["colour"],
            a["attributes"]["size"],
            tuple(a["bbox"]),
        )
        for a in anns
    ]


# ---------------------------------------------------------------- meaning


def referents(expr: Expr, objs: list[Obj], margin: float) -> list[int]:
    """Indices of every object the expression could reasonably mean (loose readings; an ambiguous
    anchor counts every reading)."""
    cands = [i for i, o in enumerate(objs) if expr.target.matches(o)]
    if expr.location:
        cands = _at_location(expr.location, cands, objs, margin)
    if not expr.relation:
        return cands
    anchors = [i for i, o in enumerate(objs) if expr.anchor.matches(o)]
    out: set[int] = set()
    for a in anchors:
        out.update(_related(expr.relation, [i for i in cands if i != a], objs[a], objs, margin))
    return sorted(out)


def resolve(expr: Expr, objs: list[Obj], margin: float) -> Optional[int]:
    """The one object the expression names, or None when it names none, several, or leans on an
    anchor that is not itself unique."""
    if expr.relation and sum(expr.anchor.matches(o) for o in objs) != 1:
        return None
    found = referents(expr, objs, margin)
    return found[0] if len(found) == 1 else None


def is_overspecified(expr: Expr, objs: list[Obj], margin: float) -> bool:
    """Two cues or more, and erasing any one of them still names the same object (CM-Erase's
    premise)."""
    t = resolve(expr, objs, margin)
    drops = expr.without_each_cue()
    return t is not None and len(drops) >= 2 and all(resolve(d, objs, margin) == t for d in drops)


def needs_its_cue(expr: Expr, objs: list[Obj]) -> bool:
    """A location or relation that the target cannot be told without: its description alone fits two
    objects or more (a relation then genuinely needs its context object)."""
    return sum(expr.target.matches(o) for o in objs) >= 2


def _at_location(loc: str, cands: list[int], objs: list[Obj], margin: float) -> list[int]:
    if not cands:
        return []
    # Per axis, a key that is smallest for the object most in the named direction.
    keys = {
        "left": lambda o: o.cx,
        "right": lambda o: -o.cx,
        "top": lambda o: o.cy,
        "bottom": lambda o: -o.cy,
    }
    parts = loc.split()
    if len(parts) == 1:
        f = keys[loc]
        best = min(f(objs[i]) for i in cands)
        return [i for i in cands if f(objs[i]) < best + margin]
    fy, fx = keys[parts[0]], keys[parts[1]]
    # A corner: every object that no other beats clearly on both axes at once.
    return [
        i
        for i in cands
        if not any(
            fy(objs[j]) < fy(objs[i]) - margin and fx(objs[j]) < fx(objs[i]) - margin for j in cands
        )
    ]


def _related(rel: str, cands: list[int], a: Obj, objs: list[Obj], margin: float) -> list[int]:
    if rel == "near":
        if not cands:
            return []
        d = {i: _distance(objs[i], a) for i in cands}
        nearest = min(d.values())
        return [i for i in cands if d[i] <= NEAR_RATIO * nearest and d[i] <= NEAR_LIMIT * margin]
    return [i for i in cands if _loosely(rel, objs[i], a, margin)]


def _distance(o: Obj, a: Obj) -> float:
    return math.hypot(o.cx - a.cx, o.cy - a.cy)


def _loosely(rel: str, t: Obj, a: Obj, margin: float) -> bool:
    dx, dy = t.cx - a.cx, t.cy - a.cy
    return {
        "left": dx < -margin,
        "right": dx > margin,
        "above": dy < -margin,
        "below": dy > margin,
    }[rel]


def strictly(rel: str, t: Obj, a: Obj, margin: float) -> bool:
    """The target lies mostly in that direction from the anchor, not just slightly past it (what the
    generator asks of a relation before it names it)."""
    if rel == "near":
        return _distance(t, a) <= NEAR_LIMIT * margin
    dx, dy = t.cx - a.cx, t.cy - a.cy
    along = abs(dx) if rel in ("left", "right") else abs(dy)
    across = abs(dy) if rel in ("left", "right") else abs(dx)
    return _loosely(rel, t, a, margin) and across < along


# ---------------------------------------------------------------- text


def render(expr: Expr, rng: np.random.Generator) -> str:
    """One of the many texts of `expr`: synonyms and a template drawn from `rng`."""
    d = _desc_text(expr.target, rng)
    named = expr.target.shape is not None  # "the" may go only before a named shape ("left circle")
    the = "the " if not named or rng.random() < 0.7 else ""
    if expr.relation:
        link = str(rng.choice(["", "", "that is ", "which is "]))
        words = _pick(RELATION_WORDS[expr.relation], rng)
        return f"{the}{d} {link}{words} the {_desc_text(expr.anchor, rng)}"
    if expr.location:
        if rng.random() < 0.5:
            return f"{the}{_pick(LOCATION_PREFIX[expr.location], rng)} {d}"
        link = str(rng.choice(["", "", "that is "]))
        return f"{the}{d} {link}{_pick(LOCATION_SUFFIX[expr.location], rng)}"
    return f"{the}{d}"


def _pick(words, rng: np.random.Generator) -> str:
    return str(words[int(rng.integers(len(words)))])


def _desc_text(d: Desc, rng: np.random.Generator) -> str:
    words = []
    if d.size:
        words.append(_pick(SIZE_WORDS[d.size], rng))
    if d.colour:
        words.append(_pick(COLOUR_WORDS[d.colour], rng))
    words.append(_pick(SHAPE_WORDS[d.shape], rng) if d.shape else _pick(NOUNS, rng))
    return " ".join(words)


def _alternatives(phrases) -> str:
    return "|".join(
        re.escape(p) for p in sorted(set(phrases), key=lambda p: (-len(p), p))
    )  # longest first


def _inverse(table: dict) -> dict[str, str]:
    return {w: key for key, words in table.items() for w in words}


_SIZE_OF, _COLOUR_OF = _inverse(SIZE_WORDS), _inverse(COLOUR_WORDS)
_SHAPE_OF = _inverse(SHAPE_WORDS)
_PREFIX_OF, _SUFFIX_OF, _RELATION_OF = (
    _inverse(LOCATION_PREFIX),
    _inverse(LOCATION_SUFFIX),
    _inverse(RELATION_WORDS),
)
_DESC_RE = re.compile(
    rf"(?:({_alternatives(_SIZE_OF)}) )?(?:({_alternatives(_COLOUR_OF)}) )?"
    rf"({_alternatives(list(_SHAPE_OF) + list(NOUNS))})"
)
_LINK = r"(?:(?:that|which) is )?"
_RELATION_RE = re.compile(rf"(.+?) {_LINK}({_alternatives(_RELATION_OF)}) the (.+)")
_PREFIX_RE = re.compile(rf"({_alternatives(_PREFIX_OF)}) (.+)")
_SUFFIX_RE = re.compile(rf"(.+?) {_LINK}({_alternatives(_SUFFIX_OF)})")


def parse_expression(text: str) -> Expr:
    """Inverse of :func:`render` (meaning, not wording); ValueError on text outside the RefShapes
    language."""
    t = " ".join(text.lower().split())
    body = t[4:] if t.startswith("the ") else t
    m = _RELATION_RE.fullmatch(body)
    if m and _parse_desc(m.group(3), strict=False):
        return Expr(
            _parse_desc(m.group(1)),
            relation=_RELATION_OF[m.group(2)],
            anchor=_parse_desc(m.group(3)),
        )
    m = _PREFIX_RE.fullmatch(body)
    if m and _parse_desc(m.group(2), strict=False):
        return Expr(_parse_desc(m.group(2)), location=_PREFIX_OF[m.group(1)])
    m = _SUFFIX_RE.fullmatch(body)
    if m and _parse_desc(m.group(1), strict=False):
        return Expr(_parse_desc(m.group(1)), location=_SUFFIX_OF[m.group(2)])
    desc = _parse_desc(body, strict=False)
    if desc is None:
        raise ValueError(f"not a RefShapes expression: {text!r}")
    return Expr(desc)


def _parse_desc(text: str, strict: bool = True) -> Optional[Desc]:
    m = _DESC_RE.fullmatch(text)
    if m is None:
        if strict:
            raise ValueError(f"not a RefShapes description: {text!r}")
        return None
    size, colour, noun = m.groups()
    return Desc(_SIZE_OF.get(size), _COLOUR_OF.get(colour), _SHAPE_OF.get(noun))


def vocabulary() -> set[str]:
    """Every word the language can write."""
    phrases = [
        *_SIZE_OF,
        *_COLOUR_OF,
        *_SHAPE_OF,
        *NOUNS,
        *_PREFIX_OF,
        *_SUFFIX_OF,
        *_RELATION_OF,
        "the",
        "that",
        "which",
        "is",
    ]
    return {w for p in phrases for w in p.split()}
