"""Statistics of a REFER-layout dataset on disk (refs(<split_by>).p or .json + instances.json):
RefShapes, or RefCOCO / RefCOCO+ / RefCOCOg as shipped, the same way, so the generated data can be
set beside them.

Per image, only images holding a ref count; `objects_per_image` counts every annotation of such an
image (RefCOCO's instances.json holds all of COCO's annotations of its images),
`same_category_per_ref` the objects of the referred object's category in its image, itself included.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from refvg.data.refer import find_refs_file, load_refs


def dataset_statistics(folder: Path, split_by: str) -> dict:
    folder = Path(folder)
    refs = load_refs(find_refs_file(folder, split_by))
    instances = json.loads((folder / "instances.json").read_text(encoding="utf-8"))
    per_image: dict[int, list[int]] = {}
    for a in instances["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a["category_id"])
    referred_images = {r["image_id"] for r in refs}
    same_category = [per_image.get(r["image_id"], []).count(r["category_id"]) for r in refs]
    words = [len(s.get("tokens") or s["sent"].split()) for r in refs for s in r["sentences"]]
    vocabulary = {
        w.lower()
        for r in refs
        for s in r["sentences"]
        for w in (s.get("tokens") or s["sent"].split())
    }
    return {
        "images": len(referred_images),
        "refs": len(refs),
        "expressions": len(words),
        "objects_per_image": _mean([len(per_image.get(i, [])) for i in referred_images]),
        "same_category_per_ref": _mean(same_category),
        "share_refs_with_same_category_other": _mean([n >= 2 for n in same_category]),
        "words_per_expression": _mean(words),
        "expressions_per_ref": len(words) / max(len(refs), 1),
        "vocabulary_size": len(vocabulary),
        "splits": dict(sorted(Counter(r["split"] for r in refs).items())),
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
