"""TransVG (Deng et al., ICCV 2021): backbones -> one visual-linguistic transformer -> [REG] -> box.

The paper's model, at the size `model.*` sets: a CNN whose last map goes through a visual transformer
(DETR encoder layers, `fusion.visual_encoder_layers`), a BERT text encoder, and a fusion transformer over
[REG] + text + visual tokens with learned positions on queries and keys; an MLP regresses the box from the
[REG] output; loss L1 + GIoU. No proposals and no hand-made fusion.

`transvg_attn` (params.yaml) is the same class configured as refvg's earlier variant: no visual encoder,
8-d cell coordinates on the visual tokens, positions added to the tokens, and the attention box head with
its attention-in-box loss (`fusion.box_head: attention`, `train.loss.attention_weight`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from refvg.config import Config
from refvg.losses import grounding_box_loss
from refvg.models.backbones import build_text_encoder, build_visual_backbone
from refvg.models.registry import register_model
from refvg.models.vl import (
    AttentionBoxHead,
    VisualEncoder,
    VLTransformer,
    attention_in_box_loss,
    build_box_head,
    downsample_mask,
)


class TransVG(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int, pad_token_id: int):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        max_len = max(64, cfg.data.max_tokens)
        self.visual = build_visual_backbone(m.visual, image_size=cfg.data.image_size)
        self.text = build_text_encoder(m.text, vocab_size, pad_token_id, max_positions=max_len)
        visual_dim = self.build_neck()
        grids = self.visual_grids()
        if m.fusion.box_head == "attention" and len(grids) != 1:
            raise ValueError(f"fusion.box_head 'attention' reads one grid; this model's tokens lie on {grids}")
        self.vl = VLTransformer(
            visual_dim, self.text.hidden_size, m.fusion, max_len, position=m.fusion.position,
            cell_coords=m.fusion.cell_coords, num_visual_tokens=sum(h * w for h, w in grids),
            num_scales=len(grids),
        )
        self.head = build_box_head(m.fusion)

    def build_neck(self) -> int:
        """Modules between the backbones and the fusion transformer (TransVG: the visual transformer
        on the last out stage's map, unless `fusion.visual_encoder_layers` is 0); returns the
        channels of the map the fusion transformer consumes."""
        channels = self.visual.out_channels[-1]
        f = self.cfg.model.fusion
        self.visual_encoder = VisualEncoder(channels, f) if f.visual_encoder_layers > 0 else None
        return channels if self.visual_encoder is None else f.d_model

    def visual_grids(self) -> list[tuple[int, int]]:
        """(h, w) of each map `visual_features` returns, from the letterbox size and the strides."""
        side = math.ceil(self.cfg.data.image_size / self.visual.strides[-1])
        return [(side, side)]

    def visual_features(self, batch: dict, text: torch.Tensor) -> torch.Tensor:
        """The one visual map [B,C,h,w] fused with the text. TransVG's backbone never sees the expression."""
        fmap = self.visual(batch["image"])[-1]
        if self.visual_encoder is not None:
            fmap = self.visual_encoder(fmap, batch["pixel_mask"])
        return fmap

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        text = self.text(batch["input_ids"], batch["attention_mask"])
        visual = self.visual_features(batch, text)
        reg, tokens = self.vl(visual, batch["pixel_mask"], text, batch["attention_mask"])
        if isinstance(self.head, AttentionBoxHead):
            grid = visual.shape[-2:]
            visual_pad = downsample_mask(batch["pixel_mask"], grid).flatten(1)
            out = {"pred_boxes": self.head(reg, tokens[:, -grid[0] * grid[1]:], visual_pad, grid)}
            out["readout_attention"], out["grid"] = self.head.last_attention, tuple(grid)
        else:
            out = {"pred_boxes": self.head(reg)}
        return out | self.extra_outputs(batch, visual, text)

    def extra_outputs(self, batch: dict, visual, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a subclass adds to the outputs from the backbones' features (EpmVG: their projections into
        the teacher's space); visual is what `visual_features` returned (TransVG: the map [B,C,h,w] fused
        with the text), text [B,L,Ct] the token features."""
        return {}

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        w = self.cfg.train.loss
        losses = grounding_box_loss(outputs["pred_boxes"], batch["box"], w.l1_weight, w.giou_weight)
        if "readout_attention" in outputs and w.attention_weight > 0:
            losses["attention"] = attention_in_box_loss(outputs["readout_attention"], outputs["grid"], batch["box"])
            losses["loss"] = losses["loss"] + w.attention_weight * losses["attention"]
        return losses

    def param_groups(self, lr: float, lr_backbone: float, weight_decay: float) -> list[dict]:
        return backbone_param_groups(self, ("visual.", "text."), lr, lr_backbone, weight_decay)


def backbone_param_groups(
    model: nn.Module, backbone_prefixes: tuple[str, ...], lr: float, lr_backbone: float, weight_decay: float
) -> list[dict]:
    """Optimizer groups: backbone parameters (names starting with a prefix) at lr_backbone, the rest at
    lr; biases and norm weights (every <=1-D parameter) without weight decay. Frozen ones are left out."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (name.startswith(backbone_prefixes), p.ndim > 1)
            groups.setdefault(key, []).append(p)
    out = []
    for (is_backbone, decay), params in sorted(groups.items()):
        out.append({
            "name": f"{'backbone' if is_backbone else 'head'}_{'decay' if decay else 'no_decay'}",
            "params": params,
            "lr": lr_backbone if is_backbone else lr,
            "weight_decay": weight_decay if decay else 0.0,
        })
    return out


@register_model("transvg")
def build_transvg(cfg: Config, vocab_size: int, pad_token_id: int) -> TransVG:
    return TransVG(cfg, vocab_size, pad_token_id)
