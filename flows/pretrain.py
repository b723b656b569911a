"""DVC stage `pretrain`: `python -m flows.pretrain`."""

from __future__ import annotations

from flows.launcher import launch


def main(argv: list[str] | None = None) -> None:
    from flows.runtime import stage_parser, timed_main

    parser = stage_parser(__doc__)
    args = parser.parse_args(argv)
    timed_main("flows.stages:pretrain_flow", params=args.params)


if __name__ == "__main__":
    launch(
        "flows.pretrain", main
    )  # through the warm stage worker (flows/launcher.py), or in-process
