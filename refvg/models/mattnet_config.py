"""MAttNet / CM-Erase's family config: what a method entry's `config:` holds for model `mattnet`,
validated when params.yaml loads. Apart from the model (mattnet.py) and free of torch, so
reading params imports no model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from refvg.config import _Strict
from refvg.models.registry import register_config


class EraseConfig(_Strict):
    """CM-Erase (Liu et al., CVPR 2019): also train on copies of each sample whose dominant
    evidence, chosen from the model's own attention, is erased."""

    # none: the ablation | language: a word of the expression -> [MASK] | visual: for every
    # candidate, a window of subject RoI cells, a location item or a context object -> zeros, the
    # module drawn from the module weights | both: a language AND a visual copy of every sample (the
    # paper)
    type: Literal["none", "language", "visual", "both"] = "both"
    # sample: each choice (module, word, cell window, location item, context object) is a
    # multinomial draw from its attention (the paper) | argmax: the most attended one every time
    rule: Literal["sample", "argmax"] = "sample"
    cell_window: int = Field(1, ge=1)  # side of the erased block of RoI cells (paper: 2 of 7x7)
    min_words: int = Field(3, ge=1)  # shorter expressions: the language copy keeps them (paper: 3)
    rate: float = Field(1.0, ge=0, le=1)  # fraction of samples that also train erased (paper: 1)


@register_config("mattnet")
class MAttNetConfig(_Strict):
    """MAttNet-style modular matching over candidate boxes (method mattnet), with CM-Erase."""

    d_model: int = Field(64, gt=0)  # width of the phrase and module embeddings
    roi_size: int = Field(3, gt=0)  # RoI align output bins per side (the subject's attention grid)
    roi_samples: int = Field(2, gt=0)  # bilinear samples per bin side, averaged
    neighbours: int = Field(5, ge=0)  # location module: offsets to this many nearest candidates
    max_contexts: int = Field(5, ge=1)  # relation module: the nearest other candidates
    # What the candidates' categories feed. none: nothing (the output does not depend on them; on
    # RefShapes the category is the expression's noun) | neighbours: MAttNet's use, location offsets
    # to same-category candidates only | embedding: that, plus a category embedding added to subject
    # and context features
    category_input: Literal["none", "neighbours", "embedding"] = "none"
    num_categories: int = Field(100, gt=0)  # category_input embedding: ids below this (COCO: 90)
    rank_margin: float = Field(0.1, ge=0)  # hinge margin against mismatched expressions / images
    rank_weight: float = Field(
        1.0, ge=0
    )  # weight of the ranking loss (cross-entropy over candidates: 1)
    erase: EraseConfig = EraseConfig()
