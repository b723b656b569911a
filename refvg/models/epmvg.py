"""EpmVG (Wang et al., "Bridging Modality Gap for Visual Grounding with Effective Cross-modal
Distillation"): a TransVG student whose backbones learn from a CLIP teacher (stage `teacher`,
refvg/models/clip_teacher.py).

The student's visual and language backbones start in two unrelated feature spaces, and the fusion
transformer has to bridge that gap from the grounding loss alone. EpmVG closes it with distillation
from a model whose image and text features already share one space:
- feature consistency: the student's visual tokens (projected, resampled to the teacher's patch
grid) vs
  the teacher's patch features, and the student's sentence feature (projected) vs the teacher's;
- similarity-structure consistency: the student's in-batch image-text similarity matrix vs the
teacher's. Weights in the method's `config:` (EpmVGConfig; all 0: the same student without
distillation, and without the projection heads, which then would have nothing to learn). The
teacher's features are computed once by the `teacher` stage and read with the batch
("teacher_patch", "teacher_sentence"), never recomputed during training. Backbones, fusion
transformer, [REG] head and grounding loss are TransVG's (inherited, not copied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from refvg.losses import distillation_losses
from refvg.models.layers import masked_mean
from refvg.models.registry import register_model
from refvg.models.epmvg_config import EpmVGConfig
from refvg.models.transvg import TransVG, TransVGOutput
from refvg.models.vl import downsample_mask

TEACHER_KEYS = (
    "teacher_patch",
    "teacher_sentence",
)  # what refvg.data.teacher_features adds to a batch


@dataclass
class EpmVGOutput(TransVGOutput):
    # while distilling: the visual tokens [B,h*w,D] in the teacher's space, their grid, the sentence
    # [B,D]
    distill_visual: Optional[torch.Tensor] = None
    distill_grid: Optional[tuple[int, int]] = None
    distill_sentence: Optional[torch.Tensor] = None


def epmvg_needs(config: EpmVGConfig) -> tuple[str, ...]:
    """The teacher's cached features while any distillation weight is on; nothing more without."""
    return ("teacher",) if config.distills else ()


@register_model("epmvg", config=EpmVGConfig, needs=epmvg_needs)
class EpmVG(TransVG):
    output_type = EpmVGOutput

    def __init__(self, config: EpmVGConfig, *, teacher_dim: int, **kwargs):
        self.teacher_dim = (
            teacher_dim  # the teacher's joint space (teacher.projection_dim); read by build_neck
        )
        super().__init__(config, **kwargs)

    @classmethod
    def config_kwargs(cls, cfg) -> dict:
        return {**super().config_kwargs(cfg), "teacher_dim": cfg.teacher.projection_dim}

    @property
    def auxiliary_loss(self) -> bool:
        return (
            self.distill_visual is not None
        )  # the trainer clips the distillation's gradient apart

    def build_neck(self) -> int:
        visual_dim = super().build_neck()
        self.distill_visual = self.distill_text = None
        if self.config.distills:
            # Linear heads from the student's feature spaces to the teacher's joint space: the
            # backbones keep their own width, and what the fusion transformer reads is their output,
            # not the projection. Drawn from a forked RNG: the modules built after them (fusion,
            # head) start from the weights the ablation's start from, so the pair differs in the
            # distillation alone.
            with torch.random.fork_rng(devices=[]):
                self.distill_visual = nn.Linear(visual_dim, self.teacher_dim)
                self.distill_text = nn.Linear(self.text.hidden_size, self.teacher_dim)
        return visual_dim

    def extra_outputs(self, batch: dict, visual: torch.Tensor, text: torch.Tensor) -> dict:
        if self.distill_visual is None:
            return {}
        tokens = self.distill_visual(visual.flatten(2).transpose(1, 2))  # [B, h*w, D]
        return {
            "distill_visual": tokens,
            "distill_grid": tuple(visual.shape[-2:]),
            "distill_sentence": self.distill_text(masked_mean(text, batch["attention_mask"])),
        }

    def compute_loss(self, outputs: EpmVGOutput, batch: dict) -> dict[str, torch.Tensor]:
        losses = super().compute_loss(outputs, batch)
        if self.distill_visual is None:
            return losses
        missing = [k for k in TEACHER_KEYS if k not in batch]
        if missing:
            raise KeyError(
                f"epmvg distils (its config's weights > 0) but the batch has "
                f"no {', '.join(missing)}: "
                "train it through refvg.stages.train_method, which reads the "
                "`teacher` stage's features"
            )
        teacher = batch["teacher_patch"]  # [B, G, D] on the teacher's g x g patch grid
        grid = patch_grid(teacher.shape[1])
        student = resample_tokens(outputs.distill_visual, outputs.distill_grid, grid)
        valid = ~downsample_mask(batch["pixel_mask"], grid).flatten(1)
        e = self.config
        parts = distillation_losses(
            student,
            outputs.distill_sentence,
            teacher,
            batch["teacher_sentence"],
            valid,
            e.temperature,
        )
        total = (
            e.image_weight * parts["distill_image"]
            + e.text_weight * parts["distill_text"]
            + e.similarity_weight * parts["distill_similarity"]
        )
        return {**losses, **parts, "loss": losses["loss"] + total, "auxiliary": total}


def patch_grid(cells: int) -> tuple[int, int]:
    """The square grid a ViT's `cells` patch features lie on."""
    side = math.isqrt(cells)
    if side * side != cells:
        raise ValueError(f"teacher patch features: {cells} cells do not form a square grid")
    return side, side


def resample_tokens(
    tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]
) -> torch.Tensor:
    """Tokens [B, h*w, D] on `grid` -> [B, H*W, D] on `target`: averaged when the target is coarser
    (each teacher patch covers several student cells), bilinear when it is finer."""
    if tuple(grid) == tuple(target):
        return tokens
    b, _, d = tokens.shape
    fmap = tokens.transpose(1, 2).reshape(b, d, *grid)
    if grid[0] >= target[0] and grid[1] >= target[1]:
        fmap = F.adaptive_avg_pool2d(fmap, target)
    else:
        fmap = F.interpolate(fmap, size=target, mode="bilinear", align_corners=False)
    return fmap.flatten(2).transpose(1, 2)
