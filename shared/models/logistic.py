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

    def _losses_from_scores(self, scores: np.ndarray, y: np.ndarray, *,
                            with_grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
        signs = 2.0 * y - 1.0
        losses, sigmoid_of_negated = logistic_loss(signs * scores, with_grad=with_grad)
        if not with_grad:
            return losses, None
        assert sigmoid_of_negated is not None  # logistic_loss computes it when with_grad is True
        # d/dz log(1 + exp(-s z)) = -s * sigmoid(-s z).
        scores_grad = np.multiply(sigmoid_of_negated, np.negative(signs, out=signs), out=sigmoid_of_negated)
        return losses, scores_grad

    def predict_proba(self, params: np.ndarray, X) -> np.ndarray:
        """Return ``p(y = classes[1] | x)`` for each row, shape ``(n_samples,)``."""
        return expit(self.decision_function(params, X))

