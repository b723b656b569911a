"""CMSA's family config: what a method entry's `config:` holds for model `cmsa`,
validated when params.yaml loads. Apart from the model (cmsa.py) and free of torch, so
reading params imports no model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from refvg.config import _Strict
from refvg.models.registry import register_config


@register_config("cmsa")
class CMSAConfig(_Strict):
    """CMSA (referring segmentation): one cross-modal self-attention block per backbone level of
    `visual.out_stages`, gated fusion of the levels, an upsampling decoder to mask logits."""

    visual_dim: int = Field(
        32, gt=0
    )  # C_v: each level's features are projected to this, then L2-normalised
    word_dim: int = Field(32, gt=0)  # C_l: the same for each word's features
    d_model: int = Field(
        32, gt=0
    )  # width of the joint (word, pixel) features inside the self-attention
    num_heads: int = Field(1, gt=0)
    ffn_dim: int = Field(64, gt=0)
    num_layers: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    # One 3x3 conv + 2x upsampling per entry, from the finest CMSA level; the logits are then
    # resized to the letterbox size bilinearly.
    decoder_channels: tuple[int, ...] = (32, 16)
    # Inference: keep only the connected region of the thresholded mask that holds its most
    # confident pixel (for the mask and its box); false: the whole thresholded mask and its tight
    # box.
    keep_peak_component: bool = True
    # Loss: per-pixel BCE and soft Dice on the letterboxed mask logits (padding excluded).
    mask_bce_weight: float = Field(1.0, ge=0)
    mask_dice_weight: float = Field(1.0, ge=0)
    # How each level fuses the modalities. self_attention: CMSA's cross-modal self-attention;
    # concat: the paper's baseline, [v_p, sentence, s_p] at every pixel then a 1x1 conv (no
    # attention, no word-level features): everything else the same, so the pair isolates the
    # cross-modal self-attention. num_heads, ffn_dim, num_layers and dropout are unused by concat.
    fusion: Literal["self_attention", "concat"] = "self_attention"
