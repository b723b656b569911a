"""The teacher's cached features: written once by the `teacher` stage, read by the distilling
student's dataset.

`<teacher.out_dir>/features/` holds, per split it was computed for (train),
- `<split>_patch.npy`    float16 [N_images, G, D]: the teacher's patch features of each letterboxed
image (one
                         row per image of the split, as `images.npy`; several expressions share an
                         image);
- `<split>_sentence.npy` float16 [N_samples, D]: the teacher's sentence feature of each expression;
and `manifest.json`: the fingerprint of the prepared data they were computed from, the grid and
width, and the teacher they came from. Features made from other prepared data are refused, never
silently misaligned.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from refvg.data.dataset import MANIFEST, PreparedSplit

FEATURES_DIR = "features"
MODEL_DIR = "model"


class TeacherFeaturesError(FileNotFoundError):
    """The teacher's features are missing, incomplete or were made from other prepared data."""


def data_fingerprint(prepared: Path) -> str:
    """What the features must match: the prepared dataset's manifest and each split's records and
    tokens by their bytes, its image array by its shape. Not
    refvg.data.dataset.prepared_fingerprint, which reads the image arrays' modification times: a
    `dvc checkout` rewrites those files, and the features (checked out with them) must stay valid;
    hashing the pixels themselves would cost minutes at RefCOCO scale."""
    prepared = Path(prepared)
    digest = hashlib.sha256()
    for path in [
        prepared / MANIFEST,
        *sorted(prepared.glob("*/samples.json")),
        *sorted(prepared.glob("*/tokens.npy")),
    ]:
        digest.update(path.relative_to(prepared).as_posix().encode())
        digest.update(path.read_bytes())
    for path in sorted(prepared.glob("*/images.npy")):
        digest.update(
            f"{path.relative_to(prepared).as_posix()}:{np.load(path, mmap_mode='r').shape}".encode()
        )
    return digest.hexdigest()[:16]


def write_features(folder: Path, split: str, patch: np.ndarray, sentence: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_patch.npy", patch.astype(np.float16))
    np.save(folder / f"{split}_sentence.npy", sentence.astype(np.float16))


def write_manifest(folder: Path, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise TeacherFeaturesError(
            f"{path}: no teacher features here; run the `teacher` stage "
            f"first "
            f"(dvc repro teacher, or python -m flows.teacher)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


class WithTeacherFeatures(Dataset):
    """A prepared split whose items also carry the teacher's features of the sample: "teacher_patch"
    float32 [G, D] (its image's patch features) and "teacher_sentence" float32 [D]. Read from the
    cache, never computed."""

    def __init__(self, base: PreparedSplit, folder: Path, prepared: Path, dim: int | None = None):
        folder = Path(folder)
        meta = read_manifest(folder)
        if "skipped" in meta:
            raise TeacherFeaturesError(
                f"{folder / MANIFEST}: {meta['skipped']}; run the `teacher` "
                f"stage with this "
                f"method in distill_methods (dvc repro teacher)"
            )
        want = data_fingerprint(prepared)
        if meta.get("data_fingerprint") != want:
            raise TeacherFeaturesError(
                f"{folder / MANIFEST}: the teacher features were computed "
                f"from other prepared data (fingerprint "
                f"{meta.get('data_fingerprint')}, {prepared} is {want}); "
                f"re-run the `teacher` stage (dvc repro teacher)"
            )
        split = base.split
        if split not in meta.get("splits", {}):
            raise TeacherFeaturesError(
                f"{folder / MANIFEST}: no teacher features for split "
                f"{split!r} "
                f"(has {sorted(meta.get('splits', {}))}); re-run the "
                f"`teacher` stage"
            )
        paths = [folder / f"{split}_patch.npy", folder / f"{split}_sentence.npy"]
        for path in paths:
            if not path.exists():
                raise TeacherFeaturesError(
                    f"{path}: missing; re-run the `teacher` stage (dvc repro teacher)"
                )
        self.patch = np.load(paths[0], mmap_mode="r", allow_pickle=False)
        self.sentence = np.load(paths[1], allow_pickle=False)
        n_images = base.images.shape[0]
        if (
            self.patch.ndim != 3
            or self.patch.shape[0] != n_images
            or self.sentence.shape != (len(base), self.patch.shape[2])
        ):
            raise TeacherFeaturesError(
                f"{folder}: {split} features of shapes {self.patch.shape} / "
                f"{self.sentence.shape} do not fit the split "
                f"({n_images} images, {len(base)} samples); re-run the `teacher` stage"
            )
        if dim is not None and self.patch.shape[2] != dim:
            raise TeacherFeaturesError(
                f"{folder}: teacher features are {self.patch.shape[2]}-d but "
                f"the student projects to teacher.projection_dim "
                f"= {dim}; set teacher.projection_dim to the teacher's width"
            )
        self.base = base
        self.meta = meta

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        image = self.base.records[i]["image_index"]
        item["teacher_patch"] = torch.from_numpy(np.asarray(self.patch[image], dtype=np.float32))
        item["teacher_sentence"] = torch.from_numpy(self.sentence[i].astype(np.float32))
        return item
