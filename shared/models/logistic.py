"""Binary logistic regression."""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from shared.models._linear import LinearModel
from shared.models._losses import logistic_loss


class LogisticRegression(LinearModel):
    """Binary logistic regression: ``p(y=1 | x) = sigmoid(x . w + b)``.

    The parameter vector is ``[w_1, ..., w_n_features, b]``. Targets are encoded as 0 and 1
    (the first and second of the sorted training classes). The objective minimised over a
    data set of ``n`` rows is ``sum_i log(1 + exp(-s_i z_i)) / n + alpha / 2 * ||w||^2``
    with ``s_i = 2 y_i - 1``, which equals scikit-learn's ``LogisticRegression`` with
    ``C = 1 / (alpha * n)``. Other penalties are described in
    :class:`~shared.models._linear.LinearModel`.
    """

    name = "logistic_regression"
    task = "binary"

    def loss_grad(self, params: np.ndarray, X, y: np.ndarray,
                  sample_weight: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        params = self._check_params(params)
        X = self._check_X(X)
        sample_weight = self._check_sample_weight(sample_weight, X.shape[0])
        scores = self._scores(params, X)
        signs = 2.0 * y - 1.0
        # The margins overwrite the scores, which are needed no further.
        margins = np.multiply(signs, scores, out=scores)
        # d/dz log(1 + exp(-s z)) = -s * sigmoid(-s z).
        losses, residuals = logistic_loss(margins)
        np.multiply(residuals, np.negative(signs, out=signs), out=residuals)
        if sample_weight is not None:
            losses *= sample_weight
            residuals *= sample_weight
        return float(np.add.reduce(losses)), self._gradient_from_residuals(X, residuals)

    def predict_proba(self, params: np.ndarray, X) -> np.ndarray:
        """Return ``p(y = classes[1] | x)`` for each row, shape ``(n_samples,)``."""
        return expit(self.decision_function(params, X))

    def metrics(self, params: np.ndarray, X, y: np.ndarray) -> dict[str, float]:
        n_samples = X.shape[0]
        loss_sum, _ = self.loss_grad(params, X, y)
        predicted = self.predict(params, X)
        return {"loss": loss_sum / n_samples, "accuracy": float(np.mean(predicted == y))}
