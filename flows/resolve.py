"""DVC stage `resolve`: `python -m flows.resolve --out DIR` writes DIR/<method>.json for every
method, what its training reads (refvg.engine.fingerprint); each train stage depends on its own
file, so DVC retrains only the methods whose knobs or code changed. Bookkeeping, not a pipeline step
worth a Prefect flow or an MLflow
run. Validating params.yaml imports no model (the family configs are torch-free), so the stage is
cheap on its own; it still goes through the stage worker like the others because it is the
pipeline's first stage: it starts the worker the next stages use."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.launcher import launch


def resolve(params: str = "params.yaml", out: str = "data/stamps") -> dict[str, bool]:
    """Write the stamps; method -> whether its stamp changed."""
    from refvg.config import load_config
    from refvg.engine.fingerprint import write_stamps

    return write_stamps(load_config(params), Path(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--params", default="params.yaml", help="the params file (default: params.yaml)"
    )
    parser.add_argument(
        "--out", default="data/stamps", help="folder of the stamps (dvc.yaml's stamps_dir)"
    )
    args = parser.parse_args(argv)
    from refvg.config import ConfigError

    try:
        changed = resolve(args.params, args.out)
    except ConfigError as err:
        sys.exit(f"resolve: {err}")
    names = [m for m, c in changed.items() if c]
    print(
        f"resolve: {len(changed)} method stamps in {args.out}, "
        f"changed: {', '.join(names) or 'none'}"
    )


if __name__ == "__main__":
    launch("flows.resolve", main)  # through the warm stage worker, or in-process
