"""How noisy weak_cam's "negative" pairs are: how often a random other train image holds an object
the expression fits (RefShapes' own checker on the generator's annotations; a diagnosis of the
matching objective, never part of training), per expression kind.

    PYTHONPATH=$PWD python benchmarks/weak_false_negatives.py [--params params.yaml] [--seed 0]

Needs the generated RefShapes data (`dvc repro generate` or `python -m flows.generate`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def false_negatives(params: str, seed: int = 0) -> dict[str, tuple[int, int]]:
    """kind -> (expressions, of which the random other image holds an object the expression
    fits)."""
    from refvg.config import load_config
    from refvg.data.refer import find_refs_file, load_refs
    from refvg.data.synthetic import MARGIN, objects_from_annotations, parse_expression, referents

    cfg = load_config(params)
    folder = Path(cfg.data.root) / cfg.data.dataset
    instances = json.loads((folder / "instances.json").read_text())
    refs = load_refs(find_refs_file(folder, cfg.data.split_by))
    names = {c["id"]: c["name"] for c in instances["categories"]}
    sizes = {i["id"]: min(i["width"], i["height"]) for i in instances["images"]}
    anns: dict[int, list] = {}
    for a in instances["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    objs = {k: objects_from_annotations(v, names) for k, v in anns.items()}
    train = [r for r in refs if r["split"] == "train"]
    images = sorted({r["image_id"] for r in train})
    rng = random.Random(seed)
    counts: dict[str, list[int]] = {}
    for r in train:
        for sent in r["sentences"]:
            expr = parse_expression(sent["sent"])
            other = rng.choice(images)
            while other == r["image_id"]:
                other = rng.choice(images)
            fits = bool(referents(expr, objs[other], MARGIN * sizes[other]))
            for key in (expr.kind, "all"):
                c = counts.setdefault(key, [0, 0])
                c[0] += 1
                c[1] += fits
    return {k: (n, fits) for k, (n, fits) in counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seed", type=int, default=0, help="draws the random other images")
    args = ap.parse_args()
    for key, (n, fits) in false_negatives(args.params, args.seed).items():
        print(f"{key}: {fits / n:.3f} of {n} random other images hold an object it fits")


if __name__ == "__main__":
    main()
