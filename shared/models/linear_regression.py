"""Least-squares linear regression with ridge, lasso or elastic-net penalties."""

from __future__ import annotations

import numpy as np

from shared.models._linear import LinearModel


class LinearRegression(LinearModel):
    """Least-squares regression with prediction ``x . w + b``.

    The per-row loss is ``(y - z)^2 / 2``, so over ``n`` rows the objective is
    ``||y - X w - b||^2 / (2 n) + alpha * (r * ||w||_1 + (1 - r) / 2 * ||w||^2)``,
    with ``r`` set by ``penalty`` and ``l1_ratio``. That equals scikit-learn's ``Lasso``
    and ``ElasticNet`` with the same ``alpha`` and ``l1_ratio``, and ``Ridge`` with
    ``alpha_ridge = alpha * n``.

    Parameters
    ----------
    n_features : int
        Number of input columns, >= 1.
    n_classes : int, default=2
        Ignored.
    alpha : float, default=0.0
        Penalty strength, >= 0. 0 is ordinary least squares.
    penalty : {"l2", "l1", "elasticnet"}, default="l2"
        ``"l2"`` is ridge, ``"l1"`` is lasso.
    l1_ratio : float, default=0.15
        Share of the L1 term for ``penalty="elasticnet"``, in [0, 1].
    l1_method : {"subgradient", "proximal"}, default="subgradient"
        With ``"subgradient"`` the L1 term's subgradient ``alpha * r * sign(w)`` is part
        of :meth:`penalty_grad`, so any optimizer can train the model, but weights only
        hover around zero instead of reaching it. With ``"proximal"`` the L1 term is
        left out of :meth:`penalty_grad` and :meth:`proximal` soft-thresholds the
        weights, which gives a sparse lasso solution when the loop calls it after each
        step with that step's learning rate.

    Notes
    -----
    ``metrics`` reports ``loss`` (half the mean squared error, the objective's data term),
    ``mse`` and ``r2``.
    """

    name = "linear_regression"
    task = "regression"

    def loss_grad(self, params: np.ndarray, X, y: np.ndarray,
                  sample_weight: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        params = self._check_params(params)
        X = self._check_X(X)
        sample_weight = self._check_sample_weight(sample_weight, X.shape[0])
        residuals = self._scores(params, X) - y
        losses = 0.5 * residuals * residuals
        if sample_weight is not None:
            losses = losses * sample_weight
            residuals = residuals * sample_weight
        return float(losses.sum()), self._gradient_from_residuals(X, residuals)

    def metrics(self, params: np.ndarray, X, y: np.ndarray) -> dict[str, float]:
        return regression_metrics(self.predict(params, X), y)


def regression_metrics(predicted: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Return ``loss`` (half the MSE), ``mse`` and ``r2`` of ``predicted`` against ``y``.

    ``r2`` is ``1 - SS_res / SS_tot``. For constant ``y`` it is 1.0 when the predictions
    are exact and 0.0 otherwise, as in scikit-learn's ``r2_score``.
    """
    y = np.asarray(y, dtype=np.float64)
    residual_sum_of_squares = float(np.sum((y - predicted) ** 2))
    total_sum_of_squares = float(np.sum((y - y.mean()) ** 2))
    mse = residual_sum_of_squares / len(y)

    if total_sum_of_squares > 0.0:
        r2 = 1.0 - residual_sum_of_squares / total_sum_of_squares
    else:
        r2 = 1.0 if residual_sum_of_squares == 0.0 else 0.0
    return {"loss": 0.5 * mse, "mse": mse, "r2": r2}
