"""Tests of the worker's fast paths: batch drawing, row slicing, the logistic loss and shard loading.

Each fast path is checked against the plain computation it replaces, on real data: the
breast-cancer rows bundled with the tests (dense) and the first rows of a9a (sparse).
"""

from __future__ import annotations

import mmap
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import expit

from shared import training
from shared.efs import EfsStore
from shared.formats.libsvm import parse_libsvm_lines
from shared.models import get_model_class
from shared.models._losses import logistic_loss
from shared.sampling import batch_indices, rounds_per_epoch, take_rows
from shared.shards import load_shard, shard_folder
from shared.spec import parse_job_spec

TESTS_DATA = Path(__file__).parent / "data"
A9A = Path(__file__).resolve().parents[1] / "examples" / "data" / "a9a" / "a9a"
A9A_ROWS = 3000


def original_batch_indices(seed, round_index, worker, n_rows, per_epoch, batch_size):
    """The batch rule as first written: sort a slice of the epoch's permutation."""
    epoch, position = divmod(round_index, per_epoch)
    order = np.random.default_rng([seed, worker, epoch]).permutation(n_rows)
    return np.sort(order[position * batch_size:(position + 1) * batch_size])


@pytest.mark.parametrize("n_rows, batch_size, round_index", [
    (1000, 1000, 0),     # whole shard
    (1000, 1000, 3),     # whole shard, a later epoch
    (1000, 400, 2),      # short last batch, drawn through the mask
    (1000, 30, 7),       # small batch, comparison sort
    (999, 100, 9),       # shard one row short of the largest: empty batch
    (1, 1, 0),
])
def test_batch_indices_match_original_rule(n_rows, batch_size, round_index):
    per_epoch = rounds_per_epoch([1000], batch_size)
    rows = batch_indices(7, round_index, 2, n_rows, per_epoch, batch_size)
    expected = original_batch_indices(7, round_index, 2, n_rows, per_epoch, batch_size)
    assert rows.dtype == expected.dtype
    np.testing.assert_array_equal(rows, expected)


def test_batch_indices_read_only():
    rows = batch_indices(3, 1, 0, 500, 5, 100)
    assert not rows.flags.writeable
    with pytest.raises(ValueError):
        rows[0] = 1


def load_dense_rows() -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(TESTS_DATA / "breast_cancer.csv", delimiter=",", skiprows=1)
    X = (table[:, :-1] - table[:, :-1].mean(axis=0)) / table[:, :-1].std(axis=0)
    return X.astype(np.float32), table[:, -1].astype(np.int64)


def load_sparse_rows() -> tuple[sp.csr_matrix, np.ndarray]:
    with open(A9A, encoding="utf-8") as handle:
        X, labels = parse_libsvm_lines(islice(handle, A9A_ROWS), str(A9A))
    X = sp.csr_matrix((X.data, X.indices, X.indptr), shape=(X.shape[0], 123))
    return X, (labels > 0).astype(np.int64)


def write_shard(efs_root: Path, job_id: str, X, y: np.ndarray) -> dict:
    """Write one shard in the layout the preparation writes; return its manifest."""
    store = EfsStore(efs_root)
    folder = shard_folder(store, job_id, 0)
    folder.mkdir(parents=True)
    np.save(folder / "y.npy", y)
    if sp.issparse(X):
        np.save(folder / "X-data.npy", X.data.astype(np.float32))
        np.save(folder / "X-indices.npy", X.indices.astype(np.int32))
        np.save(folder / "X-indptr.npy", X.indptr.astype(np.int64))
    else:
        np.save(folder / "X.npy", np.ascontiguousarray(X, dtype=np.float32))
    return {"n_features": X.shape[1], "classes": [0, 1], "class_counts": np.bincount(y).tolist(),
            "sparse": sp.issparse(X), "shard_rows": [X.shape[0]], "validation_rows": 0}


def mapped_buffer(array: np.ndarray):
    """Return the object at the end of ``array``'s chain of bases."""
    while getattr(array, "base", None) is not None:
        array = array.base
    return array


@pytest.fixture(params=["dense", "sparse"])
def shard_case(request, tmp_path):
    X, y = load_dense_rows() if request.param == "dense" else load_sparse_rows()
    manifest = write_shard(tmp_path, "job", X, y)
    return request.param, load_shard(EfsStore(tmp_path), "job", manifest, 0), manifest, X, y


def test_load_shard_maps_files(shard_case):
    kind, shard, _, _, _ = shard_case
    arrays = [shard.X.data, shard.X.indices] if kind == "sparse" else [shard.X]
    for array in [*arrays, shard.y]:
        assert isinstance(mapped_buffer(array), mmap.mmap)


def test_take_rows_contiguous_equals_fancy_index(shard_case):
    kind, shard, _, X, _ = shard_case
    rows = np.arange(100, 260)
    chunk = take_rows(shard.X, rows)
    if kind == "sparse":
        assert chunk.shape == (len(rows), X.shape[1])
        np.testing.assert_array_equal(chunk.toarray(), X[rows].toarray())
    else:
        assert np.shares_memory(chunk, shard.X)
        np.testing.assert_array_equal(chunk, X[rows])


def test_take_rows_scattered_equals_fancy_index(shard_case):
    kind, shard, _, X, _ = shard_case
    rows = np.array([0, 3, 4, 90, 91, 300])
    chunk = take_rows(shard.X, rows)
    dense = chunk.toarray() if kind == "sparse" else chunk
    expected = X[rows].toarray() if kind == "sparse" else X[rows]
    np.testing.assert_array_equal(dense, expected)


@pytest.mark.parametrize("rows", [np.arange(100, 260), np.array([0, 3, 4, 90, 91, 300])],
                         ids=["contiguous", "scattered"])
