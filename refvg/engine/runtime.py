"""Device, precision, seeding and batch placement: what the trainer, evaluator and predictor
share."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no per-process core sharing
    fcntl = None

import numpy as np
import torch

from refvg.data.transforms import normalize_images

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, amp: str):
    """bf16 autocast on CUDA ("auto" or "bf16"); plain fp32 elsewhere. bf16 needs no loss scaler."""
    if amp != "off" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if amp == "bf16" and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a collated batch to `device` and turn the uint8 images into normalised floats there."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    out["image"] = normalize_images(out["image"])
    return out


def thread_share(cores: int, cap: int, holders: int) -> int:
    """Compute threads for one of `holders` processes computing at once on `cores` cores, never
    above `cap` (what this process would use alone)."""
    return max(1, min(cap, cores // max(holders, 1)))


class CpuShare:
    """This process's share of the machine's cores while other refvg processes compute beside it.

    N trainings side by side (`dvc queue start -j N`, `dvc exp run --run-all -j N`) each start
    torch's pool with a thread per core: N x cores threads fight for the cores and each runs several
    times slower than its share. A computing process holds a slot (a file lock in a per-user folder,
    released by the kernel when the process dies, so a killed stage never leaves its slot taken) and
    uses cores // (slots held) threads; `refresh` recounts (at most every REFRESH_S seconds), so a
    training that started alone gives back threads when another starts, and takes them again when it
    ends. Where file locks do not exist (Windows), or with REFVG_CPU_SHARE=0, it does nothing."""

    REFRESH_S = 2.0

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder else _slots_dir()
        self.file = None
        self.cap: int | None = None
        self.threads: int | None = None
        self.checked = -float("inf")

    def enter(self) -> "CpuShare":
        if fcntl is None or self.file is not None or _off(os.environ.get("REFVG_CPU_SHARE", "")):
            return self
        # mkdir(parents=True) gives the missing parents the default mode: the per-user folder it
        # makes is also the stage worker's, which refuses a folder others can enter
        # (flows.launcher).
        for folder in (self.folder.parent, self.folder):
            folder.mkdir(mode=0o700, exist_ok=True)
        for i in range(4096):
            f = open(self.folder / f"slot-{i}.lock", "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            self.file = f
            break
        if self.cap is None:
            self.cap = torch.get_num_threads()  # what it would use alone (OMP_NUM_THREADS honoured)
        self.refresh(force=True)
        return self

    def leave(self) -> None:
        if self.file is not None:
            self.file.close()  # releases the lock
            self.file = None
        if self.cap is not None and self.threads is not None and self.threads != self.cap:
            torch.set_num_threads(self.cap)
        self.threads = None

    def holders(self) -> int:
        """Processes holding a slot now, this one included."""
        if fcntl is None or not self.folder.is_dir():
            return 1
        n = 1 if self.file is not None else 0
        own = Path(self.file.name).name if self.file is not None else None
        for path in self.folder.glob("slot-*.lock"):
            if path.name == own:
                continue
            with open(path, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    n += 1
                else:
                    fcntl.flock(f, fcntl.LOCK_UN)
        return max(n, 1)

    def refresh(self, force: bool = False) -> None:
        if self.file is None:
            return
        now = time.monotonic()
        if not force and now - self.checked < self.REFRESH_S:
            return
        self.checked = now
        holders = self.holders()
        threads = thread_share(_cores(), self.cap or 1, holders)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            if self.threads is not None or holders > 1:
                log.info(
                    "%d processes computing on %d cores: %d threads here",
                    holders,
                    _cores(),
                    threads,
                )
        self.threads = threads


def _off(value: str) -> bool:
    return value.strip().lower() in ("0", "false", "off", "no")


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _slots_dir() -> Path:
    if os.environ.get("REFVG_CPU_SLOTS_DIR"):
        return Path(os.environ["REFVG_CPU_SLOTS_DIR"])
    import tempfile

    user = getattr(os, "getuid", lambda: "user")()
    return Path(tempfile.gettempdir()) / f"refvg-{user}" / "cpu-slots"


CPU_SHARE = CpuShare()  # the process's one share: a process is one consumer of the cores
