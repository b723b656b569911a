"""Serve the deployments of prefect.yaml from this process: `python -m flows.serve [--only NAME
...]`.

prefect.yaml is the one declaration of the deployments (entrypoint, parameters, cron schedules);
this reads it rather than repeating it, registers each deployment with the Prefect API
(PREFECT_API_URL, else the local server of flows/runtime) and runs their flow runs, scheduled or
triggered, in subprocesses here until stopped. `prefect deploy --all` registers the same deployments
for a work pool instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

import yaml

from flows.runtime import begin_prefect_api

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def declared(path: Path = PREFECT_YAML) -> list[dict]:
    """The deployments of prefect.yaml, with what `to_deployment` needs checked up front."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    deployments = spec.get("deployments") or []
    if not deployments:
        raise SystemExit(f"{path}: no deployments declared")
    for d in deployments:
        missing = {"name", "entrypoint"} - set(d)
        if missing:
            raise SystemExit(f"{path}: deployment {d.get('name', '?')!r} lacks {sorted(missing)}")
    return deployments


def load_flow(entrypoint: str):
    """ "flows/pipeline.py:pipeline_flow" -> the flow object."""
    file, _, name = entrypoint.partition(":")
    module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def to_deployments(specs: list[dict]) -> list:
    from prefect.schedules import Cron

    out = []
    for d in specs:
        schedules = [Cron(s["cron"], timezone=s.get("timezone")) for s in d.get("schedules") or []]
        out.append(
            load_flow(d["entrypoint"]).to_deployment(
                name=d["name"],
                description=d.get("description"),
                parameters=d.get("parameters") or {},
                schedules=schedules or None,
                tags=d.get("tags") or [],
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--only", nargs="*", help="serve only these deployments (names in prefect.yaml)"
    )
    ap.add_argument("--prefect-yaml", type=Path, default=PREFECT_YAML)
    args = ap.parse_args()
    specs = [d for d in declared(args.prefect_yaml) if not args.only or d["name"] in args.only]
    if args.only and len(specs) != len(args.only):
        known = [d["name"] for d in declared(args.prefect_yaml)]
        raise SystemExit(
            f"unknown deployment(s) in --only {args.only}; prefect.yaml declares {known}"
        )
    url = begin_prefect_api()()
    if url is None:
        raise SystemExit(
            "serving needs a Prefect server that outlives this process: set PREFECT_API_URL, "
            "or unset REFVG_PREFECT_SERVER=ephemeral to use the local one"
        )
    os.environ["PREFECT_API_URL"] = (
        url  # before prefect is imported: the flow-run subprocesses inherit it
    )
    from prefect import serve

    serve(*to_deployments(specs))


if __name__ == "__main__":
    main()
