"""Times the default pipeline and its orchestration overhead.

    python benchmarks/pipeline.py            # cold: forces every stage (dvc repro -f), then a no-op repro

Prints, per stage process: wall time, time inside the library's data work / model compute ("work"), and the
rest (process start and imports, Prefect, MLflow, DVC: "overhead"); then the totals, the overhead share of
the pipeline's wall time, training samples/s per method, and the wall time of a `dvc repro` with nothing
changed. Stage timings come from `.refvg/timings.jsonl`, which every stage process appends to.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TIMINGS = Path(".refvg/timings.jsonl")


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-force", action="store_true", help="plain `dvc repro` (only what is stale)")
    args = ap.parse_args()

    start = TIMINGS.stat().st_size if TIMINGS.exists() else 0
    wall = run(["dvc", "repro", *([] if args.no_force else ["-f"])])
    noop = run(["dvc", "repro"])
    with TIMINGS.open() as f:
        f.seek(start)
        stages = [json.loads(line) for line in f if line.strip()]

    print(f"{'stage':28s} {'wall s':>8s} {'work s':>8s} {'overhead s':>11s}")
    total_work = total_proc = 0.0
    for s in stages:
        name = s["flow"] + (f"@{s['args']['method']}" if "method" in s["args"] else "")
        work = s.get("work_seconds") or 0.0
        total_work += work
        total_proc += s["process_seconds"]
        print(f"{name:28s} {s['process_seconds']:8.1f} {work:8.1f} {s['process_seconds'] - work:11.1f}")
    overhead = wall - total_work
    print(f"\npipeline wall (dvc repro{'' if args.no_force else ' -f'}): {wall:.1f} s; "
          f"stage processes {total_proc:.1f} s; work {total_work:.1f} s")
    print(f"overhead (process start + imports, Prefect, MLflow, DVC): {overhead:.1f} s = {100 * overhead / wall:.1f} % of wall")
    print(f"dvc repro with nothing changed: {noop:.1f} s")
    for m in sorted(Path("metrics").glob("*.json")):
        data = json.loads(m.read_text())
        print(f"{data['method']:16s} val Acc@0.5 {data['splits'].get('val', {}).get('acc@0.5', float('nan')):.3f}")
    sps = _samples_per_second()
    for method, v in sps.items():
        print(f"{method:16s} training {v:.0f} samples/s")


def _samples_per_second() -> dict:
    """From the checkpoints' own history (what the trainer measured, forward+backward+step)."""
    try:
        from refvg.engine.checkpoint import load_checkpoint
    except ImportError:
        return {}
    out = {}
    for ckpt in sorted(Path("checkpoints").glob("*/last.pt")):
        hist = load_checkpoint(ckpt)["history"]
        out[ckpt.parent.name] = sum(h["samples_per_second"] for h in hist) / max(len(hist), 1)
    return out


if __name__ == "__main__":
    sys.exit(main())
