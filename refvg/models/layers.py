"""Tensor helpers more than one model family uses: pooling over kept positions and reading a box off
a mask. A model file imports these from here, never from another model file (it imports another
model file only to subclass its model)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from refvg.data.transforms import xyxy_to_cxcywh


def masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over the kept positions: [B,N,D], [B,N] (nonzero/True = keep) -> [B,D]. For the sentence
    feature (the real tokens) and for pooling over real pixels (not letterbox padding)."""
    m = keep.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def peak_component(logits: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """bool [B,H,W]: the 8-connected region of (logits > 0) outside the padding that holds the
    highest-scoring pixel (just that pixel when nothing is above 0). Inference only: labelled on the
    CPU with scipy (growing the region by max-pooling instead costs more, and more the larger the
    object)."""
    from scipy import ndimage

    fg = ((logits > 0) & ~pad).cpu().numpy()
    peaks = (
        logits.detach().float().masked_fill(pad, float("-inf")).flatten(1).argmax(1).cpu().numpy()
    )
    region = np.zeros_like(fg)
    for i, (mask, peak) in enumerate(zip(fg, peaks)):
        y, x = divmod(int(peak), mask.shape[1])
        if mask[y, x]:
            labels, _ = ndimage.label(mask, structure=_EIGHT_CONNECTED)
            region[i] = labels == labels[y, x]
        else:
            region[i, y, x] = True
    return torch.from_numpy(region).to(logits.device)


def mask_to_box(logits: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Tight box of (logits > 0) outside the padding, [B,4] cxcywh normalised to the square; a pixel
    spans [i, i+1). An empty mask gives the box of its highest-scoring pixel, so every sample still
    has a box."""
    b, h, w = logits.shape
    fg = (logits > 0) & ~pad
    empty = ~fg.flatten(1).any(1)
    if empty.any():
        peak = logits.detach().float().masked_fill(pad, float("-inf")).flatten(1).argmax(1)
        fg = fg.flatten(1)
        fg[empty] = F.one_hot(peak[empty], h * w).bool()
        fg = fg.view(b, h, w)
    ys = torch.arange(h, device=logits.device)
    xs = torch.arange(w, device=logits.device)
    rows, cols = fg.any(2), fg.any(1)
    y0 = torch.where(rows, ys, h).amin(1)
    y1 = torch.where(rows, ys, -1).amax(1) + 1
    x0 = torch.where(cols, xs, w).amin(1)
    x1 = torch.where(cols, xs, -1).amax(1) + 1
    scale = torch.tensor([w, h, w, h], device=logits.device, dtype=torch.float32)
    return xyxy_to_cxcywh(torch.stack([x0, y0, x1, y1], -1).float() / scale)
