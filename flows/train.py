"""DVC stage `train@<method>`: `python -m flows.train --method <method>`.

Multi-GPU: `torchrun --nproc_per_node N -m flows.train --method <method>`. Rank 0 runs the flow (Prefect
run, MLflow run, checkpoints); the other ranks only compute, so a run is tracked once, not N times."""
import os

from flows.runtime import stage_parser, timed_main

if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--method", required=True, help="a key of the methods table in params.yaml")
    args = parser.parse_args()
    if int(os.environ.get("RANK", "0")) > 0:  # set by torchrun
        from refvg import stages
        from refvg.config import load_config

        stages.train_method(load_config(args.params), args.method)
    else:
        timed_main("flows.stages:train_flow", method=args.method, params=args.params)
