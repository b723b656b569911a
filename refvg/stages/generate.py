"""The `generate` stage: RefShapes written in the REFER layout (refvg.data.synthetic)."""

from __future__ import annotations

from refvg.config import Config
from refvg.stages.paths import synthetic_dir


def generate(cfg: Config) -> dict:
    from refvg.data.synthetic import generate_refshapes

    return generate_refshapes(synthetic_dir(cfg), cfg.synthetic, split_by=cfg.data.split_by)
