"""weak_cam: does the fusion's matcher learn, and does attention mining help? Trains through
`refvg.stages.train_method` (the pipeline's own path: box-free validation and best.pt selection) and
prints, per run, the per-epoch training losses (itm: the matcher's BCE, ln 2 = 0.693 is chance) and
the box-free val matching accuracy, then val Acc@0.5 of best.pt (the only place a box is read).

    PYTHONPATH=$PWD nice -n 10 python benchmarks/compare_weak.py           # the pair, seeds 0 1 2
    PYTHONPATH=$PWD nice -n 10 python benchmarks/compare_weak.py --before --seeds 0 \
        --methods weak_cam_no_mining                                       # the old settings
    PYTHONPATH=$PWD nice -n 10 python benchmarks/compare_weak.py --seeds 0 \
        --methods weak_cam_no_mining --set negatives=hard                  # one knob back
    PYTHONPATH=$PWD python benchmarks/compare_weak.py --false-negatives   # how noisy "negative" is

--before runs the settings this project had before the matcher was fixed (ALBEF hard negatives, the
contrastive loss at weight 1, 1/8 of the batch to the fusion, the contrastive similarity inside the
matching score) at today's epochs, for the per-epoch loss curve. Needs the prepared default data
(`python -m flows.generate` and `python -m flows.prepare`, or `dvc repro prepare`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import yaml  # noqa: E402

from refvg import stages  # noqa: E402
from refvg.config import Config  # noqa: E402
from refvg.engine.checkpoint import load_trained  # noqa: E402
from refvg.engine.evaluator import box_metrics, predict_split  # noqa: E402
from refvg.engine.runtime import resolve_device  # noqa: E402

BEFORE = {
    "negatives": "hard",
    "itc_weight": 1.0,
    "match_fraction": 0.125,
    "contrastive_in_score": True,
}
LOSSES = ("itm", "itm_cam", "itc", "mining")


def run(raw: dict, method: str, seed: int, before: bool, workdir: Path, knobs: dict) -> dict:
    raw = json.loads(json.dumps(raw))
    entry = raw["methods"][method]
    entry.setdefault("overrides", {}).setdefault("train", {})["seed"] = seed
    weak = entry.setdefault("config", {})  # over its base's, for a method with `base:`
    weak.update(BEFORE if before else {})
    weak.update(knobs)
    raw["train"]["checkpoint_dir"] = str(workdir / f"{method}-{seed}-{int(before)}")
    cfg = Config.model_validate(raw)
    epochs = []
    t0 = time.perf_counter()
    result = stages.train_method(cfg, method, on_epoch_end=lambda m, e: epochs.append(m))
    train_s = time.perf_counter() - t0
    model, rcfg, state = load_trained(result.best_checkpoint)
    val = stages.open_split(rcfg, state["model_name"], "val")  # the boxes: for the figure only
    device = resolve_device(rcfg.train.device)
    acc = box_metrics(predict_split(model, val, rcfg.eval.batch_size, device), [0.5])["acc@0.5"]
    return {
        "method": method,
        "seed": seed,
        "before": before,
        "train_s": train_s,
        "acc": acc,
        "best_epoch": result.best_epoch,
        "select": result.select_metric,
        "epochs": [
            {k: m.get(f"train/{k}") for k in LOSSES} | {"match_acc": m.get("val/match_acc")}
            for m in epochs
        ],
    }


def false_negatives(raw: dict, seed: int = 0) -> None:
    """How often a "negative" image holds an object the expression fits (RefShapes' own checker on
    the generator's annotations: a diagnosis of the objective, never part of training): for each
    train expression, a random other train image."""
    import random

    from refvg.data.refer import find_refs_file, load_refs
    from refvg.data.synthetic import MARGIN, objects_from_annotations, parse_expression, referents

    cfg = Config.model_validate(raw)
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
    for key, (n, fits) in counts.items():
        print(f"{key}: {fits / n:.3f} of {n} random other images hold an object it fits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--methods", nargs="+", default=["weak_cam", "weak_cam_no_mining"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--before", action="store_true", help="the settings before the matcher fix")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KNOB=VALUE",
        help="weak_cam config knobs for every run, e.g. negatives=hard itc_weight=1.0",
    )
    ap.add_argument(
        "--false-negatives",
        action="store_true",
        help="only print how often a random negative image fits the expression",
    )
    args = ap.parse_args()
    raw = yaml.safe_load(Path(args.params).read_text())
    if args.false_negatives:
        return false_negatives(raw)
    knobs = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    tag = " ".join([" (before)" if args.before else ""] + args.set)
    rows = []
    with tempfile.TemporaryDirectory(prefix="compare_weak_") as tmp:
        for seed in args.seeds:
            for method in args.methods:
                r = run(raw, method, seed, args.before, Path(tmp), knobs)
                rows.append(r)
                print(
                    f"{method} seed {seed}{tag}: val Acc@0.5 "
                    f"{r['acc']:.3f}, best epoch {r['best_epoch']} by {r['select']}, "
                    f"train {r['train_s']:.0f} s",
                    flush=True,
                )
                for i, e in enumerate(r["epochs"], 1):
                    parts = " ".join(f"{k} {v:.3f}" for k, v in e.items() if v is not None)
                    print(f"  epoch {i}: {parts}", flush=True)
    print("\n| method | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("|---|" + "---:|" * (len(args.seeds) + 1))
    accs = {m: [r["acc"] for r in rows if r["method"] == m] for m in args.methods}
    for m, a in accs.items():
        print(f"| {m} | " + " | ".join(f"{x:.3f}" for x in a) + f" | {statistics.mean(a):.3f} |")
    if len(args.methods) == 2 and len(args.seeds) > 1:
        first, second = args.methods
        diffs = [x - y for x, y in zip(accs[first], accs[second])]
        spread = max(max(a) - min(a) for a in accs.values())
        inside = abs(statistics.mean(diffs)) <= spread
        verdict = "inside noise" if inside else "outside the seed spread"
        print(
            f"\n{first} - {second}: per seed "
            + " ".join(f"{d:+.3f}" for d in diffs)
            + f", mean {statistics.mean(diffs):+.3f}; largest seed spread of one method "
            f"{spread:.3f}: {verdict}"
        )


if __name__ == "__main__":
    main()
