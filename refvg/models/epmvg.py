"""EpmVG (Wang et al., "Bridging Modality Gap for Visual Grounding with Effective Cross-modal Distillation"):
a TransVG student whose backbones learn from a CLIP teacher (stage `teacher`, refvg/models/clip_teacher.py).

The student's visual and language backbones start in two unrelated feature spaces, and the fusion
transformer has to bridge that gap from the grounding loss alone. EpmVG closes it with distillation from a
model whose image and text features already share one space:
- feature consistency: the student's visual tokens (projected, resampled to the teacher's patch grid) vs
  the teacher's patch features, and the student's sentence feature (projected) vs the teacher's;
- similarity-structure consistency: the student's in-batch image-text similarity matrix vs the teacher's.
Weights in `model.epmvg` (all 0: the same student without distillation, and without the projection heads,
which then would have nothing to learn). The teacher's features are computed once by the `teacher` stage
and read with the batch ("teacher_patch", "teacher_sentence"), never recomputed during training.
Backbones, fusion transformer, [REG] head and grounding loss are TransVG's (inherited, not copied).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from refvg.config import Config
from refvg.losses import distillation_losses
from refvg.models.qrnet import masked_mean
from refvg.models.registry import register_model
from refvg.models.transvg import TransVG
from refvg.models.vl import downsample_mask

TEACHER_KEYS = ("teacher_patch", "teacher_sentence")  # what refvg.data.teacher_features adds to a batch


class EpmVG(TransVG):
    def build_neck(self) -> int:
        visual_dim = super().build_neck()
        self.distill_visual = self.distill_text = None
        self.auxiliary_loss = self.cfg.model.epmvg.distills  # the trainer clips its gradient apart
        if self.cfg.model.epmvg.distills:
            # Linear heads from the student's feature spaces to the teacher's joint space: the backbones keep
            # their own width, and what the fusion transformer reads is their output, not the projection.
            # Drawn from a forked RNG: the modules built after them (fusion, head) start from the
            # weights the ablation's start from, so the pair differs in the distillation alone.
            dim = self.cfg.teacher.projection_dim
            with torch.random.fork_rng(devices=[]):
                self.distill_visual = nn.Linear(visual_dim, dim)
                self.distill_text = nn.Linear(self.text.hidden_size, dim)
        return visual_dim

    def extra_outputs(self, batch: dict, visual: torch.Tensor, text: torch.Tensor) -> dict:
        if self.distill_visual is None:
            return {}
        tokens = self.distill_visual(visual.flatten(2).transpose(1, 2))  # [B, h*w, D]
        return {"distill_visual": tokens, "distill_grid": tuple(visual.shape[-2:]),
                "distill_sentence": self.distill_text(masked_mean(text, batch["attention_mask"]))}

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        losses = super().compute_loss(outputs, batch)
        if self.distill_visual is None:
            return losses
        missing = [k for k in TEACHER_KEYS if k not in batch]
        if missing:
            raise KeyError(f"epmvg distils (model.epmvg weights > 0) but the batch has no {', '.join(missing)}: "
                           "train it through refvg.stages.train_method, which reads the `teacher` stage's features")
        teacher = batch["teacher_patch"]  # [B, G, D] on the teacher's g x g patch grid
        grid = patch_grid(teacher.shape[1])
        student = resample_tokens(outputs["distill_visual"], outputs["distill_grid"], grid)
        valid = ~downsample_mask(batch["pixel_mask"], grid).flatten(1)
        e = self.cfg.model.epmvg
        parts = distillation_losses(student, outputs["distill_sentence"], teacher, batch["teacher_sentence"],
                                    valid, e.temperature)
        total = e.image_weight * parts["distill_image"] + e.text_weight * parts["distill_text"] \
            + e.similarity_weight * parts["distill_similarity"]
        return {**losses, **parts, "loss": losses["loss"] + total, "auxiliary": total}


def patch_grid(cells: int) -> tuple[int, int]:
    """The square grid a ViT's `cells` patch features lie on."""
    side = math.isqrt(cells)
    if side * side != cells:
        raise ValueError(f"teacher patch features: {cells} cells do not form a square grid")
    return side, side


def resample_tokens(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Tokens [B, h*w, D] on `grid` -> [B, H*W, D] on `target`: averaged when the target is coarser (each teacher
    patch covers several student cells), bilinear when it is finer."""
    if tuple(grid) == tuple(target):
        return tokens
    b, _, d = tokens.shape
    fmap = tokens.transpose(1, 2).reshape(b, d, *grid)
    if grid[0] >= target[0] and grid[1] >= target[1]:
        fmap = F.adaptive_avg_pool2d(fmap, target)
    else:
        fmap = F.interpolate(fmap, size=target, mode="bilinear", align_corners=False)
    return fmap.flatten(2).transpose(1, 2)


def epmvg_needs(cfg: Config) -> tuple[str, ...]:
    """The teacher's cached features while any distillation weight is on; nothing more without."""
    return ("teacher",) if cfg.model.epmvg.distills else ()


@register_model("epmvg", needs=epmvg_needs)
def build_epmvg(cfg: Config, vocab_size: int, pad_token_id: int) -> EpmVG:
    return EpmVG(cfg, vocab_size, pad_token_id)
