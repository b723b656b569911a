"""The whole pipeline as one Prefect flow (what a scheduled deployment runs): generate -> prepare ->
teacher (when a method distils) -> train + evaluate every method of params.yaml -> report, in one process,
each stage a subflow with its own MLflow child run under one parent. `dvc repro` runs the same stage flows one process per stage, and skips
what is up to date."""
from __future__ import annotations

from prefect import flow

from flows.runtime import stage_parser, timed_main
from flows.stages import (
    cfg_methods, detections_flow, evaluate_flow, generate_flow, prepare_flow, report_flow, teacher_flow,
    train_flow,
)
from refvg.config import load_config


@flow(name="refvg-pipeline")
def pipeline_flow(params: str = "params.yaml", generate: bool = True) -> dict:
    work = 0.0
    if generate:
        work += generate_flow(params=params)["work_seconds"]
    work += prepare_flow(params=params)["work_seconds"]
    work += detections_flow(params=params)["work_seconds"]
    if load_config(params).distill_methods:  # the teacher the distilling methods learn from
        work += teacher_flow(params=params)["work_seconds"]
    results = {}
    for method in cfg_methods(params):
        trained = train_flow(method=method, params=params)
        evaluated = evaluate_flow(method=method, params=params)
        work += trained["work_seconds"] + evaluated["work_seconds"]
        results[method] = evaluated["metrics"]
    work += report_flow(params=params)["work_seconds"]
    return {"metrics": results, "work_seconds": work}


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--no-generate", action="store_true", help="skip RefShapes (a real dataset is configured)")
    args = parser.parse_args()
    timed_main(pipeline_flow, params=args.params, generate=not args.no_generate)
