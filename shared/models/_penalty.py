"""The elastic-net penalty shared by the linear models."""

from __future__ import annotations

import math

import numpy as np

from shared.errors import JobSpecError

PENALTIES = ("l2", "l1", "elasticnet")
L1_METHODS = ("subgradient", "proximal")


class ElasticNetPenalty:
    """The penalty ``alpha * (r * ||w||_1 + (1 - r) / 2 * ||w||^2)`` on a weight vector.

    With ``penalty="l2"`` the ratio ``r`` is 0, with ``"l1"`` it is 1, and with
    ``"elasticnet"`` it is ``l1_ratio``. This is the parametrisation of scikit-learn's
    ``ElasticNet`` and ``SGDClassifier``.

    Parameters
    ----------
    alpha : float
        Overall strength, >= 0.
    penalty : {"l2", "l1", "elasticnet"}, default="l2"
    l1_ratio : float, default=0.15
        Share ``r`` of the L1 term for ``penalty="elasticnet"``, in [0, 1].
    l1_method : {"subgradient", "proximal"}, default="subgradient"
        How the L1 term enters training. ``"subgradient"`` adds ``alpha * r * sign(w)``
        to the gradient, which never makes a weight exactly zero. ``"proximal"`` leaves
        the L1 term out of the gradient and applies it by soft-thresholding in
        :meth:`proximal`, which the training loop must then call after each step.
    target_scale : float, default=1.0
        The scale ``s`` the regression targets were divided by, > 0. The L1 coefficient
        becomes ``alpha * r / s`` and the L2 coefficient stays ``alpha * (1 - r)``. The
        weights of the scaled problem are the original ones divided by ``s``, so its
        squared error and L2 term are the original ones divided by ``s ** 2``, and so is
        the L1 term with this coefficient. Its minimiser is then the original minimiser
        divided by ``s``.

    Notes
    -----
    The subgradient at a weight of exactly 0 is taken as 0.
    """

    def __init__(self, alpha: float, penalty: str = "l2", l1_ratio: float = 0.15, l1_method: str = "subgradient",
                 target_scale: float = 1.0):
        if penalty not in PENALTIES:
            raise JobSpecError("model.penalty", f"got {penalty!r}; expected one of {', '.join(map(repr, PENALTIES))}")
        if l1_method not in L1_METHODS:
            raise JobSpecError("model.l1_method",
                               f"got {l1_method!r}; expected one of {', '.join(map(repr, L1_METHODS))}")
        l1_ratio = float(l1_ratio)
        if not (math.isfinite(l1_ratio) and 0.0 <= l1_ratio <= 1.0):
            raise JobSpecError("model.l1_ratio", f"got {l1_ratio!r}; expected a number in [0, 1]")

        self.alpha = float(alpha)
        self.penalty = penalty
        self.l1_ratio = l1_ratio
        self.l1_method = l1_method
        self.l1_share = {"l2": 0.0, "l1": 1.0, "elasticnet": l1_ratio}[penalty]
        self.target_scale = float(target_scale)

    @property
    def l1_strength(self) -> float:
        """Coefficient of ``||w||_1`` in the penalty."""
        return self.alpha * self.l1_share / self.target_scale

    @property
    def l2_strength(self) -> float:
        """Coefficient ``c`` of ``c / 2 * ||w||^2`` in the penalty."""
        return self.alpha * (1.0 - self.l1_share)

    def value_grad(self, weights: np.ndarray) -> tuple[float, np.ndarray]:
        """Return the penalty of ``weights`` and its gradient.

        With ``l1_method="proximal"`` both leave out the L1 term, which
        :meth:`proximal` applies instead.
        """
        value = 0.5 * self.l2_strength * float(weights @ weights)
        grad = self.l2_strength * weights
        if self.l1_method == "subgradient" and self.l1_strength > 0.0:
            value += self.l1_strength * float(np.abs(weights).sum())
            grad = grad + self.l1_strength * np.sign(weights)
        return value, grad

    def proximal(self, weights: np.ndarray, step: float) -> np.ndarray:
        """Return ``weights`` soft-thresholded by ``step * l1_strength``.

        This is the proximal operator of the L1 term for a gradient step of size
        ``step``. It returns ``weights`` unchanged unless ``l1_method="proximal"``.
        """
        if self.l1_method != "proximal" or self.l1_strength == 0.0:
            return weights
        threshold = step * self.l1_strength
        return np.sign(weights) * np.maximum(np.abs(weights) - threshold, 0.0)
