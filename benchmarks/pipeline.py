"""Times the default pipeline and what the orchestration (Prefect + MLflow + DVC) costs on top of it.

    python benchmarks/pipeline.py              # bare run, then dvc repro -f, then a no-op dvc repro
    python benchmarks/pipeline.py --skip-bare  # only the orchestrated runs

1. Bare: every stage through the `refvg` CLI, one process per stage exactly like DVC would start them, but
   with no Prefect, no MLflow and no DVC. This is data work + model compute + Python/torch start-up.
2. Orchestrated: `dvc repro -f`, every stage a Prefect flow logging to MLflow.
The orchestration overhead is the difference of the two wall times. Also printed: per-stage wall and work
seconds of the orchestrated run (from `.refvg/timings.jsonl`, which every stage process appends to),
training samples/s per method, val Acc@0.5 per method, and the wall time of `dvc repro` with nothing changed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

TIMINGS = Path(".refvg/timings.jsonl")


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def bare_pipeline(params: dict) -> dict[str, float]:
    """The stages of dvc.yaml, in order, as plain CLI processes."""
    shutil.rmtree(params["train"]["checkpoint_dir"], ignore_errors=True)  # no resume: train from scratch
    steps = [["generate"], ["prepare"]]
    for method in params["methods"]:
        steps += [["train", "--method", method], ["evaluate", "--method", method]]
    steps.append(["report"])
    return {" ".join(s): run([sys.executable, "-m", "refvg.cli", *s]) for s in steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-bare", action="store_true")
    args = ap.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())

    bare = {} if args.skip_bare else bare_pipeline(params)
    start = TIMINGS.stat().st_size if TIMINGS.exists() else 0
    wall = run(["dvc", "repro", "-f"])
    noop = run(["dvc", "repro"])
    with TIMINGS.open() as f:
        f.seek(start)
        stages = [json.loads(line) for line in f if line.strip()]

    print(f"\n{'stage':26s} {'bare s':>7s} {'orchestrated s':>15s} {'work s':>7s}")
    total_work = 0.0
    for s in stages:
        method = s["args"].get("method")
        key = s["flow"] + (f" --method {method}" if method else "")
        work = s.get("work_seconds") or 0.0
        total_work += work
        print(f"{s['flow'] + ('@' + method if method else ''):26s} {bare.get(key, float('nan')):7.1f} "
              f"{s['process_seconds']:15.1f} {work:7.1f}")
    print(f"\norchestrated pipeline (dvc repro -f): {wall:.1f} s wall, of which data work + model compute {total_work:.1f} s")
    if bare:
        bare_wall = sum(bare.values())
        overhead = wall - bare_wall
        print(f"bare pipeline (refvg CLI, same stages, same processes): {bare_wall:.1f} s")
        print(f"orchestration overhead (Prefect + MLflow + DVC): {overhead:.1f} s = {100 * overhead / wall:.1f} % of the pipeline's wall time")
    print(f"dvc repro with nothing changed: {noop:.1f} s")
    for m in params["methods"]:
        path = Path(params["eval"]["metrics_dir"]) / f"{m}.json"
        if path.exists():
            splits = json.loads(path.read_text())["splits"]
            print(f"{m:16s} " + "  ".join(f"{k} Acc@0.5 {v['acc@0.5']:.3f}" for k, v in splits.items()))
    for method, sps in _samples_per_second(params).items():
        print(f"{method:16s} training {sps:.0f} samples/s (forward + backward + step, CPU)")


def _samples_per_second(params: dict) -> dict:
    from refvg.engine.checkpoint import load_checkpoint

    out = {}
    for ckpt in sorted(Path(params["train"]["checkpoint_dir"]).glob("*/last.pt")):
        hist = load_checkpoint(ckpt)["history"]
        out[ckpt.parent.name] = sum(h["samples_per_second"] for h in hist) / max(len(hist), 1)
    return out


if __name__ == "__main__":
    main()
