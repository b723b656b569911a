"""What orchestration (Prefect + MLflow + DVC) costs per stage process, itemised, with and without
the stage worker (flows/launcher.py).

    python benchmarks/overhead.py [--repeats 5] [--pipeline-wall SECONDS] [--stages N]
                                  [--per-stage-only]

- per stage: the `report` stage (almost no work of its own), each in a fresh process as DVC starts
them, three
  ways in interleaved rounds (so a busy machine slows all three alike; medians of `--repeats`
  rounds): bare (`refvg report`: no Prefect, no MLflow); as a Prefect flow + MLflow run in its own
  process (`REFVG_STAGE_WORKER=0 python -m flows.report`, the path without the worker); the same
  through a warm stage worker (`python -m flows.report`, the default). Two figures, never netted
  against each other: the gross cost of orchestration (own process minus bare: Prefect + MLflow
  imported and run; and each path's time outside the stage's work, wall minus the work seconds the
  flow reports, an upper bound), and the net effect of the worker (worker minus own process; worker
  minus bare, signed: below zero when the worker's pre-imported libraries save more than
  orchestration costs);
- once per pipeline, the first stage over a warm one: on a fresh machine, where it starts the local
Prefect
  server (new state, database created and migrated; through the worker path it also starts the
  worker, whose imports run while the server boots), and in a later pipeline through the worker path
  (the server is up; the worker idled out and starts again); and the server's fresh start alone;
- DVC's own work: `dvc status` (graph, hashes, lock file).
With the wall time of a full `dvc repro` (benchmarks/pipeline.py passes it) it prints the share:
(once-per-pipeline cost + stages x per-stage cost + DVC) / pipeline wall, for both paths, fresh and
later. Needs a pipeline that has run once (metrics/ for the report stage).
"""

from __future__ import annotations

import argparse
import json
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


STAGE = [sys.executable, "-m", "flows.report"]
BARE = [sys.executable, "-m", "refvg.cli", "report"]
TIMINGS = Path(".refvg/timings.jsonl")


def wall(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


@contextmanager
def fresh_prefect_home() -> Iterator[dict]:
    """An environment whose stages start their local Prefect server in a new, empty state folder (as
    on a fresh machine); that server is stopped on exit."""
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "REFVG_PREFECT_HOME": home}
        try:
            yield env
        finally:
            subprocess.run(
                [sys.executable, "-m", "flows.runtime", "stop"],
                env=env,
                check=True,
                capture_output=True,
            )


@contextmanager
def fresh_worker_dir(env: dict | None = None) -> Iterator[dict]:
    """An environment whose stages start their own stage worker (none running yet); stopped on
    exit."""
    with tempfile.TemporaryDirectory(prefix="refvg-w-") as folder:
        env = {**(env or os.environ), "REFVG_STAGE_WORKER_DIR": folder}
        try:
            yield env
        finally:
            subprocess.run(
                [sys.executable, "-m", "flows.launcher", "stop"],
                env=env,
                check=True,
                capture_output=True,
            )


def cold_server_start() -> float:
    with fresh_prefect_home() as env:
        return wall([sys.executable, "-m", "flows.runtime", "url"], env)


def _work_seconds(since: int) -> dict[bool, list[float]]:
    """Work seconds the report flows appended to the timings since byte `since`, by whether a worker
    ran them."""
    out: dict[bool, list[float]] = {True: [], False: []}
    with TIMINGS.open() as f:
        f.seek(since)
        for line in f:
            rec = json.loads(line)
            if rec["flow"] == "report":
                out[bool(rec.get("via_worker"))].append(rec["work_seconds"])
    return out


def measure(repeats: int = 5, per_stage_only: bool = False) -> dict[str, float]:
    since = TIMINGS.stat().st_size if TIMINGS.exists() else 0
    if per_stage_only:  # no fresh Prefect servers (each one's migrations take minutes when loaded)
        wall([sys.executable, "-m", "flows.runtime", "url"])
        return _per_stage(repeats, since)
    # The first stage of a pipeline on a fresh machine starts the Prefect server (new state);
    # through the worker path it also starts the worker, whose imports run while the server boots.
    with fresh_prefect_home() as env:
        first_fresh_in_process = wall(STAGE, {**env, "REFVG_STAGE_WORKER": "0"})
    with fresh_prefect_home() as env, fresh_worker_dir(env) as env:
        first_fresh_worker = wall(STAGE, env)
    wall(
        [sys.executable, "-m", "flows.runtime", "url"]
    )  # the project's server is up, as after a first run
    c = _per_stage(repeats, since)
    return {
        **c,
        "first_fresh_in_process": first_fresh_in_process,
        "first_fresh_worker": first_fresh_worker,
        "once_fresh_in_process": first_fresh_in_process - c["in_process_stage"],
        "once_fresh_worker": first_fresh_worker - c["worker_stage"],
        "server_start": cold_server_start(),
    }


