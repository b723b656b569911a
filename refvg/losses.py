"""Training losses. Box part: L1 + GIoU on normalised cxcywh boxes (as in DETR / TransVG). Mask
part: per-pixel BCE + soft Dice on mask logits (referring segmentation). Distillation part (EpmVG):
feature consistency with a teacher and consistency of the in-batch image-text similarity structure.

Computed in float32 whatever the autocast dtype: GIoU divides small areas, which bf16 handles
poorly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refvg.data.transforms import cxcywh_to_xyxy
from refvg.metrics import generalized_box_iou


def box_l1_loss(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> torch.Tensor:
    """L1 summed over the 4 coordinates, averaged over boxes."""
    return (pred_cxcywh.float() - target_cxcywh.float()).abs().sum(-1).mean()


def giou_loss(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> torch.Tensor:
    """Mean over boxes of 1 - GIoU."""
    giou = generalized_box_iou(
        cxcywh_to_xyxy(pred_cxcywh.float()), cxcywh_to_xyxy(target_cxcywh.float())
    )
    return (1 - giou).mean()


def grounding_box_loss(
    pred: torch.Tensor, target: torch.Tensor, l1_weight: float, giou_weight: float
) -> dict[str, torch.Tensor]:
    """{"loss": weighted sum, "l1": unweighted L1, "giou": unweighted 1 - GIoU}."""
    l1 = box_l1_loss(pred, target)
    giou = giou_loss(pred, target)
    return {"loss": l1_weight * l1 + giou_weight * giou, "l1": l1, "giou": giou}


def mask_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    bce_weight: float,
    dice_weight: float,
) -> dict[str, torch.Tensor]:
    """logits [B,H,W], target {0,1} [B,H,W], valid bool [B,H,W] (False on letterbox padding, which
    is left out).

    {"loss": weighted sum, "bce": mean per-pixel BCE, "dice": mean over samples of 1 - soft Dice}.
    Dice weighs every object equally whatever its size, where BCE alone lets the background's many
    easy pixels dominate and under-segments small objects."""
    logits, target, valid = logits.float(), target.float(), valid.float()
    bce = (
        F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid
    ).sum() / valid.sum().clamp_min(1)
    prob = logits.sigmoid() * valid
    inter = (prob * target).flatten(1).sum(-1)
    total = prob.flatten(1).sum(-1) + (target * valid).flatten(1).sum(-1)
    dice = (1 - (2 * inter + 1) / (total + 1)).mean()
    return {"loss": bce_weight * bce + dice_weight * dice, "bce": bce, "dice": dice}


# ------------------------------------------------------------------ cross-modal distillation
# (EpmVG) The teacher's features are constants: every function below detaches them, so no gradient
# can reach a teacher whatever the caller passes.


def feature_consistency_loss(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of 1 - cos(student, teacher) over the positions kept by `valid` (all when None).

    student, teacher [..., D] of one shape (features already in the teacher's space); valid bool
    [...]. Cosine rather than L2: the teacher's feature norms carry nothing the student should copy
    (a CLIP embedding is only ever used normalised)."""
    cos = F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)
    if valid is None:
        return (1 - cos).mean()
    keep = valid.float()
    return ((1 - cos) * keep).sum() / keep.sum().clamp_min(1)


def similarity_structure_loss(
    student_image: torch.Tensor,
    student_text: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """KL(teacher || student) between the softmaxed rows of the in-batch image-text cosine
    similarity matrices [B, B], image->text and text->image, averaged: the student's images and
    texts must relate to each other as the teacher's do, not only sit near the teacher's features
    one by one. Inputs [B, D] (student and teacher widths may differ: each side is compared with
    itself)."""
    s = (
        F.normalize(student_image.float(), dim=-1)
        @ F.normalize(student_text.float(), dim=-1).T
        / temperature
    )
    t = (
        F.normalize(teacher_image.detach().float(), dim=-1)
        @ F.normalize(teacher_text.detach().float(), dim=-1).T
        / temperature
    )

    def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return F.kl_div(
            F.log_softmax(student_logits, -1),
            F.log_softmax(teacher_logits, -1),
            log_target=True,
            reduction="batchmean",
        )

    return (kl(s, t) + kl(s.T, t.T)) / 2


def distillation_losses(
    student_tokens: torch.Tensor,
    student_sentence: torch.Tensor,
    teacher_tokens: torch.Tensor,
    teacher_sentence: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """EpmVG's three terms, unweighted: {"distill_image", "distill_text", "distill_similarity"}.

    student_tokens / teacher_tokens [B, N, D] on one grid (N cells), valid bool [B, N] (False on
    letterbox padding), student_sentence / teacher_sentence [B, D]. The image side of the similarity
    structure is each image's mean feature over its valid cells, taken the same way for student and
    teacher."""
    keep = valid.unsqueeze(-1).float()

    def pooled(tokens: torch.Tensor) -> torch.Tensor:
        return (tokens.float() * keep).sum(1) / keep.sum(1).clamp_min(1)

    return {
        "distill_image": feature_consistency_loss(student_tokens, teacher_tokens, valid),
        "distill_text": feature_consistency_loss(student_sentence, teacher_sentence),
        "distill_similarity": similarity_structure_loss(
            pooled(student_tokens),
            student_sentence,
            pooled(teacher_tokens.detach()),
            teacher_sentence,
            temperature,
        ),
    }


# ------------------------------------------------------------------ image-text contrast (weak_cam,
# CLIP teacher)


def multi_positive_nce(logits: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch image-text logits [B,B] (row: image, column: text) where
    every pair of `same` (bool [B,B]) is a positive, the target spread evenly over them: several
    expressions or captions of one image in a batch are matches, not negatives."""
    target = same.float() / same.float().sum(1, keepdim=True)
    i2t = -(target * logits.log_softmax(1)).sum(1).mean()
    t2i = -(target.t() * logits.t().log_softmax(1)).sum(1).mean()
    return (i2t + t2i) / 2
