"""QRNet (Ye et al., CVPR 2022, "Shifting More Attention to Visual Backbone: Query-modulated
Refinement Networks for End-to-End Visual Grounding"): TransVG whose visual backbone is steered by
the expression.

- Query-aware dynamic attention (QD-ATT) after every backbone stage: two multiplicative gates in
  sequence, a channel gate sigmoid(MLP(avg-pool) + MLP(max-pool)) and a spatial gate
  sigmoid(linear C -> 1), where every linear layer's weights are generated from the sentence feature
  (the text encoder's [CLS] output). Gates lie in (0, 1): the expression can suppress features as
  well as keep them. The gated map goes into the next stage, so later stages already compute on
  query-relevant features.
- Query-aware multiscale fusion: the out stages' maps, projected to one width, pass a top-down FPN
  path (coarser maps upsampled and added) and a bottom-up path where each level, gated by QD-ATT and
  2x2-averaged, is added to the next coarser one. The last level and one more (its stride-2
  subsampling) enter the fusion transformer: tokens of two scales, each with a learned scale
  embedding.
Unlike TransVG, no visual transformer runs on the backbone's maps (QRNet has none). The fusion
transformer, [REG] token, MLP head and L1 + GIoU loss are TransVG's (inherited, not copied).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from refvg.models.registry import register_model
from refvg.models.qrnet_config import QRNetConfig
from refvg.models.transvg import TransVG
from refvg.models.vl import downsample_mask


class DynamicLinear(nn.Module):
    """x [B,...,C_in] -> [B,...,C_out] through a weight and bias generated from the query: [W; b](q)
    = U(q) V, U(q) [C_in+1, rank] a linear function of q, V [rank, C_out] learned. V starts at zero
    (as in QRNet), so the layer starts at 0 and every gate built on it at sigmoid(0) = 0.5."""

    def __init__(self, in_dim: int, out_dim: int, query_dim: int, rank: int):
        super().__init__()
        self.in_dim, self.rank = in_dim, rank
        self.decoder = nn.Linear(query_dim, (in_dim + 1) * rank)
        self.v = nn.Parameter(torch.zeros(rank, out_dim))

    def weight_and_bias(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The generated layer: weight [B,C_in,C_out] and bias [B,C_out]."""
        b = query.shape[0]
        param = self.decoder(query).view(b, self.in_dim + 1, self.rank) @ self.v.to(query.dtype)
        return param[:, :-1], param[:, -1]

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight_and_bias(query)
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        bias = bias.view(x.shape[0], *([1] * (x.dim() - 2)), -1)
        return torch.einsum("b...i,bio->b...o", x, weight) + bias