def _per_stage(repeats: int, since: int) -> dict[str, float]:
    """The interleaved rounds (the project's Prefect server up), the first stage of a later
    pipeline (the worker idled out) and `dvc status`."""
    rounds: dict[str, list[float]] = {"bare": [], "in_process": [], "worker": []}
    with fresh_worker_dir() as env:
        first_later_worker = wall(
            STAGE, env
        )  # a later pipeline: server up, the worker idled out long ago
        in_process = {**env, "REFVG_STAGE_WORKER": "0"}
        for _ in range(repeats):
            rounds["bare"].append(wall(BARE))
            rounds["in_process"].append(wall(STAGE, in_process))
            rounds["worker"].append(wall(STAGE, env))
    work = _work_seconds(since)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    return {
        "bare_stage": med["bare"],
        "in_process_stage": med["in_process"],
        "worker_stage": med["worker"],
        "in_process_per_stage": med["in_process"] - med["bare"],
        "worker_per_stage": med["worker"] - med["bare"],
        "in_process_outside_work": med["in_process"] - statistics.median(work[False]),
        "worker_outside_work": med["worker"] - statistics.median(work[True]),
        "first_later_worker": first_later_worker,
        "once_later_worker": first_later_worker - med["worker"],
        "dvc": statistics.median(wall(["dvc", "status"]) for _ in range(repeats)),
    }


def report(
    costs: dict[str, float], pipeline_wall: float | None, repeats: int, stages: int | None = None
) -> None:
    c = costs
    print(f"report stage, medians of {repeats} interleaved rounds:")
    print(f"  bare (refvg CLI, no Prefect/MLflow):         {c['bare_stage']:6.2f} s")
    print(f"  Prefect flow + MLflow run, own process:      {c['in_process_stage']:6.2f} s")
    print(f"  same through the warm stage worker:          {c['worker_stage']:6.2f} s")
    print("gross cost of orchestration per stage (not netted against the worker's saving):")
    print(f"  own process minus bare:                      {c['in_process_per_stage']:+6.2f} s")
    print(
        f"  outside the stage's work, own process:       "
        f"{c['in_process_outside_work']:6.2f} s (upper bound)"
    )
    print(
        f"  outside the stage's work, stage worker:      "
        f"{c['worker_outside_work']:6.2f} s (upper bound)"
    )
    print("net effect of the stage worker per stage (signed):")
    print(
        f"  worker minus own process:                    "
        f"{c['worker_stage'] - c['in_process_stage']:+6.2f} s"
    )
    print(
        f"  worker minus bare:                           {c['worker_per_stage']:+6.2f} s "
        f"(below zero: its pre-imported libraries save more than orchestration costs)"
    )
    print("first stage of a pipeline (once per pipeline: the extra over the stages above):")
    if "first_fresh_worker" in c:
        print(
            f"  fresh machine, own process (starts the Prefect server):   "
            f"   {c['first_fresh_in_process']:6.2f} s "
            f"({c['once_fresh_in_process']:+.2f} s)"
        )
        print(
            f"  fresh machine, worker path (starts server and worker):    "
            f"   {c['first_fresh_worker']:6.2f} s "
            f"({c['once_fresh_worker']:+.2f} s)"
        )
    print(
        f"  later pipeline, worker path (server up, starts the "
        f"worker):  {c['first_later_worker']:6.2f} s "
        f"({c['once_later_worker']:+.2f} s)"
    )
    if "server_start" in c:
        print(
            f"  the local Prefect server on fresh state, alone:              "
            f"{c['server_start']:6.2f} s"
        )
    print(f"dvc status (DVC's own graph/hash check):                       {c['dvc']:6.2f} s")
    if not pipeline_wall:
        return
    n = stages or len(yaml.safe_load(Path("dvc.lock").read_text())["stages"])
    print(
        f"pipeline of {n} stage processes, {pipeline_wall:.0f} s "
        f"wall: once + {n} x per stage + dvc, signed "
        f"(no term clamped)"
    )
    for name, once, per_stage in (
        (
            "gross, fresh machine, own process per stage",
            c.get("once_fresh_in_process"),
            c["in_process_per_stage"],
        ),
        (
            "gross, fresh machine, worker, outside work",
            c.get("once_fresh_worker"),
            c["worker_outside_work"],
        ),
        ("gross, later run, own process per stage", 0.0, c["in_process_per_stage"]),
        (
            "gross, later run, worker, outside work",
            c["once_later_worker"],
            c["worker_outside_work"],
        ),
        (
            "net vs bare, fresh machine, stage worker",
            c.get("once_fresh_worker"),
            c["worker_per_stage"],
        ),
        ("net vs bare, later run, stage worker", c["once_later_worker"], c["worker_per_stage"]),
    ):
        if once is None:  # --per-stage-only: no fresh-machine figures
            continue
        overhead = once + n * per_stage + c["dvc"]
        print(f"  {name:47s} {overhead:+5.0f} s = {100 * overhead / pipeline_wall:+5.1f} %")
    saving = n * (c["in_process_stage"] - c["worker_stage"])
    print(
        f"  the worker's saving over own processes ({n} stages, later run): {saving:+.0f} s "
        f"= {100 * saving / pipeline_wall:+.1f} %"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--pipeline-wall", type=float, help="wall seconds of a full `dvc repro` (for the share)"
    )
    ap.add_argument(
        "--stages", type=int, help="stage processes in that pipeline (default: those of dvc.lock)"
    )
    ap.add_argument(
        "--per-stage-only",
        action="store_true",
        help="skip the fresh-machine first stages and the cold server start (the rounds, the "
        "later pipeline's first stage and dvc status only)",
    )
    args = ap.parse_args()
    costs = measure(args.repeats, args.per_stage_only)
    report(costs, args.pipeline_wall, args.repeats, args.stages)


if __name__ == "__main__":
    main()
