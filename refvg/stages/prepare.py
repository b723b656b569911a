"""The `prepare` stage: validate, letterbox, tokenize (refvg.data.prepare)."""

from __future__ import annotations

from pathlib import Path

from refvg.config import Config


def prepare(cfg: Config, run_shards=None) -> dict:
    """`run_shards(letterbox_shard, shards)` runs the image shards (default: one after the other,
    here)."""
    from refvg.data.prepare import prepare_dataset, run_sequentially

    return prepare_dataset(cfg, run_shards=run_shards or run_sequentially)


def prepared_manifest(cfg: Config) -> Path:
    from refvg.data.dataset import MANIFEST
    from refvg.data.prepare import prepared_path

    return prepared_path(cfg) / MANIFEST