class _MaskedPools(torch.autograd.Function):
    """fmap [B,C,h,w], valid bool [B,h*w] -> (average, max) over the valid pixels, each [B,C]. The
    max is amax's (a padding-only sample gets the float minimum) and so is its gradient: shared
    evenly among tied maxima, none to padding. One autograd node, whose backward writes the
    map-sized gradient once, in place; autograd's version of the same (a masked copy, an
    outer-product bmm, a compare, an and, a where, and the sum of their map-sized gradients) cost
    ~3x as much. Padding is masked by adding -inf per pixel, a broadcast add: masked_fill or where
    with a per-pixel mask ran ~10x slower on CPU."""

    @staticmethod
    def forward(ctx, fmap: torch.Tensor, valid: torch.Tensor):
        x = fmap.flatten(2).transpose(1, 2)  # [B,N,C], a view in either memory format
        keep = valid.to(x.dtype)
        count = keep.sum(1, keepdim=True).clamp_min(1)
        avg = torch.bmm(keep.unsqueeze(1), x).squeeze(1) / count
        # clamped: a padding-only sample's max is not -inf, so no padding pixel equals it backward
        peak = _masked(x, keep).amax(1).clamp_min(torch.finfo(x.dtype).min)
        ctx.save_for_backward(fmap, keep, count, peak)
        return avg, peak

    @staticmethod
    def backward(ctx, grad_avg: torch.Tensor, grad_peak: torch.Tensor):
        fmap, keep, count, peak = ctx.saved_tensors
        x = fmap.flatten(2).transpose(1, 2)
        at_max = (_masked(x, keep) == peak.unsqueeze(1)).to(x.dtype)  # no padding: it is -inf
        share = grad_peak.to(x.dtype) / at_max.sum(1).clamp_min(1)
        grad = at_max.mul_(share.unsqueeze(1))
        grad.addcmul_(keep.unsqueeze(-1), (grad_avg / count).to(x.dtype).unsqueeze(1))
        return grad.transpose(1, 2).unflatten(2, fmap.shape[2:]), None


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x [B,N,C] with -inf on the padding pixels (keep 0)."""
    return x + torch.zeros_like(keep).masked_fill_(keep == 0, float("-inf")).unsqueeze(-1)


class _GateMap(torch.autograd.Function):
    """fmap [B,C,h,w], channel [B,C], weight [B,C], bias [B] -> (fmap * channel * spatial, spatial)
    with spatial = sigmoid(x @ weight + bias) [B,h*w], x the map's pixels x channels: QD-ATT's
    spatial gate and output in one autograd node. Its backward makes one map-sized product (grad *
    fmap: the gates' gradients are reductions of it) and the map's gradient in three in-place
    passes; autograd's chain of mul and bmm nodes made ~8 map-sized tensors, two of them by K=1
    outer-product bmms. All inputs in fmap's dtype."""

    @staticmethod
    def forward(ctx, fmap, channel, weight, bias):
        b, c, h, w = fmap.shape
        x = fmap.flatten(2).transpose(1, 2)  # [B,N,C]: the tokens of a channels-last map
        logits = torch.bmm(x, weight.unsqueeze(-1)).squeeze(-1).to(fmap.dtype)
        spatial = torch.sigmoid(logits + bias.unsqueeze(1))
        out = fmap * channel.view(b, c, 1, 1)
        out.mul_(spatial.view(b, 1, h, w))
        ctx.save_for_backward(fmap, channel, weight, spatial)
        ctx.set_materialize_grads(False)  # spatial is read by callers of `gates` only
        return out, spatial

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, grad_spatial_out: torch.Tensor | None):
        fmap, channel, weight, spatial = ctx.saved_tensors
        b, c, h, w = fmap.shape
        # Reductions over pixels as a row vector times the [N,C] tokens, over channels as the tokens
        # times a column: both read a channels-last map in its memory order.
        prod = (grad_out * fmap).flatten(2).transpose(1, 2)  # [B,N,C]
        grad_channel = torch.bmm(spatial.unsqueeze(1), prod).squeeze(1)
        grad_spatial = torch.bmm(prod, channel.unsqueeze(-1)).squeeze(-1)
        if grad_spatial_out is not None:
            grad_spatial = grad_spatial + grad_spatial_out
        grad_logits = grad_spatial * spatial * (1 - spatial)
        x = fmap.flatten(2).transpose(1, 2)
        grad_weight = torch.bmm(grad_logits.unsqueeze(1), x).squeeze(1)
        grad_fmap = grad_out * channel.view(b, c, 1, 1)
        grad_fmap.mul_(spatial.view(b, 1, h, w))
        grad_fmap.addcmul_(weight.view(b, c, 1, 1), grad_logits.view(b, 1, h, w))
        return grad_fmap, grad_channel, grad_weight, grad_logits.sum(1)


