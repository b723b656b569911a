"""What the `pretrain` stage trains the visual backbones with: a multi-label head on a whole
ResNetModel / SwinModel (every stage of the model config, so save_pretrained writes a normal
one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refvg.data.pretrain_corpus import GRID


class SceneClassifier(nn.Module):
    """pixel_values [B,3,S,S] -> logits [B, num_labels] of what is in the scene and where.

    The last stage's map is average-pooled per cell of the labels' GRID x GRID grid, not globally: a
    global pool keeps what is in the scene but throws away where, and the position labels (category
    x cell) are what makes the backbone's maps say where things are, which is what grounding reads
    off them. The head is linear so that the backbone, not the head, has to learn it."""

    def __init__(self, body: nn.Module, num_labels: int):
        super().__init__()
        self.body = body
        c = body.config
        channels = c.hidden_sizes[-1] if c.model_type == "resnet" else c.hidden_size
        self.head = nn.Linear(channels * GRID * GRID, num_labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.body(pixel_values).last_hidden_state
        if x.dim() == 3:  # swin: tokens [B, h*w, C] of a square image
            b, n, c = x.shape
            side = int(round(n**0.5))
            x = x.transpose(1, 2).reshape(b, c, side, side)
        return self.head(F.adaptive_avg_pool2d(x, GRID).flatten(1))
