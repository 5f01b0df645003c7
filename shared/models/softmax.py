"""Multinomial logistic (softmax) regression."""

from __future__ import annotations

import numpy as np
from scipy.special import softmax

from shared.errors import DataError
from shared.models._linear import LinearModel
from shared.models._losses import softmax_cross_entropy


class SoftmaxRegression(LinearModel):
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
    **hyperparameters
        ``penalty``, ``l1_ratio`` and ``l1_method`` as in
        :class:`~shared.models._linear.LinearModel`, applied to every entry of ``W``;
        other names are ignored.
    """

    name = "softmax_regression"
    task = "multiclass"

    def __init__(self, n_features: int, n_classes: int = 2, alpha: float = 0.0, **hyperparameters):
        super().__init__(n_features, n_classes, alpha, **hyperparameters)
        if self.n_classes < 2:
            raise DataError(f"model '{self.name}' needs at least 2 classes, got n_classes={self.n_classes}")

    @property
    def n_params(self) -> int:
        return (self.n_features + 1) * self.n_classes

    @property
    def _weights_slice(self) -> slice:
        return slice(0, self.n_features * self.n_classes)

    def unpack(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return views ``W`` of shape (n_features, n_classes) and ``b`` of shape (n_classes,)."""
        n_weights = self._weights_slice.stop
        return params[:n_weights].reshape(self.n_features, self.n_classes), params[n_weights:]

    def predict_proba(self, params: np.ndarray, X) -> np.ndarray:
        """Return class probabilities, shape ``(n_samples, n_classes)``."""
        return softmax(self.decision_function(params, X), axis=1)

    def _losses_from_scores(self, scores: np.ndarray, y: np.ndarray, *,
                            with_grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
        return softmax_cross_entropy(scores, y, with_grad=with_grad)

    def _scores(self, params: np.ndarray, X) -> np.ndarray:
        weights, biases = self.unpack(params)
        return np.asarray(X @ weights) + biases

    def _gradient_from_residuals(self, X, residuals: np.ndarray) -> np.ndarray:
        """Return the parameter gradient given ``d loss / d scores``, shape ``(n_samples, n_classes)``."""
        n_weights = self._weights_slice.stop
        grad = np.empty(self.n_params, dtype=np.float64)
        grad[:n_weights] = np.asarray(X.T @ residuals).ravel()
        grad[n_weights:] = residuals.sum(axis=0)
        return grad
