"""TransVG's family config: what a method entry's `config:` holds for model `transvg`,
validated when params.yaml loads. Apart from the model (transvg.py) and free of torch, so
reading params imports no model."""

from __future__ import annotations

from pydantic import Field

from refvg.config import _Strict
from refvg.models.registry import register_config


@register_config("transvg")
class TransVGConfig(_Strict):
    """The TransVG family's loss (TransVG, QRNet, EpmVG); its transformers are the shared
    `model.fusion`."""

    l1_weight: float = 1.0  # L1 + GIoU, unweighted as in TransVG and QRNet (DETR: 5 and 2)
    giou_weight: float = 1.0
    # Weight of -log(read-out attention mass inside the target box); only with fusion.box_head
    # "attention".
    attention_weight: float = Field(1.0, ge=0)
