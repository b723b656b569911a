"""EpmVG's family config: what a method entry's `config:` holds for model `epmvg`,
validated when params.yaml loads. Apart from the model (epmvg.py) and free of torch, so
reading params imports no model."""

from __future__ import annotations

from pydantic import Field

from refvg.models.registry import register_config
from refvg.models.transvg_config import TransVGConfig


@register_config("epmvg")
class EpmVGConfig(TransVGConfig):
    """EpmVG's cross-modal distillation from the CLIP teacher (section `teacher`), on top of
    TransVG's grounding loss. Every weight 0: no distillation (the same student, trained without the
    teacher)."""

    # Feature consistency: 1 - cosine between the student's projected visual tokens (resampled to
    # the teacher's patch grid) and the teacher's patch features, over real (non-padding) cells ...
    image_weight: float = Field(0.1, ge=0)
    # ... and between the student's projected sentence feature and the teacher's.
    text_weight: float = Field(0.1, ge=0)
    # Similarity structure: KL between the teacher's and the student's row-softmaxed in-batch
    # image-text similarity matrices (both directions).
    similarity_weight: float = Field(0.1, ge=0)
    temperature: float = Field(0.1, gt=0)  # of those softmaxes (cosine similarities / temperature)

    @property
    def distills(self) -> bool:
        return max(self.image_weight, self.text_weight, self.similarity_weight) > 0
