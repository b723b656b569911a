"""The `prepare` stage: REFER-layout dataset -> training-ready arrays.

Per split, `<out>/<split>/` holds
- `images.npy`   uint8 [N_images, S, S, 3], letterboxed to the training size once, so training never
decodes
                 or resizes an image (the DataLoader only slices a memory map);
- `tokens.npy`   int32 [N_samples, 2, L]: input_ids and attention_mask;
- `samples.json` one record per (ref, sentence): ids, expression, image index, original size and
box, and
                 `mask_index`, the row of its target's mask (-1: the annotation has no
                 segmentation);
- `masks.npy`    uint8 [N_masks, ceil(S*S/8)]: each target mask letterboxed like its image,
bit-packed
                 (np.packbits of the S x S mask, row-major), once per annotation;
- `masks_rle.json` the same masks at original resolution as COCO RLE: what mask metrics are scored
against;
- `candidates.json` every annotated object of each image (one list per row of `images.npy`): the
                 ground-truth proposals that ranking methods choose from (refvg.data.proposals).
`<out>/tokenizer/` is the tokenizer every later stage loads, and `<out>/manifest.json` the counts,
skipped records with their reasons, and the settings they were prepared with. All files are plain
arrays and JSON: nothing here is unpickled later.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from refvg.config import Config
from refvg.data.dataset import MANIFEST, MASKS, MASKS_RLE
from refvg.data.images import UnsafeImagePath, open_dataset_image
from refvg.data.proposals import write_gt_candidates
from refvg.data.refer import (
    BadRecordError,
    ReferDataset,
    RefSample,
    SkipLog,
    open_source,
    select_splits,
)
from refvg.data.text import TOKENIZER_DIR, encode, get_tokenizer
from refvg.data.transforms import Letterbox, xywh_to_xyxy

ShardRunner = Callable[[Callable[["Shard"], "ShardResult"], list["Shard"]], list["ShardResult"]]


def prepared_path(cfg: Config) -> Path:
    return Path(cfg.data.prepared_dir) / cfg.data.dataset


def _load_image(path: Path, image_dir: Path | None = None) -> Image.Image:
    # Decoded fully now (a truncated file fails here, not in the middle of training), in the stored
    # pixel frame the boxes use (no EXIF turn), and only from inside the image folder
    # (refvg.data.images).
    return open_dataset_image(path, image_dir)


# ------------------------------------------------------------------ shards: the unit of parallel
# work Decoding and letterboxing images is nearly all of `prepare`'s time and each image is
# independent, so a split's images are cut into shards that can run anywhere (a loop, threads, Dask
# worker processes). A shard takes and returns only small picklable values and writes its frames to
# a file in the output folder.


@dataclass(frozen=True)
class ImageJob:
    image_id: int
    path: str
    width: int  # as annotated: the boxes are in this frame
    height: int
    image_dir: str = ""  # the folder the resolved path must stay in ("": not checked)


@dataclass(frozen=True)
class Shard:
    split: str
    index: int
    jobs: tuple[ImageJob, ...]
    size: int  # letterbox size
    out_path: str  # where the shard's frames go (.npy)
    # data.on_bad_record == "error": raise on the first bad image instead of reporting it
    strict: bool


@dataclass
class ShardResult:
    split: str
    index: int
    out_path: str
    image_ids: list[int]  # the images in the frames file, in order
    # image id -> (skip reason, detail)
    bad: dict[int, tuple[str, str]] = field(default_factory=dict)


def image_jobs(refer: ReferDataset, samples: list[RefSample]) -> list[ImageJob]:
    """The split's distinct images, in order of first use."""
    seen: dict[int, ImageJob] = {}
    for s in samples:
        if s.image_id not in seen:
            seen[s.image_id] = ImageJob(
                s.image_id,
                str(refer.image_path(s)),
                s.image_width,
                s.image_height,
                str(refer.image_dir),
            )
    return list(seen.values())


