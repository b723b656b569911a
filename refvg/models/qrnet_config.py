"""QRNet's family config: what a method entry's `config:` holds for model `qrnet`,
validated when params.yaml loads. Apart from the model (qrnet.py) and free of torch, so
reading params imports no model."""

from __future__ import annotations

from pydantic import Field

from refvg.models.registry import register_config
from refvg.models.transvg_config import TransVGConfig


@register_config("qrnet")
class QRNetConfig(TransVGConfig):
    """QRNet's query-modulated backbone and fusion (and TransVG's loss). Its fusion (top-down FPN +
    QD-ATT-gated bottom-up path) reads every `model.visual.out_stages` map; the last level and one
    more (stride x2) enter the fusion transformer as tokens of two scales."""

    # Query-aware dynamic attention (channel gate then spatial gate, weights generated from the
    # sentence) after every backbone stage and on every bottom-up merge of the fusion; false: the
    # ablation, no QD-ATT anywhere (the visual path never sees the expression), as the paper's
    # use_channel/use_spatial off.
    qd_att: bool = True
    qd_att_rank: int = Field(
        16, gt=0
    )  # k of the dynamic linear layers' generated weights (the paper's 30)
    qd_att_reduction: int = Field(16, gt=0)  # channel gate MLP: C -> C // this (at least 1) -> C
