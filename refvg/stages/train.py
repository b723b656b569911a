"""The `train@<method>` stage: one method trained by the engine's one loop, validated by its
evaluators."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from refvg.config import Config
from refvg.data.text import TOKENIZER_DIR
from refvg.stages.paths import checkpoint_dir, teacher_dir
from refvg.stages.splits import open_split

if TYPE_CHECKING:
    import torch

    from refvg.engine.trainer import TrainResult


def train_method(
    cfg: Config, method: str, on_epoch_end: Callable[[dict, int], None] = lambda m, e: None
) -> TrainResult:
    from refvg.data.dataset import prepared_fingerprint, read_manifest
    from refvg.data.prepare import prepared_path
    from refvg.engine.distributed import env_rank
    from refvg.engine.evaluator import inference_on_dataset
    from refvg.engine.runtime import resolve_device, seed_everything
    from refvg.engine.trainer import train
    from refvg.evaluation import evaluators_for, flatten
    from refvg.models import build_model, model_needs
    from refvg.models.backbones import pretrained_configs
    from refvg.models.registry import is_weakly_supervised

    rcfg = cfg.for_method(method)  # raises for a method params.yaml does not declare
    mcfg = cfg.declared_methods[method]
    prepared = prepared_path(rcfg)
    manifest = read_manifest(prepared)
    blind = {"language_blind": mcfg.language_blind, "image_blind": mcfg.image_blind}
    train_set = open_split(rcfg, mcfg.model, "train", training=True, **blind)
    data_version = prepared_fingerprint(prepared)
    if "teacher" in model_needs(mcfg.model, rcfg):
        train_set, teacher_version = with_teacher_features(cfg, method, train_set, prepared)
        data_version += (
            f"+teacher:{teacher_version}"  # a new teacher must not resume the old student
        )
    weak = is_weakly_supervised(mcfg.model)
    # Weak end to end: a weak method validates on the val split's image-sentence pairs (a WeakSplit:
    # no box to read) and best.pt is chosen by its model's box-free criterion, never by Acc@0.5.
    val_set = open_split(rcfg, mcfg.model, "val", training=weak, **blind)
    seed_everything(
        rcfg.train.seed
    )  # before the model exists: its initial weights are part of the run
    model = build_model(
        mcfg.model, rcfg, vocab_size=manifest["vocab_size"], pad_token_id=manifest["pad_token_id"]
    )
    device = resolve_device(rcfg.train.device)
    # A checkpoint folder is self-contained: the tokenizer travels with the weights (written by rank
    # 0 only).
    if env_rank() == 0:
        shutil.copytree(
            prepared / TOKENIZER_DIR,
            checkpoint_dir(cfg, method) / TOKENIZER_DIR,
            dirs_exist_ok=True,
        )

    validation = evaluators_for(
        mcfg.model, rcfg, val_set, rcfg.eval.iou_thresholds, validation=True
    )

    def evaluate(
        m: torch.nn.Module,
    ) -> dict:  # {"acc@0.5": .., "mask/oIoU": ..}, or a weak model's "match_acc"
        return flatten(
            inference_on_dataset(
                m, val_set, validation, rcfg.eval.batch_size, device, rcfg.train.amp
            )
        )

    return train(
        model,
        train_set,
        rcfg,
        checkpoint_dir(cfg, method),
        method=method,
        evaluate=evaluate,
        select_metric=model.select_metric,
        on_epoch_end=on_epoch_end,
        data_version=data_version,
        extra_state={
            "model_name": mcfg.model,
            **blind,
            "vocab_size": manifest["vocab_size"],
            "pad_token_id": manifest["pad_token_id"],
            # the pretrained encoders' configs: load_trained rebuilds them without their folders
            "pretrained_configs": pretrained_configs(model),
        },
    )


def with_teacher_features(cfg: Config, method: str, train_set, prepared: Path):
    """(the train split with the `teacher` stage's cached features in every item, their identity).
    Only methods of `distill_methods` may use them: the others' DVC stages do not depend on the
    teacher."""
    from refvg.config import ConfigError
    from refvg.data.teacher_features import FEATURES_DIR, WithTeacherFeatures

    if method not in cfg.distill_methods:
        raise ConfigError(
            f"method {method!r} distils from the teacher: declare it under distill_methods (not "
            f"methods), so that its DVC stage depends on the `teacher` stage's outputs"
        )
    rcfg = cfg.for_method(method)
    data = WithTeacherFeatures(
        train_set, teacher_dir(rcfg) / FEATURES_DIR, prepared, dim=rcfg.teacher.projection_dim
    )
    return data, data.meta["features_id"]
