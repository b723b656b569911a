"""DVC stage `generate`: `python -m flows.generate`."""
from flows.runtime import stage_parser, timed_main

if __name__ == "__main__":
    args = stage_parser(__doc__).parse_args()
    timed_main("flows.stages:generate_flow", params=args.params)
