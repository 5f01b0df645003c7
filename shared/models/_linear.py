"""The base of models that score a row by ``x . w + b``."""

from __future__ import annotations

import numpy as np

from shared.models._penalty import ElasticNetPenalty
from shared.models.base import Model


# Up to this many stored values, a CSR gradient is summed with numpy.bincount rather than
# scipy's product with the transpose, whose fixed cost dominates small batches. Measured on
# a9a rows (numpy 2.4, scipy 1.17, 2-core AMD EPYC): bincount took 8 us and scipy 16 us for
# 1,775 values, and the two were even at about 10,000 values.
BINCOUNT_MAX_VALUES = 8192


class LinearModel(Model):
    """A model whose score is ``x . w + b``, with parameters ``[w_1, ..., w_n_features, b]``.

    Subclasses give the per-row loss of the scores in :meth:`_losses_from_scores`. A
    subclass with one score per class, such as softmax regression, overrides
    :attr:`n_params`, :attr:`_weights_slice`, :meth:`_scores` and
    :meth:`_gradient_from_residuals`, and keeps the penalty, :meth:`loss_grad` and
    :meth:`proximal` of this class.

    Parameters
    ----------
    n_features : int
        Number of input columns, >= 1.
    n_classes : int, default=2
        Ignored, because a linear model has one score per row.
    alpha : float, default=0.0
        Strength of the penalty on ``w``, >= 0. The bias ``b`` is never penalised.
    penalty : {"l2", "l1", "elasticnet"}, default="l2"
        Penalty ``alpha * (r * ||w||_1 + (1 - r) / 2 * ||w||^2)`` with ``r`` = 0 for
        ``"l2"``, 1 for ``"l1"`` and ``l1_ratio`` for ``"elasticnet"``.
    l1_ratio : float, default=0.15
        Share of the L1 term for ``penalty="elasticnet"``, in [0, 1].
    l1_method : {"subgradient", "proximal"}, default="subgradient"
        ``"subgradient"`` puts ``alpha * r * sign(w)`` into :meth:`penalty_grad`.
        ``"proximal"`` leaves it out and soft-thresholds ``w`` in :meth:`proximal`
        instead, which gives exact zeros but needs a training loop that calls
        :meth:`proximal` after every step.
    target_scale : float, default=1.0
        For a regressor trained on targets divided by it: the L1 coefficient is divided
        by it too, so the minimiser is the unscaled problem's divided by it
        (:class:`~shared.models._penalty.ElasticNetPenalty`).
    """

    def __init__(self, n_features: int, n_classes: int = 2, alpha: float = 0.0, penalty: str = "l2",
                 l1_ratio: float = 0.15, l1_method: str = "subgradient", **hyperparameters):
        super().__init__(n_features, n_classes, alpha, **hyperparameters)
        self.penalty = penalty
        self.l1_ratio = l1_ratio
        self.l1_method = l1_method
        self._penalty = ElasticNetPenalty(self.alpha, penalty, l1_ratio, l1_method, self.target_scale)

    @property
    def n_params(self) -> int:
        return self.n_features + 1

    @property
    def _weights_slice(self) -> slice:
        """Slice of the parameter vector with the weights, the only part the penalty applies to.

        The biases follow it, up to the end of the vector.
        """
        return slice(0, self.n_features)

    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        # Every linear loss here is convex, so zeros are a fine and reproducible start.
        return np.zeros(self.n_params, dtype=np.float64)

    def decision_function(self, params: np.ndarray, X) -> np.ndarray:
        """Return the scores ``X @ w + b``, shape ``(n_samples,)``.

        A subclass with one score per class returns shape ``(n_samples, n_classes)``.
        """
        return self._scores(self._check_params(params), self._check_X(X))

    def loss_grad(self, params: np.ndarray, X, y: np.ndarray,
                  sample_weight: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        params = self._check_params(params)
        X = self._check_X(X)
        sample_weight = self._check_sample_weight(sample_weight, X.shape[0])
        losses, residuals = self._losses_from_scores(self._scores(params, X), y, with_grad=True)
        assert residuals is not None  # with_grad=True returns the derivative
        if sample_weight is not None:
            losses *= sample_weight
            # Residuals with one column per class take their row's weight in every column.
            residuals *= sample_weight if residuals.ndim == 1 else sample_weight[:, np.newaxis]
        return float(np.add.reduce(losses)), self._gradient_from_residuals(X, residuals)

    def penalty_grad(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        weights = self._weights_slice
        value, weights_grad = self._penalty.value_grad(params[weights])
        grad = np.zeros_like(params)
        grad[weights] = weights_grad
        return value, grad

    def proximal(self, params: np.ndarray, step: float) -> np.ndarray:
        """Soft-threshold the weights when ``l1_method="proximal"``, leaving the biases as they are."""
        if self._penalty.l1_method != "proximal":
            return params
        weights = self._weights_slice
        result = params.copy()
        result[weights] = self._penalty.proximal(params[weights], step)
        return result

    def rescaled_output_params(self, params: np.ndarray, scale: float, offset: float) -> np.ndarray:
        # Every parameter is a weight or a bias of the one, output, layer.
        rescaled = self._check_params(params) * scale
        rescaled[self._weights_slice.stop:] += offset
        return rescaled

    def _scores(self, params: np.ndarray, X) -> np.ndarray:
        # X is already float64 here, so the product is accumulated in float64.
        scores = X @ params[:-1]
        if not isinstance(scores, np.ndarray) or scores.ndim != 1:
            scores = np.asarray(scores).ravel()
        scores += params[-1]
        return scores

    def _gradient_from_residuals(self, X, residuals: np.ndarray) -> np.ndarray:
        """Return the parameter gradient given ``d loss / d score`` of every row."""
        grad = np.empty(self.n_params, dtype=np.float64)
        if isinstance(X, np.ndarray):
            # The same BLAS product, written into the gradient instead of a temporary.
            np.matmul(X.T, residuals, out=grad[:-1])
        elif X.format == "csr" and X.nnz <= BINCOUNT_MAX_VALUES:
            # Each value times its row's residual, summed per column. bincount adds the
            # products in storage order, as scipy's X.T @ residuals does, so the sums are
            # the same bits, without building the transposed matrix.
            row_residuals = np.repeat(residuals, np.diff(X.indptr))
            grad[:-1] = np.bincount(X.indices, weights=X.data * row_residuals, minlength=grad.size - 1)
        else:
            grad[:-1] = np.asarray(X.T @ residuals).ravel()
        grad[-1] = np.add.reduce(residuals)
        return grad
