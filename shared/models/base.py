"""The interface every Baton model implements.

A model is stateless maths over a flat float64 parameter vector, so that optimizers,
checkpoints and aggregation treat every model alike. Workers call :meth:`Model.loss_grad`
on their mini-batch and return sums, not means: the aggregator adds the sums in worker
order and divides once by the total sample count, which keeps the result independent of
how rows were split between workers. The regularisation penalty is applied once per round,
by the aggregator, through :meth:`Model.penalty_grad`.

Two kinds of model exist. Gradient models (``training_mode = "gradient"``) are trained by
an optimizer on the summed gradients. Statistics models (``training_mode = "statistics"``,
for example k-means) instead return sufficient statistics from
:meth:`Model.partial_statistics`, and the aggregator turns the statistics of all workers
into the next parameters with :meth:`Model.combine_statistics`.
"""

from __future__ import annotations

import inspect

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import scipy.sparse as sp

from shared.errors import DataError, JobSpecError, preview_list

# A classifier's distinct training labels are capped: thousands of them usually mean a
# continuous target was given to a classifier.
MAX_CLASSES = 1000

# Labels quoted in an error message; the rest are counted.
LABELS_SHOWN = 10


# The models to suggest for a continuous target given to a classifier.
REGRESSION_MODELS = "linear_regression or mlp_regressor"
# The models to suggest for more than 2 classes given to a binary classifier.
MULTICLASS_MODELS = "softmax_regression or mlp_classifier"


def _has_fractional_labels(classes: np.ndarray) -> bool:
    """Return whether some label is a number that is not whole, as the values of a continuous target are."""
    if not np.issubdtype(classes.dtype, np.floating):
        return False
    return bool(np.any(classes != np.round(classes)))


def _preview_labels(classes: np.ndarray) -> str:
    """Return the first labels of ``classes`` for a message, with the count of the others."""
    return preview_list(classes.tolist(), LABELS_SHOWN)


