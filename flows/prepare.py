"""DVC stage `prepare`: `python -m flows.prepare`."""
from flows.runtime import stage_parser, timed_main
from flows.stages import prepare_flow

if __name__ == "__main__":
    args = stage_parser(__doc__).parse_args()
    timed_main(prepare_flow, params=args.params)
