"""The `pretrain` stage's corpus: what the backbones and the text encoder learn from before any
grounding.

RefShapes scenes (refvg.data.synthetic.random_scene) from a random stream of their own
(PRETRAIN_STREAM: neither generate_refshapes' stream nor the teacher's caption corpus's),
letterboxed to `data.image_size` exactly as `prepare` letterboxes the grounding images. Each scene
carries:

- multi-label targets (what the visual backbones classify): which shape categories and colours are
  in it, and which category occupies which cell of a 3 x 3 grid (where things are: what grounding
  needs from a backbone);
- texts (what the text encoder models): RefShapes expressions of every style the generator writes
  (attribute, location, relation, overspecified, with their synonyms) for its objects, and a caption
  of the whole scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from refvg.config import SyntheticConfig
from refvg.data.captions import image_digests, scene_caption
from refvg.data.refshapes_language import CATEGORIES, MARGIN, Obj
from refvg.data.synthetic import COLOURS, choose_expressions, random_scene
from refvg.data.transforms import Letterbox

# Spawn key of the corpus's random stream: differs from captions.CORPUS_STREAM (the teacher's
# corpus), and SeedSequence([seed, key]) never starts where generate_refshapes' default_rng(seed)
# does.
PRETRAIN_STREAM = 0x9E7A11
GRID = 3  # cells per side of the position labels
LABELS = (
    [f"shape:{c}" for c in CATEGORIES]
    + [f"colour:{c}" for c in COLOURS]
    + [f"{c}@{r},{k}" for c in CATEGORIES for r in range(GRID) for k in range(GRID)]
)


@dataclass
class PretrainCorpus:
    images: np.ndarray  # uint8 [N, S, S, 3], content top-left, zero padding
    labels: np.ndarray  # float32 [N, len(LABELS)], 0/1
    texts: list[list[str]]  # per image: its objects' expressions and one scene caption

    def __len__(self) -> int:
        return len(self.images)

    def split(self, held_out: int) -> tuple[PretrainCorpus, PretrainCorpus]:
        """(training part, the last `held_out` images with their labels and texts)."""
        at = len(self) - held_out
        part = lambda a, b: PretrainCorpus(self.images[a:b], self.labels[a:b], self.texts[a:b])  # noqa: E731
        return part(0, at), part(at, None)


def cell(o: Obj, w: int, h: int) -> tuple[int, int]:
    """(row, column) of the object's centre in the GRID x GRID grid of its scene (the thirds of
    captions.position_words)."""
    return min(GRID - 1, int(GRID * o.cy / h)), min(GRID - 1, int(GRID * o.cx / w))


def scene_labels(objs: list[Obj], w: int, h: int) -> np.ndarray:
    index = {name: i for i, name in enumerate(LABELS)}
    y = np.zeros(len(LABELS), dtype=np.float32)
    for o in objs:
        r, k = cell(o, w, h)
        for name in (f"shape:{o.shape}", f"colour:{o.colour}", f"{o.shape}@{r},{k}"):
            y[index[name]] = 1.0
    return y


def build_pretrain_corpus(
    cfg: SyntheticConfig,
    num_images: int,
    image_size: int,
    seed: int,
    expressions_per_object: int = 2,
) -> PretrainCorpus:
    rng = np.random.default_rng(np.random.SeedSequence([seed, PRETRAIN_STREAM]))
    images = np.zeros((num_images, image_size, image_size, 3), dtype=np.uint8)
    labels = np.zeros((num_images, len(LABELS)), dtype=np.float32)
    texts = []
    for i in range(num_images):
        image, objs = random_scene(cfg, rng)
        w, h = image.width, image.height
        images[i] = Letterbox(w, h, image_size).image(image)
        labels[i] = scene_labels(objs, w, h)
        margin = MARGIN * min(w, h)  # as generate_refshapes resolves its expressions
        scene = [
            text
            for t in range(len(objs))
            for text in choose_expressions(t, objs, expressions_per_object, margin, rng)
        ]
        texts.append(scene + [scene_caption(objs, w, h, rng)])
    return PretrainCorpus(images, labels, texts)


def shared_images(corpus: PretrainCorpus, grounding: np.ndarray) -> int:
    """How many corpus images have exactly the pixels of one of `grounding`'s (must be 0)."""
    return len(image_digests(corpus.images) & image_digests(grounding))


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_id: int,
    random_ids: tuple[int, int],
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each `maskable` token is chosen with `probability`; a chosen one becomes
    [MASK] (80%), a random word id from [random_ids[0], random_ids[1]) (10%) or stays (10%).
    -> (inputs, labels: the original id where chosen, -100 elsewhere)."""
    draw = lambda: torch.rand(input_ids.shape, generator=generator)  # noqa: E731
    chosen = (draw() < probability) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    roll = draw()
    inputs = input_ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    low, high = random_ids
    inputs[swap] = torch.randint(low, high, input_ids.shape, generator=generator)[swap]
    return inputs, labels