class QueryDynamicAttention(nn.Module):
    """QD-ATT on one map [B,C,h,w] -> the same shape: x * channel gate, then * spatial gate
    (computed on the channel-gated map). Pooling for the channel gate covers real pixels only (not
    letterbox padding)."""

    def __init__(self, channels: int, query_dim: int, rank: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.channel_in = DynamicLinear(channels, hidden, query_dim, rank)
        self.channel_out = DynamicLinear(hidden, channels, query_dim, rank)
        self.spatial = DynamicLinear(channels, 1, query_dim, rank)

    def channel_gate(self, avg: torch.Tensor, peak: torch.Tensor, query: torch.Tensor):
        """sigmoid(MLP(avg) + MLP(max)) [B,C]: both poolings through the shared MLP in one pass (its
        weights are generated once)."""
        hidden = F.relu(self.channel_in(torch.stack([avg, peak], 1), query))
        return torch.sigmoid(self.channel_out(hidden, query).sum(1))

    def spatial_weight(self, channel: torch.Tensor, query: torch.Tensor):
        """The spatial layer on the channel-gated map, (x * channel) @ W = x @ (channel * W): the
        gate folds into the generated weight instead of a gated copy of the map. -> ([B,C], [B])"""
        weight, bias = self.spatial.weight_and_bias(query)
        return (channel.unsqueeze(-1) * weight).squeeze(-1), bias.squeeze(-1)

    def gates(
        self, fmap: torch.Tensor, query: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(channel [B,C], spatial [B,h*w]) gates in (0, 1); `valid` bool [B,h*w] (False on
        padding)."""
        channel, spatial = self._gate(fmap, query, valid)[1:]
        return channel, spatial

    def _gate(self, fmap, query, valid):
        """(output map, channel gate, spatial gate)."""
        avg, peak = _MaskedPools.apply(fmap, valid)
        channel = self.channel_gate(avg, peak, query)
        weight, bias = self.spatial_weight(channel, query)
        dtype = fmap.dtype
        out, spatial = _GateMap.apply(fmap, channel.to(dtype), weight.to(dtype), bias.to(dtype))
        return out, channel, spatial

    def forward(self, fmap: torch.Tensor, query: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self._gate(fmap, query, valid)[0]


def avg_down(fmap: torch.Tensor) -> torch.Tensor:
    """2x2 average (odd sides zero-padded first, as QRNet's merge), halving the grid like a backbone
    stage."""
    h, w = fmap.shape[-2:]
    if h % 2 or w % 2:  # F.pad copies the map even when it adds nothing
        fmap = F.pad(fmap, (0, w % 2, 0, h % 2))
    pixels = fmap.permute(0, 2, 3, 1)  # [B,H,W,C]
    if not pixels.is_contiguous():
        return F.avg_pool2d(fmap, 2)
    # A channels-last map (QRNet's, from the Swin tokens): sums of row pairs, then of pixel pairs,
    # each over contiguous memory; avg_pool2d's channels-last backward makes two copies of the map.
    b, hp, wp, c = pixels.shape
    rows = pixels.reshape(b, hp // 2, 2, wp * c).sum(2)
    quads = rows.view(b, hp // 2, wp // 2, 2, c).sum(3)
    return (quads * 0.25).permute(0, 3, 1, 2)


class QueryFPN(nn.Module):
    """QRNet's fusion: maps [B,C_l,h_l,w_l] (finest first, each half the previous one's side) -> the
    two coarsest outputs [B,D,h,w] and [B,D,ceil(h/2),ceil(w/2)].

    1x1 lateral projections; top-down: each coarser level upsampled (nearest) and added to the finer
    one; bottom-up: each level, QD-ATT-gated and 2x2-averaged, added to the next coarser one; then
    one extra level (the last one at stride 2, as FPN's extra max-pool level). `qd_att` None:
    ungated merges."""

    def __init__(self, channels: list[int], out_dim: int, qd_att: nn.ModuleList | None):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_dim, 1) for c in channels)
        self.qd_att = qd_att  # one per bottom-up merge

    def forward(
        self, maps: list[torch.Tensor], query: torch.Tensor, pixel_mask: torch.Tensor
    ) -> list[torch.Tensor]:
        levels = [proj(m) for proj, m in zip(self.lateral, maps)]
        for i in range(len(levels) - 1, 0, -1):
            up = F.interpolate(levels[i], size=levels[i - 1].shape[-2:], mode="nearest")
            levels[i - 1] = levels[i - 1] + up
        for i in range(len(levels) - 1):
            x = levels[i]
            if self.qd_att is not None:
                x = self.qd_att[i](x, query, ~downsample_mask(pixel_mask, x.shape[-2:]).flatten(1))
            levels[i + 1] = levels[i + 1] + avg_down(x)
        return [levels[-1], levels[-1][..., ::2, ::2]]


@register_model("qrnet", config=QRNetConfig)
class QRNet(TransVG):
    def build_neck(self) -> int:
        q, d = self.config, self.fusion_config.d_model
        stages = list(self.visual.out_stages)
        if stages != sorted(stages):
            raise ValueError(f"qrnet fuses model.visual.out_stages finest first; got {stages}")
        text_dim = self.text.hidden_size

        def qd_atts(channels: list[int]) -> nn.ModuleList | None:
            if not q.qd_att:
                return None
            rank, reduction = q.qd_att_rank, q.qd_att_reduction
            return nn.ModuleList(
                QueryDynamicAttention(c, text_dim, rank, reduction) for c in channels
            )

        # Not under `visual.`: QD-ATT is new even on a pretrained backbone, so it trains at the
        # head's lr.
        self.qd_att = qd_atts(self.visual.stage_channels)
        if stages != list(range(stages[0], stages[-1] + 1)):
            raise ValueError(
                f"qrnet's fusion merges consecutive stages; model.visual.out_stages {stages}"
            )
        self.multiscale = QueryFPN(self.visual.out_channels, d, qd_atts([d] * (len(stages) - 1)))
        return d

    def visual_grids(self) -> list[tuple[int, int]]:
        side = math.ceil(self.image_size / self.visual.strides[-1])
        return [(side, side), (math.ceil(side / 2),) * 2]

    @staticmethod
    def query(text: torch.Tensor) -> torch.Tensor:
        """The sentence feature QD-ATT and the fusion read: the text encoder's [CLS] output, as in
        QRNet."""
        return text[:, 0]

    def visual_features(self, batch: dict, text: torch.Tensor) -> list[torch.Tensor]:
        """The two token maps (finer, coarser) the fusion transformer reads."""
        query = self.query(text)
        pixel_mask = batch["pixel_mask"]
        modulate = None
        if self.qd_att is not None:

            def modulate(stage: int, fmap: torch.Tensor) -> torch.Tensor:
                valid = ~downsample_mask(pixel_mask, fmap.shape[-2:]).flatten(1)
                return self.qd_att[stage](fmap, query, valid)

        return self.multiscale(self.visual(batch["image"], modulate=modulate), query, pixel_mask)
