"""DVC stage `train@<method>`: `python -m flows.train --method <method>`.

Multi-GPU: `torchrun --nproc_per_node N -m flows.train --method <method>`. Rank 0 runs the flow
(Prefect run, MLflow run, checkpoints); the other ranks only compute, so a run is tracked once, not
N times."""

from __future__ import annotations

import os

from flows.launcher import launch


def main(argv: list[str] | None = None) -> None:
    from flows.runtime import stage_parser, timed_main

    parser = stage_parser(__doc__)
    parser.add_argument("--method", required=True, help="a key of the methods table in params.yaml")
    args = parser.parse_args(argv)
    if int(os.environ.get("RANK", "0")) > 0:  # set by torchrun
        from refvg import stages
        from refvg.config import load_config

        stages.train_method(load_config(args.params), args.method)
    else:
        timed_main("flows.stages:train_flow", method=args.method, params=args.params)


if __name__ == "__main__":
    # Through the warm stage worker (flows/launcher.py), or in-process; torchrun's ranks always run
    # in-process (they are the launcher's children and meet in its process group).
    launch("flows.train", main)
