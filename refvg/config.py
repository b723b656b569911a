"""Typed configuration: the one place every knob of refvg is declared.

`params.yaml` is parsed into :class:`Config`. Unknown keys and wrong types are rejected with a
message that names the offending key path, so a typo in `dvc exp run -S train.lrr=...` fails loudly
instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from refvg.data.splits import split_vocabulary


class ConfigError(ValueError):
    """params.yaml (or an override) does not describe a valid configuration."""


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads yes/no/on/off as booleans, and pydantic would quietly make them 1/0 for a
        # number.
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation in _NUMBERS:
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value


_NUMBERS = (int, float, Optional[int], Optional[float])


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
    """Where the dataset lives and how it is prepared.

    `format: refer` reads `<root>/<dataset>/refs(<split_by>).p` (or `.json`) and
    `<root>/<dataset>/instances.json`, images under `image_dir` named by COCO `file_name`
    (RefCOCO/+/g: `images/mscoco/images/train2014`,
    RefClef: `images/saiapr_tc-12`). `format: transvg` reads TransVG's split files
    `<root>/<dataset>/<dataset>_<split>.pth` (datasets unc, unc+, gref, gref_umd, referit, flickr).
    """

    format: Literal["refer", "transvg"] = "refer"
    dataset: str = "refshapes"
    root: str = "data/raw"
    split_by: Literal["unc", "umd", "google", "berkeley"] = "unc"  # refer format only
    image_dir: str = "data/raw/refshapes/images"
    prepared_dir: str = "data/prepared"
    image_size: int = Field(64, ge=32)
    max_tokens: int = Field(20, ge=4)
    # null: the dataset's own splits (refvg.data.splits: e.g. refcocog/umd -> train, val, test). A
    # split asked for that the files do not hold is an error.
    splits: Optional[tuple[str, ...]] = None
    # null: REFER's split names for dataset/split_by. Set it only for a dataset whose files use
    # other names.
    split_vocabulary: Optional[tuple[str, ...]] = None
    # "skip": drop a bad record, count it with its reason in the prepare manifest; "error": stop on
    # it.
    on_bad_record: Literal["skip", "error"] = "skip"
    max_expression_chars: int = Field(512, gt=0)

    @model_validator(mode="after")
    def _splits_known(self) -> "DataConfig":
        vocab = self.vocabulary()
        if self.splits is not None:
            unknown = [s for s in self.splits if s not in vocab.splits]
            if unknown:
                raise ValueError(
                    f"splits {unknown} are not splits of {self.dataset} ({self._split_source}); "
                    f"known: {', '.join(vocab.splits)}"
                )
            if "train" not in self.splits:
                raise ValueError("splits must include train")
        return self

    def vocabulary(self):
        return split_vocabulary(self.dataset, self.split_by, self.format, self.split_vocabulary)

    @property
    def _split_source(self) -> str:
        return "split files" if self.format == "transvg" else f"split_by {self.split_by}"


class VisualConfig(_Strict):
    kind: Literal["resnet", "swin"] = "resnet"
    # A Hugging Face name or a local folder saved with save_pretrained; None builds a small config.
    pretrained: Optional[str] = None
    hidden_sizes: tuple[int, ...] = (32, 64, 128)
    depths: tuple[int, ...] = (1, 1, 1)
    embed_dim: int = 32  # swin only
    num_heads: tuple[int, ...] = (2, 4, 8)  # swin only
    # Swin only, small config: stochastic depth. Explicit because transformers' SwinConfig defaults
    # to 0.1, which was on unseen (and made DDP and single-process gradients differ by ~0.5 %).
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
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
    # TransVG's visual transformer: DETR encoder layers (post-norm, 2-D sine positions on queries
    # and keys) on the CNN's last map, projected to d_model by a 1x1 conv. The paper has 6; 0: none
    # (the CNN map goes straight to the fusion transformer, as in transvg_attn).
    visual_encoder_layers: int = Field(2, ge=0)
    # Positions in the fusion transformer. "query_key" (the paper's): one learned embedding per
    # token slot ([REG], text, visual), added to queries and keys in every post-norm layer.
    # "tokens": 2-D sine (visual), learned (text) and type embeddings added once to the tokens
    # themselves, pre-norm layers (transvg_attn).
    position: Literal["query_key", "tokens"] = "query_key"
    # Append FAOA-style 8-d cell coordinates to each visual token (not in the paper; transvg_attn).
    cell_coords: bool = False
    # "mlp": the paper's head, an MLP on the [REG] output. "attention": [REG] also attends over the
    # fused visual tokens and the box centre is the attention-weighted cell centre plus an MLP
    # offset; it reads location off the feature map instead of decoding it (transvg_attn, with the
    # TransVG family's attention_weight).
    box_head: Literal["mlp", "attention"] = "mlp"
    # Attention head only: the box is read from the cells within this many cells of the attention
    # peak (null: from the whole map). A soft average over the whole map lands between two candidate
    # objects.
    readout_radius: Optional[int] = Field(1, ge=0)


class ProposalsConfig(_Strict):
    """Candidate boxes for the methods that rank candidates (refvg.data.proposals)."""

    # gt: every annotated object of the image (written by `prepare`); detections: the boxes of
    # `detections_file`
    source: Literal["gt", "detections"] = "gt"
    max_candidates: int = Field(16, gt=0)  # per image, the highest-scoring; more are dropped
    match_iou: float = Field(
        0.5, gt=0, le=1
    )  # a candidate is the target when its IoU with it is at least this
    # source "detections": a COCO results JSON ([{image_id, category_id, bbox: [x, y, w, h], score},
    # ...]) over the images of data.root/data.dataset/instances.json, read with pycocotools' loadRes
    detections_file: Optional[str] = None
    min_score: float = Field(0.0, ge=0)  # source "detections": boxes scored below this are dropped

    @model_validator(mode="after")
    def _file_for_detections(self) -> "ProposalsConfig":
        if self.source == "detections" and not self.detections_file:
            raise ValueError("source 'detections' needs detections_file (a COCO results JSON)")
        return self


class DetectionsConfig(_Strict):
    """The `detections` stage: a STAND-IN for a real detector's results file, made by perturbing the
    ground-truth boxes (refvg.data.detections), so the detection-proposal setting runs without a
    detector."""

    # Writes <dir>/<data.dataset>.json (the COCO results JSON) and <dir>/methods/<method>.json, what
    # each method ranks (its proposals settings, and the hash of its detections file): the one file
    # of this folder that dvc.yaml makes a method's training depend on, so only the methods that
    # rank detections rerun when they change.
    dir: str = "data/detections"
    seed: int = 0
    jitter: float = Field(0.1, ge=0, lt=1)  # each box edge moves by N(0, jitter x box side)
    drop_rate: float = Field(0.05, ge=0, lt=1)  # fraction of objects the "detector" misses
    false_positives: int = Field(2, ge=0)  # per image: boxes on background/parts, scored lower
    true_score_min: float = Field(
        0.5, gt=0, lt=1
    )  # kept objects score in [this, 1); false positives below it
    # Fraction of the kept objects reported with a wrong category (another of the dataset's,
    # uniformly), as a real detector's classifier errs; its own seeded stream, so the boxes do not
    # depend on it.
    confusion_rate: float = Field(0.1, ge=0, le=1)


class ModelConfig(_Strict):
    """The sections every model family shares. A family's own knobs (loss weights included) are its
    method entry's `config:`, validated by the config class registered with its model
    (refvg.models)."""

    visual: VisualConfig = VisualConfig()
    text: TextConfig = TextConfig()
    fusion: FusionConfig = FusionConfig()


class TrainConfig(_Strict):
    epochs: int = Field(5, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    lr_backbone: float = Field(1e-3, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(50, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_milestones: tuple[float, ...] = (0.7, 0.9)  # fractions of total steps, for schedule "step"
    # Total-norm clip; a method's auxiliary loss (what its ablation lacks) is clipped apart from the
    # main loss, so adding it never rescales the main term's step. 0 disables (the papers' TransVG).
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA, off on CPU
    num_workers: int = Field(0, ge=0)
    device: str = "auto"
    compile: bool = False
    checkpoint_dir: str = "checkpoints"
    # Crash safety: last.pt is also written every this many steps (0: only at epoch ends), so a
    # killed run loses at most this much work; resume is exact at any step.
    checkpoint_every_steps: int = Field(500, ge=0)
    # A step with a NaN/inf loss or gradient is skipped (no update) and counted; this many in a row
    # stop the run with a clear error, the last good state in last.pt.
    max_bad_steps: int = Field(10, ge=1)


class EvalConfig(_Strict):
    batch_size: int = Field(64, gt=0)
    # Splits scored by the evaluate stage; null: every prepared split but train (the largest split,
    # and it costs more than the rest together; name it to look for overfitting). A split named here
    # that was not prepared is an error.
    splits: Optional[tuple[str, ...]] = None
    iou_thresholds: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    num_qualitative: int = Field(16, ge=0)
    metrics_dir: str = "metrics"
    plots_dir: str = "plots"


class MethodConfig(_Strict):
    """One entry of the `methods` table: a registered model, its family's knobs and what differs for
    it in the shared sections. `base:` names another method whose whole entry this one inherits (a
    chain of bases is allowed): resolved when the params are read, the entry then holds the merged
    values and no `base`."""

    model: str
    # Blind control: the expression is replaced by an empty one, so only the image can be used.
    language_blind: bool = False
    # Its counterpart: every image is blanked (train and eval) to what letterbox padding is (zero
    # pixels, and no padding mask, whose extent would tell the aspect ratio), so only the expression
    # can be used; the box targets are unchanged.
    image_blind: bool = False
    # The family's knobs: a mapping in params.yaml, an instance of the family's config class
    # (registered with the model, e.g. MAttNetConfig) once validated; missing keys take the class's
    # defaults.
    config: Any = Field(default_factory=dict)
    # Partial overrides of the shared sections, e.g. {"train": {"epochs": 20}}.
    overrides: dict[str, Any] = Field(default_factory=dict)


class TeacherConfig(_Strict):
    """The CLIP teacher (stage `teacher`, what EpmVG distils from): a pretrained CLIPModel, used as
    is, or a small one trained contrastively on its own image-caption corpus (refvg.data.captions:
    RefShapes scenes from another random stream, captions of the whole scene, no box), never on the
    grounding splits.

    Its own section, not under `model`: every method's train stage depends on `model`, and a new
    teacher must retrain only the methods that distil from it (`distill_methods`)."""

    # A Hugging Face name or a local folder saved with save_pretrained (its own tokenizer alongside,
    # and it sees our letterboxed images resized to its input size); None: the small config below,
    # trained here.
    pretrained: Optional[str] = None
    out_dir: str = (
        "checkpoints/teacher"  # model/ (save_pretrained + tokenizer) and features/ (cached)
    )
    # Small config: a ViT on the letterboxed data.image_size images and a text transformer over the
    # prepared tokenizer's vocabulary.
    patch_size: int = Field(
        8, gt=0
    )  # 8 at 64 px: the teacher's patch grid = the student's stride-8 grid
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(128, gt=0)
    # Width of the joint embedding = of the cached features; with `pretrained`, set it to that
    # model's projection_dim (e.g. 512): the student's projection heads are built to it.
    projection_dim: int = Field(64, gt=0)
    # Contrastive training (small config only)
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    # The caption corpus (small config only): scenes like `synthetic`'s (size, objects per scene),
    # drawn from the stream SeedSequence([seed, captions.CORPUS_STREAM]); the last `corpus_held_out`
    # score the teacher.
    corpus_images: int = Field(4000, ge=2)
    corpus_held_out: int = Field(500, ge=1)
    captions_per_image: int = Field(2, ge=1)
    seed: int = 0
    max_text_tokens: int = Field(77, ge=4)  # pretrained tokenizer only: CLIP's context length

    @model_validator(mode="after")
    def _corpus_leaves_training_images(self) -> "TeacherConfig":
        if self.corpus_held_out >= self.corpus_images:
            raise ValueError(
                f"corpus_held_out ({self.corpus_held_out}) must be below "
                f"corpus_images ({self.corpus_images}): the rest is what the teacher "
                f"trains on"
            )
        return self


PRETRAINED = ("resnet", "swin", "text")  # the pretrain stage's folders under its out_dir


class PretrainConfig(_Strict):
    """Stage `pretrain`: what every method's `pretrained:` backbone and text encoder start from when
    no hub can be reached. The small models of `model.visual` / `model.text` (their sizes are
    defined there, once) learn from RefShapes scenes of a random stream of their own, never the
    grounding splits: the visual backbones by multi-label classification of what is where in the
    scene, the text encoder by masked language modelling on RefShapes expressions and scene
    captions. Written with save_pretrained, so they load exactly as microsoft/resnet-50 or
    bert-base-uncased would."""

    out_dir: str = "data/pretrained"  # <out_dir>/resnet, swin, text (+ metrics.json)
    models: tuple[Literal[PRETRAINED], ...] = PRETRAINED
    # The corpus: scenes like `synthetic`'s, from SeedSequence([seed, PRETRAIN_STREAM])
    # (refvg.data.pretrain_corpus);
    # the last `held_out` images (and their texts) score the models.
    corpus_images: int = Field(1000, ge=2)
    held_out: int = Field(200, ge=1)
    expressions_per_object: int = Field(
        1, ge=1
    )  # MLM corpus: up to this many per object, all styles
    epochs: int = Field(6, gt=0)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0
    mask_probability: float = Field(0.15, gt=0, lt=1)  # MLM: share of tokens chosen (80/10/10)
    # MLM training sequences: "none", each text alone; "caption", each expression followed by its
    # scene's caption (a masked attribute word has evidence; docs/pretrain.md)
    text_context: Literal["none", "caption"] = "none"

    @model_validator(mode="after")
    def _held_out_leaves_training(self) -> "PretrainConfig":
        if self.held_out >= self.corpus_images:
            raise ValueError(
                f"pretrain.held_out ({self.held_out}) must be below corpus_images "
                f"({self.corpus_images}): the rest is what the models train on"
            )
        return self


class TrackingConfig(_Strict):
    # Default store: an sqlite database in the repo; MLFLOW_TRACKING_URI overrides it.
    tracking_uri: str = "sqlite:///mlruns.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "refvg"
    # Faults: calls the store refused until the stage ended are saved here (python -m refvg.tracking
    # replay)
    unlogged_dir: str = ".refvg/unlogged"
    http_retries: int = Field(
        2, ge=0
    )  # per call to a tracking server (MLflow's default: 7, minutes of backoff)
    http_timeout_s: int = Field(10, gt=0)


class StorageConfig(_Strict):
    """S3, or any S3-compatible store (MinIO, Ceph, moto), for the DVC remote and MLflow's
    artifacts.

    No credentials here, ever: boto3 finds them in the environment (AWS_ACCESS_KEY_ID, ...) or in an
    AWS profile. REFVG_S3_BUCKET, REFVG_S3_PREFIX and REFVG_S3_ENDPOINT_URL override the values
    below."""

    bucket: Optional[str] = None  # None: nothing goes to S3
    prefix: str = (
        "refvg"  # s3://<bucket>/<prefix>/dvc is the DVC remote, .../mlflow the MLflow artifacts
    )
    endpoint_url: Optional[str] = None  # None: AWS itself; e.g. http://127.0.0.1:9000 for a MinIO
    region: str = "us-east-1"
    profile: Optional[str] = None  # an AWS profile (~/.aws/credentials) instead of AWS_* variables
    mlflow_artifacts: bool = (
        True  # experiments created while a bucket is set keep their artifacts in S3
    )
    max_attempts: int = Field(
        5, ge=1
    )  # per request, botocore's "standard" retries (exponential backoff)
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)
    dvc_remote: str = "s3"  # the name `refvg storage setup` gives the DVC remote

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials(cls, value: Optional[str]) -> Optional[str]:
        from urllib.parse import urlsplit

        if value is not None:
            url = urlsplit(value)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError(f"must be an http(s)://host[:port] URL, got {value!r}")
            if url.username or url.password:
                raise ValueError(
                    "must not carry credentials (user:password@); put them in the environment "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or an AWS profile"
                )
        return value


class ParallelConfig(_Strict):
    """How the `prepare` stage spreads its image work; the prepared dataset is identical either
    way."""

    prepare_shards: int = Field(1, ge=1)  # 1: one process, no task mapping (the default pipeline)
    # Where the shards run: "dask" (prefect-dask, one process per worker), "threads" (Prefect's
    # thread pool), or "auto": dask when prefect-dask is installed, else threads.
    prepare_runner: Literal["auto", "dask", "threads"] = "auto"
    prepare_workers: int = Field(2, ge=1)


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
    storage: StorageConfig = StorageConfig()
    parallel: ParallelConfig = ParallelConfig()
    proposals: ProposalsConfig = ProposalsConfig()
    detections: DetectionsConfig = DetectionsConfig()
    teacher: TeacherConfig = TeacherConfig()
    pretrain: PretrainConfig = PretrainConfig()
    # Methods that distil from the teacher: a table of their own so that only their DVC stages
    # depend on the teacher's outputs (dvc.yaml `train_distill` / `evaluate_distill`); otherwise
    # like `methods`.
    distill_methods: dict[str, MethodConfig] = Field(default_factory=dict)
    # Controls of benchmarks/compare.py's pairs that are no paper's own ablation (a blanked image,
    # another backbone, a plain fusion): declared like `methods` and trained by compare.py (or
    # `refvg train`), but not by the default pipeline (dvc.yaml), which keeps to its time budget.
    controls: dict[str, MethodConfig] = Field(default_factory=dict)
    # The method this config runs, set by `for_method` (None in params.yaml): its family config is
    # `family`, and it is part of the run config's dump.
    method: Optional[MethodConfig] = None

    @model_validator(mode="before")
    @classmethod
    def _resolve_bases(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            raw = resolve_method_bases(raw)
        return raw

    @model_validator(mode="after")
    def _method_names_unique(self) -> "Config":
        seen: dict[str, str] = {}
        for table in METHOD_TABLES:
            for name in getattr(self, table):
                if name in seen:
                    raise ValueError(f"method {name!r} declared in both {seen[name]} and {table}")
                seen[name] = table
        return self

    @model_validator(mode="after")
    def _family_configs(self) -> "Config":
        # `config`'s class depends on the entry's `model`, which only the model registry knows
        # (the family config modules import this one, so it is looked up at validation time);
        # each entry's mapping is replaced by its validated instance, errors named by key path.
        problems = []
        tables = [(table, getattr(self, table)) for table in METHOD_TABLES]
        entries = [
            (f"{table}.{name}", entry)
            for table, methods in tables
            for name, entry in methods.items()
        ]
        if self.method is not None:
            entries.append(("method", self.method))
        for where, entry in entries:
            try:
                object.__setattr__(entry, "config", _family_config(entry))
            except ValidationError as err:
                problems += [
                    f"{where}.config.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                    for e in err.errors()
                ]
            except ValueError as err:
                problems.append(f"{where}.model: {err}")
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @model_validator(mode="after")
    def _pretrained_folders_are_written(self) -> "Config":
        # A `pretrained:` inside pretrain.out_dir names one of the pretrain stage's folders; one
        # the stage does not write (pretrain.models lacks it) would fail late, in prepare or train.
        out_dir = Path(self.pretrain.out_dir)
        uses = [("model", self.model.model_dump())]
        uses += [
            (f"{t}.{name}.overrides.model", entry.overrides.get("model") or {})
            for t in METHOD_TABLES
            for name, entry in getattr(self, t).items()
        ]
        problems = []
        for where, model in uses:
            for part in ("visual", "text"):
                folder = (model.get(part) or {}).get("pretrained")
                if folder and Path(folder).parent == out_dir and Path(folder).name in PRETRAINED:
                    if Path(folder).name not in self.pretrain.models:
                        problems.append(
                            f"{where}.{part}.pretrained: {folder} is the pretrain stage's, but "
                            f"pretrain.models {list(self.pretrain.models)} does not write it"
                        )
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @property
    def family(self):
        """The run's family config (an instance of its model's config class); None outside
        `for_method`."""
        return None if self.method is None else self.method.config

    @property
    def all_methods(self) -> dict[str, MethodConfig]:
        """`methods` then `distill_methods`: every method the pipeline trains, evaluates and
        reports."""
        return {**self.methods, **self.distill_methods}

    @property
    def declared_methods(self) -> dict[str, MethodConfig]:
        """Every method of every table, `controls` included: what `for_method` can run."""
        return {**self.all_methods, **self.controls}

    def table_of(self, name: str) -> str:
        """The params table declaring method `name`."""
        return next(t for t in METHOD_TABLES if name in getattr(self, t))

    def for_method(self, name: str) -> "Config":
        """The config a method actually runs with: its overrides merged into the shared sections,
        and its entry as `method` (so `family` is its family config, and a dump of the run config
        holds it)."""
        if name not in self.declared_methods:
            raise ConfigError(
                f"unknown method {name!r}; params.yaml declares {sorted(self.declared_methods)}"
            )
        entry = self.declared_methods[name]
        table = self.table_of(name)
        merged = _deep_merge(self.model_dump(mode="python"), entry.overrides)
        merged["method"] = entry.model_dump(mode="python")
        return _validate(merged, source=f"{table}.{name}.overrides")


def _family_config(entry: MethodConfig):
    """The entry's `config` as its model's family config class (validated; already one: returned as
    is)."""
    from refvg.models.registry import config_class

    family = config_class(entry.model)
    if isinstance(entry.config, family) and type(entry.config) is family:
        return entry.config
    if isinstance(entry.config, BaseModel):
        raise ValueError(
            f"config is a {type(entry.config).__name__}; model {entry.model!r} takes a "
            f"{family.__name__}"
        )
    return family.model_validate(entry.config if entry.config is not None else {})


METHOD_TABLES = ("methods", "distill_methods", "controls")


def resolve_method_bases(raw: dict) -> dict:
    """`raw` (params as read) with every method entry that names a `base:` replaced by the base's
    resolved entry deep-merged with its own keys, `base` dropped: a resolved entry stands alone (a
    dump of one method, or of a table without its bases, still validates). A base may be any method
    of any table; chains are followed. A cycle, an unknown base or a `model:` other than the
    base's raises, naming the key path."""
    entries = {}
    for table in METHOD_TABLES:
        methods = raw.get(table)
        if isinstance(methods, dict):
            for name, entry in methods.items():
                if isinstance(entry, dict):
                    entries[name] = (table, entry)
    if not any("base" in e for _, e in entries.values()):
        return raw
    resolved: dict[str, dict] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> dict:
        if name in resolved:
            return resolved[name]
        table, entry = entries[name]
        if "base" not in entry:
            resolved[name] = entry
            return entry
        base = entry["base"]
        where = f"{table}.{name}.base"
        if not isinstance(base, str):
            raise ValueError(f"{where}: expected a method name, got {base!r}")
        if base in chain or base == name:
            raise ValueError(f"{where}: cycle of bases {' -> '.join((*chain, name, base))}")
        if base not in entries:
            raise ValueError(
                f"{where}: unknown method {base!r}; methods: {', '.join(sorted(entries))}"
            )
        parent = resolve(base, (*chain, name))
        if "model" in entry and "model" in parent and entry["model"] != parent["model"]:
            raise ValueError(
                f"{table}.{name}.model: {entry['model']!r} contradicts its base {base!r}'s model "
                f"{parent['model']!r}"
            )
        merged = _deep_merge(parent, {k: v for k, v in entry.items() if k != "base"})
        resolved[name] = merged
        return merged

    out = dict(raw)
    for table in METHOD_TABLES:
        if isinstance(raw.get(table), dict):
            out[table] = {
                name: (resolve(name, ()) if isinstance(entry, dict) else entry)
                for name, entry in raw[table].items()
            }
    return out


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
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(raw).__name__}"
        )
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            # a check of the whole config names its key paths in its message
            lines.append(
                f"  {where}: {e['msg']}" if where else f"  {e['msg'].removeprefix('Value error, ')}"
            )
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML lets a key appear twice and keeps the last; in params.yaml that silently drops a
    setting."""


def _mapping_without_duplicates(
    loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False
) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def load_config(path: str | Path = "params.yaml") -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file")
    try:
        with path.open(encoding="utf-8") as f:  # a stream, so YAML's errors name the file and line
            raw = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if isinstance(raw, dict) and raw.get("method") is not None:
        raise ConfigError(
            f"{path}: method: is what Config.for_method sets for a run; declare methods under "
            "`methods:` or `distill_methods:`"
        )
    return _validate(raw, source=str(path))
