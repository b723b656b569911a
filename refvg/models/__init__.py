"""Grounding models. Importing a model module registers it, so every model module is imported here."""
from refvg.models.registry import build_model, list_models, model_needs, register_model
from refvg.models import cmsa, qrnet, transvg  # noqa: F401  (each registers its name)
from refvg.models import weak_cam  # noqa: F401

__all__ = ["build_model", "list_models", "model_needs", "register_model"]
