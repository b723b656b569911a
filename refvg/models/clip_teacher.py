"""The CLIP teacher EpmVG distils from (stage `teacher`): build or load it, train it contrastively,
score it by retrieval, and extract the features the student learns from.

- Small config (the default, nothing to download): a `transformers` CLIPModel whose ViT reads our
letterboxed
  `data.image_size` images (patch `teacher.patch_size`, so its patch grid is the student's stride-8
  grid at 64 px) and whose text transformer reads the prepared tokenizer's ids. Trained with InfoNCE
  on its own image-caption corpus (refvg.data.captions: scenes from another random stream than the
  grounding images, captions of the whole scene, no box), so what it knows comes from outside the
  grounding data; scored on that corpus's held-out images (its own task) and by expression -> object
  retrieval on the grounding val split (how far that knowledge carries to referring expressions;
  never trained on).
- `teacher.pretrained` (a name or a save_pretrained folder): a real CLIP, used as is. No
CLIPProcessor: it
  gets our letterboxed images resized to its own input size (224) with CLIP's normalisation, and the
  expressions tokenized by its own tokenizer (from the same name/folder), never by our prepared one.

Features (what the student distils from): an image's patch features are the ViT's last hidden states
of its patches through the post-LayerNorm and the visual projection, i.e. in the joint space, as the
pooled image embedding is; a sentence's feature is the projected hidden state of its last real token
(CLIP's [EOS] pooling; ours ends with [SEP]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import CLIPConfig, CLIPModel

from refvg.config import Config, TeacherConfig
from refvg.data.captions import CorpusPairs
from refvg.data.dataset import PreparedSplit, collate
from refvg.losses import multi_positive_nce
from refvg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from refvg.engine.checkpoint import load_checkpoint
from refvg.engine.trainer import TrainResult, train

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RECALL_AT = (1, 5)
SELECT_METRIC = (
    "corpus/text_recall@1"  # best.pt: the epoch whose captions find their held-out images best
)
TRAINING_DIR = (
    "training"  # under teacher.out_dir: the trainer's last.pt / best.pt (resume after a kill)
)


def build_teacher(tcfg: TeacherConfig, image_size: int, max_tokens: int, tokenizer) -> CLIPModel:
    """A small CLIPModel from `teacher`'s settings over `tokenizer`'s vocabulary (the prepared
    one)."""
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=tcfg.hidden_size,
        num_hidden_layers=tcfg.num_layers,
        num_attention_heads=tcfg.num_heads,
        intermediate_size=tcfg.intermediate_size,
        max_position_embeddings=max_tokens,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    vision = dict(
        image_size=image_size,
        patch_size=tcfg.patch_size,
        hidden_size=tcfg.hidden_size,
        num_hidden_layers=tcfg.num_layers,
        num_attention_heads=tcfg.num_heads,
        intermediate_size=tcfg.intermediate_size,
    )
    if image_size % tcfg.patch_size:
        raise ValueError(
            f"teacher.patch_size {tcfg.patch_size} does not tile data.image_size {image_size}"
        )
    return CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=tcfg.projection_dim)
    )


def load_teacher(name_or_folder: str, projection_dim: int) -> CLIPModel:
    model = CLIPModel.from_pretrained(name_or_folder)
    if model.config.projection_dim != projection_dim:
        raise ValueError(
            f"teacher {name_or_folder} embeds in {model.config.projection_dim} dimensions; set "
            f"teacher.projection_dim: {model.config.projection_dim} (the "
            f"student's projection heads use it)"
        )
    return model


def input_size(model: CLIPModel) -> int:
    return model.config.vision_config.image_size


def teacher_pixels(images_uint8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B,S,S,3] letterboxed images -> float [B,3,size,size], CLIP-normalised."""
    return _clip_normalised(images_uint8.permute(0, 3, 1, 2).float().div_(255.0), size)


def _clip_normalised(x: torch.Tensor, size: int) -> torch.Tensor:
    """float [B,3,S,S] in [0, 1] -> resized to [B,3,size,size], CLIP-normalised."""
    if x.shape[-1] != size:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def crop_boxes(pixels: torch.Tensor, boxes_cxcywh: torch.Tensor, size: int) -> torch.Tensor:
    """The box of each image (normalised cxcywh in the square), resampled to [B,3,size,size]."""
    cx, cy, w, h = boxes_cxcywh.float().unbind(-1)
    theta = torch.zeros(len(boxes_cxcywh), 2, 3, device=pixels.device)
    theta[:, 0, 0], theta[:, 0, 2] = w, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * cy - 1
    grid = F.affine_grid(theta, [len(boxes_cxcywh), 3, size, size], align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


def encode_images(model: CLIPModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embedding [B,D], patch features [B,G,D]), both in the joint space (not normalised)."""
    vision = model.vision_model(pixel_values=pixels)
    hidden = model.vision_model.post_layernorm(vision.last_hidden_state)  # [B, 1+G, H]
    projected = model.visual_projection(hidden)
    return projected[:, 0], projected[:, 1:]


def encode_texts(
    model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Sentence features [B,D]: the projected hidden state of each expression's last real token."""
    hidden = model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = attention_mask.long().sum(1).clamp_min(1) - 1
    return model.text_projection(hidden[torch.arange(len(last), device=hidden.device), last])


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, same: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of (image, text) pairs; `same` bool [B,B] marks every pair
    that matches (two captions of one image), so a duplicate in the batch is a positive, not a
    negative."""
    return multi_positive_nce(
        scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T, same
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


class ContrastiveTeacher(nn.Module):
    """A CLIPModel as refvg.engine.trainer trains a model: forward(batch) embeds the batch's images
    and captions, compute_loss is the multi-positive InfoNCE (captions of one image are all
    positives)."""

    auxiliary_loss = False  # one loss term: clipped as a whole

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.clip = clip

    def forward(self, batch: dict) -> dict:
        # The trainer hands every model ImageNet-normalised images (runtime.to_device); CLIP has its
        # own statistics.
        mean = torch.tensor(IMAGENET_MEAN, device=batch["image"].device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=batch["image"].device).view(1, 3, 1, 1)
        pixels = _clip_normalised(batch["image"] * std + mean, input_size(self.clip))
        return {
            "image": encode_images(self.clip, pixels)[0],
            "text": encode_texts(self.clip, batch["input_ids"], batch["attention_mask"]),
            "scale": self.clip.logit_scale.exp().clamp(max=100),
        }

    def compute_loss(self, outputs: dict, batch: dict) -> dict:
        img = batch["image_index"]
        same = img[:, None] == img[None]
        return {"loss": contrastive_loss(outputs["image"], outputs["text"], outputs["scale"], same)}

    def param_groups(self, lr: float, lr_backbone: float, weight_decay: float) -> list[dict]:
        return [
            {
                "params": [p for p in self.parameters() if p.requires_grad],
                "lr": lr,
                "weight_decay": weight_decay,
            }
        ]


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


def save_teacher(model: CLIPModel, tokenizer, folder: Path) -> None:
    """save_pretrained: the folder loads back with `teacher.pretrained: <folder>`."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
