"""What orchestration (Prefect + MLflow + DVC) costs per stage process, itemised.

    python benchmarks/overhead.py [--repeats 3] [--pipeline-wall SECONDS]

- per stage: the `report` stage (almost no work of its own) as a Prefect flow logging to MLflow
  (`python -m flows.report`) minus the same stage bare (`refvg report`), each in a fresh process as DVC
  starts them; medians of `--repeats` runs;
- once per pipeline: the first stage starting the local Prefect server on a fresh machine (new state,
  database created and migrated);
- DVC's own work: `dvc status` (graph, hashes, lock file).
With the wall time of a full `dvc repro` (benchmarks/pipeline.py passes it) it prints the share:
(server start + stages x per-stage cost + DVC) / pipeline wall. Needs a pipeline that has run once.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml


def wall(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


@contextmanager
def fresh_prefect_home() -> Iterator[dict]:
    """An environment whose stages start their local Prefect server in a new, empty state folder (as on a
    fresh machine); that server is stopped on exit."""
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "REFVG_PREFECT_HOME": home}
        try:
            yield env
        finally:
            subprocess.run([sys.executable, "-m", "flows.runtime", "stop"], env=env, check=True, capture_output=True)


def cold_server_start() -> float:
    with fresh_prefect_home() as env:
        return wall([sys.executable, "-m", "flows.runtime", "url"], env)


def measure(repeats: int = 3) -> dict[str, float]:
    cold = cold_server_start()
    wall([sys.executable, "-m", "flows.runtime", "url"])  # the shared server is up, as after the first stage
    flow = statistics.median(wall([sys.executable, "-m", "flows.report"]) for _ in range(repeats))
    bare = statistics.median(wall([sys.executable, "-m", "refvg.cli", "report"]) for _ in range(repeats))
    dvc = statistics.median(wall(["dvc", "status"]) for _ in range(repeats))
    return {"server_start": cold, "flow_stage": flow, "bare_stage": bare, "per_stage": flow - bare, "dvc": dvc}


def report(costs: dict[str, float], pipeline_wall: float | None, repeats: int) -> None:
    print(f"report stage as a Prefect flow + MLflow run: {costs['flow_stage']:.2f} s (median of {repeats})")
    print(f"report stage bare (refvg CLI):                {costs['bare_stage']:.2f} s")
    print(f"orchestration cost per stage process:         {costs['per_stage']:.2f} s")
    print(f"dvc status (DVC's own graph/hash check):      {costs['dvc']:.2f} s")
    print(f"local Prefect server start, fresh state (first stage only): {costs['server_start']:.2f} s")
    if pipeline_wall:
        n = len(yaml.safe_load(Path("dvc.lock").read_text())["stages"])
        overhead = costs["server_start"] + n * costs["per_stage"] + costs["dvc"]
        print(f"pipeline: {n} stage processes, {pipeline_wall:.0f} s wall -> orchestration "
              f"~{overhead:.0f} s = {100 * overhead / pipeline_wall:.1f} % of the wall time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pipeline-wall", type=float, help="wall seconds of a full `dvc repro` (for the share)")
    args = ap.parse_args()
    report(measure(args.repeats), args.pipeline_wall, args.repeats)


if __name__ == "__main__":
    main()
