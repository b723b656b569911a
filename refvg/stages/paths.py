"""Where the stages read and write, from the config: shared by several stages."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


@contextmanager
def written_whole(out: Path) -> Iterator[Path]:
    """A temporary sibling of folder `out` to write into: on success it takes `out`'s place, on an
    error it is removed, so an interrupted stage leaves the old folder or the new one, never half
    of one (DVC would cache a half)."""
    out = Path(out)
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
