"""Binary linear support vector machine trained on the primal hinge loss."""

from __future__ import annotations

import numpy as np

from shared.errors import JobSpecError
from shared.models._linear import LinearModel

SVM_LOSSES = ("hinge", "squared_hinge")


class LinearSVM(LinearModel):
    """Binary linear SVM with score ``x . w + b``.

    Targets are encoded as 0 and 1 and used as signs ``s = 2 y - 1``. The per-row loss is
    ``max(0, 1 - s z)`` for ``loss="hinge"`` and ``max(0, 1 - s z)^2`` for
    ``loss="squared_hinge"``, with ``z`` the score. Over ``n`` rows the objective is
    ``sum_i loss_i / n + alpha / 2 * ||w||^2``, which is a soft-margin SVM with
    ``C = 1 / (alpha * n)`` and an unpenalised bias.

    Parameters
    ----------
    n_features : int
        Number of input columns, >= 1.
    n_classes : int, default=2
        Must be 2 when given by the data.
    alpha : float, default=0.0
        Penalty strength, >= 0. An SVM needs ``alpha > 0`` for a maximum-margin solution.
    loss : {"hinge", "squared_hinge"}, default="hinge"
        Per-row loss. The hinge loss has a kink at margin 1, where the gradient used is
        the subgradient 0. The squared hinge is differentiable everywhere.
    **hyperparameters
        ``penalty``, ``l1_ratio`` and ``l1_method`` as in
        :class:`~shared.models._linear.LinearModel`; other names are ignored.
    """

    name = "linear_svm"
    task = "binary"

    def __init__(self, n_features: int, n_classes: int = 2, alpha: float = 0.0, loss: str = "hinge",
                 **hyperparameters):
        super().__init__(n_features, n_classes, alpha, **hyperparameters)
        if loss not in SVM_LOSSES:
            raise JobSpecError("model.loss", f"got {loss!r}; expected one of {', '.join(map(repr, SVM_LOSSES))}")
        self.loss = loss

    def loss_grad(self, params: np.ndarray, X, y: np.ndarray,
                  sample_weight: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        params = self._check_params(params)
        X = self._check_X(X)
        sample_weight = self._check_sample_weight(sample_weight, X.shape[0])
        signs = 2.0 * y - 1.0
        slack = np.maximum(0.0, 1.0 - signs * self._scores(params, X))

        if self.loss == "hinge":
            losses = slack
            residuals = np.where(slack > 0.0, -signs, 0.0)
        else:
            losses = slack * slack
            residuals = -2.0 * signs * slack

        if sample_weight is not None:
            losses = losses * sample_weight
            residuals = residuals * sample_weight
        return float(losses.sum()), self._gradient_from_residuals(X, residuals)

    def metrics(self, params: np.ndarray, X, y: np.ndarray) -> dict[str, float]:
        n_samples = X.shape[0]
        loss_sum, _ = self.loss_grad(params, X, y)
        predicted = self.predict(params, X)
        return {"loss": loss_sum / n_samples, "accuracy": float(np.mean(predicted == y))}
