"""Multi-layer perceptrons for classification and regression."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import softmax

from shared.errors import DataError, JobSpecError
from shared.models._losses import softmax_cross_entropy, squared_error
from shared.models.base import Model

ACTIVATIONS = ("relu", "tanh")


class _MultiLayerPerceptron(Model):
    """A fully connected network with one activation on every hidden layer.

    The parameter vector holds, layer by layer from the input, the weight matrix of shape
    ``(fan_in, fan_out)`` flattened in C order and then the ``fan_out`` biases. The
    output layer is linear. The penalty is ``alpha / 2`` times the sum of the squared
    weights of every layer, biases excluded.

    Parameters
    ----------
    n_features : int
        Number of input columns, >= 1.
    n_classes : int, default=2
        Number of classes for the classifier, >= 2; ignored by the regressor.
    alpha : float, default=0.0
        L2 penalty strength, >= 0. scikit-learn's ``MLPClassifier`` (version 1.9.1) divides
        its penalty ``alpha / 2 * ||W||^2`` by the row count, but this one is not divided.
    hidden_layer_sizes : sequence of int, default=(100,)
        Width of each hidden layer, each >= 1. An empty sequence gives a linear model.
    activation : {"relu", "tanh"}, default="relu"
        Activation of the hidden layers.
    target_scale : float, default=1.0
        Keyword-only. The scale ``s`` the regressor's training targets were divided by
        (``data.standardize_target``). The hidden layers' weights then take the penalty
        ``alpha / (2 * s ** 2) * ||W||^2`` and the output layer's keep
        ``alpha / 2 * ||W||^2``. See :class:`MLPRegressor` for what this preserves.
    """

    def __init__(self, n_features: int, n_classes: int = 2, alpha: float = 0.0,
                 hidden_layer_sizes: Sequence[int] = (100,), activation: str = "relu", **hyperparameters):
        super().__init__(n_features, n_classes, alpha, **hyperparameters)
        if activation not in ACTIVATIONS:
            raise JobSpecError("model.activation",
                               f"got {activation!r}; expected one of {', '.join(map(repr, ACTIVATIONS))}")
        if isinstance(hidden_layer_sizes, (str, bytes)) or not isinstance(hidden_layer_sizes, Sequence) or any(
                isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1
                for size in hidden_layer_sizes):
            raise JobSpecError("model.hidden_layer_sizes",
                               f"got {hidden_layer_sizes!r}; expected a list of positive integers such as [64, 32]")

        self.hidden_layer_sizes = tuple(int(size) for size in hidden_layer_sizes)
        self.activation = activation
        self.layer_sizes = (self.n_features, *self.hidden_layer_sizes, self._n_outputs())

        # Offsets of each layer's weights and biases in the flat vector.
        self._layer_slices: list[tuple[slice, slice]] = []
        offset = 0
        for fan_in, fan_out in zip(self.layer_sizes[:-1], self.layer_sizes[1:]):
            weights = slice(offset, offset + fan_in * fan_out)
            biases = slice(weights.stop, weights.stop + fan_out)
            self._layer_slices.append((weights, biases))
            offset = biases.stop
        self._n_params = offset

    def _n_outputs(self) -> int:
        raise NotImplementedError

    @property
    def n_params(self) -> int:
        return self._n_params

    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        """Return Glorot-uniform weights and zero biases.

        Each weight of a layer is drawn from ``U(-limit, limit)`` with
        ``limit = sqrt(6 / (fan_in + fan_out))`` (Glorot and Bengio, 2010).
        """
        params = np.zeros(self.n_params, dtype=np.float64)
        for (fan_in, fan_out), (weights, _) in zip(zip(self.layer_sizes[:-1], self.layer_sizes[1:]),
                                                    self._layer_slices):
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            params[weights] = rng.uniform(-limit, limit, size=fan_in * fan_out)
        return params

    def unpack(self, params: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Return a ``(weights, biases)`` pair of views per layer, from the input layer on."""
        return [
            (params[weights].reshape(fan_in, fan_out), params[biases])
            for (weights, biases), fan_in, fan_out in zip(self._layer_slices, self.layer_sizes[:-1],
                                                          self.layer_sizes[1:])
        ]

    def decision_function(self, params: np.ndarray, X) -> np.ndarray:
        """Return the output layer's values: class scores or the regression prediction."""
        outputs = self._forward(self._check_params(params), self._check_X(X))[-1]
        return self._format_outputs(outputs)

    def _format_outputs(self, outputs: np.ndarray) -> np.ndarray:
        return outputs

    def penalty_grad(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        grad = np.zeros_like(params)
        value = 0.0
        hidden_alpha = self.alpha / self.target_scale ** 2
        for index, (weights, _) in enumerate(self._layer_slices):
            alpha = self.alpha if index == len(self._layer_slices) - 1 else hidden_alpha
            value += 0.5 * alpha * float(params[weights] @ params[weights])
            grad[weights] = alpha * params[weights]
        return value, grad

    def rescaled_output_params(self, params: np.ndarray, scale: float, offset: float) -> np.ndarray:
        rescaled = self._check_params(params).copy()
        weights, biases = self._layer_slices[-1]
        rescaled[weights] *= scale
        rescaled[biases] = rescaled[biases] * scale + offset
        return rescaled

    def loss_grad(self, params: np.ndarray, X, y: np.ndarray,
                  sample_weight: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        params = self._check_params(params)
        X = self._check_X(X)
        sample_weight = self._check_sample_weight(sample_weight, X.shape[0])

        activations = self._forward(params, X)
        outputs = activations[-1]
        losses, scores_grad = self._losses_from_scores(self._format_outputs(outputs), y, with_grad=True)
        assert scores_grad is not None  # with_grad=True returns the derivative
        # The regressor's scores are its single output column, so the reshape adds that column back.
        delta = scores_grad.reshape(outputs.shape)
        if sample_weight is not None:
            losses = losses * sample_weight
            delta = delta * sample_weight[:, np.newaxis]

        # Backpropagation: delta is d loss / d (pre-activation) of the current layer.
        grad = np.empty(self.n_params, dtype=np.float64)
        layers = self.unpack(params)
        for index in range(len(layers) - 1, -1, -1):
            weights_slice, biases_slice = self._layer_slices[index]
            inputs = activations[index]
            grad[weights_slice] = np.asarray(inputs.T @ delta).ravel()
            grad[biases_slice] = delta.sum(axis=0)
            if index > 0:
                delta = (delta @ layers[index][0].T) * self._activation_derivative(activations[index])
        return float(losses.sum()), grad

    def _forward(self, params: np.ndarray, X) -> list:
        """Return the input followed by the output of every layer, so the last entry is the network output."""
        activations = [X]
        layers = self.unpack(params)
        for index, (weights, biases) in enumerate(layers):
            pre_activation = np.asarray(activations[-1] @ weights) + biases
            is_output_layer = index == len(layers) - 1
            activations.append(pre_activation if is_output_layer else self._activate(pre_activation))
        return activations

    def _activate(self, pre_activation: np.ndarray) -> np.ndarray:
        if self.activation == "relu":
            return np.maximum(pre_activation, 0.0)
        return np.tanh(pre_activation)

    def _activation_derivative(self, activated: np.ndarray) -> np.ndarray:
        """Return the activation's derivative, written in terms of its output."""
        if self.activation == "relu":
            return (activated > 0.0).astype(np.float64)
        return 1.0 - activated * activated


class MLPClassifier(_MultiLayerPerceptron):
    """Multi-layer perceptron classifier with a softmax output and cross-entropy loss.

    There is one output per class, also for two classes. Targets are class indices
    ``0 .. n_classes - 1``. See :class:`_MultiLayerPerceptron` for the parameters and the
    parameter layout.
    """

    name = "mlp_classifier"
    task = "multiclass"

    def _n_outputs(self) -> int:
        if self.n_classes < 2:
            raise DataError(f"model '{self.name}' needs at least 2 classes, got n_classes={self.n_classes}")
        return self.n_classes

    def _losses_from_scores(self, scores: np.ndarray, y: np.ndarray, *,
                            with_grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
        return softmax_cross_entropy(scores, y, with_grad=with_grad)

    def predict_proba(self, params: np.ndarray, X) -> np.ndarray:
        """Return class probabilities, shape ``(n_samples, n_classes)``."""
        return softmax(self.decision_function(params, X), axis=1)


class MLPRegressor(_MultiLayerPerceptron):
    """Multi-layer perceptron regressor with one linear output and the loss ``(y - z)^2 / 2``.

    See :class:`_MultiLayerPerceptron` for the parameters and the parameter layout.
    ``metrics`` reports ``loss`` (half the mean squared error), ``mse`` and ``r2``.

    Notes
    -----
    Training on targets ``(y - m) / s`` with ``target_scale=s`` is the same problem as
    training on ``y``. Map parameters to the targets' units with
    :meth:`rescaled_output_params` (``scale=s``, ``offset=m``): that multiplies the
    output layer by ``s`` and leaves the hidden layers alone. The squared error and the
    output layer's penalty are then multiplied by ``s ** 2``, and so is the hidden
    layers' penalty, whose coefficient is ``alpha / s ** 2``. So the objective is the
    unscaled one divided by ``s ** 2`` everywhere, and both have the same minima and
    stationary points. What differs is the path. The start differs, because Glorot
    weights and zero biases are drawn in the scaled units. And in the targets' units, a
    plain gradient step of learning rate ``lr`` on the scaled problem is a step on the
    unscaled objective with learning rate ``lr`` for the output layer but ``lr / s ** 2``
    for the hidden layers. So a job with and a job without ``data.standardize_target``
    end at different weights, and on a non-convex problem they may reach different
    minima.

    NOTE: with ``alpha > 0`` and a small ``s``, the hidden layers' coefficient
    ``alpha / s ** 2`` is large, and a learning rate above about ``2 * s ** 2 / alpha``
    makes plain gradient steps diverge. Such an ``alpha`` also dominates the unscaled
    objective, whose minimum is then close to a constant prediction.
    """

    name = "mlp_regressor"
    task = "regression"

    def _n_outputs(self) -> int:
        return 1

    def _format_outputs(self, outputs: np.ndarray) -> np.ndarray:
        return outputs[:, 0]

    def _losses_from_scores(self, scores: np.ndarray, y: np.ndarray, *,
                            with_grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
        return squared_error(scores, y, with_grad=with_grad)