def test_take_rows_as_float64(shard_case, rows):
    kind, shard, _, X, _ = shard_case
    chunk = take_rows(shard.X, rows, dtype=np.float64)

    assert chunk.dtype == np.float64
    assert chunk.shape == (len(rows), X.shape[1])
    dense = chunk.toarray() if kind == "sparse" else chunk
    expected = X[rows].toarray() if kind == "sparse" else X[rows]
    np.testing.assert_array_equal(dense, expected.astype(np.float64))
    if kind == "sparse":
        # The stored order of each row is kept, so products add the same terms in the same order.
        np.testing.assert_array_equal(chunk.indices, X[rows].indices)


def test_take_rows_sparse_empty():
    X, _ = load_sparse_rows()
    chunk = take_rows(X, np.zeros(0, dtype=np.int64), dtype=np.float64)

    assert chunk.shape == (0, X.shape[1])
    assert chunk.nnz == 0


def test_take_rows_empty():
    X = np.zeros((5, 2), dtype=np.float32)
    assert take_rows(X, np.zeros(0, dtype=np.int64)).shape == (0, 2)


@pytest.mark.parametrize("batch_size", [1_000_000, 128])
def test_chunked_worker_equals_one_call(shard_case, monkeypatch, batch_size):
    kind, shard, manifest, _, _ = shard_case
    spec = parse_job_spec({
        "job_id": "job", "model": {"name": "logistic_regression", "alpha": 1e-3},
        "data": {"path": "unused.svm", "format": "libsvm"},
        "training": {"n_workers": 1, "batch_size": batch_size, "seed": 5}})
    model = get_model_class("logistic_regression")(n_features=manifest["n_features"])
    params = np.random.default_rng(1).normal(scale=0.3, size=model.n_params)
    # Chunks of 37 rows make several chunks, and a short last one, of every batch.
    monkeypatch.setattr(training, "GRADIENT_CHUNK_ROWS", 37)
    result = training.GradientAveraging().worker_result(spec, manifest, model, params, shard, 1, 0)

    per_epoch = rounds_per_epoch(manifest["shard_rows"], batch_size)
    rows = batch_indices(5, 1, 0, shard.n_rows, per_epoch, batch_size)
    loss, grad = model.loss_grad(params, shard.X[rows], np.asarray(shard.y[rows]))
    assert int(result["n_samples"]) == len(rows)
    assert float(result["loss_sum"]) == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(result["grad_sum"], grad, rtol=1e-11, atol=1e-11)


def expected_worker_result(spec, manifest, model, params, shard, round_index):
    """Return the loss and gradient sums of worker 0's batch, computed in one call without the mode."""
    per_epoch = rounds_per_epoch(manifest["shard_rows"], spec.training.batch_size)
    rows = batch_indices(spec.training.seed, round_index, 0, shard.n_rows, per_epoch, spec.training.batch_size)
    y = np.asarray(shard.y[rows])
    weights = training.class_weights(spec, manifest)
    return model.loss_grad(params, shard.X[rows], y, None if weights is None else weights[y])


def test_worker_follows_each_job_settings(shard_case):
    # The mode keeps the settings of the last spec and manifest it saw, so alternating jobs
    # check that each gets its own batch size and class weights.
    _, shard, manifest, _, _ = shard_case
    specs = [parse_job_spec({
        "job_id": f"job-{batch_size}", "model": {"name": "logistic_regression", "alpha": 1e-3, **model},
        "data": {"path": "unused.svm", "format": "libsvm"},
        "training": {"n_workers": 1, "batch_size": batch_size, "seed": 5}})
        for batch_size, model in ((10, {}), (25, {"class_weight": "balanced"}))]
    model = get_model_class("logistic_regression")(n_features=manifest["n_features"])
    params = np.random.default_rng(2).normal(scale=0.3, size=model.n_params)
    mode = training.GradientAveraging()

    # The last pair gives the same settings in a new manifest object.
    for spec, job_manifest in ((specs[0], manifest), (specs[1], manifest), (specs[0], manifest),
                               (specs[1], dict(manifest))):
        for round_index in (0, 3):
            result = mode.worker_result(spec, job_manifest, model, params, shard, round_index, 0)
            loss, grad = expected_worker_result(spec, job_manifest, model, params, shard, round_index)
            assert int(result["n_samples"]) == spec.training.batch_size
            assert float(result["loss_sum"]) == loss
            np.testing.assert_array_equal(result["grad_sum"], grad)


def test_logistic_loss_matches_reference_formulas():
    margins = np.concatenate([np.linspace(-700.0, 700.0, 200_001), [0.0, -0.0, 1e-300, -1e-300]])
    losses, sigmoid_of_negated = logistic_loss(margins)
    np.testing.assert_allclose(losses, np.logaddexp(0.0, -margins), rtol=1e-15, atol=0)
    np.testing.assert_allclose(sigmoid_of_negated, expit(-margins), rtol=1e-15, atol=0)


def test_logistic_loss_finite_beyond_exp_range():
    losses, sigmoid_of_negated = logistic_loss(np.array([-1e308, -800.0, 800.0, 1e308]))
    np.testing.assert_array_equal(losses, [1e308, 800.0, 0.0, 0.0])
    np.testing.assert_array_equal(sigmoid_of_negated, [1.0, 1.0, 0.0, 0.0])


def test_sparse_float32_converted_without_copying_indices():
    X, _ = load_sparse_rows()
    model = get_model_class("logistic_regression")(n_features=123)
    converted = model._check_X(X)
    assert converted.dtype == np.float64
    assert np.shares_memory(converted.indices, X.indices)
    np.testing.assert_array_equal(converted.toarray(), X.toarray().astype(np.float64))
