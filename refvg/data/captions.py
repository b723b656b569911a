"""The CLIP teacher's own image-caption corpus: knowledge from outside the grounding data.

EpmVG distils from a model that learnt from image-text pairs, not from the grounding boxes. With no
pretrained CLIP (`teacher.pretrained: null`) the small teacher learns from this corpus instead:
RefShapes scenes (refvg.data.synthetic.random_scene) drawn from a random stream of their own, never
the one `generate_refshapes` draws the grounding images from, each with captions of the WHOLE scene
(every object's size, colour, shape and coarse position, in a random order) and no box. Images are
letterboxed to `data.image_size` exactly as `prepare` letterboxes the grounding images, so the
teacher sees the same kind of input it later encodes for the students.

Captions use only words of the RefShapes grammar ("the big red circle top left the small blue star
right"), so the prepared tokenizer (built from the grounding train expressions) has them all as
whole words.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from refvg.config import SyntheticConfig
from refvg.data.synthetic import SIZE_WORDS, Obj, random_scene
from refvg.data.transforms import Letterbox

# Spawn key of the corpus's random stream: SeedSequence([seed, CORPUS_STREAM]) never gives the state
# that generate_refshapes' default_rng(seed) starts from, for any seed.
CORPUS_STREAM = 0xCA9710


@dataclass
class CaptionCorpus:
    """Letterboxed scenes and their captions; nothing else (no box, no object list)."""

    images: np.ndarray  # uint8 [N, S, S, 3], content top-left, zero padding
    captions: list[list[str]]  # per image, `captions_per_image` different texts of the whole scene

    def __len__(self) -> int:
        return len(self.captions)


def position_words(o: Obj, w: int, h: int) -> list[str]:
    """Coarse place of an object in a 3 x 3 grid: ["top", "left"], ["right"] (vertically central),
    [] (the centre cell)."""
    words = []
    for centre, side, (low, high) in ((o.cy, h, ("top", "bottom")), (o.cx, w, ("left", "right"))):
        if centre < side / 3:
            words.append(low)
        elif centre > 2 * side / 3:
            words.append(high)
    return words


def scene_caption(objs: list[Obj], w: int, h: int, rng: np.random.Generator) -> str:
    """Every object of the scene, in a random order, each as "the <size> <colour> <shape>
    <position>" (size synonyms drawn at random: captions of one scene differ in order and wording,
    not in content)."""
    parts = []
    for i in rng.permutation(len(objs)):
        o = objs[int(i)]
        size = str(rng.choice(SIZE_WORDS[o.size]))
        parts.append(" ".join(["the", size, o.colour, o.shape, *position_words(o, w, h)]))
    return " ".join(parts)


def build_corpus(
    cfg: SyntheticConfig, num_images: int, captions_per_image: int, image_size: int, seed: int
) -> CaptionCorpus:
    """`num_images` scenes of the RefShapes kind (`cfg`: image size, objects per scene) from the
    corpus's own stream of `seed`, letterboxed to `image_size`, with `captions_per_image` captions
    each."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, CORPUS_STREAM]))
    images = np.zeros((num_images, image_size, image_size, 3), dtype=np.uint8)
    captions = []
    for i in range(num_images):
        image, objs = random_scene(cfg, rng)
        images[i] = Letterbox(image.width, image.height, image_size).image(image)
        texts: list[str] = []
        # A scene of 3 objects has 3! orders x 8 size wordings: the loop always finds enough.
        for _ in range(8 * captions_per_image):
            text = scene_caption(objs, image.width, image.height, rng)
            if text not in texts:
                texts.append(text)
            if len(texts) == captions_per_image:
                break
        captions.append(texts)
    return CaptionCorpus(images, captions)


def subset(corpus: CaptionCorpus, start: int, stop: int | None = None) -> CaptionCorpus:
    return CaptionCorpus(corpus.images[start:stop], corpus.captions[start:stop])


def image_digests(images: np.ndarray) -> set[str]:
    """sha256 of each image's pixels (uint8 [N, S, S, 3]): identical content, identical digest."""
    return {
        hashlib.sha256(np.ascontiguousarray(images[i]).tobytes()).hexdigest()
        for i in range(len(images))
    }


def shared_with_prepared(corpus: CaptionCorpus, prepared: Path) -> int:
    """How many corpus images have exactly the pixels of an image of any prepared split (must be
    0)."""
    seen = image_digests(corpus.images)
    shared = set()
    for path in sorted(Path(prepared).glob("*/images.npy")):
        shared |= seen & image_digests(np.load(path, mmap_mode="r"))
    return len(shared)


class CorpusPairs:
    """The corpus as the teacher reads it, tokenized once. An epoch (`batches`) shows every image
    once, with one of its captions drawn at random (the others are the same scene in another order
    and wording), so each step's images are all different and their captions are each other's
    negatives. Batches are dicts of tensors: image uint8 [B,S,S,3], input_ids / attention_mask [B,L]
    int64, image_index [B]."""

    def __init__(self, corpus: CaptionCorpus, tokenizer, max_tokens: int):
        from refvg.data.text import encode

        longest = caption_tokens(tokenizer, corpus)
        if longest > max_tokens:
            raise ValueError(
                f"caption corpus: its longest caption takes {longest} tokens, the "
                f"teacher reads {max_tokens}: build it with caption_tokens() "
                f"positions"
            )
        per_image = {len(caps) for caps in corpus.captions}
        if len(per_image) != 1:
            raise ValueError(
                f"caption corpus: images have {sorted(per_image)} captions; every "
                f"image needs as many"
            )
        self.images = torch.from_numpy(corpus.images)
        ids, mask = encode(tokenizer, [t for caps in corpus.captions for t in caps], max_tokens)
        shape = (len(corpus), per_image.pop(), max_tokens)
        self.input_ids = torch.from_numpy(ids.astype(np.int64)).view(shape)
        self.attention_mask = torch.from_numpy(mask.astype(np.int64)).view(shape)

    def __len__(self) -> int:
        return len(self.images)

    def batch(
        self, rows: torch.Tensor, caption: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Images `rows`, each with its caption number `caption` (default: each one's first)."""
        caption = torch.zeros_like(rows) if caption is None else caption
        return {
            "image": self.images[rows],
            "input_ids": self.input_ids[rows, caption],
            "attention_mask": self.attention_mask[rows, caption],
            "image_index": rows,
        }

    def batches(self, batch_size: int, generator: torch.Generator):
        """One epoch: the images shuffled, each with a caption drawn at random."""
        order = torch.randperm(len(self), generator=generator)
        caption = torch.randint(self.input_ids.shape[1], (len(self),), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield self.batch(rows, caption[rows])


def caption_tokens(tokenizer, corpus: CaptionCorpus) -> int:
    """Tokens the corpus's longest caption takes ([CLS] and [SEP] included)."""
    return max(len(tokenizer(t)["input_ids"]) for caps in corpus.captions for t in caps)
