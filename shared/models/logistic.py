"""Binary logistic regression with an L2 penalty."""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from shared.models.base import Model


class LogisticRegression(Model):
    """Binary logistic regression: ``p(y=1 | x) = sigmoid(x . w + b)``.

    The parameter vector is ``[w_1, ..., w_n_features, b]``. Targets are encoded as 0 and 1
    (the first and second of the sorted training classes). The objective minimised over a
    data set of ``n`` rows is ``sum_i log(1 + exp(-s_i z_i)) / n + alpha / 2 * ||w||^2``
    with ``s_i = 2 y_i - 1``, which equals scikit-learn's ``LogisticRegression`` with
    ``C = 1 / (alpha * n)``.
    """

    name = "logistic_regression"
    task = "binary"

    @property
    def n_params(self) -> int:
        return self.n_features + 1

    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        # The loss is convex, so zeros are a fine and reproducible start.
        return np.zeros(self.n_params, dtype=np.float64)

    def decision_function(self, params: np.ndarray, X) -> np.ndarray:
        return np.asarray(X @ params[:-1], dtype=np.float64).ravel() + params[-1]

    def loss_grad(self, params: np.ndarray, X, y: np.ndarray) -> tuple[float, np.ndarray]:
        scores = self.decision_function(params, X)
        signs = 2.0 * y - 1.0

        # log(1 + exp(-m)) through logaddexp stays finite for any margin m.
        margins = signs * scores
        loss_sum = float(np.logaddexp(0.0, -margins).sum())

        # d/dz log(1 + exp(-s z)) = -s * sigmoid(-s z); expit never overflows.
        residuals = -signs * expit(-margins)
        grad = np.empty(self.n_params, dtype=np.float64)
        grad[:-1] = np.asarray(X.T @ residuals, dtype=np.float64).ravel()
        grad[-1] = residuals.sum()
        return loss_sum, grad

    def penalty_grad(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        weights = params[:-1]
        grad = np.zeros_like(params)
        grad[:-1] = self.alpha * weights
        return 0.5 * self.alpha * float(weights @ weights), grad

    def predict_proba(self, params: np.ndarray, X) -> np.ndarray:
        """Return ``p(y = classes[1] | x)`` for each row, shape ``(n_samples,)``."""
        return expit(self.decision_function(params, X))

    def metrics(self, params: np.ndarray, X, y: np.ndarray) -> dict[str, float]:
        n_samples = X.shape[0]
        loss_sum, _ = self.loss_grad(params, X, y)
        predicted = (self.decision_function(params, X) > 0).astype(np.int64)
        return {"loss": loss_sum / n_samples, "accuracy": float(np.mean(predicted == y))}
