"""The `report` stage: reports/summary.md from every method's metrics file."""

from __future__ import annotations

from pathlib import Path

from refvg.config import Config


def report(cfg: Config, out_dir: Path = Path("reports")) -> Path:
    """reports/summary.md: one row per method of params.yaml, Acc@0.5 per split, from
    metrics/<method>.json."""
    from refvg.reporting import write_summary

    return write_summary(cfg, out_dir)
