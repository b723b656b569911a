"""CMSA (Ye et al., CVPR 2019, "Cross-Modal Self-Attention Network for Referring Image
Segmentation").

For each backbone level of `visual.out_stages`, every (word, pixel) pair gets the joint feature [v_p
/ |v_p|, e_n / |e_n|, s_p] (visual feature, word feature, 8-d spatial coordinates of the cell); one
self-attention runs over all words x pixels of it, so a pixel can read any word at any other place;
the result is averaged over the words back to a per-pixel map. The levels' maps, resized to the
finest level, are merged by gated multi-level fusion (a memory and a reset gate per level), then a
small decoder upsamples to mask logits at the letterbox size. Loss: per-pixel BCE + soft Dice. The
box (`pred_boxes`, what the box tables score) is the tight box of the thresholded mask.

`fusion: concat` (the method cmsa_concat) is the paper's baseline: each level's map is [v_p, tiled
sentence feature, s_p] through a 1x1 conv instead of the self-attention; the rest is shared.

An expression refers to one object, so at inference (eval mode, its config's `keep_peak_component`)
the prediction keeps only the connected region of the thresholded mask that holds its most confident
pixel: a stray positive blob on a distractor would otherwise stretch the box over both objects.

Word features come from the shared text encoder (contextual) rather than the paper's bare word
embeddings: the same encoder every method uses, and relations ("left of the green star") need
context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from refvg.losses import mask_loss
from refvg.models.base import GroundingModel, GroundingOutput
from refvg.models.layers import mask_to_box, peak_component
from refvg.models.registry import register_model
from refvg.models.cmsa_config import CMSAConfig
from refvg.models.vl import TransformerLayer, cell_coords, downsample_mask


@dataclass
class CMSAOutput(GroundingOutput):
    mask_logits: torch.Tensor = (
        None  # [B,H,W] what the loss sees (pred_masks: after the peak read-out)
    )


class CrossModalSelfAttention(nn.Module):
    """One level: visual map [B,C,h,w] + word features [B,L,Ct] -> self-attentive map [B,d,h,w]."""

    def __init__(self, visual_in: int, text_in: int, cfg: CMSAConfig):
        super().__init__()
        self.visual = nn.Conv2d(visual_in, cfg.visual_dim, 1)
        self.word = nn.Linear(text_in, cfg.word_dim)
        # The joint feature's projection W [v; e; s] is split as W_vs [v; s] + W_e e: computed once
        # per pixel and once per word, then broadcast over the L x hw pairs instead of projecting
        # every pair.
        self.joint_pixel = nn.Linear(cfg.visual_dim + 8, cfg.d_model)
        self.joint_word = nn.Linear(cfg.word_dim, cfg.d_model, bias=False)
        self.layers = nn.ModuleList(
            TransformerLayer(cfg.d_model, cfg.num_heads, cfg.ffn_dim, cfg.dropout)
            for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(
        self, visual: torch.Tensor, pad: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor
    ) -> torch.Tensor:
        """pad bool [B,h,w] (True = letterbox padding); word_mask [B,L] (1 = a real token; real
        tokens first)."""
        b, _, h, w = visual.shape
        v = F.normalize(self.visual(visual).flatten(2).transpose(1, 2), dim=-1)  # [B,hw,Cv]
        coords = cell_coords(h, w, v).expand(b, -1, -1)
        e = F.normalize(self.word(words), dim=-1)  # [B,L,Cl]
        pixel = self.joint_pixel(torch.cat([v, coords], -1))  # [B,hw,d]
        word = self.joint_word(e)  # [B,L,d]
        lengths = _prefix_lengths(word_mask)
        keep_pixels = ~pad.flatten(1)  # keys: pixels of the image, not of the letterbox padding
        out = pixel.new_empty(b, h * w, pixel.shape[-1])
        # One attention per expression length, so no (word, pixel) token is padding: a sample costs
        # (L*hw)^2, and padding to the batch's longest expression would spend ~3x that on RefShapes
        # (7 of 12 word slots are real on average).
        for n in lengths.unique().tolist():
            rows = (lengths == n).nonzero().squeeze(1)
            x = (word[rows, :n, None] + pixel[rows, None]).flatten(1, 2)  # [g, n*hw, d], word-major
            keep = keep_pixels[rows].repeat(1, n)
            for layer in self.layers:
                x = layer(x, None, keep)
            out[rows] = self.norm(x).view(len(rows), n, h * w, -1).mean(1)  # average over the words
        return out.transpose(1, 2).reshape(b, -1, h, w)


class ConcatFusion(nn.Module):
    """CMSA's baseline for one level: visual map [B,C,h,w] + word features [B,L,Ct] -> [B,d,h,w].
    Each pixel's [v_p / |v_p|, q / |q|, s_p] (q: the sentence feature, the mean of the expression's
    word features, tiled over the map; s_p: the cell's 8-d coordinates) through one 1x1 conv."""

    def __init__(self, visual_in: int, text_in: int, cfg: CMSAConfig):
        super().__init__()
        self.visual = nn.Conv2d(visual_in, cfg.visual_dim, 1)
        self.sentence = nn.Linear(text_in, cfg.word_dim)
        # The 1x1 conv W [v; q; s] split as W_vs [v; s] + W_q q: q is one vector per sample, so
        # it is projected once and broadcast instead of tiled and convolved at every pixel.
        self.joint_pixel = nn.Linear(cfg.visual_dim + 8, cfg.d_model)
        self.joint_sentence = nn.Linear(cfg.word_dim, cfg.d_model, bias=False)

    def forward(
        self, visual: torch.Tensor, pad: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor
    ) -> torch.Tensor:
        """pad is unused (a 1x1 conv reads one pixel); word_mask [B,L] (1 = a real token)."""
        b, _, h, w = visual.shape
        v = F.normalize(self.visual(visual).flatten(2).transpose(1, 2), dim=-1)  # [B,hw,Cv]
        coords = cell_coords(h, w, v).expand(b, -1, -1)
        real = word_mask.to(words.dtype).unsqueeze(-1)
        sentence = (words * real).sum(1) / real.sum(1).clamp_min(1)  # [B,Ct]
        q = F.normalize(self.sentence(sentence), dim=-1)  # [B,Cl]
        out = self.joint_pixel(torch.cat([v, coords], -1)) + self.joint_sentence(q)[:, None]
        return out.transpose(1, 2).reshape(b, -1, h, w)


