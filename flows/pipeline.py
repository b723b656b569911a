"""The whole pipeline as one Prefect flow, in one process and outside DVC: every stage of dvc.yaml,
in the order `dvc repro` runs them (DVC's own plan of dvc.yaml resolved against the params file, so
the graph is written once), each stage a subflow with its own MLflow child run under one parent.
Unlike `dvc repro` (flows/scheduled.py, what the scheduled deployment runs), it reruns every stage,
up to date or not."""

from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path

from prefect import flow

from flows.resolve import resolve
from flows.runtime import stage_parser, timed_main
from flows.stages import (
    detections_flow,
    evaluate_flow,
    generate_flow,
    prepare_flow,
    pretrain_flow,
    report_flow,
    teacher_flow,
    train_flow,
)
from refvg.config import load_config

DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"
# What each stage command of dvc.yaml (`python -m <module> [--<arg> <value>]...`) runs, in this
# process.
STAGE_FUNCTIONS = {
    "flows.resolve": resolve,
    "flows.generate": generate_flow,
    "flows.pretrain": pretrain_flow,
    "flows.prepare": prepare_flow,
    "flows.detections": detections_flow,
    "flows.teacher": teacher_flow,
    "flows.train": train_flow,
    "flows.evaluate": evaluate_flow,
    "flows.report": report_flow,
}


def stage_plan(params: str = "params.yaml", dvc_yaml: Path = DVC_YAML) -> list[tuple[str, str]]:
    """(stage, command) for every stage of `dvc_yaml` with `params` as its params.yaml, in the order
    `dvc repro` runs them."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    with tempfile.TemporaryDirectory(prefix="refvg-plan-") as tmp:
        # DVC resolves dvc.yaml against the params.yaml beside it: a view of the two, without a
        # repository.
        shutil.copy(dvc_yaml, Path(tmp) / "dvc.yaml")
        shutil.copy(params, Path(tmp) / "params.yaml")
        repo = Repo(tmp, uninitialized=True)
        try:
            return [(stage.name, stage.cmd) for stage in plan_repro(repo.index.graph)]
        finally:
            repo.close()


def stage_call(stage: str, cmd: str) -> tuple[str, dict]:
    """`python -m flows.train --method m` -> ("flows.train", {"method": "m"})."""
    words = shlex.split(cmd)
    if len(words) < 3 or words[1] != "-m" or words[2] not in STAGE_FUNCTIONS or len(words[3:]) % 2:
        raise ValueError(
            f"dvc.yaml stage {stage!r} runs {cmd!r}; the one-process pipeline runs "
            f"`python -m <module> [--<arg> <value>]...` of {sorted(STAGE_FUNCTIONS)}"
        )
    args = words[3:]
    if not all(a.startswith("--") for a in args[::2]):
        raise ValueError(f"dvc.yaml stage {stage!r}: {cmd!r} is not `--<arg> <value>` pairs")
    return words[2], {a[2:].replace("-", "_"): v for a, v in zip(args[::2], args[1::2])}


@flow(name="refvg-pipeline")
def pipeline_flow(params: str = "params.yaml", generate: bool = True) -> dict:
    skip = set() if generate else {"flows.generate"}
    if not load_config(params).distill_methods:  # no student: the teacher would be wasted time
        skip.add("flows.teacher")
    work = 0.0
    results = {}
    for stage, cmd in stage_plan(params):
        module, kwargs = stage_call(stage, cmd)
        if module in skip:
            continue
        out = STAGE_FUNCTIONS[module](params=params, **kwargs)
        if module == "flows.resolve":  # bookkeeping for DVC, not a flow
            continue
        work += out["work_seconds"]
        if module == "flows.evaluate":
            results[kwargs["method"]] = out["metrics"]
    return {"metrics": results, "work_seconds": work}


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument(
        "--no-generate", action="store_true", help="skip RefShapes (a real dataset is configured)"
    )
    args = parser.parse_args()
    timed_main(pipeline_flow, params=args.params, generate=not args.no_generate)
