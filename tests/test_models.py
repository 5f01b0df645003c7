"""Tests of the model maths: gradients, loss values, conventions and k-means statistics.

Loss values are checked against scikit-learn's metrics, fitted coefficients against
scikit-learn's estimators, and the k-means update against a naive loop implementation.
"""

from __future__ import annotations

import io
import os
import re
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import minimize
from scipy.special import expit, softmax
from sklearn.cluster import KMeans as SklearnKMeans
from sklearn.datasets import load_svmlight_file
from sklearn.linear_model import Lasso as SklearnLasso
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression
from sklearn.linear_model import Ridge as SklearnRidge
from sklearn.metrics import accuracy_score, hinge_loss, log_loss, mean_squared_error, r2_score
from sklearn.utils.class_weight import compute_class_weight

from shared.errors import DataError, JobSpecError
from shared.models import MODELS, compute_class_weights, get_model_class
from shared.models.base import MAX_CLASSES
from shared.optim import build_optimizer

TESTS_DATA = Path(__file__).parent / "data"
A9A = Path(__file__).resolve().parents[1] / "examples" / "data" / "a9a" / "a9a"
# The reference data sets sit in a folder named shared/ beside the checkout.
DATASETS_DIR = Path(os.environ.get("BATON_DATASETS_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))

# Model name and hyperparameters of every case the generic tests run.
MODEL_CASES = [
    ("logistic_regression", {}),
    ("logistic_regression", {"alpha": 0.3, "penalty": "elasticnet", "l1_ratio": 0.4}),
    ("softmax_regression", {}),
    ("softmax_regression", {"alpha": 0.2, "penalty": "l1"}),
    ("linear_svm", {"loss": "hinge"}),
    ("linear_svm", {"loss": "squared_hinge", "alpha": 0.1}),
    ("linear_regression", {"alpha": 0.5}),
    ("linear_regression", {"alpha": 0.5, "penalty": "elasticnet", "l1_ratio": 0.7}),
    ("mlp_classifier", {"hidden_layer_sizes": (5, 4), "activation": "relu", "alpha": 0.1}),
    ("mlp_classifier", {"hidden_layer_sizes": (5,), "activation": "tanh"}),
    ("mlp_regressor", {"hidden_layer_sizes": (5, 4), "activation": "relu"}),
    ("mlp_regressor", {"hidden_layer_sizes": (3,), "activation": "tanh", "alpha": 0.2}),
    ("kmeans", {"n_clusters": 4}),
]
CASE_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in params.items()) or 'default'}" for name, params in MODEL_CASES]

N_FEATURES = 6
N_CLASSES = 3


# Data loaders and factories.


def load_breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """Return the standardised breast-cancer features and 0/1 labels."""
    table = np.loadtxt(TESTS_DATA / "breast_cancer.csv", delimiter=",", skiprows=1)
    X, y = table[:, :-1], table[:, -1].astype(np.int64)
    return (X - X.mean(axis=0)) / X.std(axis=0), y


def load_diabetes() -> tuple[np.ndarray, np.ndarray]:
    """Return the standardised diabetes features and the raw progression target."""
    folder = DATASETS_DIR / "diabetes"
    if not folder.exists():
        pytest.skip(f"diabetes data set not found in {folder}; set BATON_DATASETS_DIR")
    X = np.loadtxt(folder / "diabetes_data_raw.csv.gz")
    y = np.loadtxt(folder / "diabetes_target.csv.gz")
    return (X - X.mean(axis=0)) / X.std(axis=0), y


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return the digits pixels scaled to [0, 1] and labels 0-9."""
    path = DATASETS_DIR / "digits" / "digits.csv.gz"
    if not path.exists():
        pytest.skip(f"digits data set not found at {path}; set BATON_DATASETS_DIR")
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1] / 16.0, table[:, -1].astype(np.int64)


def load_a9a_head(n_rows: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Return the first ``n_rows`` rows of a9a's training file as dense 0/1 features and 0/1 labels."""
    with open(A9A, "rb") as handle:
        head = b"".join(islice(handle, n_rows))
    X, labels = load_svmlight_file(io.BytesIO(head), n_features=123)
    return X.toarray(), (labels > 0).astype(np.int64)


def build_model(name: str, hyperparameters: dict, n_features: int = N_FEATURES, n_classes: int = N_CLASSES):
    model_class = get_model_class(name)
    if model_class.task == "binary":
        n_classes = 2
    return model_class(n_features=n_features, n_classes=n_classes, **hyperparameters)


def make_problem(name: str, hyperparameters: dict, sparse: bool, seed: int = 0, n_samples: int = 40):
    """Return a model, random parameters, inputs and targets of the model's task.

    About half of the inputs are exact zeros, so that the sparse and dense paths differ.
    """
    rng = np.random.default_rng(seed)
    model = build_model(name, hyperparameters)

    X = rng.standard_normal((n_samples, N_FEATURES)) * (rng.random((n_samples, N_FEATURES)) < 0.5)
    if model.task == "regression":
        y = rng.standard_normal(n_samples)
    else:
        y = rng.integers(0, max(model.n_classes, 1), size=n_samples)

    if model.task == "clustering":
        params = model.init_params_from_data(X, rng) + 0.3 * rng.standard_normal(model.n_params)
    else:
        params = model.init_params(rng) + 0.5 * rng.standard_normal(model.n_params)

    return model, params, (sp.csr_matrix(X) if sparse else X), y


