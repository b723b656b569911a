"""Inference on raw inputs: an image and an expression in, a box in original pixels out.

Used by `refvg predict` and by the MLflow pyfunc model, so the preprocessing there is exactly the one the
model was trained with (letterbox size, tokenizer, max tokens from the checkpoint's own config)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from refvg.data.refer import check_expression
from refvg.data.text import TOKENIZER_DIR, encode, load_tokenizer
from refvg.data.transforms import Letterbox, cxcywh_to_xyxy
from refvg.engine.runtime import autocast, resolve_device, to_device


class Grounder:
    def __init__(self, checkpoint: Path, tokenizer_dir: Path | None = None, device: str = "auto"):
        from refvg.stages import load_trained

        self.device = resolve_device(device)
        self.model, self.cfg, self.state = load_trained(checkpoint, self.device)
        self.tokenizer = load_tokenizer(tokenizer_dir or Path(checkpoint).parent / TOKENIZER_DIR)

    @torch.no_grad()
    def predict(self, images: list[Image.Image], expressions: list[str]) -> np.ndarray:
        """-> [N, 4] xyxy boxes in each image's original pixels."""
        if len(images) != len(expressions):
            raise ValueError(f"{len(images)} images but {len(expressions)} expressions")
        # The checks prepare applied to the training expressions, before anything reaches the tokenizer.
        expressions = [self._expression(i, text) for i, text in enumerate(expressions)]
        size = self.cfg.data.image_size
        boxes = []
        for img, text in zip(images, expressions):
            lb = Letterbox(img.width, img.height, size)
            ids, mask = encode(self.tokenizer, [text], self.cfg.data.max_tokens)
            batch = to_device({
                "image": torch.from_numpy(lb.image(img))[None],
                "pixel_mask": torch.from_numpy(lb.padding_mask())[None],
                "input_ids": torch.from_numpy(ids).long(), "attention_mask": torch.from_numpy(mask).long(),
            }, self.device)
            with autocast(self.device, self.cfg.train.amp):
                pred = self.model(batch)["pred_boxes"].float()
            boxes.append(lb.box_from_square(cxcywh_to_xyxy(pred)[0].cpu().numpy()))
        return np.stack(boxes) if boxes else np.zeros((0, 4))

    def _expression(self, i: int, text) -> str:
        try:
            return check_expression(text, self.cfg.data.max_expression_chars)
        except ValueError as err:
            raise ValueError(f"expression #{i}: {err}") from None
