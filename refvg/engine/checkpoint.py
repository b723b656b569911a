"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
`torch.load(weights_only=True)` reads it; a file that is not one of ours fails with a message that
names it instead of executing anything.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from refvg.config import Config

FORMAT = "refvg-checkpoint-v1"


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash leaves the old file or
    the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_partial_writes(folder: Path) -> list[Path]:
    """Delete the temp files of writes a crash cut short (never a checkpoint: only the rename
    publishes one)."""
    folder = Path(folder)
    leftovers = sorted(folder.glob(".*.pt.*.tmp")) if folder.is_dir() else []
    for p in leftovers:
        p.unlink(missing_ok=True)
    return leftovers


def load_checkpoint(path: Path, map_location="cpu", require: tuple[str, ...] = ()) -> dict:
    """Our checkpoint at `path`, holding at least the keys in `require`; CheckpointError (naming the
    file) for anything else."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint here")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"{path}: not a refvg checkpoint (refused to load it: {err})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a refvg checkpoint (no '{FORMAT}' marker)")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: a refvg checkpoint without {', '.join(missing)} (not one a training wrote)"
        )
    return state


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


TRAINED_KEYS = (
    "model",
    "config",
    "model_name",
    "vocab_size",
    "pad_token_id",
    "language_blind",
    "best_epoch",
)
# Keys a later version added, with what a checkpoint written before them meant.
TRAINED_DEFAULTS = {"image_blind": False}


def load_trained(
    path: Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Config, dict]:
    """Rebuild a model from one of our training checkpoints (its own config, not today's
    params.yaml), in eval mode on `device`; also returns that config and the checkpoint's state."""
    from contextlib import nullcontext

    from refvg.config import _validate
    from refvg.models import build_model
    from refvg.models.backbones import from_stored_configs

    state = load_checkpoint(path, map_location=device, require=TRAINED_KEYS)
    state = TRAINED_DEFAULTS | state
    try:
        cfg = _validate(state["config"], source="its config")
        # Its pretrained encoders' architectures travel in the checkpoint (train_method stores
        # them): it loads without the pretrained folder, from another cwd, offline. Older
        # checkpoints have none and load them from `pretrained` as before.
        stored = state.get("pretrained_configs")
        with from_stored_configs(stored) if stored else nullcontext():
            model = build_model(
                state["model_name"],
                cfg,
                vocab_size=state["vocab_size"],
                pad_token_id=state["pad_token_id"],
            )
        model.load_state_dict(state["model"])
    except (
        ValueError,
        TypeError,
        RuntimeError,
    ) as err:  # config of another version; weights that do not fit
        reason = " ".join(str(err).split())[:400]
        raise CheckpointError(
            f"{path}: cannot rebuild its {state['model_name']!r} model: {reason}"
        ) from None
    return model.to(device).eval(), cfg, state
