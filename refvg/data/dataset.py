"""Dataset over a prepared split and the collate that builds the batch every model consumes.

Batch contract: "image" uint8 [B, S, S, 3] (normalised on the device by the engine, so host->device
copies stay 4x smaller), "pixel_mask" bool [B, S, S] (True = padding), "input_ids" /
"attention_mask" long [B, L], "box" float [B, 4] target cxcywh normalised to the square, "index"
long [B] (row in the split); with `masks=True` also "mask" uint8 [B, S, S], the target mask
letterboxed like the image (1 = object); with `candidates` (one ImageCandidates per image row, see
refvg.data.proposals) also "cand_boxes" float [B, K, 4] cxcywh normalised to the square,
"cand_valid" bool [B, K] (False = padding), "cand_category" long [B, K] and "cand_target" long [B],
the target's candidate (-1: not among them), with K = `max_candidates`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from refvg.data.proposals import ImageCandidates, candidate_tensors
from refvg.data.transforms import Letterbox, xyxy_to_cxcywh

MANIFEST = "manifest.json"
MASKS = "masks.npy"  # bit-packed letterboxed target masks, one row per annotation
MASKS_RLE = "masks_rle.json"  # the same masks at original resolution, COCO RLE


def read_manifest(prepared: Path) -> dict:
    path = Path(prepared) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no prepared dataset here; run the `prepare` stage first (dvc repro prepare)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def prepared_fingerprint(prepared: Path) -> str:
    """Identifies a prepared dataset's content: the small files by their bytes, the image arrays by
    size and modification time (hashing GBs of pixels at every start would cost more than it
    protects)."""
    prepared = Path(prepared)
    digest = hashlib.sha256()
    for path in sorted(prepared.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(prepared).as_posix().encode())
            if path.name == "images.npy":
                st = path.stat()
                digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            else:
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class PreparedSplit(Dataset):
    """One prepared split. `masks=True` adds each sample's letterboxed target mask to its item (what
    mask methods train on); `gt_mask(i)` gives the original-resolution mask (what mask metrics score
    against)."""

    def __init__(
        self,
        prepared_dir: Path,
        split: str,
        language_blind: bool = False,
        image_blind: bool = False,
        masks: bool = False,
        candidates: list[ImageCandidates] | None = None,
        max_candidates: int = 16,
        match_iou: float = 0.5,
    ):
        split_dir = Path(prepared_dir) / split
        if not (split_dir / "samples.json").exists():
            raise FileNotFoundError(
                f"{split_dir}: split {split!r} was not prepared (see manifest.json)"
            )
        self.split = split
        self.split_dir = split_dir
        self.records: list[dict] = json.loads(
            (split_dir / "samples.json").read_text(encoding="utf-8")
        )
        self.images = np.load(split_dir / "images.npy", mmap_mode="r", allow_pickle=False)
        tokens = np.load(split_dir / "tokens.npy", allow_pickle=False)
        self.pad_token_id = int(read_manifest(prepared_dir)["pad_token_id"])
        self.input_ids = torch.from_numpy(tokens[:, 0].astype(np.int64))
        self.attention_mask = torch.from_numpy(tokens[:, 1].astype(np.int64))
        if language_blind:
            self._blind()
        self.image_blind = image_blind
        self.size = self.images.shape[1]
        self.letterboxes = [
            Letterbox(r["image_width"], r["image_height"], self.size) for r in self.records
        ]
        boxes = (
            np.stack(
                [lb.box_to_square(r["bbox_xyxy"]) for lb, r in zip(self.letterboxes, self.records)]
            )
            if self.records
            else np.zeros((0, 4))
        )
        self.boxes = torch.from_numpy(xyxy_to_cxcywh(boxes)).float()
        self._pad_masks: dict[tuple[int, int], torch.Tensor] = {}
        self.masks = self._load_masks() if masks else None
        self._rles: list[dict] | None = None
        self.candidates = (
            self._candidate_tensors(candidates, max_candidates, match_iou)
            if candidates is not None
            else None
        )

    def _candidate_tensors(
        self, per_image: list[ImageCandidates], k: int, match_iou: float
    ) -> dict[str, torch.Tensor]:
        """Each sample's candidates as fixed-size tensors: the `k` highest-scoring of its image,
        letterboxed."""
        n_images = self.images.shape[0]
        if len(per_image) != n_images:
            raise ValueError(
                f"{self.split_dir}: {len(per_image)} candidate lists for {n_images} images"
            )
        rows = [
            candidate_tensors(
                per_image[rec["image_index"]],
                lb,
                k,
                np.asarray(rec["bbox_xyxy"], np.float64),
                match_iou,
            )
            for rec, lb in zip(self.records, self.letterboxes)
        ]
        names = ("cand_boxes", "cand_valid", "cand_category", "cand_target")
        if not rows:
            return {
                "cand_boxes": torch.zeros(0, k, 4),
                "cand_valid": torch.zeros(0, k, dtype=torch.bool),
                "cand_category": torch.zeros(0, k, dtype=torch.long),
                "cand_target": torch.zeros(0, dtype=torch.long),
            }
        return {name: torch.stack([r[name] for r in rows]) for name in names}

    def _mask_rows(self) -> np.ndarray:
        """Each sample's row in the mask files; raises when the split was prepared without masks or
        a sample's annotation has no segmentation (mask methods cannot train or be scored on it)."""
        if self.records and "mask_index" not in self.records[0]:
            raise FileNotFoundError(
                f"{self.split_dir}: prepared without masks; re-run the `prepare` stage"
            )
        rows = np.asarray([r["mask_index"] for r in self.records], dtype=np.int64)
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            raise ValueError(
                f"{self.split_dir / 'samples.json'}: {missing.size} of "
                f"{len(rows)} samples have no "
                f"target mask (their annotation carries no segmentation), e.g. sample "
                f"{self.records[missing[0]]['sample_id']}; a mask method "
                f"needs one for every sample"
            )
        return rows

    def _load_masks(self) -> np.ndarray:
        path = self.split_dir / MASKS
        if not path.exists():
            raise FileNotFoundError(f"{path}: no target masks here; re-run the `prepare` stage")
        self._mask_index = self._mask_rows()
        packed = np.load(path, mmap_mode="r", allow_pickle=False)
        if packed.ndim != 2 or packed.shape[1] != (self.size * self.size + 7) // 8:
            raise ValueError(
                f"{path}: shape {packed.shape} does not hold "
                f"{self.size}x{self.size} bit-packed masks"
            )
        if self._mask_index.size and self._mask_index.max() >= len(packed):
            raise ValueError(
                f"{path}: {len(packed)} masks, but samples.json refers to row "
                f"{self._mask_index.max()}"
            )
        return packed

    def square_mask(self, i: int) -> np.ndarray:
        """uint8 [S, S]: sample i's target mask in the letterboxed square."""
        row = self.masks[self._mask_index[i]]
        return np.unpackbits(row, count=self.size * self.size).reshape(self.size, self.size)

    def gt_mask(self, i: int) -> np.ndarray:
        """bool [orig_h, orig_w]: sample i's target mask at the original image resolution."""
        from pycocotools import mask as mask_utils

        if self._rles is None:
            self._mask_index = self._mask_rows()
            path = self.split_dir / MASKS_RLE
            if not path.exists():
                raise FileNotFoundError(f"{path}: no target masks here; re-run the `prepare` stage")
            self._rles = json.loads(path.read_text(encoding="utf-8"))
        rle = self._rles[self._mask_index[i]]
        return mask_utils.decode(
            {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        ).astype(bool)

    def _blind(self) -> None:
        """The language-blind control: every expression becomes the empty one ([CLS] [SEP])."""
        sep = self.input_ids.gather(1, self.attention_mask.sum(1, keepdim=True) - 1).squeeze(1)
        self.input_ids[:, 1] = sep
        self.input_ids[:, 2:] = self.pad_token_id
        self.attention_mask[:, :2] = 1
        self.attention_mask[:, 2:] = 0

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> torch.Tensor:
        """uint8 [S, S, 3] of sample i; the image-blind control's is all zero, what letterbox
        padding is, so the image carries no information."""
        if self.image_blind:
            return torch.zeros(self.images.shape[1:], dtype=torch.uint8)
        return torch.from_numpy(np.array(self.images[self.records[i]["image_index"]]))  # a copy

    def pixel_mask(self, i: int) -> torch.Tensor:
        """bool [S, S] of sample i, True on letterbox padding."""
        lb = self.letterboxes[i]
        if self.image_blind:  # no padding either: its extent would give away the aspect ratio
            lb = Letterbox(self.size, self.size, self.size)
        key = (lb.content_w, lb.content_h)
        if key not in self._pad_masks:  # few distinct image sizes: build each padding mask once
            self._pad_masks[key] = torch.from_numpy(lb.padding_mask())
        return self._pad_masks[key]

    def __getitem__(self, i: int) -> dict:
        return (
            {
                "image": self.image(i),
                "pixel_mask": self.pixel_mask(i),
                "input_ids": self.input_ids[i],
                "attention_mask": self.attention_mask[i],
                "box": self.boxes[i],
                "index": torch.tensor(i),
            }
            | ({"mask": torch.from_numpy(self.square_mask(i))} if self.masks is not None else {})
            | ({k: v[i] for k, v in self.candidates.items()} if self.candidates is not None else {})
        )


def collate(items: list[dict]) -> dict:
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    # Text is stored padded to data.max_tokens; cut the batch to its longest expression so the
    # encoders don't spend most of their time on padding (RefShapes: median 6 of 20 tokens).
    longest = int(batch["attention_mask"].sum(1).max())
    batch["input_ids"] = batch["input_ids"][:, :longest]
    batch["attention_mask"] = batch["attention_mask"][:, :longest]
    return batch
