"""The `prepare` stage: REFER-layout dataset -> training-ready arrays.

Per split, `<out>/<split>/` holds
- `images.npy`   uint8 [N_images, S, S, 3], letterboxed to the training size once, so training never decodes
                 or resizes an image (the DataLoader only slices a memory map);
- `tokens.npy`   int32 [N_samples, 2, L]: input_ids and attention_mask;
- `samples.json` one record per (ref, sentence): ids, expression, image index, original size and box, and
                 `mask_index`, the row of its target's mask (-1: the annotation has no segmentation);
- `masks.npy`    uint8 [N_masks, ceil(S*S/8)]: each target mask letterboxed like its image, bit-packed
                 (np.packbits of the S x S mask, row-major), once per annotation;
- `masks_rle.json` the same masks at original resolution as COCO RLE: what mask metrics are scored against.
`<out>/tokenizer/` is the tokenizer every later stage loads, and `<out>/manifest.json` the counts, skipped
records with their reasons, and the settings they were prepared with.
All files are plain arrays and JSON: nothing here is unpickled later.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from refvg.config import Config
from refvg.data.dataset import MANIFEST, MASKS, MASKS_RLE
from refvg.data.refer import BadRecordError, ReferDataset, RefSample, SkipLog
from refvg.data.text import TOKENIZER_DIR, encode, get_tokenizer
from refvg.data.transforms import Letterbox, xywh_to_xyxy

def prepared_path(cfg: Config) -> Path:
    return Path(cfg.data.prepared_dir) / cfg.data.dataset


def _load_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()  # decode fully now: a truncated file must fail here, not in the middle of training
        return img.convert("RGB")


def _prepare_split(
    refer: ReferDataset, samples: list[RefSample], size: int, split_dir: Path, skips: SkipLog, strict: bool
) -> tuple[list[RefSample], int]:
    """Letterbox the split's images and target masks into arrays; returns the samples whose image and
    segmentation decoded, and the number of masks written."""
    from pycocotools import mask as mask_utils

    image_index: dict[int, int] = {}
    frames: list[np.ndarray] = []
    mask_index: dict[int, int] = {}
    packed: list[np.ndarray] = []
    rles: list[dict] = []
    kept: list[RefSample] = []
    bad_images: set[int] = set()
    bad_anns: set[int] = set()
    for s in samples:
        if s.ann_id in bad_anns:
            skips.add("bad_segmentation", f"{refer.instances_path.name}: ann {s.ann_id}: ref {s.ref_id} sent {s.sent_id}")
            continue
        if s.ann_id not in mask_index:
            try:
                rle = refer.rle(s.ann_id)
            except BadRecordError as err:
                if strict:
                    raise
                bad_anns.add(s.ann_id)
                skips.add("bad_segmentation", f"ref {s.ref_id} sent {s.sent_id}: {err}")
                continue
            if rle is None:
                mask_index[s.ann_id] = -1
            else:
                mask_index[s.ann_id] = len(rles)
                rles.append(rle)
                square = Letterbox(s.image_width, s.image_height, size).mask(mask_utils.decode(rle))
                packed.append(np.packbits(square.reshape(-1)))
        if s.image_id in bad_images:
            skips.add("corrupt_image", f"{refer.image_path(s)}: ref {s.ref_id} sent {s.sent_id}")
            continue
        if s.image_id not in image_index:
            path = refer.image_path(s)
            try:
                img = _load_image(path)
            except (OSError, UnidentifiedImageError, ValueError) as err:
                if strict:
                    raise BadRecordError(f"{path}: image {s.image_id} cannot be decoded: {err}") from None
                bad_images.add(s.image_id)
                skips.add("corrupt_image", f"{path}: ref {s.ref_id} sent {s.sent_id}: {err}")
                continue
            if img.size != (s.image_width, s.image_height):
                # Boxes are in the annotated size; a silently different file would shift every box.
                reason = f"image is {img.size[0]}x{img.size[1]}, annotation says {s.image_width}x{s.image_height}"
                if strict:
                    raise BadRecordError(f"{path}: image {s.image_id}: {reason}")
                bad_images.add(s.image_id)
                skips.add("image_size_mismatch", f"{path}: {reason}")
                continue
            image_index[s.image_id] = len(frames)
            frames.append(Letterbox(s.image_width, s.image_height, size).image(img))
        kept.append(s)
    split_dir.mkdir(parents=True, exist_ok=True)
    images = np.stack(frames) if frames else np.zeros((0, size, size, 3), np.uint8)
    np.save(split_dir / "images.npy", images)
    masks = np.stack(packed) if packed else np.zeros((0, (size * size + 7) // 8), np.uint8)
    np.save(split_dir / MASKS, masks)
    (split_dir / MASKS_RLE).write_text(json.dumps(rles), encoding="utf-8")
    records = []
    for s in kept:
        rec = asdict(s)
        rec["image_index"] = image_index[s.image_id]
        rec["mask_index"] = mask_index[s.ann_id]
        rec["bbox_xyxy"] = xywh_to_xyxy(np.asarray(s.bbox)).tolist()
        records.append(rec)
    (split_dir / "samples.json").write_text(json.dumps(records), encoding="utf-8")
    return kept, len(rles)


def prepare_dataset(cfg: Config, out_dir: Path | None = None) -> dict:
    """Validate, letterbox and tokenize every split; returns the manifest (also written to disk).

    Writes into a temporary sibling and renames at the end, so an interrupted run never leaves a
    half-prepared dataset that looks complete."""
    d = cfg.data
    out_dir = Path(out_dir) if out_dir else prepared_path(cfg)
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    strict = d.on_bad_record == "error"

    try:
        refer = ReferDataset(
            d.root, d.dataset, split_by=d.split_by, image_dir=d.image_dir,
            on_bad_record=d.on_bad_record, max_expression_chars=d.max_expression_chars,
        )
        by_split = refer.all_samples()
        missing = [s for s in d.splits if not by_split.get(s)]
        if "train" in missing:
            raise BadRecordError(f"{d.root}/{d.dataset}: no usable training samples (skips: {refer.skips.to_dict()})")

        tokenizer = get_tokenizer(
            tmp_dir / TOKENIZER_DIR, cfg.model.text.pretrained, (s.sentence for s in by_split["train"]), cfg.model.text.vocab_size
        )
        counts = {}
        for split in d.splits:
            if split in missing:
                continue
            kept, n_masks = _prepare_split(refer, by_split[split], d.image_size, tmp_dir / split, refer.skips, strict)
            ids, mask = encode(tokenizer, [s.sentence for s in kept], d.max_tokens)
            np.save(tmp_dir / split / "tokens.npy", np.stack([ids, mask], axis=1))
            counts[split] = {"samples": len(kept), "images": len({s.image_id for s in kept}), "masks": n_masks}

        manifest = {
            "dataset": d.dataset,
            "source": str(Path(d.root) / d.dataset),
            "split_by": d.split_by,
            "image_size": d.image_size,
            "max_tokens": d.max_tokens,
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "splits": counts,
            "missing_splits": missing,
            "skipped": refer.skips.to_dict(),
        }
        (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # nothing half-written is left behind
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    return manifest

