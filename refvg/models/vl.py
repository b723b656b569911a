"""Visual-linguistic fusion shared by the transformer grounding models (TransVG, QRNet), and
TransVG's visual transformer (a DETR encoder on the CNN's map).

Token layout fed to the encoder: [REG] + text tokens + visual tokens. The [REG] output is what the
box head reads, so it must never be masked; that also guarantees no attention row is fully masked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from refvg.config import FusionConfig


def downsample_mask(pixel_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """bool [B,S,S] (True = padding) -> bool [B,h,w] at a feature map's resolution."""
    return F.interpolate(pixel_mask[:, None].float(), size=size, mode="nearest")[:, 0].bool()


def sine_position_2d(mask: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR-style 2-D sine encoding, normalised over the unpadded content: bool [B,h,w] ->
    [B,h,w,dim].

    Coordinates count only real pixels, so a letterboxed image's content gets the same encoding
    whatever the amount of padding next to it."""
    if dim % 4:
        raise ValueError(f"d_model must be divisible by 4 for the 2-D sine encoding, got {dim}")
    valid = (~mask).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps = 1e-6
    y = y / (y[:, -1:, :] + eps) * 2 * math.pi
    x = x / (x[:, :, -1:] + eps) * 2 * math.pi
    half = dim // 2
    freq = temperature ** (2 * (torch.arange(half // 2, device=mask.device).float()) / half)
    px = x[..., None] / freq
    py = y[..., None] / freq
    px = torch.cat([px.sin(), px.cos()], dim=-1)
    py = torch.cat([py.sin(), py.cos()], dim=-1)
    return torch.cat([py, px], dim=-1)


def cell_coords(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """[1, h*w, 8] FAOA-style spatial features of each feature-map cell, in the letterboxed square's
    frame (the frame boxes are predicted in): x0, y0, x1, y1, cx, cy, 1/w, 1/h."""
    ys = torch.arange(h, device=like.device, dtype=like.dtype)
    xs = torch.arange(w, device=like.device, dtype=like.dtype)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    x0, y0 = x / w, y / h
    x1, y1 = (x + 1) / w, (y + 1) / h
    feats = [
        x0,
        y0,
        x1,
        y1,
        (x0 + x1) / 2,
        (y0 + y1) / 2,
        torch.full_like(x, 1 / w),
        torch.full_like(y, 1 / h),
    ]
    return torch.stack(feats, -1).view(1, h * w, 8)


class TransformerLayer(nn.Module):
    """Encoder layer on `scaled_dot_product_attention`: pre-norm with GELU (default), or post-norm
    with ReLU (`post_norm`: DETR's and TransVG's layer).

    Positions are added to queries and keys only (DETR style), so values carry content alone; with a
    fused qkv weight that is W_qk @ pos added to q and k, computed without a second full
    projection."""

    def __init__(
        self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, post_norm: bool = False
    ):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim),
            nn.ReLU() if post_norm else nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, d_model),
        )
        self.drop = nn.Dropout(dropout)

    def attend(
        self, h: torch.Tensor, pos: torch.Tensor | None, keep: torch.Tensor | None
    ) -> torch.Tensor:
        b, n, d = h.shape
        qkv = self.qkv(h)
        q, k, v = qkv.split(d, dim=-1)
        if (
            pos is not None
        ):  # added to q and k apart: a cat of the sum with v costs a copy of all three
            q_pos, k_pos = F.linear(
                pos.to(qkv.dtype), self.qkv.weight[: 2 * d].to(qkv.dtype)
            ).split(d, dim=-1)
            q, k = q + q_pos, k + k_pos
        q, k, v = (
            t.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2) for t in (q, k, v)
        )
        attn_mask = keep[:, None, None, :] if keep is not None else None
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.drop(self.out(a.transpose(1, 2).reshape(b, n, d)))

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor | None, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """x [B,N,D]; pos [B or 1,N,D] or None; keep bool [B,N] (True = a real key) or None."""
        if self.post_norm:
            x = self.norm1(x + self.attend(x, pos, keep))
            return self.norm2(x + self.drop(self.ffn(x)))
        x = x + self.attend(self.norm1(x), pos, keep)
        return x + self.drop(self.ffn(self.norm2(x)))


def xavier_(module: nn.Module) -> None:
    """DETR's (and TransVG's) init of its transformers: Xavier-uniform on every matrix."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class VisualEncoder(nn.Module):
    """TransVG's visual transformer: the CNN map [B,C,h,w] -> 1x1 conv to d_model -> DETR encoder
    layers (post-norm, 2-D sine positions on queries and keys, letterbox padding masked) ->
    [B,d_model,h,w]."""

    def __init__(self, in_channels: int, cfg: FusionConfig):
        super().__init__()
        self.d_model = cfg.d_model
        self.input_proj = nn.Conv2d(in_channels, cfg.d_model, 1)
        self.layers = nn.ModuleList(
            TransformerLayer(cfg.d_model, cfg.num_heads, cfg.ffn_dim, cfg.dropout, post_norm=True)
            for _ in range(cfg.visual_encoder_layers)
        )
        xavier_(self.layers)

    def forward(self, fmap: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        b, _, h, w = fmap.shape
        pad = downsample_mask(pixel_mask, (h, w))
        x = self.input_proj(fmap).flatten(2).transpose(1, 2)
        pos = sine_position_2d(pad, self.d_model).flatten(1, 2)
        keep = ~pad.flatten(1)
        for layer in self.layers:
            x = layer(x, pos, keep)
        return x.transpose(1, 2).reshape(b, self.d_model, h, w)


class VLTransformer(nn.Module):
    """Fuses visual feature maps with text token features; returns ([REG] [B,D], tokens
    [B,1+L+N,D]).

    Token order in the output: [REG], the L text tokens, then each map's h*w visual tokens
    (row-major), maps in the order given. Several maps (QRNet's two scales) each get a learned scale
    embedding, added to their features before the projection, as in QRNet.

    `position` "query_key" (TransVG's): a learned embedding per token slot added to queries and keys
    of post-norm layers; it needs `num_visual_tokens`, the visual token count, fixed by the
    letterbox size. "tokens": positions added to the tokens once, pre-norm layers and a final norm.
    `cell_coords`: 8-d cell coordinates appended to each visual token's features."""

    def __init__(
        self,
        visual_dim: int,
        text_dim: int,
        cfg: FusionConfig,
        max_text_len: int = 64,
        *,
        position: str = "tokens",
        cell_coords: bool = True,
        num_visual_tokens: int | None = None,
        num_scales: int = 1,
    ):
        super().__init__()
        d = cfg.d_model
        self.d_model = d
        self.position = position
        self.cell_coords = cell_coords
        self.visual_proj = nn.Linear(visual_dim + (8 if cell_coords else 0), d)
        self.text_proj = nn.Linear(text_dim, d)
        self.text_pos = nn.Embedding(max_text_len, d)
        self.reg_token = nn.Parameter(torch.zeros(1, 1, d))
        self.scale_embed = (
            nn.Parameter(torch.zeros(num_scales, visual_dim)) if num_scales > 1 else None
        )
        post_norm = position == "query_key"
        self.layers = nn.ModuleList(
            TransformerLayer(d, cfg.num_heads, cfg.ffn_dim, cfg.dropout, post_norm=post_norm)
            for _ in range(cfg.num_layers)
        )
        nn.init.normal_(self.reg_token, std=0.02)
        if post_norm:
            if num_visual_tokens is None:
                raise ValueError("position 'query_key' needs num_visual_tokens")
            self.reg_pos = nn.Parameter(torch.zeros(1, 1, d))
            self.visual_pos = nn.Embedding(num_visual_tokens, d)
            self.norm = nn.Identity()  # post-norm layers end normalised
            xavier_(self.layers)
            # N(0, 1), TransVG's nn.Embedding default for its [REG] token and position table: at the
            # scale of the normalised tokens, so positions steer attention from the first step.
            for table in (self.reg_token, self.reg_pos, self.visual_pos.weight):
                nn.init.normal_(table)
        else:
            # The [REG] token has no position of its own; the type embeddings tell the three kinds
            # apart.
            self.type_embed = nn.Parameter(torch.zeros(3, d))
            self.norm = nn.LayerNorm(d)
            nn.init.normal_(self.type_embed, std=0.02)
        nn.init.normal_(self.text_pos.weight, std=1.0 if post_norm else 0.02)
        if self.scale_embed is not None:
            nn.init.normal_(self.scale_embed)  # N(0, 1): QRNet's nn.Embedding default

    def forward(
        self,
        visual: torch.Tensor | list[torch.Tensor],
        pixel_mask: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """visual [B,C,h,w] or a list of such maps; pixel_mask bool [B,S,S] (True = padding); text
        [B,L,Ct]; text_mask [B,L] (1 = real)."""
        maps = [visual] if isinstance(visual, torch.Tensor) else list(visual)
        b, L = text.shape[0], text.shape[1]
        if L > self.text_pos.num_embeddings:
            raise ValueError(f"{L} text tokens exceed max_text_len {self.text_pos.num_embeddings}")
        feats, pads, sines = [], [], []
        for i, fmap in enumerate(maps):
            fh, fw = fmap.shape[-2:]
            pad = downsample_mask(pixel_mask, (fh, fw))
            f = fmap.flatten(2).transpose(1, 2)
            if self.scale_embed is not None:
                f = f + self.scale_embed[i].to(f.dtype)
            if self.cell_coords:
                f = torch.cat([f, cell_coords(fh, fw, fmap).expand(b, -1, -1)], -1)
            feats.append(f)
            pads.append(pad.flatten(1))
            if self.position == "tokens":
                sines.append(sine_position_2d(pad, self.d_model).flatten(1, 2))
        v = self.visual_proj(torch.cat(feats, 1))
        vis_pad = torch.cat(pads, 1)
        n = v.shape[1]
        t = self.text_proj(text)
        dtype = v.dtype
        x = torch.cat([self.reg_token.to(dtype).expand(b, -1, -1), t, v], dim=1)
        keep = torch.cat(
            [torch.ones(b, 1, dtype=torch.bool, device=x.device), text_mask.bool(), ~vis_pad], dim=1
        )
        t_pos = self.text_pos.weight[:L].expand(b, -1, -1)
        if self.position == "query_key":
            if n != self.visual_pos.num_embeddings:
                raise ValueError(
                    f"{n} visual tokens, but the fusion transformer was built for "
                    f"{self.visual_pos.num_embeddings} (data.image_size changed?)"
                )
            pos = torch.cat(
                [self.reg_pos.expand(b, -1, -1), t_pos, self.visual_pos.weight.expand(b, -1, -1)], 1
            )
            for layer in self.layers:
                x = layer(x, pos, keep)
            return x[:, 0], x

        te = self.type_embed
        types = torch.cat([te[:1], te[1:2].expand(L, -1), te[2:].expand(n, -1)])
        zeros = v.new_zeros(b, 1, self.d_model, dtype=torch.float32)
        pos = (torch.cat([zeros, t_pos.float(), torch.cat(sines, 1)], dim=1) + types.float()).to(
            dtype
        )
        # Positions go into the tokens themselves (not only queries and keys, as in DETR), so
        # attention outputs carry where they read from: backbones trained from scratch have no other
        # location cue.
        x = x + pos
        for layer in self.layers:
            x = layer(x, None, keep)
        x = self.norm(x)
        return x[:, 0], x


class BoxHead(nn.Module):
    """[REG] output -> [B,4] cxcywh in [0,1] (3-layer MLP, sigmoid): TransVG's head."""

    def __init__(self, d_model: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or d_model
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 4),
        )

    def forward(
        self,
        reg: torch.Tensor,
        visual_tokens: torch.Tensor | None = None,
        visual_pad: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        return self.mlp(reg).sigmoid()


class AttentionBoxHead(BoxHead):
    """[REG] attends over the fused visual tokens; centre = attention-weighted cell centres + a
    bounded offset (at most one cell), offset and size from an MLP over [REG] and the attended
    visual features (the object's own features know its extent; [REG] alone regresses sizes poorly).
    [B,4] cxcywh in [0,1]."""

    def __init__(self, d_model: int, readout_radius: int | None = 1):
        super().__init__(d_model)
        self.readout_radius = readout_radius
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.mlp[0] = nn.Linear(2 * d_model, d_model)

    def forward(self, reg, visual_tokens=None, visual_pad=None, grid=None):
        h, w = grid
        logits = (self.key(visual_tokens) @ self.query(reg).unsqueeze(-1)).squeeze(-1) / reg.shape[
            -1
        ] ** 0.5
        attn = logits.float().masked_fill(visual_pad, torch.finfo(torch.float32).min).softmax(-1)
        self.last_attention = attn  # [B, h*w]: what the grounding-attention loss supervises
        centres = cell_coords(h, w, attn)[0, :, 4:6]
        if self.readout_radius is not None:
            attn = local_attention(attn, h, w, self.readout_radius)
        centre = attn @ centres
        attended = (attn.to(visual_tokens.dtype).unsqueeze(1) @ visual_tokens).squeeze(1)
        raw = self.mlp(torch.cat([reg, attended], -1)).float()
        cell = torch.tensor([1 / w, 1 / h], device=raw.device)
        return torch.cat(
            [(centre + torch.tanh(raw[:, :2]) * cell).clamp(0, 1), raw[:, 2:].sigmoid()], -1
        )


def local_attention(attn: torch.Tensor, h: int, w: int, radius: int) -> torch.Tensor:
    """Attention [B, h*w] kept only within `radius` cells (Chebyshev) of its peak, renormalised. The
    peak is chosen without gradient; the kept weights stay differentiable."""
    peak = attn.detach().argmax(-1)
    py, px = peak // w, peak % w
    ys = torch.arange(h, device=attn.device).repeat_interleave(w)
    xs = torch.arange(w, device=attn.device).repeat(h)
    near = ((ys[None] - py[:, None]).abs() <= radius) & ((xs[None] - px[:, None]).abs() <= radius)
    local = attn * near
    return local / local.sum(-1, keepdim=True).clamp_min(1e-12)


def attention_in_box_loss(
    attn: torch.Tensor, grid: tuple[int, int], box_cxcywh: torch.Tensor
) -> torch.Tensor:
    """-log of the read-out attention mass on cells whose centre lies in the target box (the nearest
    cell when the box is smaller than a cell): a dense signal that tells the [REG] token where to
    look."""
    h, w = grid
    centres = cell_coords(h, w, attn)[0, :, 4:6]  # [N, 2]
    cx, cy, bw, bh = box_cxcywh.float().unbind(-1)
    half_w = torch.maximum(bw / 2, torch.full_like(bw, 0.5 / w))[:, None]
    half_h = torch.maximum(bh / 2, torch.full_like(bh, 0.5 / h))[:, None]
    inside = ((centres[None, :, 0] - cx[:, None]).abs() <= half_w) & (
        (centres[None, :, 1] - cy[:, None]).abs() <= half_h
    )
    return -torch.log((attn * inside).sum(-1).clamp_min(1e-6)).mean()


def build_box_head(cfg: FusionConfig) -> BoxHead:
    return (
        AttentionBoxHead(cfg.d_model, cfg.readout_radius)
        if cfg.box_head == "attention"
        else BoxHead(cfg.d_model)
    )
