"""DVC stage `train@<method>`: `python -m flows.train --method <method>`."""
from flows.runtime import stage_parser, timed_main

if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--method", required=True, help="a key of the methods table in params.yaml")
    args = parser.parse_args()
    timed_main("flows.stages:train_flow", method=args.method, params=args.params)
