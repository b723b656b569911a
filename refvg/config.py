"""Typed configuration: the one place every knob of refvg is declared.

`params.yaml` is parsed into :class:`Config`. Unknown keys and wrong types are rejected with a message
that names the offending key path, so a typo in `dvc exp run -S train.lrr=...` fails loudly instead of
being ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SPLITS = ("train", "val", "testA", "testB")


class ConfigError(ValueError):
    """params.yaml (or an override) does not describe a valid configuration."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class SyntheticConfig(_Strict):
    """RefShapes: the procedurally generated dataset written in the RefCOCO layout."""

    num_images: int = Field(1200, gt=0)
    image_size: int = Field(128, ge=64)
    min_objects: int = Field(3, ge=2)
    max_objects: int = Field(4, ge=2)
    expressions_per_ref: int = Field(2, ge=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _objects_range(self) -> "SyntheticConfig":
        if self.max_objects < self.min_objects:
            raise ValueError("max_objects must be >= min_objects")
        return self


class DataConfig(_Strict):
    """Where the REFER-layout dataset lives and how it is prepared.

    Layout read: `<root>/<dataset>/refs(<split_by>).p` (or `refs(<split_by>).json`),
    `<root>/<dataset>/instances.json`, images under `image_dir` named by COCO `file_name`.
    """

    dataset: str = "refshapes"
    root: str = "data/raw"
    split_by: Literal["unc", "umd", "google"] = "unc"
    image_dir: str = "data/raw/refshapes/images"
    prepared_dir: str = "data/prepared"
    image_size: int = Field(64, ge=32)
    max_tokens: int = Field(20, ge=4)
    splits: tuple[str, ...] = SPLITS
    # "skip": drop a bad record, count it with its reason in the prepare manifest; "error": stop on it.
    on_bad_record: Literal["skip", "error"] = "skip"
    max_expression_chars: int = Field(512, gt=0)


class VisualConfig(_Strict):
    kind: Literal["resnet", "swin"] = "resnet"
    # A Hugging Face name or a local folder saved with save_pretrained; None builds a small config.
    pretrained: Optional[str] = None
    hidden_sizes: tuple[int, ...] = (32, 64, 128)
    depths: tuple[int, ...] = (1, 1, 1)
    embed_dim: int = 32  # swin only
    num_heads: tuple[int, ...] = (2, 4, 8)  # swin only
    # Which backbone stages feed the grounding model (0-based); the last is the one TransVG uses.
    out_stages: tuple[int, ...] = (1,)
    freeze: bool = False


class TextConfig(_Strict):
    pretrained: Optional[str] = None  # e.g. "bert-base-uncased" or a local folder
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = Field(1000, ge=50)  # size of the WordPiece vocabulary built offline
    dropout: float = Field(0.0, ge=0, lt=1)  # small config only; a pretrained model keeps its own
    freeze: bool = False


class FusionConfig(_Strict):
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 256
    dropout: float = Field(0.0, ge=0, lt=1)
    # "mlp": the paper's head, an MLP on the [REG] output. "attention": [REG] also attends over the fused
    # visual tokens and the box centre is the attention-weighted cell centre plus an MLP offset; it reads
    # location off the feature map instead of decoding it, and converges several times faster from scratch.
    box_head: Literal["mlp", "attention"] = "attention"
    # Attention head only: the box is read from the cells within this many cells of the attention peak
    # (null: from the whole map). A soft average over the whole map lands between two candidate objects.
    readout_radius: Optional[int] = Field(1, ge=0)


class CMSAConfig(_Strict):
    """CMSA (referring segmentation): one cross-modal self-attention block per backbone level of
    `visual.out_stages`, gated fusion of the levels, an upsampling decoder to mask logits."""

    visual_dim: int = Field(32, gt=0)  # C_v: each level's features are projected to this, then L2-normalised
    word_dim: int = Field(32, gt=0)  # C_l: the same for each word's features
    d_model: int = Field(32, gt=0)  # width of the joint (word, pixel) features inside the self-attention
    num_heads: int = Field(1, gt=0)
    ffn_dim: int = Field(64, gt=0)
    num_layers: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    # One 3x3 conv + 2x upsampling per entry, from the finest CMSA level; the logits are then resized to the
    # letterbox size bilinearly.
    decoder_channels: tuple[int, ...] = (32, 16)
    # Inference: keep only the connected region of the thresholded mask that holds its most confident pixel
    # (for the mask and its box); false: the whole thresholded mask and its tight box.
    keep_peak_component: bool = True


class ModelConfig(_Strict):
    visual: VisualConfig = VisualConfig()
    text: TextConfig = TextConfig()
    fusion: FusionConfig = FusionConfig()
    cmsa: CMSAConfig = CMSAConfig()


class LossConfig(_Strict):
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    # Weight of -log(read-out attention mass inside the target box); only with fusion.box_head "attention".
    attention_weight: float = Field(1.0, ge=0)
    # Mask methods: per-pixel BCE and soft Dice on the letterboxed mask logits (padding excluded).
    mask_bce_weight: float = Field(1.0, ge=0)
    mask_dice_weight: float = Field(1.0, ge=0)


class TrainConfig(_Strict):
    epochs: int = Field(5, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    lr_backbone: float = Field(1e-3, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(50, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_milestones: tuple[float, ...] = (0.7, 0.9)  # fractions of total steps, for schedule "step"
    grad_clip: float = Field(1.0, ge=0)  # 0 disables
    seed: int = 0
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA, off on CPU
    num_workers: int = Field(0, ge=0)
    device: str = "auto"
    compile: bool = False
    checkpoint_dir: str = "checkpoints"
    loss: LossConfig = LossConfig()


class EvalConfig(_Strict):
    batch_size: int = Field(64, gt=0)
    iou_thresholds: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    num_qualitative: int = Field(16, ge=0)
    metrics_dir: str = "metrics"
    plots_dir: str = "plots"


class MethodConfig(_Strict):
    """One entry of the `methods` table: a registered model name plus what differs for it."""

    model: str
    # Blind control: the expression is replaced by an empty one, so only the image can be used.
    language_blind: bool = False
    # Partial overrides of the shared sections, e.g. {"train": {"epochs": 20}}.
    overrides: dict[str, Any] = Field(default_factory=dict)


class TrackingConfig(_Strict):
    # Default store: an sqlite database in the repo; MLFLOW_TRACKING_URI overrides it.
    tracking_uri: str = "sqlite:///mlruns.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "refvg"


class Config(_Strict):
    synthetic: SyntheticConfig = SyntheticConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    methods: dict[str, MethodConfig] = Field(
        default_factory=lambda: {"transvg": MethodConfig(model="transvg")}
    )

    def for_method(self, name: str) -> "Config":
        """The config a method actually runs with: its overrides merged into the shared sections."""
        if name not in self.methods:
            raise ConfigError(f"unknown method {name!r}; params.yaml declares {sorted(self.methods)}")
        overrides = self.methods[name].overrides
        if not overrides:
            return self
        merged = _deep_merge(self.model_dump(mode="python"), overrides)
        return _validate(merged, source=f"methods.{name}.overrides")


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _validate(raw: Any, source: str) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "<top>"
            lines.append(f"  {where}: {e['msg']}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None


def load_config(path: str | Path = "params.yaml") -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return _validate(raw, source=str(path))
