"""Models Baton can train, looked up by the name a job spec gives."""

from __future__ import annotations

from shared.models.base import Model, compute_class_weights
from shared.models.kmeans import KMeans
from shared.models.linear_regression import LinearRegression
from shared.models.logistic import LogisticRegression
from shared.models.mlp import MLPClassifier, MLPRegressor
from shared.models.softmax import SoftmaxRegression
from shared.models.svm import LinearSVM

MODELS: dict[str, type[Model]] = {
    cls.name: cls
    for cls in (LogisticRegression, SoftmaxRegression, LinearSVM, LinearRegression, MLPClassifier, MLPRegressor,
                KMeans)
}


def get_model_class(name: str) -> type[Model]:
    """Return the model class registered under ``name``; raise ``KeyError`` if unknown."""
    return MODELS[name]


__all__ = [
    "MODELS",
    "Model",
    "compute_class_weights",
    "get_model_class",
    "KMeans",
    "LinearRegression",
    "LinearSVM",
    "LogisticRegression",
    "MLPClassifier",
    "MLPRegressor",
    "SoftmaxRegression",
]
