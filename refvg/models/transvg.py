"""TransVG (Deng et al., ICCV 2021): backbones -> one visual-linguistic transformer -> [REG] -> box.

The paper's model, at the size `model.*` sets: a CNN whose last map goes through a visual
transformer (DETR encoder layers, `fusion.visual_encoder_layers`), a BERT text encoder, and a fusion
transformer over [REG] + text + visual tokens with learned positions on queries and keys; an MLP
regresses the box from the [REG] output; loss L1 + GIoU. No proposals and no hand-made fusion.

`transvg_attn` (params.yaml) is the same class configured as refvg's earlier variant: no visual
encoder, 8-d cell coordinates on the visual tokens, positions added to the tokens, and the attention
box head with its attention-in-box loss (`fusion.box_head: attention`, the method's `config:
{attention_weight}`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from refvg.config import FusionConfig
from refvg.losses import grounding_box_loss
from refvg.models.base import GroundingModel, GroundingOutput
from refvg.models.registry import register_model
from refvg.models.transvg_config import TransVGConfig
from refvg.models.vl import (
    AttentionBoxHead,
    VisualEncoder,
    VLTransformer,
    attention_in_box_loss,
    build_box_head,
    downsample_mask,
)


@dataclass
class TransVGOutput(GroundingOutput):
    # attention box head only: [REG]'s read-out attention over the visual tokens [B,h*w] and their
    # grid
    readout_attention: Optional[torch.Tensor] = None
    grid: Optional[tuple[int, int]] = None


@register_model("transvg", config=TransVGConfig)
class TransVG(GroundingModel):
    output_type: ClassVar[type] = TransVGOutput

    def __init__(self, config: TransVGConfig, *, fusion: FusionConfig, **backbones):
        super().__init__(config, **backbones)
        self.fusion_config = fusion
        visual_dim = self.build_neck()
        grids = self.visual_grids()
        if fusion.box_head == "attention" and len(grids) != 1:
            raise ValueError(
                f"fusion.box_head 'attention' reads one grid; this model's tokens lie on {grids}"
            )
        self.vl = VLTransformer(
            visual_dim,
            self.text.hidden_size,
            fusion,
            self.text_positions,
            position=fusion.position,
            cell_coords=fusion.cell_coords,
            num_visual_tokens=sum(h * w for h, w in grids),
            num_scales=len(grids),
        )
        self.head = build_box_head(fusion)

    @classmethod
    def config_kwargs(cls, cfg) -> dict:
        return {**super().config_kwargs(cfg), "fusion": cfg.model.fusion}

    def build_neck(self) -> int:
        """Modules between the backbones and the fusion transformer (TransVG: the visual transformer
        on the last out stage's map, unless `fusion.visual_encoder_layers` is 0); returns the
        channels of the map the fusion transformer consumes."""
        channels = self.visual.out_channels[-1]
        f = self.fusion_config
        self.visual_encoder = VisualEncoder(channels, f) if f.visual_encoder_layers > 0 else None
        return channels if self.visual_encoder is None else f.d_model

    def visual_grids(self) -> list[tuple[int, int]]:
        """(h, w) of each map `visual_features` returns, from the letterbox size and the strides."""
        side = math.ceil(self.image_size / self.visual.strides[-1])
        return [(side, side)]

    def visual_features(self, batch: dict, text: torch.Tensor) -> torch.Tensor:
        """The one visual map [B,C,h,w] fused with the text. TransVG's backbone never sees the
        expression."""
        fmap = self.visual(batch["image"])[-1]
        if self.visual_encoder is not None:
            fmap = self.visual_encoder(fmap, batch["pixel_mask"])
        return fmap

    def forward(self, batch: dict) -> TransVGOutput:
        text = self.text(batch["input_ids"], batch["attention_mask"])
        visual = self.visual_features(batch, text)
        reg, tokens = self.vl(visual, batch["pixel_mask"], text, batch["attention_mask"])
        extras = self.extra_outputs(batch, visual, text)
        if isinstance(self.head, AttentionBoxHead):
            grid = visual.shape[-2:]
            visual_pad = downsample_mask(batch["pixel_mask"], grid).flatten(1)
            boxes = self.head(reg, tokens[:, -grid[0] * grid[1] :], visual_pad, grid)
            return self.output_type(
                pred_boxes=boxes,
                readout_attention=self.head.last_attention,
                grid=tuple(grid),
                **extras,
            )
        return self.output_type(pred_boxes=self.head(reg), **extras)

    def extra_outputs(self, batch: dict, visual, text: torch.Tensor) -> dict:
        """The fields a subclass's `output_type` adds, from the backbones' features (EpmVG: their
        projections into the teacher's space); visual is what `visual_features` returned (TransVG:
        the map [B,C,h,w] fused with the text), text [B,L,Ct] the token features."""
        return {}

    def compute_loss(self, outputs: TransVGOutput, batch: dict) -> dict[str, torch.Tensor]:
        w = self.config
        losses = grounding_box_loss(outputs.pred_boxes, batch["box"], w.l1_weight, w.giou_weight)
        if outputs.readout_attention is not None and w.attention_weight > 0:
            losses["attention"] = attention_in_box_loss(
                outputs.readout_attention, outputs.grid, batch["box"]
            )
            losses["loss"] = losses["loss"] + w.attention_weight * losses["attention"]
        return losses
