"""The CLIP teacher EpmVG distils from (stage `teacher`): build or load it, encode images and
texts, its contrastive loss (training, scoring and feature extraction: refvg.engine.teacher).

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

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel

from refvg.config import TeacherConfig
from refvg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from refvg.losses import multi_positive_nce

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def save_teacher(model: CLIPModel, tokenizer, folder: Path) -> None:
    """save_pretrained: the folder loads back with `teacher.pretrained: <folder>`."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
