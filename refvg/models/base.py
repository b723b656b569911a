"""The contract between a grounding model and the rest of refvg (trainer, evaluator, inference).

Every model derives from :class:`GroundingModel` and is registered with its family's config class
(refvg.models.registry). It is built by `from_config(cfg, vocab_size, pad_token_id)` from a run
config (`Config.for_method`), which reads the shared sections and the family config and calls a
plain keyword constructor, so a test can build one without a params file (detectron2's `from_config`
idea).

- `forward(batch)` -> a :class:`GroundingOutput` (a family subclass with its extras) in eval mode;
in train
  mode what its own `compute_loss` reads (every family a GroundingOutput, except weak_cam, whose
  training pass predicts no box).
- `compute_loss(outputs, batch)` -> {"loss": total, ...parts}; "auxiliary": what the method adds
over its
  ablation (inside "loss"), which the trainer clips apart while `auxiliary_loss` is true.
- `param_groups(lr, lr_backbone, weight_decay)`: one definition for every model.
- `explain(batch)` where `can_explain` (ranking models: which words and regions decided).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from refvg.config import TextConfig, VisualConfig
from refvg.models.backbones import build_text_encoder, build_visual_backbone

# The text encoder's position table has at least this many slots whatever data.max_tokens is, so its
# weights keep one shape across the prepared datasets' token limits (and a checkpoint loads into
# either).
MIN_TEXT_POSITIONS = 64
BACKBONE_PREFIXES = ("visual.", "text.")


def text_positions(max_tokens: int) -> int:
    return max(MIN_TEXT_POSITIONS, max_tokens)


@dataclass
class GroundingOutput:
    """What every model predicts: boxes [B,4] (normalised cxcywh in the letterboxed square) and, for
    a model that segments, mask logits [B,H,W] over the square. Families subclass it with their
    extras."""

    pred_boxes: torch.Tensor
    pred_masks: Optional[torch.Tensor] = None


class GroundingModel(nn.Module):
    config_class: ClassVar[
        type
    ]  # the family's config class; set by refvg.models.registry.register_model
    # best.pt is chosen by this val metric (a weakly supervised model has no box to score during
    # training)
    select_metric: ClassVar[str] = "acc@0.5"
    can_explain: ClassVar[bool] = False

    def __init__(
        self,
        config,
        *,
        visual: VisualConfig,
        text: TextConfig,
        image_size: int,
        max_tokens: int,
        vocab_size: int,
        pad_token_id: int,
    ):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config
        self.image_size = image_size
        self.text_positions = text_positions(max_tokens)
        self.visual = build_visual_backbone(visual, image_size=image_size)
        self.text = build_text_encoder(
            text, vocab_size, pad_token_id, max_positions=self.text_positions
        )

    @classmethod
    def from_config(cls, cfg, vocab_size: int, pad_token_id: int) -> "GroundingModel":
        """The model a run config (`Config.for_method(name)`) describes."""
        return cls(**cls.config_kwargs(cfg), vocab_size=vocab_size, pad_token_id=pad_token_id)

    @classmethod
    def config_kwargs(cls, cfg) -> dict[str, Any]:
        """The constructor's keyword arguments read from a run config; a family adds what else it
        reads."""
        return {
            "config": cls.family_config(cfg),
            "visual": cfg.model.visual,
            "text": cfg.model.text,
            "image_size": cfg.data.image_size,
            "max_tokens": cfg.data.max_tokens,
        }

    @classmethod
    def family_config(cls, cfg):
        """The run's family config (`cfg.method.config`); the class defaults for a config of no
        method."""
        if cfg.method is None:
            return cls.config_class()
        if type(cfg.method.config) is not cls.config_class:
            raise ValueError(
                f"{cls.__name__} needs a {cls.config_class.__name__}; this run config is for "
                f"model {cfg.method.model!r} ({type(cfg.method.config).__name__})"
            )
        return cfg.method.config

    @property
    def auxiliary_loss(self) -> bool:
        """Whether compute_loss returns an "auxiliary" term for the trainer to clip apart."""
        return False

    def compute_loss(self, outputs, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def explain(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} explains nothing (can_explain is False)")

    def param_groups(self, lr: float, lr_backbone: float, weight_decay: float) -> list[dict]:
        """Optimizer groups: the backbones' parameters (`visual.`, `text.`) at lr_backbone, the rest
        at lr; biases and norm weights (every <=1-D parameter) without weight decay. Frozen ones are
        left out."""
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                key = (name.startswith(BACKBONE_PREFIXES), p.ndim > 1)
                groups.setdefault(key, []).append(p)
        out = []
        for (is_backbone, decay), params in sorted(groups.items()):
            part, decayed = "backbone" if is_backbone else "head", "decay" if decay else "no_decay"
            out.append(
                {
                    "name": f"{part}_{decayed}",
                    "params": params,
                    "lr": lr_backbone if is_backbone else lr,
                    "weight_decay": weight_decay if decay else 0.0,
                }
            )
        return out