def numerical_gradient(function, params: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """Return the central finite-difference gradient of a scalar function."""
    grad = np.empty_like(params)
    for index in range(len(params)):
        shift = np.zeros_like(params)
        shift[index] = step
        grad[index] = (function(params + shift) - function(params - shift)) / (2.0 * step)
    return grad


# Gradients.


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("name, hyperparameters", MODEL_CASES, ids=CASE_IDS)
def test_loss_grad_matches_finite_differences(name, hyperparameters, sparse, weighted):
    model, params, X, y = make_problem(name, hyperparameters, sparse)
    sample_weight = np.random.default_rng(1).uniform(0.2, 3.0, size=X.shape[0]) if weighted else None

    loss, grad = model.loss_grad(params, X, y, sample_weight=sample_weight)
    expected = numerical_gradient(lambda p: model.loss_grad(p, X, y, sample_weight=sample_weight)[0], params)

    assert np.isfinite(loss)
    assert grad.shape == (model.n_params,)
    assert grad.dtype == np.float64
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, hyperparameters", MODEL_CASES, ids=CASE_IDS)
def test_penalty_grad_matches_finite_differences(name, hyperparameters):
    model, params, _, _ = make_problem(name, hyperparameters, sparse=False)

    value, grad = model.penalty_grad(params)
    expected = numerical_gradient(lambda p: model.penalty_grad(p)[0], params)

    assert value >= 0.0
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, hyperparameters", MODEL_CASES, ids=CASE_IDS)
def test_sparse_input_matches_dense(name, hyperparameters):
    model, params, X, y = make_problem(name, hyperparameters, sparse=False)
    X_sparse = sp.csr_matrix(X)

    dense_loss, dense_grad = model.loss_grad(params, X, y)
    sparse_loss, sparse_grad = model.loss_grad(params, X_sparse, y)

    assert sparse_loss == pytest.approx(dense_loss, rel=1e-12)
    np.testing.assert_allclose(sparse_grad, dense_grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.decision_function(params, X_sparse), model.decision_function(params, X),
                               rtol=1e-12, atol=1e-12)
    assert model.metrics(params, X_sparse, y) == pytest.approx(model.metrics(params, X, y), rel=1e-10)


@pytest.mark.parametrize("name", ["logistic_regression", "linear_regression", "linear_svm"])
def test_sparse_gradient_same_bits_as_scipy(name):
    model, _, X, _ = make_problem(name, {}, sparse=False)
    # Rows of different lengths, an empty one among them, in float64 as the worker passes them.
    X[3] = 0.0
    X[X < 0.2] = 0.0
    X_sparse = sp.csr_matrix(X)
    residuals = np.random.default_rng(5).normal(size=X.shape[0])

    grad = model._gradient_from_residuals(X_sparse, residuals)

    np.testing.assert_array_equal(grad[:-1], np.asarray(X_sparse.T @ residuals).ravel())
    assert grad[-1] == np.add.reduce(residuals)


@pytest.mark.parametrize("name, hyperparameters", MODEL_CASES, ids=CASE_IDS)
def test_float32_memmap_accumulates_in_float64(name, hyperparameters, tmp_path):
    model, params, X, y = make_problem(name, hyperparameters, sparse=False)
    memmap = np.memmap(tmp_path / "shard.f32", dtype=np.float32, mode="w+", shape=X.shape)
    memmap[:] = X
    memmap.flush()
    reopened = np.memmap(tmp_path / "shard.f32", dtype=np.float32, mode="r", shape=X.shape)

    memmap_loss, memmap_grad = model.loss_grad(params, reopened, y)
    float64_loss, float64_grad = model.loss_grad(params, np.asarray(reopened, dtype=np.float64), y)

    assert memmap_grad.dtype == np.float64
    assert memmap_loss == float64_loss
    np.testing.assert_array_equal(memmap_grad, float64_grad)


@pytest.mark.parametrize("name, hyperparameters", MODEL_CASES, ids=CASE_IDS)
def test_integer_sample_weight_equals_repeated_rows(name, hyperparameters):
    model, params, X, y = make_problem(name, hyperparameters, sparse=False)
    counts = np.random.default_rng(2).integers(0, 4, size=X.shape[0])

    weighted_loss, weighted_grad = model.loss_grad(params, X, y, sample_weight=counts.astype(np.float64))
    repeated_loss, repeated_grad = model.loss_grad(params, np.repeat(X, counts, axis=0), np.repeat(y, counts))

    assert weighted_loss == pytest.approx(repeated_loss, rel=1e-12)
    np.testing.assert_allclose(weighted_grad, repeated_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name, hyperparameters", MODEL_CASES, ids=CASE_IDS)
def test_loss_grad_sums_over_row_splits(name, hyperparameters):
    model, params, X, y = make_problem(name, hyperparameters, sparse=True)

    whole_loss, whole_grad = model.loss_grad(params, X, y)
    parts = [model.loss_grad(params, X[rows], y[rows]) for rows in (slice(0, 7), slice(7, 25), slice(25, None))]

    assert sum(loss for loss, _ in parts) == pytest.approx(whole_loss, rel=1e-12)
    np.testing.assert_allclose(sum(grad for _, grad in parts), whole_grad, rtol=1e-10, atol=1e-12)


# Loss values against scikit-learn's metrics.


def test_logistic_metrics_match_sklearn():
    X, y = load_breast_cancer()
    model = get_model_class("logistic_regression")(n_features=X.shape[1])
    params = np.random.default_rng(0).normal(scale=0.3, size=model.n_params)

    metrics = model.metrics(params, X, y)
    probabilities = model.predict_proba(params, X)

    assert metrics["loss"] == pytest.approx(log_loss(y, probabilities), rel=1e-10)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, probabilities > 0.5))


def test_softmax_metrics_match_sklearn():
    X, y = load_digits()
    model = get_model_class("softmax_regression")(n_features=X.shape[1], n_classes=10)
    params = np.random.default_rng(0).normal(scale=0.5, size=model.n_params)

    metrics = model.metrics(params, X, y)
    probabilities = model.predict_proba(params, X)

    assert metrics["loss"] == pytest.approx(log_loss(y, probabilities, labels=np.arange(10)), rel=1e-10)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, probabilities.argmax(axis=1)))


def test_mlp_classifier_metrics_match_sklearn():
    X, y = load_digits()
    model = get_model_class("mlp_classifier")(n_features=X.shape[1], n_classes=10, hidden_layer_sizes=(16,))
    params = model.init_params(np.random.default_rng(0))

    metrics = model.metrics(params, X, y)
    probabilities = model.predict_proba(params, X)

    assert metrics["loss"] == pytest.approx(log_loss(y, probabilities, labels=np.arange(10)), rel=1e-10)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, model.predict(params, X)))


