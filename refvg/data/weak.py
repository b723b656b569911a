"""The training data of weakly supervised methods: image-sentence pairs, nothing about the target.

`WeakSplit` copies out of a prepared split only what a pair is (the letterboxed image, its padding
mask, the tokenized expression) plus two row numbers: `image_index`, which image of the split the
pair shows (pairs of the same image are both positives of that image in a matching objective; it
says nothing about which object the expression means) and `index`, the pair's row (the trainer names
the rows of a skipped batch with it). It keeps no reference to the split's records, boxes, masks,
annotation ids or candidates, so nothing downstream of it can reach the target, by accident or
otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from refvg.data.dataset import PreparedSplit

WEAK_KEYS = ("image", "pixel_mask", "input_ids", "attention_mask", "image_index", "index")


class WeakSplit(Dataset):
    def __init__(self, split: PreparedSplit):
        self.split = split.split
        self.images = split.images  # letterboxed pixels, one row per image (a memory map)
        self.input_ids = split.input_ids.clone()
        self.attention_mask = split.attention_mask.clone()
        self.image_index = torch.tensor(
            [int(r["image_index"]) for r in split.records], dtype=torch.long
        )
        # few distinct image sizes: one padding mask each
        pads: dict[tuple[int, int], torch.Tensor] = {}
        self.pixel_masks = []
        for lb in split.letterboxes:
            key = (lb.content_w, lb.content_h)
            if key not in pads:
                pads[key] = torch.from_numpy(lb.padding_mask())
            self.pixel_masks.append(pads[key])

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, i: int) -> dict:
        image_index = self.image_index[i]
        return {
            # a copy: the map is read-only
            "image": torch.from_numpy(np.array(self.images[int(image_index)])),
            "pixel_mask": self.pixel_masks[i],
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "image_index": image_index,
            "index": torch.tensor(i),
        }
