"""Device, precision, seeding and batch placement: what the trainer, evaluator and predictor share."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from refvg.data.transforms import normalize_images


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
