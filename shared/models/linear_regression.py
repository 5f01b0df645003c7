"""Least-squares linear regression with ridge, lasso or elastic-net penalties."""

from __future__ import annotations

import numpy as np

from shared.models._linear import LinearModel
from shared.models._losses import squared_error


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
    target_scale : float, default=1.0
        Keyword-only. The scale ``s`` the training targets were divided by
        (``data.standardize_target``). The L1 coefficient is divided by ``s``, so the
        objective is the unscaled objective divided by ``s ** 2`` at ``w / s`` and
        ``(b - mean) / s``. Ridge, lasso and elastic net therefore reach the same
        minimiser, in the targets' units, as without scaling, and plain gradient
        steps (``sgd``, ``momentum``, ``nesterov``) from the same start follow the same
        path.

    Notes
    -----
    ``metrics`` reports ``loss`` (half the mean squared error, the objective's data term),
    ``mse`` and ``r2``.
    """

    name = "linear_regression"
    task = "regression"

    def _losses_from_scores(self, scores: np.ndarray, y: np.ndarray, *,
                            with_grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
        return squared_error(scores, y, with_grad=with_grad)
