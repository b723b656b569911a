"""Where the stages read and write, from the config: shared by several stages."""

from __future__ import annotations

from pathlib import Path

from refvg.config import Config


def synthetic_dir(cfg: Config) -> Path:
    return Path(cfg.data.root) / "refshapes"


def checkpoint_dir(cfg: Config, method: str) -> Path:
    return Path(cfg.train.checkpoint_dir) / method


def instances_path(cfg: Config) -> Path:
    """The dataset's COCO instances file (what a detections file is read against)."""
    return Path(cfg.data.root) / cfg.data.dataset / "instances.json"


def teacher_dir(cfg: Config) -> Path:
    return Path(cfg.teacher.out_dir)
