"""Training and scoring the CLIP teacher (stage `teacher`, refvg.models.clip_teacher): its
contrastive training on its own caption corpus through the one training loop (refvg.engine.trainer:
resume, the non-finite guard, AMP, DDP), retrieval recall on held-out corpus images and on the
grounding val split, and the features the distilling students read."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from transformers import CLIPModel

from refvg.config import Config
from refvg.data.captions import CorpusPairs
from refvg.data.dataset import PreparedSplit, collate
from refvg.engine.checkpoint import load_checkpoint
from refvg.engine.trainer import TrainResult, train
from refvg.models.clip_teacher import (
    ContrastiveTeacher,
    crop_boxes,
    encode_images,
    encode_texts,
    input_size,
    teacher_pixels,
)

RECALL_AT = (1, 5)
SELECT_METRIC = (
    "corpus/text_recall@1"  # best.pt: the epoch whose captions find their held-out images best
)
TRAINING_DIR = (
    "training"  # under teacher.out_dir: the trainer's last.pt / best.pt (resume after a kill)
)


def retrieval_recall(
    similarity: torch.Tensor, correct: torch.Tensor, ks=RECALL_AT
) -> dict[str, float]:
    """similarity [Q, N] of each query to each gallery item, correct [Q] the right item's column ->
    {"recall@k": fraction of queries whose right item is among their k most similar}. Ties count
    against."""
    right = similarity.gather(1, correct.view(-1, 1))
    rank = (similarity >= right).sum(1) - 1  # items scoring at least as high, besides the right one
    return {f"recall@{k}": float((rank < k).float().mean()) for k in ks}


class TeacherView(Dataset):
    """A prepared split as the teacher reads it: its items plus "image_index" and "ann_id" (which
    pairs match), and with a pretrained teacher the expressions re-tokenized by that teacher's own
    tokenizer."""

    def __init__(self, base: PreparedSplit, tokenizer=None, max_tokens: int = 77):
        self.base = base
        self.image_index = torch.tensor([r["image_index"] for r in base.records])
        self.ann_id = torch.tensor([r["ann_id"] for r in base.records])
        self.tokens = None
        if tokenizer is not None:
            from refvg.data.text import encode

            ids, mask = encode(tokenizer, [r["sentence"] for r in base.records], max_tokens)
            self.tokens = (
                torch.from_numpy(ids.astype(np.int64)),
                torch.from_numpy(mask.astype(np.int64)),
            )

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        if self.tokens is not None:
            item["input_ids"], item["attention_mask"] = self.tokens[0][i], self.tokens[1][i]
        return item | {"image_index": self.image_index[i], "ann_id": self.ann_id[i]}


def _batches(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),
    )


class CaptionPairs(Dataset):
    """The caption corpus as the trainer reads it: item i is image i with one of its captions, drawn
    at random at each read (an epoch shows every image once). The draw uses torch's global
    generator, whose state the trainer checkpoints, so a resumed run draws the captions the
    uninterrupted one drew; hence the teacher trains without DataLoader workers (each would draw
    from a generator of its own)."""

    def __init__(self, pairs: CorpusPairs):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        rows = torch.tensor([i])
        caption = torch.randint(self.pairs.input_ids.shape[1], (1,))
        return {k: v[0] for k, v in self.pairs.batch(rows, caption).items()} | {"index": rows[0]}


def teacher_run(cfg: Config) -> Config:
    """`cfg` with `train` replaced by the teacher's contrastive training: its own epochs, batch,
    AdamW settings, warmup + cosine and seed from `teacher:`; how to run (device, amp, compile,
    grad_clip, checkpointing, the non-finite guard) from `train:`."""
    t = cfg.teacher
    train = cfg.train.model_copy(
        update={
            "epochs": t.epochs,
            "batch_size": t.batch_size,
            "lr": t.lr,
            "lr_backbone": t.lr,
            "weight_decay": t.weight_decay,
            "warmup_steps": t.warmup_steps,
            "schedule": "cosine",
            "seed": t.seed,
            "num_workers": 0,  # see CaptionPairs
        }
    )
    return cfg.model_copy(update={"train": train})


def train_teacher(
    model: CLIPModel,
    pairs: CorpusPairs,
    cfg: Config,
    out_dir: Path,
    evaluate: Callable[[CLIPModel], dict],
    on_epoch_end: Callable[[dict, int], None],
    data_version: str = "",
) -> TrainResult:
    """InfoNCE of the caption corpus's images vs their captions through refvg.engine.trainer.train
    (resume from out_dir/last.pt, the non-finite guard, AMP, DDP); `evaluate(model)` after every
    epoch, whose `SELECT_METRIC` picks best.pt. Returns with `model` holding the best epoch's
    weights; the history's and `on_epoch_end`'s metrics carry evaluate's own names. The corpus has
    no box and no grounding
    image: the teacher never sees the grounding labels."""
    own_names = lambda metrics: {k.removeprefix("val/"): v for k, v in metrics.items()}  # noqa: E731
    wrapped = ContrastiveTeacher(model)
    result = train(
        wrapped,
        CaptionPairs(pairs),
        teacher_run(cfg),
        out_dir,
        method="teacher",
        evaluate=lambda m: evaluate(m.clip),
        select_metric=SELECT_METRIC,
        on_epoch_end=lambda metrics, epoch: on_epoch_end(own_names(metrics), epoch),
        data_version=data_version,
    )
    wrapped.load_state_dict(load_checkpoint(result.best_checkpoint)["model"])
    result.history = [own_names(h) for h in result.history]
    return result


@torch.no_grad()
def caption_retrieval_recall(
    model: CLIPModel, pairs: CorpusPairs, batch_size: int, device: torch.device
) -> dict[str, float]:
    """The teacher's own task on held-out corpus images: each image's first caption against the N
    images ("text_recall@k": the caption finds its image among N) and each image against those N
    captions ("image_recall@k"); "chance@1" = 1/N."""
    was_training = model.training
    model.eval()
    size = input_size(model)
    images, texts = [], []
    for start in range(0, len(pairs), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(pairs)))
        batch = {k: v.to(device) for k, v in pairs.batch(rows).items()}
        image = encode_images(model, teacher_pixels(batch["image"], size))[0]
        images.append(F.normalize(image.float(), dim=-1))
        text = encode_texts(model, batch["input_ids"], batch["attention_mask"])
        texts.append(F.normalize(text.float(), dim=-1))
    model.train(was_training)
    similarity = torch.cat(texts) @ torch.cat(images).T  # [caption, image]
    right = torch.arange(len(pairs), device=similarity.device)
    out = {f"text_{k}": v for k, v in retrieval_recall(similarity, right).items()}
    out |= {f"image_{k}": v for k, v in retrieval_recall(similarity.T, right).items()}
    return out | {"chance@1": 1.0 / len(pairs)}


@torch.no_grad()
def _embed_split(
    model: CLIPModel, view: TeacherView, batch_size: int, device: torch.device
) -> Iterator[tuple]:
    size = input_size(model)
    for batch in _batches(view, batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        crop, _ = encode_images(
            model, crop_boxes(teacher_pixels(batch["image"], size), batch["box"], size)
        )
        yield (
            crop,
            encode_texts(model, batch["input_ids"], batch["attention_mask"]),
            batch["ann_id"],
            batch["image_index"],
        )


@torch.no_grad()
def crop_retrieval_recall(
    model: CLIPModel, view: TeacherView, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Expression -> object retrieval on a split: every expression ranks the split's distinct target
    objects (their box crops) by similarity; "recall@1" / "recall@5": how often its own object is
    among the top k of all of them; "image_recall@1": among the referred objects of its own image
    only, the choice a grounding model makes (RefShapes expressions are often relative, "the top
    shape", and name an object only within its image, so the split-wide figures stay far below 1
    even for a perfect teacher)."""
    was_training = model.training
    model.eval()
    crops, texts, anns, images = (
        torch.cat(parts) for parts in zip(*_embed_split(model, view, batch_size, device))
    )
    objects, first = np.unique(
        anns.cpu().numpy(), return_index=True
    )  # sorted ids, one crop of each
    first = torch.from_numpy(first).to(crops.device)
    column = torch.searchsorted(torch.from_numpy(objects).to(anns.device), anns)
    similarity = F.normalize(texts, dim=-1) @ F.normalize(crops[first], dim=-1).T
    model.train(was_training)
    same_image = images[:, None] == images[first][None]
    within = similarity.masked_fill(~same_image, float("-inf"))
    return {
        **retrieval_recall(similarity, column),
        "image_recall@1": retrieval_recall(within, column, (1,))["recall@1"],
    }


@torch.no_grad()
def extract_features(
    model: CLIPModel, view: TeacherView, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(patch features of each image of the split [N_images, G, D], sentence features [N_samples,
    D]), float32."""
    model.eval()
    size = input_size(model)
    images = view.base.images
    patches = []
    for start in range(0, images.shape[0], batch_size):
        chunk = torch.from_numpy(np.array(images[start : start + batch_size])).to(
            device
        )  # a copy: the map is read-only
        patches.append(encode_images(model, teacher_pixels(chunk, size))[1].float().cpu())
    sentences = []
    for batch in _batches(view, batch_size, shuffle=False):
        sentences.append(
            encode_texts(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            .float()
            .cpu()
        )
    return torch.cat(patches).numpy(), torch.cat(sentences).numpy()


def teacher_config_summary(cfg: Config, model: CLIPModel) -> dict:
    """What the features manifest records about the teacher that made them."""
    return {
        "pretrained": cfg.teacher.pretrained,
        "image_size": input_size(model),
        "patch_size": model.config.vision_config.patch_size,
        "projection_dim": model.config.projection_dim,
    }
