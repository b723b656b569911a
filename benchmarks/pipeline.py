"""Times the default pipeline and what the orchestration (Prefect + MLflow + DVC) costs on top of
it.

    python benchmarks/pipeline.py               # cold dvc repro -f, no-op dvc repro, overhead
    python benchmarks/pipeline.py --bare        # first the same stages bare, for a comparison
    python benchmarks/pipeline.py --in-process  # each stage in its own process (no stage worker)

1. Orchestrated, cold: `dvc repro -f` with a Prefect server that is not running yet and has no state
(a
   temporary REFVG_PREFECT_HOME) and no stage worker running yet (a temporary
   REFVG_STAGE_WORKER_DIR), every stage a Prefect flow logging to MLflow.
2. `dvc repro` with nothing changed.
3. The orchestration share, itemised by benchmarks/overhead.py (per-stage medians; a difference of
two
   pipeline wall times is within this machine's run-to-run noise).
4. With --bare, first every stage through the `refvg` CLI, one process per stage as DVC starts them,
with
   no Prefect, MLflow or DVC, and the plain difference of the two walls.
Also printed: per-stage wall and work seconds (from `.refvg/timings.jsonl`, which every stage
process appends to), training samples/s and val Acc@0.5 per method.
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

import overhead  # benchmarks/overhead.py (this script's folder is on sys.path)

TIMINGS = Path(".refvg/timings.jsonl")


def run(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def bare_pipeline(params: dict) -> dict[str, float]:
    """The stages of dvc.yaml, in order, as plain CLI processes."""
    shutil.rmtree(
        params["train"]["checkpoint_dir"], ignore_errors=True
    )  # no resume: train from scratch
    steps = [["generate"], ["prepare"], ["detections"]]
    for method in params["methods"]:
        steps += [["train", "--method", method], ["evaluate", "--method", method]]
    steps.append(["report"])
    return {" ".join(s): run([sys.executable, "-m", "refvg.cli", *s]) for s in steps}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bare", action="store_true", help="also run the stages bare first")
    ap.add_argument(
        "--in-process", action="store_true", help="no stage worker: each stage imports everything"
    )
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the overhead measurements")
    args = ap.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())

    bare = bare_pipeline(params) if args.bare else {}
    start = TIMINGS.stat().st_size if TIMINGS.exists() else 0
    with overhead.fresh_prefect_home() as env, overhead.fresh_worker_dir(env) as env:
        if args.in_process:
            env["REFVG_STAGE_WORKER"] = "0"
        wall = run(["dvc", "repro", "-f"], env)
        noop = run(["dvc", "repro"], env)
    with TIMINGS.open() as f:
        f.seek(start)
        stages = [json.loads(line) for line in f if line.strip()]

    print(f"\n{'stage':26s} {'bare s':>7s} {'orchestrated s':>15s} {'work s':>7s}  worker")
    total_work = 0.0
    for s in stages:
        method = s["args"].get("method")
        key = s["flow"] + (f" --method {method}" if method else "")
        work = s.get("work_seconds") or 0.0
        total_work += work
        print(
            f"{s['flow'] + ('@' + method if method else ''):26s} "
            f"{bare.get(key, float('nan')):7.1f} "
            f"{s['process_seconds']:15.1f} {work:7.1f}  {'yes' if s.get('via_worker') else 'no'}"
        )
    print(
        f"\norchestrated pipeline (dvc repro -f): {wall:.1f} s wall, "
        f"of which data work + model compute {total_work:.1f} s"
    )
    if bare:
        bare_wall = sum(bare.values())
        extra = wall - bare_wall
        print(f"bare pipeline (refvg CLI, same stages, same processes): {bare_wall:.1f} s")
        print(
            f"orchestrated minus bare: {extra:.1f} s = {100 * extra / wall:.1f} % "
            "of the pipeline's wall time"
        )
    print(f"dvc repro with nothing changed: {noop:.1f} s")
    overhead.report(overhead.measure(args.repeats), wall, args.repeats)
    for m in params["methods"]:
        path = Path(params["eval"]["metrics_dir"]) / f"{m}.json"
        if path.exists():
            splits = json.loads(path.read_text())["splits"]
            print(
                f"{m:16s} "
                + "  ".join(f"{k} Acc@0.5 {v['acc@0.5']:.3f}" for k, v in splits.items())
            )
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
