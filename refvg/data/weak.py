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

import torch
from torch.utils.data import Dataset

from refvg.data.dataset import PreparedSplit

WEAK_KEYS = ("image", "pixel_mask", "input_ids", "attention_mask", "image_index", "index")


class WeakSplit(Dataset):
    def __init__(self, split: PreparedSplit):
        self.split = split.split
        self.source = split  # its pixels and padding masks (blanked for the image-blind control)
        self.input_ids = split.input_ids.clone()
        self.attention_mask = split.attention_mask.clone()
        self.image_index = torch.tensor(
            [int(r["image_index"]) for r in split.records], dtype=torch.long
        )

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, i: int) -> dict:
        image_index = self.image_index[i]
        return {
            "image": self.source.image(i),
            "pixel_mask": self.source.pixel_mask(i),
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "image_index": image_index,
            "index": torch.tensor(i),
        }
