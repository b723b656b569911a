"""Model registry: a method name in params.yaml -> the builder that makes its nn.Module, and what the model
needs from the prepared data beyond the image, the expression and the box (e.g. target masks)."""
from __future__ import annotations

from typing import Callable, Union

from torch import nn

Builder = Callable[..., nn.Module]  # (cfg: Config, vocab_size: int, pad_token_id: int) -> nn.Module
# What a model needs from the data: fixed, or decided by its run config (cfg -> needs), e.g. EpmVG needs the
# teacher's features only while a distillation weight is non-zero.
Needs = Union[tuple[str, ...], Callable[..., tuple[str, ...]]]
_MODELS: dict[str, Builder] = {}
_NEEDS: dict[str, Needs] = {}
# What a model can ask the data for: "masks" is an option of refvg.data.dataset.PreparedSplit, "teacher" the
# cached features of the `teacher` stage (refvg.data.teacher_features).
DATA_NEEDS = frozenset({"masks", "teacher"})


def register_model(name: str, needs: Needs = ()) -> Callable[[Builder], Builder]:
    unknown = set() if callable(needs) else set(needs) - DATA_NEEDS
    if unknown:
        raise ValueError(f"model {name!r} needs {sorted(unknown)}; the data provides {sorted(DATA_NEEDS)}")

    def decorator(fn: Builder) -> Builder:
        if name in _MODELS and _MODELS[name] is not fn:
            raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__module__})")
        _MODELS[name] = fn
        _NEEDS[name] = needs if callable(needs) else frozenset(needs)
        return fn

    return decorator


def build_model(name: str, cfg, vocab_size: int, pad_token_id: int) -> nn.Module:
    _check(name)
    return _MODELS[name](cfg, vocab_size, pad_token_id)


def model_needs(name: str, cfg=None) -> frozenset[str]:
    """What the model trains on besides image, expression and box, e.g. {"masks"}; `cfg` (the method's run
    config) is required for a model whose needs depend on it."""
    _check(name)
    needs = _NEEDS[name]
    if not callable(needs):
        return needs
    if cfg is None:
        raise ValueError(f"what model {name!r} needs from the data depends on its config; pass it")
    found = frozenset(needs(cfg))
    if found - DATA_NEEDS:
        raise ValueError(f"model {name!r} needs {sorted(found - DATA_NEEDS)}; the data provides {sorted(DATA_NEEDS)}")
    return found


def list_models() -> list[str]:
    return sorted(_MODELS)


def _check(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models()) or '(none)'}")
