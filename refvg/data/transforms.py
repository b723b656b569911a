"""Geometry shared by every method: box formats and the letterbox resize.

Conventions used across refvg:
- `xywh`   COCO boxes: top-left corner, width, height, in pixels of the original image.
- `xyxy`   corners.
- `cxcywh` centre and size; the models predict it normalised to [0, 1] of the letterboxed square.
A letterbox scales the longer side to `size` and pads the bottom/right, so a point maps by
`p * scale` and the padding never sits between image content and the origin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def xywh_to_xyxy(b):
    x, y, w, h = _unbind(b)
    return _stack([x, y, x + w, y + h], b)


def xyxy_to_xywh(b):
    x0, y0, x1, y1 = _unbind(b)
    return _stack([x0, y0, x1 - x0, y1 - y0], b)


def xyxy_to_cxcywh(b):
    x0, y0, x1, y1 = _unbind(b)
    return _stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], b)


def cxcywh_to_xyxy(b):
    cx, cy, w, h = _unbind(b)
    return _stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], b)


def _unbind(b):
    if isinstance(b, torch.Tensor):
        return b.unbind(-1)
    b = np.asarray(b, dtype=np.float64)
    return [b[..., i] for i in range(4)]


def _stack(parts, like):
    if isinstance(like, torch.Tensor):
        return torch.stack(parts, dim=-1)
    return np.stack(parts, axis=-1)


@dataclass(frozen=True)
class Letterbox:
    """How one original image was placed in the `size` x `size` square."""

    orig_w: int
    orig_h: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.orig_w, self.orig_h)

    @property
    def content_w(self) -> int:
        return max(1, round(self.orig_w * self.scale))

    @property
    def content_h(self) -> int:
        return max(1, round(self.orig_h * self.scale))

    def box_to_square(self, xyxy):
        """Original-pixel xyxy -> normalised xyxy in the square."""
        return np.asarray(xyxy, dtype=np.float64) * self.scale / self.size

    def box_from_square(self, xyxy_norm):
        """Normalised xyxy in the square -> original-pixel xyxy, clipped to the image."""
        b = np.asarray(xyxy_norm, dtype=np.float64) * self.size / self.scale
        b[..., 0::2] = b[..., 0::2].clip(0, self.orig_w)
        b[..., 1::2] = b[..., 1::2].clip(0, self.orig_h)
        return b

    def image(self, img: Image.Image, resample=Image.BILINEAR) -> np.ndarray:
        """RGB image -> uint8 [size, size, 3], content top-left, zero padding."""
        resized = img.convert("RGB").resize((self.content_w, self.content_h), resample)
        out = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        out[: self.content_h, : self.content_w] = np.asarray(resized)
        return out

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """Binary [H, W] mask -> uint8 [size, size], placed exactly as the image is. A pixel is set
        when the object covers at least half of its area (box filter); nearest-neighbour sampling
        would shift edges by up to a pixel depending on where the samples fall."""
        resized = Image.fromarray(mask.astype(np.float32)).resize(
            (self.content_w, self.content_h), Image.BOX
        )
        out = np.zeros((self.size, self.size), dtype=np.uint8)
        out[: self.content_h, : self.content_w] = (np.asarray(resized) >= 0.5).astype(np.uint8)
        return out

    def mask_from_square(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask logits over the square (any resolution: [h, w]) -> float logits [orig_h, orig_w]
        over the original image: resized to the letterbox size, padding cropped, resized to the
        original size (bilinear both times, so thresholding happens once, at the resolution that is
        scored)."""
        x = logits.float()[None, None]
        if x.shape[-2:] != (self.size, self.size):
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False
            )
        x = x[..., : self.content_h, : self.content_w]
        return torch.nn.functional.interpolate(
            x, size=(self.orig_h, self.orig_w), mode="bilinear", align_corners=False
        )[0, 0]

    def padding_mask(self) -> np.ndarray:
        """bool [size, size], True on padding."""
        pad = np.ones((self.size, self.size), dtype=bool)
        pad[: self.content_h, : self.content_w] = False
        return pad


def normalize_images(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] with ImageNet statistics (what pretrained backbones
    expect)."""
    x = images_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
