"""Model registry: a method name in params.yaml -> the builder that makes its nn.Module."""
from __future__ import annotations

from typing import Callable

from torch import nn

Builder = Callable[..., nn.Module]  # (cfg: Config, vocab_size: int, pad_token_id: int) -> nn.Module
_MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    def decorator(fn: Builder) -> Builder:
        if name in _MODELS and _MODELS[name] is not fn:
            raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__module__})")
        _MODELS[name] = fn
        return fn

    return decorator


def build_model(name: str, cfg, vocab_size: int, pad_token_id: int) -> nn.Module:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models()) or '(none)'}")
    return _MODELS[name](cfg, vocab_size, pad_token_id)


def list_models() -> list[str]:
    return sorted(_MODELS)
