"""weak_cam: does the fusion's matcher learn, and does attention mining help? Trains through
`refvg.stages.train_method` (the pipeline's own path: box-free validation and best.pt selection) and
prints, per run, the per-epoch training losses (itm: the matcher's BCE, ln 2 = 0.693 is chance) and
the box-free val matching accuracy, then val Acc@0.5 of best.pt (the only place a box is read).

    PYTHONPATH=$PWD nice -n 10 python benchmarks/compare_weak.py                 # the pair, seeds 0 1 2
    PYTHONPATH=$PWD nice -n 10 python benchmarks/compare_weak.py --before --seeds 0 --methods weak_cam

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
from refvg.engine.evaluator import box_metrics, predict_split  # noqa: E402
from refvg.engine.runtime import resolve_device  # noqa: E402

BEFORE = {"negatives": "hard", "itc_weight": 1.0, "match_fraction": 0.125, "contrastive_in_score": True}
LOSSES = ("itm", "itm_cam", "itc", "mining")


def run(raw: dict, method: str, seed: int, before: bool, workdir: Path) -> dict:
    raw = json.loads(json.dumps(raw))
    over = raw["methods"][method].setdefault("overrides", {})
    over.setdefault("train", {})["seed"] = seed
    if before:
        over.setdefault("model", {}).setdefault("weak_cam", {}).update(BEFORE)
    raw["train"]["checkpoint_dir"] = str(workdir / f"{method}-{seed}-{int(before)}")
    cfg = Config.model_validate(raw)
    epochs = []
    t0 = time.perf_counter()
    result = stages.train_method(cfg, method, on_epoch_end=lambda m, e: epochs.append(m))
    train_s = time.perf_counter() - t0
    model, rcfg, state = stages.load_trained(result.best_checkpoint)
    val = stages.open_split(rcfg, state["model_name"], "val")  # the boxes: for the figure only
    device = resolve_device(rcfg.train.device)
    acc = box_metrics(predict_split(model, val, rcfg.eval.batch_size, device), [0.5])["acc@0.5"]
    return {"method": method, "seed": seed, "before": before, "train_s": train_s, "acc": acc,
            "best_epoch": result.best_epoch, "select": result.select_metric,
            "epochs": [{k: m.get(f"train/{k}") for k in LOSSES} | {"match_acc": m.get("val/match_acc")}
                       for m in epochs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--methods", nargs="+", default=["weak_cam", "weak_cam_no_mining"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--before", action="store_true", help="the settings before the matcher fix")
    args = ap.parse_args()
    raw = yaml.safe_load(Path(args.params).read_text())
    rows = []
    with tempfile.TemporaryDirectory(prefix="compare_weak_") as tmp:
        for seed in args.seeds:
            for method in args.methods:
                r = run(raw, method, seed, args.before, Path(tmp))
                rows.append(r)
                print(f"{method} seed {seed}{' (before)' if args.before else ''}: val Acc@0.5 "
                      f"{r['acc']:.3f}, best epoch {r['best_epoch']} by {r['select']}, "
                      f"train {r['train_s']:.0f} s", flush=True)
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
        verdict = "inside noise" if abs(statistics.mean(diffs)) <= spread else "outside the seed spread"
        print(f"\n{first} - {second}: per seed " + " ".join(f"{d:+.3f}" for d in diffs)
              + f", mean {statistics.mean(diffs):+.3f}; largest seed spread of one method "
              f"{spread:.3f}: {verdict}")


if __name__ == "__main__":
    main()
