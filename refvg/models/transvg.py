"""TransVG (Deng et al., ICCV 2021): backbones -> one visual-linguistic transformer -> [REG] -> box.

No proposals and no hand-made fusion: the [REG] token attends jointly to text and visual tokens and
regresses the box directly.
"""
from __future__ import annotations

import torch
from torch import nn

from refvg.config import Config
from refvg.losses import grounding_box_loss
from refvg.models.backbones import build_text_encoder, build_visual_backbone
from refvg.models.registry import register_model
from refvg.models.vl import AttentionBoxHead, VLTransformer, attention_in_box_loss, build_box_head, downsample_mask


class TransVG(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int, pad_token_id: int):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        max_len = max(64, cfg.data.max_tokens)
        self.visual = build_visual_backbone(m.visual, image_size=cfg.data.image_size)
        self.text = build_text_encoder(m.text, vocab_size, pad_token_id, max_positions=max_len)
        visual_dim = self.build_neck()
        self.vl = VLTransformer(visual_dim, self.text.hidden_size, m.fusion, max_len)
        self.head = build_box_head(m.fusion)

    def build_neck(self) -> int:
        """Modules between the backbones and the fusion transformer (none in TransVG, whose transformer reads
        the backbone's last out stage); returns the channels of the map the transformer consumes."""
        return self.visual.out_channels[-1]

    def visual_features(self, batch: dict, text: torch.Tensor) -> torch.Tensor:
        """The one visual map [B,C,h,w] fused with the text. TransVG's backbone never sees the expression."""
        return self.visual(batch["image"])[-1]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        text = self.text(batch["input_ids"], batch["attention_mask"])
        visual = self.visual_features(batch, text)
        reg, tokens = self.vl(visual, batch["pixel_mask"], text, batch["attention_mask"])
        grid = visual.shape[-2:]
        visual_pad = downsample_mask(batch["pixel_mask"], grid).flatten(1)
        out = {"pred_boxes": self.head(reg, tokens[:, -grid[0] * grid[1]:], visual_pad, grid)}
        if isinstance(self.head, AttentionBoxHead):
            out["readout_attention"], out["grid"] = self.head.last_attention, tuple(grid)
        return out | self.extra_outputs(batch, visual, text)

    def extra_outputs(self, batch: dict, visual: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a subclass adds to the outputs from the backbones' features (EpmVG: their projections into
        the teacher's space); visual [B,C,h,w] is the map fused with the text, text [B,L,Ct] the token features."""
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