def plan_shards(
    jobs_by_split: dict[str, list[ImageJob]],
    size: int,
    out_dir: Path,
    num_shards: int,
    strict: bool,
) -> list[Shard]:
    """Cut every split into shards of about total/num_shards images (1: one shard per split)."""
    total = sum(len(j) for j in jobs_by_split.values())
    per_shard = max(1, -(-total // num_shards))
    shards = []
    for split, jobs in jobs_by_split.items():
        for k, start in enumerate(range(0, max(len(jobs), 1), per_shard)):
            shards.append(
                Shard(
                    split,
                    k,
                    tuple(jobs[start : start + per_shard]),
                    size,
                    str(out_dir / split / f".shard-{k:04d}.npy"),
                    strict,
                )
            )
    return shards


def letterbox_shard(shard: Shard) -> ShardResult:
    """Decode, check and letterbox a shard's images into one uint8 [n, S, S, 3] file."""
    frames, ids, bad = [], [], {}
    for job in shard.jobs:
        try:
            img = _load_image(Path(job.path), Path(job.image_dir) if job.image_dir else None)
        except UnsafeImagePath as err:
            if shard.strict:
                raise BadRecordError(f"image {job.image_id}: unsafe_image_path: {err}") from None
            bad[job.image_id] = ("unsafe_image_path", str(err))
            continue
        except (OSError, UnidentifiedImageError, ValueError) as err:
            if shard.strict:
                raise BadRecordError(
                    f"{job.path}: image {job.image_id} cannot be decoded: {err}"
                ) from None
            bad[job.image_id] = ("corrupt_image", str(err))
            continue
        if img.size != (job.width, job.height):
            # Boxes are in the annotated size; a silently different file would shift every box.
            reason = (
                f"image is {img.size[0]}x{img.size[1]}, annotation says {job.width}x{job.height}"
            )
            if shard.strict:
                raise BadRecordError(f"{job.path}: image {job.image_id}: {reason}")
            bad[job.image_id] = ("image_size_mismatch", reason)
            continue
        ids.append(job.image_id)
        frames.append(Letterbox(job.width, job.height, shard.size).image(img))
    Path(shard.out_path).parent.mkdir(parents=True, exist_ok=True)
    np.save(
        shard.out_path,
        np.stack(frames) if frames else np.zeros((0, shard.size, shard.size, 3), np.uint8),
    )
    return ShardResult(shard.split, shard.index, shard.out_path, ids, bad)


def run_sequentially(fn: Callable[[Shard], ShardResult], shards: list[Shard]) -> list[ShardResult]:
    return [fn(s) for s in shards]


def assemble_split(
    samples: list[RefSample],
    results: list[ShardResult],
    split_dir: Path,
    skips: SkipLog,
    refer: ReferDataset,
    strict: bool,
    size: int,
) -> tuple[list[RefSample], int]:
    """Join a split's shards into `images.npy`, write its candidates, target masks and
    `samples.json`; returns the samples whose image and segmentation were kept (the others are
    counted in `skips` with their reason), and the number of masks written."""
    results = sorted(results, key=lambda r: r.index)
    image_index: dict[int, int] = {}
    bad: dict[int, tuple[str, str]] = {}
    for r in results:
        for image_id in r.image_ids:
            image_index[image_id] = len(image_index)
        bad.update(r.bad)
    split_dir.mkdir(parents=True, exist_ok=True)
    _concat_frames([Path(r.out_path) for r in results], split_dir / "images.npy")
    write_gt_candidates(split_dir, list(image_index), refer, skips)
    kept, reported = [], set()
    for s in samples:
        if s.image_id in bad:
            reason, detail = bad[s.image_id]
            where = f"{refer.image_path(s)}: ref {s.ref_id} sent {s.sent_id}"
            skips.add(reason, f"{where}: {detail}" if s.image_id not in reported else where)
            reported.add(s.image_id)
            continue
        kept.append(s)
    kept, mask_index, n_masks = _write_masks(kept, split_dir, skips, refer, strict, size)
    records = []
    for s in kept:
        rec = asdict(s)
        rec["image_index"] = image_index[s.image_id]
        rec["mask_index"] = mask_index[s.ann_id]
        rec["bbox_xyxy"] = xywh_to_xyxy(np.asarray(s.bbox)).tolist()
        records.append(rec)
    (split_dir / "samples.json").write_text(json.dumps(records), encoding="utf-8")
    return kept, n_masks


def _write_masks(
    samples: list[RefSample],
    split_dir: Path,
    skips: SkipLog,
    refer: ReferDataset,
    strict: bool,
    size: int,
) -> tuple[list[RefSample], dict[int, int], int]:
    """Each target's mask once per annotation: letterboxed and bit-packed (MASKS) and as RLE at
    original resolution (MASKS_RLE). Returns the samples kept, ann id -> mask row (-1: no
    segmentation), mask count."""
    from pycocotools import mask as mask_utils

    mask_index: dict[int, int] = {}
    packed: list[np.ndarray] = []
    rles: list[dict] = []
    kept: list[RefSample] = []
    bad_anns: set[int] = set()
    for s in samples:
        if s.ann_id in bad_anns:
            skips.add(
                "bad_segmentation",
                f"{refer.instances_path.name}: ann {s.ann_id}: ref {s.ref_id} sent {s.sent_id}",
            )
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
        kept.append(s)
    masks = np.stack(packed) if packed else np.zeros((0, (size * size + 7) // 8), np.uint8)
    np.save(split_dir / MASKS, masks)
    (split_dir / MASKS_RLE).write_text(json.dumps(rles), encoding="utf-8")
    return kept, mask_index, len(rles)


def _concat_frames(parts: list[Path], out: Path) -> None:
    if len(parts) == 1:  # the one-shard case (the default pipeline): no copy at all
        os.replace(parts[0], out)
        return
    arrays = [np.load(p, mmap_mode="r") for p in parts]
    n = sum(a.shape[0] for a in arrays)
    merged = np.lib.format.open_memmap(
        out, mode="w+", dtype=np.uint8, shape=(n, *arrays[0].shape[1:])
    )
    at = 0
    for a in arrays:
        merged[at : at + a.shape[0]] = a
        at += a.shape[0]
    merged.flush()
    del merged, arrays
    for p in parts:
        p.unlink()


def prepare_dataset(
    cfg: Config, out_dir: Path | None = None, run_shards: ShardRunner = run_sequentially
) -> dict:
    """Validate, letterbox and tokenize every split; returns the manifest (also written to disk).

    The image work is cut into `cfg.parallel.prepare_shards` shards and handed to
    `run_shards(letterbox_shard, shards)`, which may run them anywhere (the prepare flow maps them
    over Dask workers); the result is the same whatever runs them. Writes into a temporary sibling
    and renames at the end, so an interrupted run never leaves a half-prepared dataset that looks
    complete."""
    d = cfg.data
    out_dir = Path(out_dir) if out_dir else prepared_path(cfg)
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    strict = d.on_bad_record == "error"

    try:
        refer = open_source(d)
        by_split = refer.all_samples()
        splits = select_splits(d, refer, by_split)

        tokenizer = get_tokenizer(
            tmp_dir / TOKENIZER_DIR,
            cfg.model.text.pretrained,
            (s.sentence for s in by_split["train"]),
            cfg.model.text.vocab_size,
        )
        present = list(splits)
        jobs = {split: image_jobs(refer, by_split[split]) for split in present}
        shards = plan_shards(jobs, d.image_size, tmp_dir, cfg.parallel.prepare_shards, strict)
        results = run_shards(letterbox_shard, shards)
        counts = {}
        for split in present:
            kept, n_masks = assemble_split(
                by_split[split],
                [r for r in results if r.split == split],
                tmp_dir / split,
                refer.skips,
                refer,
                strict,
                d.image_size,
            )
            ids, mask = encode(tokenizer, [s.sentence for s in kept], d.max_tokens)
            np.save(tmp_dir / split / "tokens.npy", np.stack([ids, mask], axis=1))
            counts[split] = {
                "samples": len(kept),
                "images": len({s.image_id for s in kept}),
                "masks": n_masks,
            }

        manifest = {
            "dataset": d.dataset,
            "source": str(Path(d.root) / d.dataset),
            "split_by": d.split_by,
            "image_size": d.image_size,
            "max_tokens": d.max_tokens,
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "format": d.format,
            "splits": counts,
            "refs_per_stored_split": refer.stored_split_counts(),
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
