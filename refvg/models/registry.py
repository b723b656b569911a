"""Model registry: a model name in params.yaml -> its GroundingModel class, its family's config
class (what a method entry's `config:` is validated by), and what it needs from the prepared data
beyond the image, the expression and the box (e.g. target masks).

Configs and models register apart: a family's config lives in `<family>_config.py` (pydantic only),
its model in `<family>.py` (torch). Validating params.yaml imports the configs alone; building a
model imports the models. Both kinds of built-in module are imported on the first lookup."""

from __future__ import annotations

import importlib
from typing import Callable, Union

# What a model needs from the data: fixed, or decided by its family config (config -> needs), e.g.
# EpmVG needs the teacher's features only while a distillation weight is non-zero.
Needs = Union[tuple[str, ...], Callable[..., tuple[str, ...]]]
_MODELS: dict[str, type] = {}
_CONFIGS: dict[str, type] = {}
_NEEDS: dict[str, Needs] = {}
_WEAK: set[str] = (
    set()
)  # weakly supervised: trained on image-sentence pairs, no target box, mask or id
# What a model can ask the data for: "masks" and "candidates" are options of
# refvg.data.dataset.PreparedSplit, "teacher" the cached features of the `teacher` stage
# (refvg.data.teacher_features).
DATA_NEEDS = frozenset({"masks", "candidates", "teacher"})
BUILTIN_FAMILIES = ("cmsa", "epmvg", "mattnet", "qrnet", "transvg", "weak_cam")


def register_config(name: str) -> Callable[[type], type]:
    """Class decorator: `cls` is the family config of model `name` (it validates a method entry's
    `config:`; the model registered under `name` gets it as its `config_class`)."""

    def decorator(cls: type) -> type:
        if name in _CONFIGS and _CONFIGS[name] is not cls:
            raise ValueError(
                f"model {name!r} already has a config class ({_CONFIGS[name].__qualname__})"
            )
        _CONFIGS[name] = cls
        return cls

    return decorator


def register_model(
    name: str, *, config: type, needs: Needs = (), weak: bool = False
) -> Callable[[type], type]:
    """Class decorator: register a GroundingModel under `name` with its family's config class (which
    becomes its `config_class`; the one `register_config(name)` declared, if any, must be it).
    `needs`: data the model reads beyond image, expression and box; for a `weak` model, at
    evaluation only (its training data carries no target at all, see refvg.data.weak)."""
    from refvg.models.base import GroundingModel

    unknown = set() if callable(needs) else set(needs) - DATA_NEEDS
    if unknown:
        raise ValueError(
            f"model {name!r} needs {sorted(unknown)}; the data provides {sorted(DATA_NEEDS)}"
        )

    def decorator(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, GroundingModel)):
            raise TypeError(f"model {name!r}: register a GroundingModel subclass, got {cls!r}")
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(
                f"model {name!r} is already registered (by {_MODELS[name].__module__})"
            )
        cls.config_class = register_config(name)(config)
        _MODELS[name] = cls
        _NEEDS[name] = needs if callable(needs) else frozenset(needs)
        if weak:
            _WEAK.add(name)
        return cls

    return decorator


def build_model(name: str, cfg, vocab_size: int, pad_token_id: int):
    """The model `name` as run config `cfg` (`Config.for_method`) describes it."""
    return model_class(name).from_config(cfg, vocab_size, pad_token_id)


def model_class(name: str) -> type:
    _check(name)
    return _MODELS[name]


def config_class(name: str) -> type:
    """The family config class a method entry of model `name` is validated by (imports no model)."""
    if name not in _CONFIGS:
        _import_builtins("_config")
    if name not in _CONFIGS:
        _check(name)  # an unknown name: the error lists the models
        raise ValueError(f"model {name!r} registered no config class")
    return _CONFIGS[name]


def model_needs(name: str, cfg=None) -> frozenset[str]:
    """What the model trains on besides image, expression and box, e.g. {"masks"} or {"candidates"};
    `cfg` (the method's run config) is required for a model whose needs depend on its family
    config."""
    _check(name)
    needs = _NEEDS[name]
    if not callable(needs):
        return needs
    if cfg is None:
        raise ValueError(f"what model {name!r} needs from the data depends on its config; pass it")
    found = frozenset(needs(_MODELS[name].family_config(cfg)))
    if found - DATA_NEEDS:
        raise ValueError(
            f"model {name!r} needs {sorted(found - DATA_NEEDS)}; the data "
            f"provides {sorted(DATA_NEEDS)}"
        )
    return found


def is_weakly_supervised(name: str) -> bool:
    """Whether the model trains without any target supervision (image-sentence pairs only)."""
    _check(name)
    return name in _WEAK


def list_models() -> list[str]:
    _import_builtins("")
    return sorted(_MODELS)


def _import_builtins(suffix: str) -> None:
    # suffix "_config": the families' configs; "": their models (which import their configs)
    for family in BUILTIN_FAMILIES:
        importlib.import_module(f"refvg.models.{family}{suffix}")


def _check(name: str) -> None:
    if name not in _MODELS:
        _import_builtins("")
    if name not in _MODELS:
        raise ValueError(
            f"unknown model {name!r}; registered models: {', '.join(list_models()) or '(none)'}"
        )
