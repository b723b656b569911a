"""Grounding models. Importing a model module registers it, so every model module is imported
here."""

from refvg.models.base import GroundingModel, GroundingOutput
from refvg.models.registry import (
    build_model,
    config_class,
    list_models,
    model_needs,
    register_model,
)

# each registers its name
from refvg.models import cmsa, epmvg, mattnet, qrnet, transvg, weak_cam  # noqa: F401,E402

__all__ = [
    "GroundingModel",
    "GroundingOutput",
    "build_model",
    "config_class",
    "list_models",
    "model_needs",
    "register_model",
]
