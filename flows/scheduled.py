"""The scheduled pipeline (prefect.yaml's `refvg-pipeline` deployment): `dvc repro` as a Prefect
flow.

It does what `dvc repro` does, because it is `dvc repro`: DVC decides which stages are stale, runs
only those (each stage its own Prefect flow run and MLflow child run, exactly as from a terminal),
and updates dvc.lock; a night with nothing changed trains nothing. Then, when the repository has a
DVC remote, the outputs are pushed (`dvc push`), so what the night produced is in the remote too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger

from flows.runtime import stage_parser, timed_main

_RAN = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping", re.MULTILINE)


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # DVC and the stages' `python -m flows.*` of this interpreter's environment, whatever PATH a
    # Prefect worker was started with.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


@flow(name="refvg-scheduled")
def scheduled_flow(targets: list[str] | None = None, push: bool = True, repo: str = ".") -> dict:
    """`dvc repro [targets]` in `repo`, then `dvc push` when a remote is configured and `push` is
    set. Returns the stages that ran and those DVC skipped as up to date."""
    log = get_run_logger()
    cwd = Path(repo).resolve()
    proc = _dvc(["repro", *(targets or [])], cwd)
    log.info("dvc repro:\n%s", proc.stdout[-20000:])
    if proc.returncode != 0:
        raise RuntimeError(
            f"dvc repro failed in {cwd} (exit {proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    ran, skipped = _RAN.findall(proc.stdout), _SKIPPED.findall(proc.stdout)
    pushed = False
    if push and _dvc(["remote", "default"], cwd).stdout.strip():
        pushed_proc = _dvc(["push"], cwd)
        if pushed_proc.returncode != 0:
            raise RuntimeError(f"dvc push failed in {cwd}:\n{pushed_proc.stderr[-4000:]}")
        log.info("dvc push:\n%s", pushed_proc.stdout[-4000:])
        pushed = True
    log.info(
        "ran %d stage(s), %d up to date%s", len(ran), len(skipped), ", pushed" if pushed else ""
    )
    return {"ran": ran, "skipped": skipped, "pushed": pushed, "work_seconds": 0.0}


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("targets", nargs="*", help="dvc.yaml stages to reproduce (default: all)")
    parser.add_argument("--no-push", action="store_true", help="do not `dvc push` after the run")
    args = parser.parse_args()
    timed_main(scheduled_flow, targets=args.targets or None, push=not args.no_push)