class Model(ABC):
    """Base class of Baton's models.

    Parameters
    ----------
    n_features : int
        Number of input columns, >= 1.
    n_classes : int, default=2
        Number of classes for classifiers. Regressors and clustering models ignore it.
    alpha : float, default=0.0
        Strength of the L2 penalty ``alpha / 2 * ||w||^2`` on the weights (never the bias),
        >= 0. Subclasses document any other penalty they apply.
    target_scale : float, default=1.0
        The standard deviation that a regressor's training targets were divided by
        (``data.standardize_target``), > 0, or 1.0 when they were used as they are.
        Regressors divide parts of their penalty by powers of it, so that their
        objective on the scaled targets is the objective on the original targets
        divided by ``target_scale ** 2`` (:mod:`shared.target_scaling`). Classifiers and
        k-means always get 1.0.
    **hyperparameters : dict
        Hyperparameters this model does not use. They are stored in ``hyperparameters``
        and otherwise ignored, so one flat model section of a job spec can configure
        every model.
    """

    #: Name used in job specs, for example ``"logistic_regression"``.
    name: ClassVar[str]
    #: ``"binary"``, ``"multiclass"``, ``"regression"`` or ``"clustering"``.
    task: ClassVar[str]
    #: ``"gradient"`` for models trained by an optimizer on :meth:`loss_grad`, or
    #: ``"statistics"`` for models updated by :meth:`combine_statistics`.
    training_mode: ClassVar[str] = "gradient"
    #: Constructor arguments that the model accepts and does not use.
    ignored_arguments: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def spec_fields(cls) -> tuple[str, ...]:
        """Return the ``model`` fields of a job spec that this model reads, besides ``name``."""
        fixed = ("self", "n_features", "n_classes")
        names: list[str] = []
        # Each constructor passes its **hyperparameters on to its base class's, so the
        # fields read are the named arguments of every constructor up the chain.
        for klass in cls.__mro__:
            if "__init__" not in vars(klass) or klass is object:
                continue
            parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
            names += [parameter.name for parameter in parameters if parameter.kind is
                      inspect.Parameter.POSITIONAL_OR_KEYWORD and parameter.name not in fixed + tuple(names)]
            if not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
                break
        if cls.task in ("binary", "multiclass"):
            names.append("class_weight")
        return tuple(name for name in names if name not in cls.ignored_arguments)

    # target_scale is keyword-only, so spec_fields() does not list it: it comes from the
    # data manifest, not from the spec's model section.
    def __init__(self, n_features: int, n_classes: int = 2, alpha: float = 0.0, *, target_scale: float = 1.0,
                 **hyperparameters):
        self.n_features = int(n_features)
        self.n_classes = int(n_classes)
        self.alpha = float(alpha)
        self.target_scale = float(target_scale)
        self.hyperparameters = hyperparameters

        if self.n_features < 1:
            raise DataError(f"model '{self.name}' needs at least 1 feature, got n_features={n_features!r}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0.0):
            raise JobSpecError("model.alpha", f"got {alpha!r}; expected a finite number >= 0")
        if not (math.isfinite(self.target_scale) and self.target_scale > 0.0):
            raise ValueError(f"target_scale must be a finite number > 0, got {target_scale!r}")

    @property
    @abstractmethod
    def n_params(self) -> int:
        """Length of the flat parameter vector."""

    @abstractmethod
    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        """Return the initial parameter vector, shape ``(n_params,)``, float64."""

    @abstractmethod
    def loss_grad(self, params: np.ndarray, X, y: np.ndarray,
                  sample_weight: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """Return the summed data loss over the rows of ``X`` and its gradient.

        Parameters
        ----------
        params : ndarray of shape (n_params,)
        X : ndarray or scipy.sparse.csr_matrix of shape (n_samples, n_features)
            Dense input may be float32, for example a memory map, but sums are taken
            in float64. Sparse input is never densified.
        y : ndarray of shape (n_samples,)
            Encoded targets, as returned by :meth:`encode_targets`.
        sample_weight : ndarray of shape (n_samples,), default=None
            Non-negative weight of each row's loss. None weighs every row 1. Use
            :func:`compute_class_weights` to build class-based weights.

        Returns
        -------
        loss_sum : float
            Weighted sum of the per-row losses, without the penalty.
        grad_sum : ndarray of shape (n_params,)
            Gradient of ``loss_sum`` with respect to ``params``.
        """

    @abstractmethod
    def decision_function(self, params: np.ndarray, X) -> np.ndarray:
        """Return raw scores for the rows of ``X``.

        The shape is ``(n_samples,)`` for binary classifiers and regressors, and
        ``(n_samples, n_outputs)`` for models with one score per class or cluster.
        """

    def metrics(self, params: np.ndarray, X, y: np.ndarray) -> dict[str, float]:
        """Return evaluation metrics on ``(X, y)``: always ``loss``, plus ``accuracy`` or ``r2``.

        ``loss`` is the mean per-row data loss, without the penalty and without sample
        weights. Classifiers return ``loss`` and ``accuracy``, and regressors ``loss``
        (half the mean squared error), ``mse`` and ``r2``. Every metric comes from one call of
        :meth:`decision_function`, without a gradient. Subclasses may return other metrics.
        """
        scores = self.decision_function(params, X)
        if self.task == "regression":
            return regression_metrics(scores, y)

        losses, _ = self._losses_from_scores(scores, y, with_grad=False)
        predicted = self._predict_from_scores(scores)
        return {"loss": float(losses.sum()) / X.shape[0], "accuracy": float(np.mean(predicted == y))}

    def predict(self, params: np.ndarray, X) -> np.ndarray:
        """Return the predicted target of each row, in the encoding of :meth:`encode_targets`.

        Classifiers return int64 class indices, regressors float64 values.
        """
        return self._predict_from_scores(self.decision_function(params, X))

    def _predict_from_scores(self, scores: np.ndarray) -> np.ndarray:
        if self.task == "regression":
            return scores
        if scores.ndim == 1:
            return (scores > 0).astype(np.int64)
        return np.argmax(scores, axis=1).astype(np.int64)

    def _losses_from_scores(self, scores: np.ndarray, y: np.ndarray, *,
                            with_grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Return each row's data loss and, if ``with_grad``, its derivative with respect to the scores.

        Gradient models implement this, and both :meth:`loss_grad` and :meth:`metrics`
        call it, so training and evaluation use the same loss.

        Parameters
        ----------
        scores : ndarray
            Scores as :meth:`decision_function` returns them. They are only read.
        y : ndarray of shape (n_samples,)
            Encoded targets.
        with_grad : bool
            Whether to compute the derivative.

        Returns
        -------
        losses : ndarray of shape (n_samples,)
            Unweighted per-row losses.
        scores_grad : ndarray of the shape of ``scores``, or None
            ``d losses[i] / d scores[i]``, or None when ``with_grad`` is False.
        """
        raise NotImplementedError(f"model '{self.name}' has no per-row loss of its scores")

    def penalty_grad(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        """Return the regularisation penalty and its gradient; zero by default."""
        return 0.0, np.zeros_like(params)

    def proximal(self, params: np.ndarray, step: float) -> np.ndarray:
        """Apply the proximal operator of the non-smooth part of the penalty.

        An optimizer loop that does proximal gradient descent calls this after each
        gradient step, with ``step`` the learning rate of that step. Models whose whole
        penalty goes through :meth:`penalty_grad` return ``params`` unchanged, which is
        the default.

        Parameters
        ----------
        params : ndarray of shape (n_params,)
        step : float
            Learning rate of the gradient step just taken, >= 0.

        Returns
        -------
        params : ndarray of shape (n_params,)
        """
        return params

    def rescaled_output_params(self, params: np.ndarray, scale: float, offset: float) -> np.ndarray:
        """Return parameters whose outputs are ``scale * outputs + offset`` of ``params``' outputs.

        Only the output layer changes: its weights are multiplied by ``scale``, and its
        biases become ``scale * biases + offset``. For a regressor trained on targets
        ``(y - offset) / scale`` this gives the same model in the targets' own units.

        Parameters
        ----------
        params : ndarray of shape (n_params,)
            Not modified.
        scale, offset : float

        Returns
        -------
        params : ndarray of shape (n_params,)
            A new array.

        Raises
        ------
        NotImplementedError
            For models without a linear output layer, such as k-means.
        """
        raise NotImplementedError(f"model '{self.name}' has no linear output layer to rescale")

    def init_params_from_data(self, X, rng: np.random.Generator) -> np.ndarray:
        """Return initial parameters that may depend on a sample of the training rows.

        The default ignores ``X`` and calls :meth:`init_params`. Models whose start
        depends on the data, such as k-means, override it.

        Parameters
        ----------
        X : ndarray or scipy.sparse.csr_matrix of shape (n_samples, n_features)
            A sample of training rows.
        rng : numpy.random.Generator
        """
        return self.init_params(rng)

    def partial_statistics(self, params: np.ndarray, X,
                           sample_weight: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Return the sufficient statistics of the rows of ``X`` for a statistics model.

        Only models with ``training_mode == "statistics"`` implement this.

        Returns
        -------
        statistics : dict of str to ndarray
            Arrays that :meth:`combine_statistics` sums across workers. Every value is
            an ndarray, so the dictionary can be stored with ``numpy.savez``.

        Raises
        ------
        NotImplementedError
            For gradient models.
        """
        raise NotImplementedError(f"model '{self.name}' is trained by gradients; call loss_grad instead")

    def combine_statistics(self, statistics: Sequence[Mapping[str, np.ndarray]],
                           params: np.ndarray) -> np.ndarray:
        """Return the next parameters from the statistics of all workers of a round.

        Parameters
        ----------
        statistics : sequence of dict of str to ndarray
            The outputs of :meth:`partial_statistics`, one per worker, in any order.
        params : ndarray of shape (n_params,)
            The parameters the statistics were computed with.

        Raises
        ------
        NotImplementedError
            For gradient models.
        """
        raise NotImplementedError(f"model '{self.name}' is trained by gradients; use an optimizer step instead")

    def encode_targets(self, y_raw: np.ndarray, classes: np.ndarray | None, source: str | None = None) -> np.ndarray:
        """Map raw labels to the model's encoding.

        Classifiers map each label to its index in ``classes``, which must be sorted as
        :func:`numpy.unique` returns them. Regressors return the
        targets as float64. Clustering models ignore targets and return zeros.
        ``source`` names the file that ``y_raw`` comes from in messages, such as
        ``"validation file 'data/test.csv'"``.
        """
        if self.task == "regression":
            return np.asarray(y_raw, dtype=np.float64)
        if self.task == "clustering":
            return np.zeros(len(y_raw), dtype=np.int64)
        if classes is None:
            raise ValueError(f"model '{self.name}' is a classifier and needs the training classes to encode labels; "
                            "pass classes, as numpy.unique returns them")
        y_raw = np.asarray(y_raw)
        positions = np.searchsorted(classes, y_raw)
        found = positions < len(classes)
        found[found] = classes[positions[found]] == y_raw[found]
        if not found.all():
            row = int(np.flatnonzero(~found)[0])
            where = f"data row {row + 1}" + (f" of {source}" if source else "")
            raise DataError(
                f"label {y_raw[row].item()!r} in {where} is not one of the training classes "
                f"{_preview_labels(classes)}; check that the validation file uses the same labels as the training "
                "file, or remove the rows with other labels")
        return positions.astype(np.int64)

    def check_classes(self, classes: np.ndarray) -> None:
        """Raise :class:`DataError` if the distinct training labels do not fit this model."""
        if self.task == "binary" and len(classes) != 2:
            if _has_fractional_labels(classes):
                advice = ("some are not whole numbers, so if the label is a continuous target, use "
                          f"{REGRESSION_MODELS}, else check data.label_column")
            elif len(classes) > MAX_CLASSES:
                advice = (f"that is more than the {MAX_CLASSES:,} classes any classifier takes, so if the label is a "
                          f"continuous target, such as a price or a count, use {REGRESSION_MODELS}, else check "
                          "data.label_column")
            elif len(classes) > 2:
                advice = f"use a multiclass model ({MULTICLASS_MODELS}) or relabel the data"
            else:
                advice = "check data.label_column and that the training rows contain both classes"
            raise DataError(f"model '{self.name}' needs exactly 2 distinct labels, found {len(classes):,}: "
                            f"{_preview_labels(classes)}; {advice}")
        if self.task == "multiclass" and len(classes) < 2:
            raise DataError(f"model '{self.name}' needs at least 2 distinct labels, found {classes.tolist()}")
        if self.task == "multiclass" and len(classes) > MAX_CLASSES:
            raise DataError(
                f"model '{self.name}' found {len(classes):,} distinct labels {_preview_labels(classes)}, more than "
                f"the {MAX_CLASSES:,} classes a classifier takes; if the label is a continuous target, use "
                f"{REGRESSION_MODELS}, else check data.label_column")

    # Input checks shared by the subclasses.

    def _check_params(self, params: np.ndarray) -> np.ndarray:
        params = np.asarray(params, dtype=np.float64)
        if params.shape != (self.n_params,):
            raise ValueError(
                f"model '{self.name}' expects a parameter vector of shape ({self.n_params},), "
                f"got {params.shape}; check that the checkpoint belongs to this model and data set"
            )
        return params

    def _check_X(self, X):
        """Return ``X`` as float64 rows: a dense ndarray or a CSR matrix, never densified."""
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise DataError(
                f"model '{self.name}' was built for {self.n_features} features, got input of shape {X.shape}; "
                "set data.n_features to the width of the training data"
            )
        if not isinstance(X, np.ndarray) and sp.issparse(X):
            X = X.tocsr()
            if X.dtype == np.float64:
                return X
            # Only the values change type; the float64 matrix shares the column indices
            # and row pointers, which ``astype`` would copy.
            return sp.csr_matrix((X.data.astype(np.float64), X.indices, X.indptr), shape=X.shape, copy=False)
        # NOTE: this copies a float32 batch (such as a memory-mapped shard) into float64,
        # so a worker needs memory for one float64 copy of its mini-batch.
        return np.asarray(X, dtype=np.float64)

    @staticmethod
    def _check_sample_weight(sample_weight: np.ndarray | None, n_samples: int) -> np.ndarray | None:
        if sample_weight is None:
            return None
        sample_weight = np.asarray(sample_weight, dtype=np.float64)
        if sample_weight.shape != (n_samples,):
            raise ValueError(f"sample_weight must have shape ({n_samples},), got {sample_weight.shape}")
        if not np.all(np.isfinite(sample_weight)) or np.any(sample_weight < 0):
            raise ValueError("sample_weight must contain finite values >= 0")
        return sample_weight


def compute_class_weights(y_encoded: np.ndarray, n_classes: int,
                          class_weight: str | Mapping | Sequence | None) -> np.ndarray:
    """Compute one weight per class from the training labels.

    Multiply each row's loss by the weight of its class, by passing
    ``sample_weight=weights[y]`` to :meth:`Model.loss_grad`, to give rare classes more
    influence.

    Parameters
    ----------
    y_encoded : ndarray of shape (n_samples,)
        Encoded labels in ``0 .. n_classes - 1``, normally the whole training set so that
        every worker uses the same weights.
    n_classes : int
        Number of classes, >= 2.
    class_weight : {"balanced"}, dict, list or None
        - None: every class weighs 1.
        - ``"balanced"``: class ``k`` weighs ``n_samples / (n_classes * count_k)``, so that
          every class contributes the same total weight. This is the rule of
          scikit-learn's ``compute_class_weight`` (checked against version 1.9.1).
        - dict: maps encoded class indices, as int or as decimal string (JSON object keys
          are strings), to weights. Classes not in the dict weigh 1.
        - list of length ``n_classes``: the weight of each class in index order.

    Returns
    -------
    class_weights : ndarray of shape (n_classes,), float64

    Raises
    ------
    JobSpecError
        If ``class_weight`` is malformed, names an unknown class or gives a weight that
        is negative or not finite.
    DataError
        If ``class_weight="balanced"`` and a class has no rows, or a label is out of range.
    """
    y_encoded = np.asarray(y_encoded)
    if y_encoded.size and (y_encoded.min() < 0 or y_encoded.max() >= n_classes):
        raise DataError(
            f"encoded labels must lie in 0..{n_classes - 1}, got values from {y_encoded.min()} to {y_encoded.max()}")

    if class_weight is None:
        return np.ones(n_classes, dtype=np.float64)

    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise JobSpecError("model.class_weight",
                               f"got {class_weight!r}; expected 'balanced', an object of class weights or null")
        counts = np.bincount(y_encoded.astype(np.int64), minlength=n_classes)
        missing = np.flatnonzero(counts == 0)
        if missing.size:
            raise DataError(
                f"class_weight='balanced' needs every class in the training labels, but classes "
                f"{missing.tolist()} have no rows; give explicit class weights instead")
        return len(y_encoded) / (n_classes * counts.astype(np.float64))

    weights = np.ones(n_classes, dtype=np.float64)
    if isinstance(class_weight, Mapping):
        for key, value in class_weight.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise JobSpecError("model.class_weight",
                                   f"key {key!r} is not a class index; use indices 0..{n_classes - 1}") from None
            if not 0 <= index < n_classes:
                raise JobSpecError("model.class_weight",
                                   f"class index {index} is out of range; use indices 0..{n_classes - 1}")
            weights[index] = _parse_weight(value)
    else:
        if len(class_weight) != n_classes:
            raise JobSpecError("model.class_weight",
                               f"got a list of {len(class_weight)} weights; expected one per class ({n_classes})")
        weights[:] = [_parse_weight(value) for value in class_weight]

    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise JobSpecError("model.class_weight", f"got weights {weights.tolist()}; every weight must be finite and >= 0")
    return weights


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


def _parse_weight(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise JobSpecError("model.class_weight", f"got weight {value!r}; expected a number")
    return float(value)
