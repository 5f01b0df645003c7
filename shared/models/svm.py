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

    def _losses_from_scores(self, scores: np.ndarray, y: np.ndarray, *,
                            with_grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
        signs = 2.0 * y - 1.0
        slack = np.maximum(0.0, 1.0 - signs * scores)
        losses = slack if self.loss == "hinge" else slack * slack
        if not with_grad:
            return losses, None
        if self.loss == "hinge":
            return losses, np.where(slack > 0.0, -signs, 0.0)
        return losses, -2.0 * signs * slack
