"""What the tests share beyond fixtures: the tiny configuration, params files, project copies, small
checkpoints and model inputs."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Small enough that a whole pipeline runs in seconds per stage on 2 CPU cores, same code paths as
# the default.
TINY = {
    "synthetic": {"num_images": 48, "image_size": 64, "seed": 0},
    "data": {"image_size": 64},
    "model": {
        "visual": {"hidden_sizes": [16, 32, 64], "depths": [1, 1, 1]},
        "text": {
            "hidden_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "intermediate_size": 64,
            "vocab_size": 200,
        },
        "fusion": {"d_model": 64, "num_layers": 1, "num_heads": 2, "ffn_dim": 128},
    },
    "train": {"epochs": 2, "batch_size": 16, "warmup_steps": 2},
    "eval": {"num_qualitative": 4},
    # Every DVC test runs the pretrain stage (prepare depends on it): a few dozen scenes, ~2 s. The
    # tiny models still start from scratch (model.*.pretrained null) unless a test points at it.
    "pretrain": {"corpus_images": 32, "held_out": 8, "epochs": 1, "batch_size": 16},
    "methods": {
        "transvg": {"model": "transvg"},
        "transvg_blind": {"model": "transvg", "language_blind": True},
    },
}


def tiny_params(**overrides) -> dict:
    """A complete params.yaml content (every key, as DVC needs) for the tiny setup."""
    from refvg.config import Config, _deep_merge

    raw = _deep_merge(Config().model_dump(mode="json"), _deep_merge(TINY, overrides))
    raw["methods"] = overrides.get("methods", TINY["methods"])
    return Config.model_validate(raw).model_dump(mode="json")


def write_params(folder: Path, **overrides) -> Path:
    path = Path(folder) / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(**overrides), sort_keys=False))
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def project_copy(repo: Path, **params) -> Path:
    """A folder holding the project as DVC runs it (the code, dvc.yaml, a tiny params.yaml): what
    the tests turn into a git + DVC repository."""
    import shutil

    repo.mkdir(parents=True)
    for item in ("refvg", "flows"):
        shutil.copytree(ROOT / item, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")  # (`dvc init` keeps it)
    write_params(repo, **params)
    return repo


def untrained_checkpoint(cfg, folder: Path, model_name: str = "transvg", **flags) -> Path:
    """A checkpoint folder (best.pt + tokenizer) of an untrained model, for tests about loading,
    moving or drawing a model rather than about its accuracy (a real training run costs seconds)."""
    import shutil

    from refvg.data.dataset import read_manifest
    from refvg.data.prepare import prepared_path
    from refvg.engine.checkpoint import save_checkpoint
    from refvg.engine.runtime import seed_everything
    from refvg.models import build_model

    manifest = read_manifest(prepared_path(cfg))
    seed_everything(0)
    model = build_model(model_name, cfg, manifest["vocab_size"], manifest["pad_token_id"])
    ckpt = Path(folder) / "best.pt"
    save_checkpoint(
        {
            "model": model.state_dict(),
            "config": cfg.model_dump(mode="json"),
            "model_name": model_name,
            "language_blind": False,
            "vocab_size": manifest["vocab_size"],
            "pad_token_id": manifest["pad_token_id"],
            "best_epoch": 0,
        }
        | flags,  # e.g. language_blind=True, image_blind=True: a control's checkpoint
        ckpt,
    )
    shutil.copytree(
        prepared_path(cfg) / "tokenizer", Path(folder) / "tokenizer", dirs_exist_ok=True
    )
    return ckpt


# Model tests' inputs: a random batch of the shapes the data layer gives.
VOCAB, PAD = 200, 0


def make_batch(b=4, size=64, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixel_mask = torch.zeros(b, size, size, dtype=torch.bool)
    pixel_mask[:, :, size * 3 // 4 :] = True  # letterbox padding on the right
    attention_mask = torch.ones(b, length, dtype=torch.long)
    attention_mask[:, length // 2 :] = 0
    input_ids = torch.randint(1, VOCAB, (b, length), generator=g) * attention_mask
    box = torch.cat(
        [0.3 + 0.4 * torch.rand(b, 2, generator=g), 0.1 + 0.3 * torch.rand(b, 2, generator=g)], 1
    )
    return {
        "image": torch.randn(b, 3, size, size, generator=g),
        "pixel_mask": pixel_mask,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "box": box,
        "meta": [{}] * b,
    }


# A teacher small enough to train in seconds (EpmVG tests).
SMALL_TEACHER = {
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 64,
    "projection_dim": 16,
    "epochs": 1,
    "batch_size": 16,
    "warmup_steps": 2,
    "corpus_images": 48,
    "corpus_held_out": 16,
}


# Fake but recognisable: the tests grep logs, params, tags and files for them.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIAREFVGTESTKEY4242",
    "AWS_SECRET_ACCESS_KEY": "refvgTestSecret/MustNeverBeLogged+42",
}


def as_trained(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """QRNet's dynamic layers' V starts at zero (every gate at exactly 0.5, whatever the sentence,
    as in QRNet); give it values, as training does, so that gates differ between sentences and
    positions.
    """
    from refvg.models.qrnet import DynamicLinear

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, DynamicLinear):
                m.v.copy_(0.5 * torch.randn(m.v.shape, generator=g))
    return module
