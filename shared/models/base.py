"""The interface every Baton model implements.

A model is stateless maths over a flat float64 parameter vector, so that optimizers,
checkpoints and aggregation treat every model alike. Workers call :meth:`Model.loss_grad`
on their mini-batch and return sums, not means: the aggregator adds the sums in worker
order and divides once by the total sample count, which keeps the result independent of
how rows were split between workers. The regularisation penalty is applied once per round,
by the aggregator, through :meth:`Model.penalty_grad`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from shared.errors import DataError


class Model(ABC):
    """Base class of Baton's models.

    Parameters
    ----------
    n_features : int
        Number of input columns.
    n_classes : int, default=2
        Number of classes for classifiers; ignored by regressors.
    alpha : float, default=0.0
        Strength of the L2 penalty ``alpha / 2 * ||w||^2`` on the weights (never the bias).
    """

    #: Name used in job specs, for example ``"logistic_regression"``.
    name: ClassVar[str]
    #: ``"binary"``, ``"multiclass"``, ``"regression"`` or ``"clustering"``.
    task: ClassVar[str]

    def __init__(self, n_features: int, n_classes: int = 2, alpha: float = 0.0, **hyperparameters):
        self.n_features = int(n_features)
        self.n_classes = int(n_classes)
        self.alpha = float(alpha)
        self.hyperparameters = hyperparameters

    @property
    @abstractmethod
    def n_params(self) -> int:
        """Length of the flat parameter vector."""

    @abstractmethod
    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        """Return the initial parameter vector, shape ``(n_params,)``, float64."""

    @abstractmethod
    def loss_grad(self, params: np.ndarray, X, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Return the summed data loss over the rows of ``X`` and its gradient.

        Parameters
        ----------
        params : ndarray of shape (n_params,)
        X : ndarray or scipy.sparse.csr_matrix of shape (n_samples, n_features)
        y : ndarray of shape (n_samples,)
            Encoded targets, as returned by :meth:`encode_targets`.

        Returns
        -------
        loss_sum : float
            Sum of the per-row losses, without the penalty.
        grad_sum : ndarray of shape (n_params,)
            Gradient of ``loss_sum`` with respect to ``params``.
        """

    @abstractmethod
    def decision_function(self, params: np.ndarray, X) -> np.ndarray:
        """Return raw scores for the rows of ``X``."""

    @abstractmethod
    def metrics(self, params: np.ndarray, X, y: np.ndarray) -> dict[str, float]:
        """Return evaluation metrics on ``(X, y)``: always ``loss``, plus ``accuracy`` or ``r2``."""

    def penalty_grad(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        """Return the regularisation penalty and its gradient; zero by default."""
        return 0.0, np.zeros_like(params)

    def encode_targets(self, y_raw: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
        """Map raw labels to the model's encoding; regressors return floats unchanged."""
        if self.task == "regression":
            return np.asarray(y_raw, dtype=np.float64)
        lookup = {value: index for index, value in enumerate(classes.tolist())}
        try:
            return np.fromiter((lookup[value] for value in y_raw.tolist()), dtype=np.int64, count=len(y_raw))
        except KeyError as error:
            raise DataError(
                f"label {error.args[0]!r} is not one of the training classes {classes.tolist()}; "
                "check that the validation file uses the same labels as the training file"
            ) from None

    def check_classes(self, classes: np.ndarray) -> None:
        """Raise :class:`DataError` if the distinct training labels do not fit this model."""
        if self.task == "binary" and len(classes) != 2:
            raise DataError(
                f"model '{self.name}' needs exactly 2 distinct labels, found {len(classes)}: "
                f"{classes[:10].tolist()}; use a multiclass model or relabel the data"
            )
        if self.task == "multiclass" and len(classes) < 2:
            raise DataError(f"model '{self.name}' needs at least 2 distinct labels, found {classes.tolist()}")
