"""Visual and text encoders built from `transformers`: a pretrained name/folder, or a small config.

Small configs keep the default pipeline runnable on a CPU with no model hub; `pretrained` swaps in
the real weights without touching the grounding models, which only see feature maps and token
features.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    ResNetConfig,
    ResNetModel,
    SwinConfig,
    SwinModel,
)

from refvg.config import TextConfig, VisualConfig

SWIN_PATCH = 4

# While a trained checkpoint is rebuilt (refvg.engine.checkpoint.load_trained): `pretrained` name ->
# the config.to_dict() its training loaded. The architecture is built from that (no download, no
# folder needed); the checkpoint's state dict then brings every weight.
_STORED_CONFIGS: ContextVar[dict | None] = ContextVar("stored_pretrained_configs", default=None)


@contextmanager
def from_stored_configs(configs: dict):
    """Build pretrained encoders from `configs` (what `pretrained_configs` returned at training)
    instead of from_pretrained."""
    token = _STORED_CONFIGS.set(configs)
    try:
        yield
    finally:
        _STORED_CONFIGS.reset(token)


def pretrained_configs(model: nn.Module) -> dict:
    """{pretrained name: its config as a plain dict} of every encoder of `model` that loaded one:
    stored in a training checkpoint, so the model rebuilds without the pretrained folder/hub."""
    return {
        m.source: json.loads(m.body.config.to_json_string(use_diff=False))
        for m in model.modules()
        if isinstance(m, _Frozen) and m.source is not None
    }


def _load(auto_class, name: str, **kwargs):
    """`auto_class.from_pretrained(name)`, or, while rebuilding a trained checkpoint, the same
    architecture from its stored config with untrained weights (the checkpoint overwrites them)."""
    stored = _STORED_CONFIGS.get()
    if stored is None:
        return auto_class.from_pretrained(name, **kwargs)
    if name not in stored:
        raise ValueError(f"the checkpoint stores no config of its pretrained {name!r}")
    from transformers import AutoConfig

    raw = dict(stored[name])
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    build = (
        getattr(auto_class, "from_config", None) or auto_class._from_config
    )  # Auto* | a model class
    return build(config, **kwargs)


class _Frozen(nn.Module):
    """Base for encoders that may be frozen: frozen weights also keep BatchNorm/dropout in eval
    mode, otherwise running statistics would still drift while 'frozen'."""

    frozen: bool = False
    source: str | None = None  # the `pretrained` it loaded (None: a small config, from scratch)

    def _freeze(self, module: nn.Module) -> None:
        self.frozen = True
        for p in module.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode and not self.frozen)
        return self


class VisualBackbone(_Frozen):
    """pixel_values [B,3,H,W] -> feature maps [B,C_i,H_i,W_i], one per `out_stages` entry.

    Runs stage by stage, so a caller can refine each stage's map before the next stage sees it
    (`modulate(stage, map) -> map`: QRNet's query-aware attention). Swin's maps are channels-last
    views of its tokens (not contiguous: `.reshape`, not `.view`). Stages after the last one in
    `out_stages` are dropped at build time: they would cost compute and leave grad-less parameters
    (DDP)."""

    def __init__(self, cfg: VisualConfig, image_size: int = 128):
        super().__init__()
        self.kind = cfg.kind
        self.source = cfg.pretrained
        self.out_stages = tuple(cfg.out_stages)
        if cfg.kind == "resnet":
            self.body = _resnet(cfg)
            c = self.body.config
            first = 2 if c.downsample_in_first_stage else 1
            channels = list(c.hidden_sizes)
            strides = [4 * first * 2**i for i in range(len(channels))]
        else:
            self.body = _swin(cfg, image_size)
            c = self.body.config
            channels = [c.embed_dim * 2**i for i in range(len(c.depths))]
            strides = [c.patch_size * 2**i for i in range(len(c.depths))]
        n = len(channels)
        if not self.out_stages or any(not 0 <= s < n for s in self.out_stages):
            raise ValueError(
                f"out_stages {self.out_stages} invalid for a {cfg.kind} with {n} stages"
            )
        self.stage_channels = channels[: max(self.out_stages) + 1]
        self.out_channels = [channels[s] for s in self.out_stages]
        self.strides = [strides[s] for s in self.out_stages]
        self.num_stages = len(self.stage_channels)
        self._drop_unused_stages(n)
        if cfg.freeze:
            self._freeze(self.body)

    def _drop_unused_stages(self, total: int) -> None:
        keep = self.num_stages
        if self.kind == "resnet":
            del self.body.encoder.stages[keep:]
            self.body.pooler = None
            return
        del self.body.encoder.layers[keep:]
        if keep < total:
            # The kept last stage's patch merging fed a dropped stage; the final LayerNorm is sized
            # for the model's true last stage, which is gone.
            self.body.encoder.layers[-1].downsample = None
            self.body.layernorm = None

    def forward(self, pixel_values: torch.Tensor, modulate=None) -> list[torch.Tensor]:
        wanted = set(self.out_stages)
        maps: dict[int, torch.Tensor] = {}
        if self.kind == "resnet":
            x = self.body.embedder(pixel_values)
            for i, stage in enumerate(self.body.encoder.stages):
                x = stage(x)
                if modulate is not None:
                    x = modulate(i, x)
                if i in wanted:
                    maps[i] = x
            return [maps[s] for s in self.out_stages]
        tokens, (h, w) = self.body.embeddings(pixel_values)
        for i, stage in enumerate(self.body.encoder.layers):
            for block in stage.blocks:
                tokens = block(tokens, (h, w))[0]
            if i == len(self.body.encoder.layers) - 1 and self.body.layernorm is not None:
                tokens = self.body.layernorm(
                    tokens
                )  # the pretrained model's final norm, kept trained
            b, _, c = tokens.shape
            # The map is a channels-last view of the tokens, and a channels-last map's pixels x
            # channels view is the tokens again: no layout copy either way (a contiguous map from
            # `modulate` is copied once here).
            fmap = tokens.view(b, h, w, c).permute(0, 3, 1, 2)
            if modulate is not None:
                fmap = modulate(i, fmap)
                tokens = fmap.permute(0, 2, 3, 1).reshape(b, h * w, c)
            if i in wanted:
                maps[i] = fmap
            if stage.downsample is not None:
                tokens = stage.downsample(tokens, (h, w))
                h, w = (h + 1) // 2, (w + 1) // 2
        return [maps[s] for s in self.out_stages]


def _resnet(cfg: VisualConfig) -> ResNetModel:
    if cfg.pretrained is not None:
        return _load(ResNetModel, cfg.pretrained)
    config = ResNetConfig(
        embedding_size=cfg.hidden_sizes[0],
        hidden_sizes=list(cfg.hidden_sizes),
        depths=list(cfg.depths),
        layer_type="basic",
    )
    return ResNetModel(config)


def _swin(cfg: VisualConfig, image_size: int) -> SwinModel:
    if cfg.pretrained is not None:
        return _load(SwinModel, cfg.pretrained, attn_implementation="sdpa", add_pooling_layer=False)
    if len(cfg.num_heads) != len(cfg.depths):
        raise ValueError(
            f"swin needs one num_heads entry per stage: {cfg.num_heads} vs depths {cfg.depths}"
        )
    # Largest window <= 7 that tiles the last stage exactly; earlier stages are multiples of it,
    # so no stage pays for window padding.
    last = max(1, image_size // (SWIN_PATCH * 2 ** (len(cfg.depths) - 1)))
    window = max(w for w in range(1, min(7, last) + 1) if last % w == 0)
    config = SwinConfig(
        image_size=image_size,
        patch_size=SWIN_PATCH,
        embed_dim=cfg.embed_dim,
        depths=list(cfg.depths),
        num_heads=list(cfg.num_heads),
        window_size=window,
        drop_path_rate=cfg.drop_path_rate,
        attn_implementation="sdpa",
    )
    return SwinModel(config, add_pooling_layer=False)


def build_visual_backbone(cfg: VisualConfig, image_size: int = 128) -> VisualBackbone:
    """`image_size` only shapes the small Swin config (window size); pretrained models ignore it."""
    return VisualBackbone(cfg, image_size)


class TextEncoder(_Frozen):
    """(input_ids [B,L], attention_mask [B,L]) -> token features [B,L,hidden_size]."""

    def __init__(
        self, cfg: TextConfig, vocab_size: int, pad_token_id: int, max_positions: int = 64
    ):
        super().__init__()
        self.source = cfg.pretrained
        if cfg.pretrained is not None:
            self.body = _load(AutoModel, cfg.pretrained, attn_implementation="sdpa")
            if getattr(self.body, "pooler", None) is not None:
                self.body.pooler = None  # unused; would leave grad-less parameters under DDP
            rows = self.body.get_input_embeddings().num_embeddings
            if vocab_size > rows:
                raise ValueError(
                    f"tokenizer has {vocab_size} ids but {cfg.pretrained} embeds only {rows}; "
                    "use the tokenizer that belongs to the pretrained text model"
                )
        else:
            config = bert_config(cfg, vocab_size, pad_token_id, max_positions)
            self.body = BertModel(config, add_pooling_layer=False)
        self.hidden_size = self.body.config.hidden_size
        if cfg.freeze:
            self._freeze(self.body)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def bert_config(
    cfg: TextConfig, vocab_size: int, pad_token_id: int, max_positions: int = 64
) -> BertConfig:
    """The small BERT of `model.text` (from scratch, or what the `pretrain` stage trains)."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(64, max_positions),
        pad_token_id=pad_token_id,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        attn_implementation="sdpa",
    )


def build_text_encoder(
    cfg: TextConfig, vocab_size: int, pad_token_id: int, max_positions: int = 64
) -> TextEncoder:
    return TextEncoder(cfg, vocab_size, pad_token_id, max_positions)
