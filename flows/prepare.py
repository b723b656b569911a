"""DVC stage `prepare`: `python -m flows.prepare`."""
from flows.runtime import stage_parser, timed_main

if __name__ == "__main__":
    args = stage_parser(__doc__).parse_args()
    timed_main("flows.stages:prepare_flow", params=args.params)