def test_svm_hinge_metrics_match_sklearn():
    X, y = load_breast_cancer()
    model = get_model_class("linear_svm")(n_features=X.shape[1], loss="hinge")
    params = np.random.default_rng(0).normal(scale=0.2, size=model.n_params)

    metrics = model.metrics(params, X, y)
    scores = model.decision_function(params, X)

    assert metrics["loss"] == pytest.approx(hinge_loss(y, scores), rel=1e-12)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, scores > 0))


# The binary classifiers are checked on a9a's one-hot rows and the multiclass ones on the
# digits pixels, each as a dense array and as a CSR matrix.
CLASSIFIER_CASES = [
    ("logistic_regression", {}),
    ("linear_svm", {"loss": "hinge"}),
    ("linear_svm", {"loss": "squared_hinge"}),
    ("softmax_regression", {}),
    ("mlp_classifier", {"hidden_layer_sizes": (8,), "activation": "tanh"}),
    ("mlp_classifier", {"hidden_layer_sizes": (8, 5), "activation": "relu"}),
]


def reference_scores(model, params: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Return the scores of a classifier computed with plain numpy on dense rows."""
    if model.name == "mlp_classifier":
        activations = X
        layers = model.unpack(params)
        for index, (weights, biases) in enumerate(layers):
            activations = activations @ weights + biases
            if index < len(layers) - 1:
                activations = np.tanh(activations) if model.activation == "tanh" else np.maximum(activations, 0.0)
        return activations
    if model.name == "softmax_regression":
        weights, biases = model.unpack(params)
        return X @ weights + biases
    return X @ params[:-1] + params[-1]


def reference_loss(model, y: np.ndarray, scores: np.ndarray) -> float:
    """Return the mean loss of ``scores`` by scikit-learn's metrics, or by formula for the squared hinge."""
    if model.name == "linear_svm" and model.loss == "hinge":
        return hinge_loss(y, scores)
    if model.name == "linear_svm":
        # scikit-learn (checked with 1.9.1) has no squared hinge metric.
        return float(np.mean(np.maximum(0.0, 1.0 - (2 * y - 1) * scores) ** 2))
    if model.name == "logistic_regression":
        return log_loss(y, expit(scores))
    return log_loss(y, softmax(scores, axis=1), labels=np.arange(model.n_classes))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("name, hyperparameters", CLASSIFIER_CASES,
                         ids=[f"{name}-{'-'.join(map(str, params.values())) or 'default'}"
                              for name, params in CLASSIFIER_CASES])
def test_classifier_metrics_match_sklearn(name, hyperparameters, sparse):
    model_class = get_model_class(name)
    X, y = load_a9a_head() if model_class.task == "binary" else load_digits()
    model = model_class(n_features=X.shape[1], n_classes=len(np.unique(y)), **hyperparameters)
    rng = np.random.default_rng(0)
    params = model.init_params(rng) + rng.normal(scale=0.2, size=model.n_params)
    scores = reference_scores(model, params, X)
    predicted = scores > 0 if scores.ndim == 1 else scores.argmax(axis=1)

    metrics = model.metrics(params, sp.csr_matrix(X) if sparse else X, y)

    assert set(metrics) == {"loss", "accuracy"}
    assert metrics["loss"] == pytest.approx(reference_loss(model, y, scores), rel=1e-10)
    assert metrics["accuracy"] == accuracy_score(y, predicted)


def test_svm_squared_hinge_metrics_match_formula():
    X, y = load_breast_cancer()
    model = get_model_class("linear_svm")(n_features=X.shape[1], loss="squared_hinge")
    params = np.random.default_rng(0).normal(scale=0.2, size=model.n_params)

    scores = X @ params[:-1] + params[-1]
    expected = np.mean(np.maximum(0.0, 1.0 - (2 * y - 1) * scores) ** 2)

    assert model.metrics(params, X, y)["loss"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name, hyperparameters", [
    ("linear_regression", {}),
    ("mlp_regressor", {"hidden_layer_sizes": (8,), "activation": "tanh"}),
])
def test_regression_metrics_match_sklearn(name, hyperparameters):
    X, y = load_diabetes()
    model = get_model_class(name)(n_features=X.shape[1], **hyperparameters)
    rng = np.random.default_rng(0)
    params = model.init_params(rng) + rng.normal(scale=5.0, size=model.n_params)

    metrics = model.metrics(params, X, y)
    predicted = model.predict(params, X)

    assert metrics["mse"] == pytest.approx(mean_squared_error(y, predicted), rel=1e-12)
    assert metrics["loss"] == pytest.approx(0.5 * mean_squared_error(y, predicted), rel=1e-12)
    assert metrics["r2"] == pytest.approx(r2_score(y, predicted), rel=1e-12)


def test_r2_of_constant_target_matches_sklearn():
    model = get_model_class("linear_regression")(n_features=1)
    X = np.ones((4, 1))
    y = np.full(4, 2.0)

    exact = np.array([0.0, 2.0])
    wrong = np.array([0.0, 3.0])

    assert model.metrics(exact, X, y)["r2"] == r2_score(y, model.predict(exact, X))
    assert model.metrics(wrong, X, y)["r2"] == r2_score(y, model.predict(wrong, X))


# Numerical stability.


@pytest.mark.parametrize("name, hyperparameters", [case for case in MODEL_CASES if case[0] != "kmeans"],
                         ids=[case_id for case, case_id in zip(MODEL_CASES, CASE_IDS) if case[0] != "kmeans"])
def test_losses_finite_for_huge_scores(name, hyperparameters):
    model, params, X, y = make_problem(name, hyperparameters, sparse=False)
    huge_params = params / np.abs(params).max() * 1e6

    loss, grad = model.loss_grad(huge_params, X, y)
    metrics = model.metrics(huge_params, X, y)

    assert np.abs(model.decision_function(huge_params, X)).max() >= 1e5
    assert np.isfinite(loss)
    assert np.all(np.isfinite(grad))
    assert all(np.isfinite(value) for value in metrics.values())


