"""QRNet (Ye et al., CVPR 2022, "Shifting More Attention to Visual Backbone: Query-modulated Refinement
Networks for End-to-End Visual Grounding"): TransVG whose visual backbone is steered by the expression.

- Query-aware dynamic attention (QD-ATT) after every backbone stage: a linear layer whose weights are
  generated from the sentence feature maps each pixel to a key; keys give a spatial attention (key . query)
  and a channel attention (pooled keys gated by the query). The refined map goes into the next stage, so
  later stages already see query-relevant features.
- Query-aware multiscale fusion: the out stages' maps (e.g. strides 8, 16, 32) are projected to one width,
  resized to one grid (`fusion_stage`'s) and summed with per-level weights predicted from the query.
The fusion transformer, [REG] token, box head and L1 + GIoU loss are TransVG's (inherited, not copied).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refvg.config import Config
from refvg.models.registry import register_model
from refvg.models.transvg import TransVG
from refvg.models.vl import downsample_mask


def masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over the kept positions: [B,N,D], [B,N] (nonzero/True = keep) -> [B,D]. For the sentence feature
    (the real tokens) and for pooling keys over real pixels (not letterbox padding)."""
    m = keep.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


class DynamicLinear(nn.Module):
    """x [B,N,C_in] -> [B,N,C_out] through W(q) = U diag(g(q)) V: a per-sample weight generated from the
    query, factorised so generating it costs `rank` numbers instead of C_in * C_out."""

    def __init__(self, in_dim: int, out_dim: int, query_dim: int, rank: int):
        super().__init__()
        self.u = nn.Linear(in_dim, rank, bias=False)
        self.g = nn.Linear(query_dim, rank)
        self.v = nn.Linear(rank, out_dim)

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return self.v(self.u(x) * self.g(query).unsqueeze(1))


class QueryDynamicAttention(nn.Module):
    """QD-ATT on one stage: map [B,C,h,w] -> map of the same shape, re-weighted per channel and per pixel
    by how well they match the expression.

    Output = map + map * channel_att * spatial_att: the residual keeps a pretrained backbone's features
    intact where the query gives no evidence, so the attention refines rather than replaces them."""

    def __init__(self, channels: int, query_dim: int, key_dim: int, rank: int):
        super().__init__()
        self.key = DynamicLinear(channels, key_dim, query_dim, rank)
        self.spatial_query = nn.Linear(query_dim, key_dim)
        self.channel_query = nn.Linear(query_dim, key_dim)
        self.channel = nn.Linear(key_dim, channels)
        self.scale = key_dim ** -0.5

    def attention(self, fmap: torch.Tensor, query: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(channel [B,C], spatial [B,h*w]) attention in (0, 1); `valid` bool [B,h*w] excludes padding from pooling."""
        key = F.gelu(self.key(fmap.flatten(2).transpose(1, 2), query))  # [B,N,K]
        spatial = torch.sigmoid((key @ self.spatial_query(query).unsqueeze(-1)).squeeze(-1) * self.scale)
        channel = torch.sigmoid(self.channel(masked_mean(key, valid) * self.channel_query(query)))
        return channel, spatial

    def forward(self, fmap: torch.Tensor, query: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        channel, spatial = self.attention(fmap, query, valid)
        b, c, h, w = fmap.shape
        gate = channel.view(b, c, 1, 1) * spatial.view(b, 1, h, w)
        return fmap + fmap * gate.to(fmap.dtype)


class QueryMultiscaleFusion(nn.Module):
    """Maps [B,C_l,h_l,w_l] (finest first) -> one [B,D,h_t,w_t] on level `target`'s grid: per-level 1x1
    projection, resize, weighted sum with softmax weights predicted from the query."""

    def __init__(self, channels: list[int], query_dim: int, out_dim: int, target: int = 0):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, out_dim, 1) for c in channels)
        self.level_logits = nn.Linear(query_dim, len(channels))
        self.target = target

    def forward(self, maps: list[torch.Tensor], query: torch.Tensor) -> torch.Tensor:
        size = maps[self.target].shape[-2:]
        weights = self.level_logits(query).softmax(-1)
        fused = 0
        for i, (proj, fmap) in enumerate(zip(self.proj, maps)):
            level = proj(fmap)
            if level.shape[-2] > size[0]:  # finer level onto a coarser grid: average, not sample (aliasing)
                level = F.adaptive_avg_pool2d(level, size)
            elif level.shape[-2:] != size:
                level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            fused = fused + weights[:, i, None, None, None].to(level.dtype) * level
        return fused


class QRNet(TransVG):
    def build_neck(self) -> int:
        q, d = self.cfg.model.qrnet, self.cfg.model.fusion.d_model
        if list(self.visual.out_stages) != sorted(self.visual.out_stages):
            raise ValueError(f"qrnet fuses model.visual.out_stages finest first; got {self.visual.out_stages}")
        text_dim = self.text.hidden_size
        self.query_norm = nn.LayerNorm(text_dim)
        # Not under `visual.`: QD-ATT is new even on a pretrained backbone, so it trains at the head's lr.
        self.qd_att = nn.ModuleList(
            QueryDynamicAttention(c, text_dim, q.qd_att_key_dim, q.qd_att_rank) for c in self.visual.stage_channels
        ) if q.qd_att else None
        stages = list(self.visual.out_stages)
        if q.fusion_stage is not None and q.fusion_stage not in stages:
            raise ValueError(f"model.qrnet.fusion_stage {q.fusion_stage} is not one of model.visual.out_stages {stages}")
        target = 0 if q.fusion_stage is None else stages.index(q.fusion_stage)
        self.multiscale = QueryMultiscaleFusion(self.visual.out_channels, text_dim, d, target)
        return d

    def visual_features(self, batch: dict, text: torch.Tensor) -> torch.Tensor:
        query = self.query_norm(masked_mean(text, batch["attention_mask"]))
        pixel_mask = batch["pixel_mask"]
        modulate = None
        if self.qd_att is not None:
            def modulate(stage: int, fmap: torch.Tensor) -> torch.Tensor:
                valid = ~downsample_mask(pixel_mask, fmap.shape[-2:]).flatten(1)
                return self.qd_att[stage](fmap, query, valid)
        return self.multiscale(self.visual(batch["image"], modulate=modulate), query)


@register_model("qrnet")
def build_qrnet(cfg: Config, vocab_size: int, pad_token_id: int) -> QRNet:
    return QRNet(cfg, vocab_size, pad_token_id)
