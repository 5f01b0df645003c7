"""Models Baton can train, looked up by the name a job spec gives."""

from __future__ import annotations

from shared.models.base import Model
from shared.models.logistic import LogisticRegression

MODELS: dict[str, type[Model]] = {
    LogisticRegression.name: LogisticRegression,
}


def get_model_class(name: str) -> type[Model]:
    """Return the model class registered under ``name``; raise ``KeyError`` if unknown."""
    return MODELS[name]


__all__ = ["MODELS", "Model", "get_model_class", "LogisticRegression"]