def test_logistic_loss_exact_at_huge_margins():
    model = get_model_class("logistic_regression")(n_features=1)
    params = np.array([1e6, 0.0])
    X = np.array([[1.0], [1.0]])
    y = np.array([1, 0])

    loss, grad = model.loss_grad(params, X, y)

    # The right row costs log(1 + e^-1e6) = 0; the wrong one log(1 + e^1e6) = 1e6.
    assert loss == pytest.approx(1e6, rel=1e-12)
    np.testing.assert_allclose(grad, [1.0, 1.0])


def test_softmax_loss_exact_at_huge_scores():
    model = get_model_class("softmax_regression")(n_features=1, n_classes=3)
    weights, biases = np.array([[1e6, -1e6, 0.0]]), np.zeros(3)
    params = np.concatenate([weights.ravel(), biases])
    X = np.array([[1.0], [1.0]])
    y = np.array([0, 1])

    loss, grad = model.loss_grad(params, X, y)

    # Row 0 picks the top class (loss 0); row 1 picks a class 2e6 below it.
    assert loss == pytest.approx(2e6, rel=1e-12)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(model.predict_proba(params, X).sum(axis=1), 1.0)


# Objective conventions, checked by fitting and comparing with scikit-learn.


def fit_by_gradient_descent(model, X, y, n_steps: int, learning_rate: float, proximal: bool = False) -> np.ndarray:
    """Run full-batch gradient descent on the mean loss plus penalty, as the aggregator does."""
    optimizer = build_optimizer("sgd", learning_rate=learning_rate)
    params = model.init_params(np.random.default_rng(0))
    state = optimizer.init_state(params)
    for step_index in range(n_steps):
        loss_sum, grad_sum = model.loss_grad(params, X, y)
        _, penalty_grad = model.penalty_grad(params)
        params, state = optimizer.step(params, grad_sum / X.shape[0] + penalty_grad, state, step_index)
        if proximal:
            params = model.proximal(params, optimizer.learning_rate_at(step_index))
    return params


def smoothness_constant(X: np.ndarray, curvature: float, alpha: float) -> float:
    """Return a Lipschitz constant of the mean-loss gradient, for the step size 1 / L."""
    with_bias = np.hstack([X, np.ones((X.shape[0], 1))])
    return curvature * np.linalg.eigvalsh(with_bias.T @ with_bias / X.shape[0]).max() + alpha


def test_logistic_fit_matches_sklearn():
    X, y = load_breast_cancer()
    n_samples = X.shape[0]
    alpha = 0.02
    model = get_model_class("logistic_regression")(n_features=X.shape[1], alpha=alpha)

    params = fit_by_gradient_descent(model, X, y, n_steps=6000,
                                     learning_rate=1.0 / smoothness_constant(X, 0.25, alpha))
    reference = SklearnLogisticRegression(C=1.0 / (alpha * n_samples), tol=1e-12, max_iter=10_000).fit(X, y)

    np.testing.assert_allclose(params[:-1], reference.coef_.ravel(), rtol=1e-4, atol=1e-5)
    assert params[-1] == pytest.approx(reference.intercept_[0], rel=1e-4, abs=1e-5)


def test_ridge_fit_matches_sklearn():
    X, y = load_diabetes()
    n_samples = X.shape[0]
    alpha = 0.05
    model = get_model_class("linear_regression")(n_features=X.shape[1], alpha=alpha, penalty="l2")

    params = fit_by_gradient_descent(model, X, y, n_steps=5000,
                                     learning_rate=1.0 / smoothness_constant(X, 1.0, alpha))
    reference = SklearnRidge(alpha=alpha * n_samples).fit(X, y)

    np.testing.assert_allclose(params[:-1], reference.coef_, rtol=1e-5, atol=1e-4)
    assert params[-1] == pytest.approx(reference.intercept_, rel=1e-8)


def test_lasso_proximal_fit_matches_sklearn():
    X, y = load_diabetes()
    alpha = 2.0
    model = get_model_class("linear_regression")(n_features=X.shape[1], alpha=alpha, penalty="l1",
                                                 l1_method="proximal")

    params = fit_by_gradient_descent(model, X, y, n_steps=5000,
                                     learning_rate=1.0 / smoothness_constant(X, 1.0, 0.0), proximal=True)
    reference = SklearnLasso(alpha=alpha, tol=1e-12, max_iter=100_000).fit(X, y)

    np.testing.assert_allclose(params[:-1], reference.coef_, rtol=1e-4, atol=1e-4)
    assert np.count_nonzero(reference.coef_ == 0.0) > 0
    np.testing.assert_array_equal(params[:-1] == 0.0, reference.coef_ == 0.0)


@pytest.mark.parametrize("penalty, reference", [
    ("l2", lambda alpha, n_samples: SklearnRidge(alpha=alpha * n_samples)),
    ("l1", lambda alpha, n_samples: SklearnLasso(alpha=alpha, tol=1e-12, max_iter=100_000)),
])
def test_standardize_target_fit_matches_sklearn(penalty, reference):
    # Trained on (y - mean) / scale and mapped back, the model minimises the unscaled
    # objective with the same alpha: the L1 coefficient is divided by the scale.
    X, y = load_diabetes()
    alpha = 2.0 if penalty == "l1" else 0.05
    mean, scale = y.mean(), y.std()
    model = get_model_class("linear_regression")(n_features=X.shape[1], alpha=alpha, penalty=penalty,
                                                 l1_method="proximal", target_scale=scale)

    scaled_params = fit_by_gradient_descent(model, X, (y - mean) / scale, n_steps=5000,
                                            learning_rate=1.0 / smoothness_constant(X, 1.0, alpha),
                                            proximal=True)
    params = model.rescaled_output_params(scaled_params, scale, mean)
    fitted = reference(alpha, X.shape[0]).fit(X, y)

    np.testing.assert_allclose(params[:-1], fitted.coef_, rtol=1e-4, atol=1e-4)
    assert params[-1] == pytest.approx(fitted.intercept_, rel=1e-8)
    np.testing.assert_array_equal(params[:-1] == 0.0, fitted.coef_ == 0.0)
    if penalty == "l1":
        assert np.count_nonzero(fitted.coef_ == 0.0) > 0


