"""Grounding models. Nothing heavy is imported here: reading params.yaml needs only the families'
configs (`<family>_config.py`, no torch), so the model modules load on the first name asked for
(`build_model`, `list_models`, ...), and the registry imports every built-in family then."""

from importlib import import_module

_EXPORTS = {
    "GroundingModel": "base",
    "GroundingOutput": "base",
    "build_model": "registry",
    "config_class": "registry",
    "list_models": "registry",
    "model_needs": "registry",
    "register_model": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"refvg.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'refvg.models' has no attribute {name!r}")
