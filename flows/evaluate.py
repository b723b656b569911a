"""DVC stage `evaluate@<method>`: `python -m flows.evaluate --method <method>`."""

from __future__ import annotations

from flows.launcher import launch


def main(argv: list[str] | None = None) -> None:
    from flows.runtime import stage_parser, timed_main

    parser = stage_parser(__doc__)
    parser.add_argument("--method", required=True, help="a key of the methods table in params.yaml")
    args = parser.parse_args(argv)
    timed_main("flows.stages:evaluate_flow", method=args.method, params=args.params)


if __name__ == "__main__":
    launch(
        "flows.evaluate", main
    )  # through the warm stage worker (flows/launcher.py), or in-process