REGRESSION_CASES = [
    ("linear_regression", {"alpha": 0.5}),
    ("linear_regression", {"alpha": 0.5, "penalty": "l1"}),
    ("linear_regression", {"alpha": 0.5, "penalty": "elasticnet", "l1_ratio": 0.7}),
    ("mlp_regressor", {"hidden_layer_sizes": (5, 4), "activation": "relu", "alpha": 0.3}),
    ("mlp_regressor", {"hidden_layer_sizes": (3,), "activation": "tanh", "alpha": 0.2}),
]


@pytest.mark.parametrize("name, hyperparameters", REGRESSION_CASES,
                         ids=[f"{name}-{'-'.join(f'{k}={v}' for k, v in params.items())}"
                              for name, params in REGRESSION_CASES])
def test_scaled_objective_matches_original(name, hyperparameters):
    X, y = load_diabetes()
    mean, scale = y.mean(), y.std()
    original = get_model_class(name)(n_features=X.shape[1], **hyperparameters)
    scaled = get_model_class(name)(n_features=X.shape[1], target_scale=scale, **hyperparameters)
    scaled_params = scaled.init_params(np.random.default_rng(4)) + np.random.default_rng(5).normal(
        scale=0.3, size=scaled.n_params)

    params = scaled.rescaled_output_params(scaled_params, scale, mean)
    scaled_loss, _ = scaled.loss_grad(scaled_params, X, (y - mean) / scale)
    original_loss, _ = original.loss_grad(params, X, y)
    scaled_objective = scaled_loss / len(y) + scaled.penalty_grad(scaled_params)[0]
    original_objective = original_loss / len(y) + original.penalty_grad(params)[0]

    assert original_objective == pytest.approx(scaled_objective * scale ** 2, rel=1e-12)
    np.testing.assert_allclose(original.predict(params, X), scale * scaled.predict(scaled_params, X) + mean,
                               rtol=1e-12)


def test_rescaled_output_keeps_hidden_layers():
    model = get_model_class("mlp_regressor")(n_features=3, hidden_layer_sizes=(4,))
    params = model.init_params(np.random.default_rng(0)) + 0.1
    before = params.copy()

    rescaled = model.rescaled_output_params(params, 3.0, -2.0)

    np.testing.assert_array_equal(params, before)
    (hidden_weights, hidden_biases), (output_weights, output_biases) = model.unpack(rescaled)
    np.testing.assert_array_equal(hidden_weights, model.unpack(params)[0][0])
    np.testing.assert_array_equal(hidden_biases, model.unpack(params)[0][1])
    np.testing.assert_array_equal(output_weights, 3.0 * model.unpack(params)[1][0])
    np.testing.assert_array_equal(output_biases, 3.0 * model.unpack(params)[1][1] - 2.0)


def test_kmeans_init_names_cluster_limit():
    model = get_model_class("kmeans")(n_features=2, n_clusters=3)

    with pytest.raises(DataError, match=r"got 2; lower model.n_clusters to at most 2, or give the job more training rows"):
        model.init_params_from_data(np.ones((2, 2)), np.random.default_rng(0))


def test_kmeans_output_rescale_raises():
    model = get_model_class("kmeans")(n_features=2, n_clusters=2)

    with pytest.raises(NotImplementedError, match="no linear output layer"):
        model.rescaled_output_params(np.zeros(model.n_params), 2.0, 1.0)


@pytest.mark.parametrize("target_scale", [0.0, -1.0, float("inf"), float("nan")])
def test_invalid_target_scale_raises(target_scale):
    with pytest.raises(ValueError, match="target_scale must be a finite number > 0"):
        get_model_class("linear_regression")(n_features=2, target_scale=target_scale)


def test_softmax_fit_matches_sklearn():
    X, y = load_digits()
    X, y = X[:600], y[:600]
    n_samples = X.shape[0]
    alpha = 0.01
    model = get_model_class("softmax_regression")(n_features=X.shape[1], n_classes=10, alpha=alpha)

    def objective(params):
        loss_sum, grad_sum = model.loss_grad(params, X, y)
        penalty, penalty_grad = model.penalty_grad(params)
        return loss_sum / n_samples + penalty, grad_sum / n_samples + penalty_grad

    result = minimize(objective, model.init_params(np.random.default_rng(0)), jac=True, method="L-BFGS-B",
                      options={"maxiter": 5000, "gtol": 1e-10, "ftol": 1e-15})
    reference = SklearnLogisticRegression(C=1.0 / (alpha * n_samples), tol=1e-10, max_iter=10_000).fit(X, y)
    weights, biases = model.unpack(result.x)

    np.testing.assert_allclose(weights, reference.coef_.T, atol=2e-3)
    # The softmax is unchanged by a shift of all biases, so compare them centred.
    np.testing.assert_allclose(biases - biases.mean(), reference.intercept_ - reference.intercept_.mean(), atol=2e-3)


def test_mlp_classifier_learns_breast_cancer():
    X, y = load_breast_cancer()
    model = get_model_class("mlp_classifier")(n_features=X.shape[1], n_classes=2, hidden_layer_sizes=(16,),
                                              alpha=1e-3)
    params = model.init_params(np.random.default_rng(0))
    before = model.metrics(params, X, y)

    params = fit_by_gradient_descent(model, X, y, n_steps=300, learning_rate=0.5)
    after = model.metrics(params, X, y)

    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.97


