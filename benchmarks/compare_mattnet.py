"""CM-Erase vs no erasing for the MAttNet-style ranker, on ground-truth and on stand-in detected
candidates, same data, epochs and seeds; prints Acc@0.5 per seed, the mean difference and whether it
is inside the seed spread.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice -n 10 python benchmarks/compare_mattnet.py --seeds 0 1 2
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice -n 10 python benchmarks/compare_mattnet.py --seeds 0 \\
        --category-input embedding

Reads params.yaml (the mattnet_erase method's config, train, detections, proposals) and the prepared
default data (flows.generate, flows.prepare); writes checkpoints and the detections file under
--work (a fresh folder per run). Each run: the mattnet_erase method's epochs, then Acc@0.5 on val /
testA / testB from the best checkpoint; "no erase" is the same with erase.type none, as the
mattnet_no_erase method.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_one(base: dict, work: Path, name: str, config: dict, overrides: dict) -> dict:
    """Train one variant (its own method in a copy of the params), score it on each eval split."""
    import torch

    from refvg import stages
    from refvg.config import Config, _deep_merge
    from refvg.engine.checkpoint import load_trained
    from refvg.engine.evaluator import box_metrics, predict_split
    from refvg.engine.trainer import BEST

    raw = _deep_merge(base, {"train": {"checkpoint_dir": str(work / "checkpoints")}})
    raw["methods"] = {name: {"model": "mattnet", "config": config, "overrides": overrides}}
    raw["distill_methods"] = {}
    cfg = Config.model_validate(raw)
    shutil.rmtree(stages.checkpoint_dir(cfg, name), ignore_errors=True)  # never resume an older run
    t0 = time.perf_counter()
    stages.train_method(cfg, name)
    seconds = time.perf_counter() - t0
    model, _, state = load_trained(stages.checkpoint_dir(cfg, name) / BEST, "cpu")
    rcfg = cfg.for_method(name)
    acc = {}
    for split in cfg.eval.splits:
        ds = stages.open_split(rcfg, "mattnet", split)
        pred = predict_split(model, ds, cfg.eval.batch_size, torch.device("cpu"), cfg.train.amp)
        acc[split] = box_metrics(pred, [0.5])["acc@0.5"]
    acc["mean"] = statistics.fmean(acc[s] for s in cfg.eval.splits)
    return {"acc": acc, "train_seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    import torch
    import yaml

    from refvg.config import _deep_merge, load_config
    from refvg.data.detections import detection_recall, stand_in_detections, write_detections
    from refvg.stages import instances_path

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="default: the mattnet_erase method's")
    p.add_argument(
        "--category-input",
        default=None,
        help="mattnet's category_input (default: the mattnet_erase method's)",
    )
    p.add_argument(
        "--proposals", nargs="+", default=["gt", "detections"], choices=["gt", "detections"]
    )
    p.add_argument("--work", default="outputs/compare_mattnet")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # 2 threads beside other jobs on 2 shared cores: several times slower

    cfg = load_config(args.params)
    base = yaml.safe_load(Path(args.params).read_text())
    method = cfg.all_methods["mattnet_erase"]
    epochs = args.epochs or method.overrides.get("train", {}).get("epochs", cfg.train.epochs)
    category = args.category_input or method.config.category_input
    work = Path(args.work)
    dets = work / "detections.json"
    rows = stand_in_detections(instances_path(cfg), cfg.detections)
    write_detections(rows, dets)
    recall = detection_recall(instances_path(cfg), rows)
    print(
        f"stand-in detections: {len(rows)} boxes, object recall {recall['object_recall']:.3f}, "
        f"confusion_rate {cfg.detections.confusion_rate}; category_input {category}; "
        f"{epochs} epoch(s)",
        flush=True,
    )

    results: dict = {}
    for source in args.proposals:
        for erase in ("both", "none"):
            for seed in args.seeds:
                name = f"cmp_{source}_{'erase' if erase != 'none' else 'no_erase'}_s{seed}"
                mattnet = _deep_merge(
                    method.config.model_dump(mode="json"),
                    {"category_input": category, "erase": {"type": erase}},
                )
                overrides = {"train": {"epochs": epochs, "seed": seed}}
                if source == "detections":
                    overrides["proposals"] = {"source": "detections", "detections_file": str(dets)}
                r = run_one(base, work, name, mattnet, overrides)
                results[(source, erase, seed)] = r
                a = r["acc"]
                print(
                    f"  {source:10s} erase={erase:4s} seed={seed}: val {a['val']:.3f} "
                    f"testA {a['testA']:.3f} testB {a['testB']:.3f} mean {a['mean']:.3f} "
                    f"({r['train_seconds']:.0f} s train)",
                    flush=True,
                )

    print(
        f"\n## category_input {category}, {epochs} epoch(s), seeds {args.seeds}: Acc@0.5 "
        "(val / testA / testB / mean of the three)\n"
    )
    print("| candidates | seed | erase (CM-Erase) | no erase | difference (mean) |")
    print("|---|---:|---|---|---:|")

    def fmt(a: dict) -> str:
        return " / ".join(f"{a[s]:.3f}" for s in ("val", "testA", "testB", "mean"))

    summary = {}
    for source in args.proposals:
        diffs, spreads = [], {}
        for seed in args.seeds:
            e, n = results[(source, "both", seed)]["acc"], results[(source, "none", seed)]["acc"]
            diffs.append(e["mean"] - n["mean"])
            print(f"| {source} | {seed} | {fmt(e)} | {fmt(n)} | {diffs[-1]:+.3f} |")
        for erase in ("both", "none"):
            means = [results[(source, erase, s)]["acc"]["mean"] for s in args.seeds]
            spreads[erase] = max(means) - min(means)
        mean_diff = statistics.fmean(diffs)
        spread = max(spreads.values())
        verdict = (
            "one seed: no spread to compare with"
            if len(args.seeds) < 2
            else "inside noise"
            if abs(mean_diff) <= spread
            else "outside the seed spread"
        )
        summary[source] = {
            "mean_difference": mean_diff,
            "seed_spread": spread,
            "verdict": verdict,
            "per_seed": diffs,
        }
        print(
            f"| {source} | mean | | | **{mean_diff:+.3f}** (seed spread {spread:.3f}: {verdict}) |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "category_input": category,
                    "epochs": epochs,
                    "seeds": args.seeds,
                    "summary": summary,
                    "runs": [
                        {"proposals": s, "erase": e, "seed": sd, **r}
                        for (s, e, sd), r in results.items()
                    ],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
