"""Inference on raw inputs: an image and an expression in, a box (and a mask, for models that
segment) in original pixels out.

Used by `refvg predict` and by the MLflow pyfunc model, so the preprocessing there is exactly the
one the model was trained with (letterbox size, tokenizer, max tokens from the checkpoint's own
config)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from refvg.data.proposals import ImageCandidates, candidate_batch
from refvg.data.refer import check_expression
from refvg.data.text import TOKENIZER_DIR, encode, load_tokenizer
from refvg.data.transforms import Letterbox, cxcywh_to_xyxy
from refvg.engine.checkpoint import load_trained
from refvg.engine.evaluator import read_outputs
from refvg.engine.runtime import autocast, resolve_device, to_device


@dataclass
class Grounding:
    box_xyxy: np.ndarray  # [4] original pixels
    mask: Optional[np.ndarray] = None  # bool [H, W] original pixels, when the model segments


def mask_to_original(mask_logits: torch.Tensor, lb: Letterbox) -> np.ndarray:
    """A model's mask logits over the letterboxed square ([h, w], any resolution) -> bool [H, W] in
    the original image: upsampled to the square, cropped to the image content, resized to the
    original size."""
    square = F.interpolate(
        mask_logits.float()[None, None],
        size=(lb.size, lb.size),
        mode="bilinear",
        align_corners=False,
    )[0, 0]
    content = square[: lb.content_h, : lb.content_w].sigmoid()
    full = F.interpolate(
        content[None, None], size=(lb.orig_h, lb.orig_w), mode="bilinear", align_corners=False
    )
    return (full[0, 0] > 0.5).cpu().numpy()


class Grounder:
    def __init__(self, checkpoint: Path, tokenizer_dir: Path | None = None, device: str = "auto"):
        self.device = resolve_device(device)
        self.model, self.cfg, self.state = load_trained(checkpoint, self.device)
        self.tokenizer = load_tokenizer(tokenizer_dir or Path(checkpoint).parent / TOKENIZER_DIR)

    @property
    def needs_candidates(self) -> bool:
        from refvg.models import model_needs

        return "candidates" in model_needs(self.state["model_name"], self.cfg)

    @torch.no_grad()
    def ground(
        self, image: Image.Image, expression: str, candidates: Optional[ImageCandidates] = None
    ) -> Grounding:
        """`candidates`: the boxes a ranking model (e.g. mattnet) chooses from, in the image's
        pixels (a detector's output); other models ignore them."""
        # The checks prepare applied to the training expressions, before anything reaches the
        # tokenizer.
        expression = self._expression(0, expression)
        size = self.cfg.data.image_size
        lb = Letterbox(image.width, image.height, size)
        pixels, padding = lb.image(image), lb.padding_mask()
        # A control answers as it was trained (refvg.data.dataset.PreparedSplit): the language-blind
        # one without the words, the image-blind one from a blank square with no padding.
        if self.state.get("language_blind"):
            expression = ""
        if self.state.get("image_blind"):
            pixels, padding = np.zeros_like(pixels), np.zeros_like(padding)
        ids, mask = encode(self.tokenizer, [expression], self.cfg.data.max_tokens)
        batch = {
            "image": torch.from_numpy(pixels)[None],
            "pixel_mask": torch.from_numpy(padding)[None],
            "input_ids": torch.from_numpy(ids).long(),
            "attention_mask": torch.from_numpy(mask).long(),
        }
        if self.needs_candidates:
            if candidates is None or len(candidates) == 0:
                raise ValueError(
                    f"model {self.state['model_name']!r} ranks candidate boxes: give the image's "
                    f"candidates (e.g. a detector's boxes)"
                )
            batch |= candidate_batch(candidates, lb, self.cfg.proposals.max_candidates)
        batch = to_device(batch, self.device)
        with autocast(self.device, self.cfg.train.amp):
            out = read_outputs(self.model(batch), ("pred_boxes", "pred_masks"))
        box = lb.box_from_square(cxcywh_to_xyxy(out["pred_boxes"].float())[0].cpu().numpy())
        masks = out.get(
            "pred_masks"
        )  # segmentation models (CMSA): [B, (1,) h, w] logits over the square
        if masks is None:
            return Grounding(box)
        return Grounding(box, mask_to_original(masks[0].reshape(masks.shape[-2:]), lb))

    def predict(
        self,
        images: list[Image.Image],
        expressions: list[str],
        candidates: Optional[list[ImageCandidates]] = None,
    ) -> np.ndarray:
        """-> [N, 4] xyxy boxes in each image's original pixels."""
        if len(images) != len(expressions) or (
            candidates is not None and len(candidates) != len(images)
        ):
            raise ValueError(
                f"{len(images)} images, {len(expressions)} expressions"
                + (f", {len(candidates)} candidate lists" if candidates is not None else "")
            )
        expressions = [self._expression(i, text) for i, text in enumerate(expressions)]
        cands = candidates if candidates is not None else [None] * len(images)
        boxes = [
            self.ground(img, text, c).box_xyxy for img, text, c in zip(images, expressions, cands)
        ]
        return np.stack(boxes) if boxes else np.zeros((0, 4))

    def _expression(self, i: int, text) -> str:
        try:
            return check_expression(text, self.cfg.data.max_expression_chars)
        except ValueError as err:
            raise ValueError(f"expression #{i}: {err}") from None