def test_mlp_init_is_glorot_uniform():
    model = get_model_class("mlp_classifier")(n_features=30, n_classes=3, hidden_layer_sizes=(20, 10))
    params = model.init_params(np.random.default_rng(0))
    layers = model.unpack(params)

    assert [weights.shape for weights, _ in layers] == [(30, 20), (20, 10), (10, 3)]
    for weights, biases in layers:
        limit = np.sqrt(6.0 / sum(weights.shape))
        assert np.abs(weights).max() <= limit
        assert np.abs(weights).max() > 0.8 * limit
        assert np.all(biases == 0.0)
    np.testing.assert_array_equal(params, model.init_params(np.random.default_rng(0)))
    assert not np.array_equal(params, model.init_params(np.random.default_rng(1)))


# Penalties and the proximal hook.


def test_proximal_soft_thresholds_weights_only():
    model = get_model_class("linear_regression")(n_features=3, alpha=2.0, penalty="elasticnet", l1_ratio=0.5,
                                                 l1_method="proximal")
    params = np.array([3.0, -0.5, -4.0, 7.0])

    # threshold = step * alpha * l1_ratio = 0.5 * 2 * 0.5 = 0.5
    np.testing.assert_allclose(model.proximal(params, step=0.5), [2.5, 0.0, -3.5, 7.0])


def test_proximal_method_moves_l1_out_of_penalty_grad():
    weights = np.array([3.0, -0.5, -4.0])
    params = np.append(weights, 7.0)
    build = get_model_class("linear_regression")
    subgradient = build(n_features=3, alpha=2.0, penalty="elasticnet", l1_ratio=0.5)
    proximal = build(n_features=3, alpha=2.0, penalty="elasticnet", l1_ratio=0.5, l1_method="proximal")

    subgradient_value, subgradient_grad = subgradient.penalty_grad(params)
    proximal_value, proximal_grad = proximal.penalty_grad(params)

    assert subgradient_value == pytest.approx(1.0 * np.abs(weights).sum() + 0.5 * 1.0 * weights @ weights)
    assert proximal_value == pytest.approx(0.5 * 1.0 * weights @ weights)
    np.testing.assert_allclose(subgradient_grad, np.append(np.sign(weights) + weights, 0.0))
    np.testing.assert_allclose(proximal_grad, np.append(weights, 0.0))


@pytest.mark.parametrize("name, hyperparameters", MODEL_CASES, ids=CASE_IDS)
def test_proximal_identity_without_proximal_method(name, hyperparameters):
    model, params, _, _ = make_problem(name, hyperparameters, sparse=False)

    np.testing.assert_array_equal(model.proximal(params, step=0.1), params)


def test_penalty_never_touches_bias():
    for name, hyperparameters in MODEL_CASES:
        if name in ("kmeans", "mlp_classifier", "mlp_regressor", "softmax_regression"):
            continue
        model = build_model(name, {**hyperparameters, "alpha": 1.0})
        params = np.zeros(model.n_params)
        params[-1] = 5.0

        value, grad = model.penalty_grad(params)

        assert value == 0.0, name
        assert grad[-1] == 0.0, name


# K-means.


