"""weak_cam's family config: what a method entry's `config:` holds for model `weak_cam`,
validated when params.yaml loads. Apart from the model (weak_cam.py) and free of torch, so
reading params imports no model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from refvg.config import _Strict
from refvg.models.registry import register_config


@register_config("weak_cam")
class WeakCAMConfig(_Strict):
    """Weakly supervised grounding by Grad-CAM (method weak_cam): trained on image-sentence pairs
    only.

    The fusion transformer is `model.fusion`'s; these are the matching objective, the CAM encoder,
    the attention-mining loss and how a box is read off the CAM at test time."""

    # in-batch image-text contrastive loss (the unimodal embeddings). 0.1: at 1 its gradient
    # dominates the clipped update and the fusion's matching loss never leaves ln 2
    # (docs/weak_cam.md)
    itc_weight: float = Field(0.1, ge=0)
    itm_weight: float = Field(
        1.0, ge=0
    )  # matching loss of the first fusion pass (positives + hard negatives)
    cam_itm_weight: float = Field(
        1.0, ge=0
    )  # matching loss of the second pass, the one fed the CAM embedding
    embed_dim: int = Field(64, gt=0)  # width of the contrastive embeddings
    cam_channels: int = Field(
        16, gt=0
    )  # hidden channels of the CAM encoder (conv net: CAM -> visual channels)
    match_fraction: float = Field(
        0.25, gt=0, le=1
    )  # share of each batch the fusion matching + mining see
    # The negative image of each matched expression: "random" (any other image of the batch) or
    # "hard" (ALBEF: drawn by contrastive similarity). On RefShapes a hard negative mostly holds an
    # object the expression also fits ("the top shape"): labelled "no match", it keeps the matcher
    # at chance.
    negatives: Literal["random", "hard"] = "random"
    cam_per_cell: bool = (
        False  # HiResCAM: weigh channels by each cell's gradient, not the map's mean (Grad-CAM)
    )
    contrastive_in_score: bool = (
        False  # matching score (and so its Grad-CAM) = fusion logit + cell-text similarity
    )
    # Attention mining: the visual map is multiplied by 1 - sigmoid((cam - threshold) * sharpness)
    # and the matching score of what remains is penalised (softplus: BCE towards "no match"). 0: the
    # ablation.
    mining_weight: float = Field(1.0, ge=0)
    mining_threshold: float = Field(0.5, gt=0, lt=1)
    mining_sharpness: float = Field(10.0, gt=0)
    mining_on: Literal["feature", "image"] = (
        "image"  # what the soft complement masks: the visual map or the image
    )
    # Test time: "threshold" keeps the CAM (upsampled to the square, padding excluded) above
    # `box_threshold` x its peak, takes the connected region holding the peak and returns its tight
    # box; "candidates" returns the candidate box (proposals section) with the highest CAM mass /
    # area^p.
    localisation: Literal["threshold", "candidates"] = "candidates"
    box_threshold: float = Field(0.5, gt=0, lt=1)
    candidate_area_power: float = Field(
        1.0, ge=0, le=1
    )  # 1: mean CAM in the box; 0: total CAM mass