LEVEL_FUSIONS = {"self_attention": CrossModalSelfAttention, "concat": ConcatFusion}


def _prefix_lengths(word_mask: torch.Tensor) -> torch.Tensor:
    """Number of real tokens per row of a right-padded mask [B,L]; raises for any other layout."""
    lengths = word_mask.long().sum(1)
    positions = torch.arange(word_mask.shape[1], device=word_mask.device)
    if (
        not torch.equal(word_mask.bool(), positions[None] < lengths[:, None])
        or (lengths == 0).any()
    ):
        raise ValueError(
            "attention_mask must mark at least one token per expression, real tokens first"
        )
    return lengths


class GatedFusion(nn.Module):
    """Gated multi-level fusion (Sec. 3.3 of the paper), levels X_i [B,d,h,w] at one resolution:
    memory gate m_i = sigmoid(conv(X_i)), reset gate r_i = sigmoid(conv(X_i)), learned scalar
    gamma_i; C_i = (1 - m_i) X_i + sum_{j != i} gamma_j m_j X_j;  F_i = r_i tanh(C_i) + (1 - r_i)
    X_i;  out = sum_i F_i. A level passes on what its memory gate lets out to the others, and its
    reset gate decides how much of that context replaces its own features."""

    def __init__(self, d: int, levels: int):
        super().__init__()
        self.memory = nn.ModuleList(nn.Conv2d(d, d, 3, padding=1) for _ in range(levels))
        self.reset = nn.ModuleList(nn.Conv2d(d, d, 3, padding=1) for _ in range(levels))
        self.gamma = nn.Parameter(torch.ones(levels))

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        memory = [torch.sigmoid(conv(x)) for conv, x in zip(self.memory, levels)]
        reset = [torch.sigmoid(conv(x)) for conv, x in zip(self.reset, levels)]
        shared = [g * m * x for g, m, x in zip(self.gamma, memory, levels)]
        total = torch.stack(shared).sum(0)
        out = 0
        for x, m, r, own in zip(levels, memory, reset, shared):
            context = (1 - m) * x + total - own
            out = out + r * torch.tanh(context) + (1 - r) * x
        return out


class MaskDecoder(nn.Module):
    """[B,d,h,w] -> mask logits [B,1,h*2^k,w*2^k]: per entry of `channels`, 2x bilinear upsampling
    then a 3x3 conv + BatchNorm + ReLU; a 1x1 conv to one logit at the end."""

    def __init__(self, d: int, channels: tuple[int, ...]):
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = d
        for c in channels:
            blocks += [
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
            c_in = c
        self.body = nn.Sequential(*blocks)
        self.logits = nn.Conv2d(c_in, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.body(x))


@register_model("cmsa", config=CMSAConfig, needs=("masks",))
class CMSA(GroundingModel):
    def __init__(self, config: CMSAConfig, **backbones):
        super().__init__(config, **backbones)
        level = LEVEL_FUSIONS[config.fusion]
        self.levels = nn.ModuleList(
            level(ch, self.text.hidden_size, config) for ch in self.visual.out_channels
        )
        self.fusion = GatedFusion(config.d_model, len(self.levels))
        self.decoder = MaskDecoder(config.d_model, config.decoder_channels)

    def forward(self, batch: dict) -> CMSAOutput:
        maps = self.visual(batch["image"])
        words = self.text(batch["input_ids"], batch["attention_mask"])
        pixel_pad = batch["pixel_mask"]
        finest = max((mp.shape[-2:] for mp in maps), key=lambda s: s[0] * s[1])
        levels = []
        for block, mp in zip(self.levels, maps):
            x = block(mp, downsample_mask(pixel_pad, mp.shape[-2:]), words, batch["attention_mask"])
            if x.shape[-2:] != finest:
                x = F.interpolate(x, size=finest, mode="bilinear", align_corners=False)
            levels.append(x)
        logits = self.decoder(self.fusion(levels))
        size = pixel_pad.shape[-2:]
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        logits = logits[:, 0]
        mask_logits = logits
        if not self.training and self.config.keep_peak_component:
            with (
                torch.no_grad()
            ):  # the prediction: other positive regions are flipped to negative logits
                logits = torch.where(peak_component(logits, pixel_pad), logits, -logits.abs())
        with torch.no_grad():
            boxes = mask_to_box(logits, pixel_pad)
        return CMSAOutput(pred_boxes=boxes, pred_masks=logits, mask_logits=mask_logits)

    def compute_loss(self, outputs: CMSAOutput, batch: dict) -> dict[str, torch.Tensor]:
        w = self.config
        return mask_loss(
            outputs.mask_logits,
            batch["mask"],
            ~batch["pixel_mask"],
            w.mask_bce_weight,
            w.mask_dice_weight,
        )
