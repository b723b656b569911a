"""Opening a prepared split the way a method reads it (train and evaluate share this)."""

from __future__ import annotations

from refvg.config import Config
from refvg.stages.paths import instances_path


def open_split(
    cfg: Config,
    model_name: str,
    split: str,
    language_blind: bool = False,
    training: bool = False,
    image_blind: bool = False,
):
    """A prepared split with what the model needs from the data: target masks to train a mask method
    on (evaluation scores against the original-resolution masks instead), candidates for a ranking
    method. A weakly supervised model trains on image-sentence pairs only
    (refvg.data.weak.WeakSplit: no box, mask, annotation id or candidate); its evaluation splits are
    like every method's. `language_blind` / `image_blind`: the blind controls' inputs
    (PreparedSplit)."""
    from refvg.data.dataset import PreparedSplit
    from refvg.data.prepare import prepared_path
    from refvg.data.proposals import load_candidates
    from refvg.data.weak import WeakSplit
    from refvg.models import model_needs
    from refvg.models.registry import is_weakly_supervised

    needs = model_needs(model_name, cfg)
    prepared = prepared_path(cfg)
    if training and is_weakly_supervised(model_name):
        return WeakSplit(
            PreparedSplit(prepared, split, language_blind=language_blind, image_blind=image_blind)
        )
    candidates = None
    if "candidates" in needs:
        candidates = load_candidates(cfg.proposals, prepared / split, instances_path(cfg))
    return PreparedSplit(
        prepared,
        split,
        language_blind=language_blind,
        image_blind=image_blind,
        masks=training and "masks" in needs,
        candidates=candidates,
        max_candidates=cfg.proposals.max_candidates,
        match_iou=cfg.proposals.match_iou,
    )
