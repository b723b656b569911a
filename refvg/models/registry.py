"""Model registry: a method name in params.yaml -> the builder that makes its nn.Module, and what the model
needs from the prepared data beyond the image, the expression and the box (e.g. target masks)."""
from __future__ import annotations

from typing import Callable

from torch import nn

Builder = Callable[..., nn.Module]  # (cfg: Config, vocab_size: int, pad_token_id: int) -> nn.Module
_MODELS: dict[str, Builder] = {}
_NEEDS: dict[str, frozenset[str]] = {}
_WEAK: set[str] = set()  # weakly supervised: trained on image-sentence pairs, no target box, mask or id
# What a model can ask the data for; each is an option of refvg.data.dataset.PreparedSplit.
DATA_NEEDS = frozenset({"masks", "candidates"})


def register_model(name: str, needs: tuple[str, ...] = (), weak: bool = False) -> Callable[[Builder], Builder]:
    """`needs`: data the model reads beyond image, expression and box; for a `weak` model, at evaluation only
    (its training data carries no target at all, see refvg.data.weak)."""
    unknown = set(needs) - DATA_NEEDS
    if unknown:
        raise ValueError(f"model {name!r} needs {sorted(unknown)}; the data provides {sorted(DATA_NEEDS)}")

    def decorator(fn: Builder) -> Builder:
        if name in _MODELS and _MODELS[name] is not fn:
            raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__module__})")
        _MODELS[name] = fn
        _NEEDS[name] = frozenset(needs)
        if weak:
            _WEAK.add(name)
        return fn

    return decorator


def build_model(name: str, cfg, vocab_size: int, pad_token_id: int) -> nn.Module:
    _check(name)
    return _MODELS[name](cfg, vocab_size, pad_token_id)


def model_needs(name: str) -> frozenset[str]:
    """What the model trains on besides image, expression and box, e.g. {"masks"} or {"candidates"}."""
    _check(name)
    return _NEEDS[name]


def is_weakly_supervised(name: str) -> bool:
    """Whether the model trains without any target supervision (image-sentence pairs only)."""
    _check(name)
    return name in _WEAK


def list_models() -> list[str]:
    return sorted(_MODELS)


def _check(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models()) or '(none)'}")
