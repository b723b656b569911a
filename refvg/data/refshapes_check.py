"""Checks a written RefShapes dataset from its files alone (instances.json + refs(<split_by>).p),
never from the generator's state: every expression parses, is true of its target and of no other
object in the image, and each kind keeps its promise:

- every referred object has another object of its category in the image (RefCOCO's collection rule);
- a relation's context object is itself unique in the image;
- a location or relation is needed (the description alone fits several objects), unless the
expression
  is over-specified: two cues or more, each of which can be erased and the rest still names the
  target.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from refvg.data.refer import find_refs_file, load_refs
from refvg.data.refshapes_language import (
    MARGIN,
    Obj,
    is_overspecified,
    needs_its_cue,
    objects_from_annotations,
    parse_expression,
    resolve,
)


@dataclass
class CheckReport:
    sentences: int = 0
    kinds: Counter = field(default_factory=Counter)  # attribute / location / relation
    overspecified: int = 0
    refs: int = 0
    refs_of_mixed_kinds: int = (
        0  # refs whose expressions are not all of one kind (over-specified counts as one)
    )
    problems: list[str] = field(
        default_factory=list
    )  # each names the ref, the text and what is wrong


def check_refshapes(folder: Path, split_by: str = "unc") -> CheckReport:
    folder = Path(folder)
    instances = json.loads((folder / "instances.json").read_text(encoding="utf-8"))
    refs = load_refs(find_refs_file(folder, split_by))
    names = {c["id"]: c["name"] for c in instances["categories"]}
    images = {i["id"]: i for i in instances["images"]}
    anns: dict[int, list[dict]] = {}
    for a in instances["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    report = CheckReport()
    for r in refs:
        where = f"ref {r['ref_id']} (image {r['image_id']}, ann {r['ann_id']})"
        image_anns = anns.get(r["image_id"], [])
        ids = [a["id"] for a in image_anns]
        if r["ann_id"] not in ids:
            report.problems.append(f"{where}: its annotation is not among its image's")
            continue
        objs = objects_from_annotations(image_anns, names)
        t = ids.index(r["ann_id"])
        if sum(o.shape == objs[t].shape for o in objs) < 2:
            report.problems.append(f"{where}: the only {objs[t].shape} in its image")
        margin = MARGIN * min(images[r["image_id"]]["width"], images[r["image_id"]]["height"])
        texts = [s["sent"] for s in r["sentences"]]
        if not texts or len(set(texts)) != len(texts):
            report.problems.append(f"{where}: no expression, or one twice: {texts}")
        report.refs += 1
        styles = set()
        for text in texts:
            report.sentences += 1
            problem = _check_expression(text, t, objs, margin, report, styles)
            if problem:
                report.problems.append(f"{where}: {text!r}: {problem}")
        report.refs_of_mixed_kinds += len(styles) > 1
    return report


def _check_expression(
    text: str, t: int, objs: list[Obj], margin: float, report: CheckReport, styles: set
) -> str | None:
    try:
        expr = parse_expression(text)
    except ValueError as err:
        return str(err)
    report.kinds[expr.kind] += 1
    named = resolve(expr, objs, margin)
    if named != t:
        return (
            "names no object, or several"
            if named is None
            else f"names object {named}, not the target {t}"
        )
    over = is_overspecified(expr, objs, margin)
    report.overspecified += over
    styles.add("overspecified" if over else expr.kind)
    if expr.kind != "attribute" and not over and not needs_its_cue(expr, objs):
        return (
            f"its {expr.kind} is not needed (the description alone names "
            f"the target) and not a second cue"
        )
    return None