def naive_lloyd_step(X: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Return one Lloyd update computed row by row, with empty clusters left in place."""
    n_clusters = len(centroids)
    sums = np.zeros_like(centroids)
    counts = np.zeros(n_clusters)
    for row in X:
        distances = [np.sum((row - centroid) ** 2) for centroid in centroids]
        nearest = int(np.argmin(distances))
        sums[nearest] += row
        counts[nearest] += 1
    updated = centroids.copy()
    for cluster in range(n_clusters):
        if counts[cluster] > 0:
            updated[cluster] = sums[cluster] / counts[cluster]
    return updated


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_kmeans_lloyd_step_matches_naive(sparse):
    X, _ = load_digits()
    X = X[:300]
    model = get_model_class("kmeans")(n_features=X.shape[1], n_clusters=6)
    params = model.init_params_from_data(X, np.random.default_rng(0)) + 0.05
    # A centroid far from every row keeps its position, as an empty cluster must.
    params[:X.shape[1]] = 50.0

    statistics = model.partial_statistics(params, sp.csr_matrix(X) if sparse else X)
    updated = model.combine_statistics([statistics], params)
    expected = naive_lloyd_step(X, model.centroids(params))

    assert statistics["counts"][0] == 0
    np.testing.assert_allclose(model.centroids(updated), expected, rtol=1e-12, atol=1e-12)


def test_kmeans_split_statistics_equal_one_shot():
    X, _ = load_digits()
    model = get_model_class("kmeans")(n_features=X.shape[1], n_clusters=10)
    params = model.init_params_from_data(X[:500], np.random.default_rng(3))

    whole = model.partial_statistics(params, X)
    parts = [model.partial_statistics(params, X[rows]) for rows in (slice(0, 400), slice(400, 1000), slice(1000, None))]

    np.testing.assert_allclose(model.combine_statistics(parts, params), model.combine_statistics([whole], params),
                               rtol=1e-12)
    assert sum(part["inertia"][0] for part in parts) == pytest.approx(whole["inertia"][0], rel=1e-12)
    np.testing.assert_array_equal(sum(part["counts"] for part in parts), whole["counts"])


def test_kmeans_statistics_roundtrip_savez(tmp_path):
    X, _ = load_digits()
    model = get_model_class("kmeans")(n_features=X.shape[1], n_clusters=5)
    params = model.init_params_from_data(X[:200], np.random.default_rng(0))
    statistics = model.partial_statistics(params, X[:300])

    np.savez(tmp_path / "statistics.npz", **statistics)
    with np.load(tmp_path / "statistics.npz") as loaded:
        restored = {key: loaded[key] for key in loaded.files}

    np.testing.assert_array_equal(model.combine_statistics([restored], params),
                                  model.combine_statistics([statistics], params))


def test_kmeans_gradient_step_is_lloyd_step():
    X, _ = load_digits()
    X = X[:300]
    model = get_model_class("kmeans")(n_features=X.shape[1], n_clusters=6)
    params = model.init_params_from_data(X, np.random.default_rng(0))

    statistics = model.partial_statistics(params, X)
    _, grad = model.loss_grad(params, X)
    step_sizes = np.repeat(1.0 / (2.0 * statistics["counts"]), X.shape[1])

    np.testing.assert_allclose(params - step_sizes * grad, model.combine_statistics([statistics], params),
                               rtol=1e-10, atol=1e-12)


def test_kmeans_lloyd_iterations_match_sklearn():
    X, _ = load_digits()
    model = get_model_class("kmeans")(n_features=X.shape[1], n_clusters=10)
    initial = model.init_params_from_data(X, np.random.default_rng(0))

    params = initial
    inertias = []
    for _ in range(5):
        statistics = model.partial_statistics(params, X)
        inertias.append(statistics["inertia"][0])
        params = model.combine_statistics([statistics], params)
    reference = SklearnKMeans(n_clusters=10, init=model.centroids(initial), n_init=1, max_iter=5, tol=0.0,
                              algorithm="lloyd").fit(X)

    np.testing.assert_allclose(model.centroids(params), reference.cluster_centers_, rtol=1e-8, atol=1e-8)
    assert all(later <= earlier for earlier, later in zip(inertias, inertias[1:]))


def test_kmeans_plus_plus_spreads_over_blobs():
    rng = np.random.default_rng(0)
    blob_centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    X = np.vstack([centre + rng.standard_normal((50, 2)) for centre in blob_centres])
    model = get_model_class("kmeans")(n_features=2, n_clusters=3)

    centroids = model.centroids(model.init_params_from_data(X, np.random.default_rng(7)))
    nearest_blob = np.argmin(((centroids[:, np.newaxis, :] - blob_centres) ** 2).sum(axis=2), axis=1)

    assert sorted(nearest_blob.tolist()) == [0, 1, 2]
    for centroid in centroids:
        assert np.any(np.all(X == centroid, axis=1))


def test_kmeans_plus_plus_reproducible_and_sparse_equal():
    X, _ = load_digits()
    X = X[:200]
    model = get_model_class("kmeans")(n_features=X.shape[1], n_clusters=8)

    dense = model.kmeans_plus_plus_init(X, np.random.default_rng(5))
    again = model.kmeans_plus_plus_init(X, np.random.default_rng(5))
    sparse = model.kmeans_plus_plus_init(sp.csr_matrix(X), np.random.default_rng(5))

    np.testing.assert_array_equal(dense, again)
    np.testing.assert_allclose(sparse, dense)


def test_kmeans_plus_plus_handles_duplicate_rows():
    X = np.ones((5, 2))
    model = get_model_class("kmeans")(n_features=2, n_clusters=3)

    params = model.kmeans_plus_plus_init(X, np.random.default_rng(0))

    np.testing.assert_array_equal(params, np.ones(6))


def test_kmeans_plus_plus_rejects_too_few_rows():
    model = get_model_class("kmeans")(n_features=2, n_clusters=3)

    with pytest.raises(DataError, match="n_clusters=3"):
        model.kmeans_plus_plus_init(np.zeros((2, 2)), np.random.default_rng(0))


def test_kmeans_predict_and_metrics():
    model = get_model_class("kmeans")(n_features=1, n_clusters=2)
    params = np.array([0.0, 10.0])
    X = np.array([[1.0], [9.0], [-2.0]])

    np.testing.assert_array_equal(model.predict(params, X), [0, 1, 0])
    assert model.metrics(params, X, None) == {"loss": pytest.approx(2.0), "inertia": pytest.approx(6.0)}


def test_gradient_model_has_no_statistics():
    model = get_model_class("logistic_regression")(n_features=2)

    with pytest.raises(NotImplementedError, match="loss_grad"):
        model.partial_statistics(np.zeros(3), np.zeros((1, 2)))


# Class weights.


def test_balanced_class_weights_match_sklearn():
    y = np.array([0, 0, 0, 0, 1, 2, 2, 0, 1, 0])

    weights = compute_class_weights(y, 3, "balanced")

    np.testing.assert_allclose(weights, compute_class_weight("balanced", classes=np.arange(3), y=y))


@pytest.mark.parametrize("class_weight, expected", [
    (None, [1.0, 1.0, 1.0]),
    ({"1": 4.0}, [1.0, 4.0, 1.0]),
    ({0: 0.5, 2: 3}, [0.5, 1.0, 3.0]),
    ([1.0, 2.0, 0.0], [1.0, 2.0, 0.0]),
])
def test_explicit_class_weights(class_weight, expected):
    weights = compute_class_weights(np.array([0, 1, 2, 2]), 3, class_weight)

    np.testing.assert_array_equal(weights, expected)
    assert weights.dtype == np.float64


@pytest.mark.parametrize("class_weight, error, message", [
    ("auto", JobSpecError, "balanced"),
    ({"cat": 1.0}, JobSpecError, "not a class index"),
    ({5: 1.0}, JobSpecError, "out of range"),
    ([1.0, 2.0], JobSpecError, "one per class"),
    ({0: -1.0}, JobSpecError, ">= 0"),
    ({0: "heavy"}, JobSpecError, "expected a number"),
])
def test_invalid_class_weights_raise(class_weight, error, message):
    with pytest.raises(error, match=message):
        compute_class_weights(np.array([0, 1, 2]), 3, class_weight)


def test_balanced_class_weights_need_every_class():
    with pytest.raises(DataError, match=r"classes \[2\] have no rows"):
        compute_class_weights(np.array([0, 1, 1]), 3, "balanced")


def test_class_weights_scale_losses_per_class():
    X, y = load_breast_cancer()
    model = get_model_class("logistic_regression")(n_features=X.shape[1])
    params = np.random.default_rng(0).normal(scale=0.1, size=model.n_params)
    weights = compute_class_weights(y, 2, "balanced")

    weighted_loss, _ = model.loss_grad(params, X, y, sample_weight=weights[y])
    per_class = [model.loss_grad(params, X[y == label], y[y == label])[0] for label in (0, 1)]

    assert weighted_loss == pytest.approx(weights[0] * per_class[0] + weights[1] * per_class[1], rel=1e-12)


# Validation, encoding and the registry.


def test_registry_names_match_classes():
    assert set(MODELS) == {"logistic_regression", "softmax_regression", "linear_svm", "linear_regression",
                           "mlp_classifier", "mlp_regressor", "kmeans"}
    for name, model_class in MODELS.items():
        assert model_class.name == name
        assert model_class.task in ("binary", "multiclass", "regression", "clustering")
        assert model_class.training_mode == ("statistics" if name == "kmeans" else "gradient")


def test_every_model_accepts_flat_hyperparameters():
    # A flat model section of a job spec passes every field to every model.
    flat = {"alpha": 0.1, "loss": "hinge", "penalty": "l2", "l1_ratio": 0.15, "l1_method": "subgradient",
            "hidden_layer_sizes": [4], "activation": "relu", "n_clusters": 2, "class_weight": None}
    for name, model_class in MODELS.items():
        model = model_class(n_features=3, n_classes=2, **flat)
        assert len(model.init_params(np.random.default_rng(0))) == model.n_params, name


@pytest.mark.parametrize("name, hyperparameters, field", [
    ("linear_svm", {"loss": "hing"}, "model.loss"),
    ("linear_regression", {"penalty": "l3"}, "model.penalty"),
    ("linear_regression", {"penalty": "elasticnet", "l1_ratio": 1.5}, "model.l1_ratio"),
    ("logistic_regression", {"l1_method": "coordinate_descent"}, "model.l1_method"),
    ("logistic_regression", {"alpha": -1.0}, "model.alpha"),
    ("mlp_classifier", {"activation": "sigmoid"}, "model.activation"),
    ("mlp_regressor", {"hidden_layer_sizes": [8, 0]}, "model.hidden_layer_sizes"),
    ("mlp_regressor", {"hidden_layer_sizes": "64"}, "model.hidden_layer_sizes"),
    ("kmeans", {"n_clusters": 0}, "model.n_clusters"),
])
def test_invalid_hyperparameters_name_field(name, hyperparameters, field):
    with pytest.raises(JobSpecError) as raised:
        get_model_class(name)(n_features=3, **hyperparameters)

    assert raised.value.field == field


def test_wrong_feature_count_raises_data_error():
    model = get_model_class("softmax_regression")(n_features=4, n_classes=3)

    with pytest.raises(DataError, match="built for 4 features, got input of shape \\(2, 5\\)"):
        model.loss_grad(np.zeros(model.n_params), np.zeros((2, 5)), np.zeros(2, dtype=np.int64))


def test_wrong_params_length_raises():
    model = get_model_class("mlp_regressor")(n_features=4, hidden_layer_sizes=(3,))

    with pytest.raises(ValueError, match=r"shape \(19,\), got \(18,\)"):
        model.decision_function(np.zeros(18), np.zeros((2, 4)))


def test_invalid_sample_weight_raises():
    model = get_model_class("linear_regression")(n_features=2)

    with pytest.raises(ValueError, match="shape"):
        model.loss_grad(np.zeros(3), np.zeros((2, 2)), np.zeros(2), sample_weight=np.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        model.loss_grad(np.zeros(3), np.zeros((2, 2)), np.zeros(2), sample_weight=np.array([1.0, -1.0]))


def test_encode_targets_per_task():
    classes = np.array([-1, 1])
    y_raw = np.array([1, -1, 1])

    binary = get_model_class("linear_svm")(n_features=1).encode_targets(y_raw, classes)
    regression = get_model_class("mlp_regressor")(n_features=1).encode_targets(y_raw, None)
    clustering = get_model_class("kmeans")(n_features=1).encode_targets(y_raw, None)

    np.testing.assert_array_equal(binary, [1, 0, 1])
    assert regression.dtype == np.float64
    np.testing.assert_array_equal(regression, [1.0, -1.0, 1.0])
    np.testing.assert_array_equal(clustering, [0, 0, 0])


def test_check_classes_rejects_wrong_label_counts():
    with pytest.raises(DataError, match="exactly 2 distinct labels"):
        get_model_class("linear_svm")(n_features=1).check_classes(np.array([0, 1, 2]))
    with pytest.raises(DataError, match="at least 2 distinct labels"):
        get_model_class("mlp_classifier")(n_features=1).check_classes(np.array([0]))


def test_binary_check_suggests_regression_for_real_labels():
    classes = np.unique(np.linspace(0.0, 20.0, 15903))

    with pytest.raises(DataError, match="found 15,903") as raised:
        get_model_class("logistic_regression")(n_features=1).check_classes(classes)

    assert "use linear_regression or mlp_regressor" in str(raised.value)
    assert "multiclass" not in str(raised.value)


@pytest.mark.parametrize("classes, advice", [
    (np.array([0.0, 1.0, 2.0]), "use a multiclass model (softmax_regression or mlp_classifier)"),
    (np.array([1.0]), "check data.label_column and that the training rows contain both classes"),
    # Whole-number prices: more labels than a multiclass model takes, so only regression fits.
    (np.arange(14999.0, 14999.0 + 3842 * 25, 25), "if the label is a continuous target, such as a price or a "
                                                  "count, use linear_regression or mlp_regressor"),
], ids=["three-whole", "one-label", "many-whole"])
def test_binary_check_advice_per_label_count(classes, advice):
    with pytest.raises(DataError, match=re.escape(advice)) as raised:
        get_model_class("linear_svm")(n_features=1).check_classes(classes)

    if len(classes) > MAX_CLASSES:
        assert "multiclass" not in str(raised.value), "a multiclass model takes no more than MAX_CLASSES labels"


def test_predict_returns_encoded_targets():
    X, y = load_breast_cancer()
    for name in ("logistic_regression", "linear_svm", "softmax_regression", "mlp_classifier"):
        model = get_model_class(name)(n_features=X.shape[1], n_classes=2, hidden_layer_sizes=(4,))
        params = model.init_params(np.random.default_rng(0)) + 0.1

        predicted = model.predict(params, X)

        assert predicted.dtype == np.int64, name
        assert set(np.unique(predicted)) <= {0, 1}, name
