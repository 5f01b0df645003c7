"""Multinomial logistic (softmax) regression."""

from __future__ import annotations

import numpy as np
from scipy.special import softmax

from shared.errors import DataError
from shared.models._losses import softmax_cross_entropy
from shared.models._penalty import ElasticNetPenalty
from shared.models.base import Model


class SoftmaxRegression(Model):
    """Multinomial logistic regression: ``p(y=k | x) = softmax(x W + b)_k``.

    The parameter vector is ``W`` of shape ``(n_features, n_classes)`` flattened in C
    order, followed by the ``n_classes`` biases. Targets are class indices
    ``0 .. n_classes - 1``. Over ``n`` rows the objective is
    ``sum_i -log p(y_i | x_i) / n + alpha / 2 * ||W||^2``, which equals scikit-learn's
    multinomial ``LogisticRegression`` with ``C = 1 / (alpha * n)``. The model is
    over-parametrised (adding a constant to every class's column changes nothing), and
    the penalty picks the solution.

    Parameters
    ----------
    n_features : int
        Number of input columns, >= 1.
    n_classes : int, default=2
        Number of classes, >= 2.
    alpha : float, default=0.0
        Penalty strength on ``W``, >= 0. The biases are never penalised.
    penalty : {"l2", "l1", "elasticnet"}, default="l2"
    l1_ratio : float, default=0.15
    l1_method : {"subgradient", "proximal"}, default="subgradient"
        As in :class:`~shared.models._linear.LinearModel`, applied to every entry of ``W``.
    """

    name = "softmax_regression"
    task = "multiclass"

    def __init__(self, n_features: int, n_classes: int = 2, alpha: float = 0.0, penalty: str = "l2",
                 l1_ratio: float = 0.15, l1_method: str = "subgradient", **hyperparameters):
        super().__init__(n_features, n_classes, alpha, **hyperparameters)
        if self.n_classes < 2:
            raise DataError(f"model '{self.name}' needs at least 2 classes, got n_classes={self.n_classes}")
        self.penalty = penalty
        self.l1_ratio = l1_ratio
        self.l1_method = l1_method
        self._penalty = ElasticNetPenalty(self.alpha, penalty, l1_ratio, l1_method)

    @property
    def n_params(self) -> int:
        return (self.n_features + 1) * self.n_classes

    @property
    def _n_weights(self) -> int:
        return self.n_features * self.n_classes

    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        # The loss is convex, so zeros are a fine and reproducible start.
        return np.zeros(self.n_params, dtype=np.float64)

    def unpack(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return views ``W`` of shape (n_features, n_classes) and ``b`` of shape (n_classes,)."""
        weights = params[:self._n_weights].reshape(self.n_features, self.n_classes)
        return weights, params[self._n_weights:]

    def decision_function(self, params: np.ndarray, X) -> np.ndarray:
        """Return the class scores ``X W + b``, shape ``(n_samples, n_classes)``."""
        return self._scores(self._check_params(params), self._check_X(X))

    def predict_proba(self, params: np.ndarray, X) -> np.ndarray:
        """Return class probabilities, shape ``(n_samples, n_classes)``."""
        return softmax(self.decision_function(params, X), axis=1)

    def loss_grad(self, params: np.ndarray, X, y: np.ndarray,
                  sample_weight: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        params = self._check_params(params)
        X = self._check_X(X)
        sample_weight = self._check_sample_weight(sample_weight, X.shape[0])

        losses, scores_grad = softmax_cross_entropy(self._scores(params, X), y)
        if sample_weight is not None:
            losses = losses * sample_weight
            scores_grad = scores_grad * sample_weight[:, np.newaxis]

        grad = np.empty(self.n_params, dtype=np.float64)
        grad[:self._n_weights] = np.asarray(X.T @ scores_grad).ravel()
        grad[self._n_weights:] = scores_grad.sum(axis=0)
        return float(losses.sum()), grad

    def penalty_grad(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        value, weights_grad = self._penalty.value_grad(params[:self._n_weights])
        grad = np.zeros_like(params)
        grad[:self._n_weights] = weights_grad
        return value, grad

    def proximal(self, params: np.ndarray, step: float) -> np.ndarray:
        """Soft-threshold ``W`` when ``l1_method="proximal"``, leaving the biases as they are."""
        if self._penalty.l1_method != "proximal":
            return params
        result = params.copy()
        result[:self._n_weights] = self._penalty.proximal(params[:self._n_weights], step)
        return result

    def metrics(self, params: np.ndarray, X, y: np.ndarray) -> dict[str, float]:
        n_samples = X.shape[0]
        loss_sum, _ = self.loss_grad(params, X, y)
        predicted = self.predict(params, X)
        return {"loss": loss_sum / n_samples, "accuracy": float(np.mean(predicted == y))}

    def _scores(self, params: np.ndarray, X) -> np.ndarray:
        weights, biases = self.unpack(params)
        return np.asarray(X @ weights) + biases
