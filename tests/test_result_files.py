"""Tests of the result file: one .npy per worker or reducer, with a trailer that names it.

Both ways of reading a file are checked: read whole into a buffer (small vectors) and
memory-mapped (large ones), chosen by ``READ_WHOLE_MAX_BYTES``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from shared import reduction, training
from shared.efs import EfsStore
from shared.errors import ResultFileError, StaleMessageError
from shared.reduction import (read_reduced_round, read_worker_result, reduce_worker_results, vector_header,
                              write_reduced_slice, write_worker_result)
from shared.state import FAILED
from shared.training import TRAINING_MODES, Reduction
from tests.baton_jobs import breast_cancer_spec

GRADIENT = TRAINING_MODES["gradient_average"]
KMEANS = TRAINING_MODES["statistics"]


def gradient_result(value: float, n_params: int = 10) -> dict[str, np.ndarray]:
    return {"grad_sum": np.full(n_params, value), "loss_sum": np.float64(value), "n_samples": np.int64(3)}


def store_with_rounds(root: Path, job_ids: tuple[str, ...] = ("job", "other-job"), rounds: int = 5) -> EfsStore:
    """Return a store whose jobs have their first ``rounds`` round folders, as the aggregator
    leaves them before a worker writes its result there."""
    store = EfsStore(root)
    for job_id in job_ids:
        for round_index in range(rounds):
            store.round_dir(job_id, round_index).mkdir(parents=True, exist_ok=True)
    return store


@pytest.fixture(params=[0, 10**9], ids=["mapped", "read-whole"])
def read_path(request, monkeypatch):
    monkeypatch.setattr(reduction, "READ_WHOLE_MAX_BYTES", request.param)
    return request.param


def test_result_file_is_one_npy(tmp_path):
    store = store_with_rounds(tmp_path)
    write_worker_result(store, "job", 4, 2, GRADIENT, gradient_result(1.5))

    assert sorted(os.listdir(store.round_dir("job", 4))) == ["result-2.npy"]
    # numpy reads the vector and stops before the trailer.
    np.testing.assert_array_equal(np.load(store.result_path("job", 4, 2)), np.full(10, 1.5))
    np.testing.assert_array_equal(np.load(store.result_path("job", 4, 2), mmap_mode="r"), np.full(10, 1.5))


def test_result_for_pruned_round_dropped(tmp_path):
    store = store_with_rounds(tmp_path, rounds=2)

    with pytest.raises(StaleMessageError, match=r"round 3 of job job is over: its folder '.*rounds/2' was pruned"):
        write_worker_result(store, "job", 2, 1, GRADIENT, gradient_result(1.0))

    # No folder is made again for a round that is over.
    assert not store.round_dir("job", 2).exists()


def test_result_file_round_trip(tmp_path):
    store = store_with_rounds(tmp_path)
    vector = np.random.default_rng(0).standard_normal(10) * 1e-300
    write_worker_result(store, "job", 0, 1, GRADIENT, {"grad_sum": vector, "loss_sum": np.float64(0.1),
                                                       "n_samples": np.int64(7)})

    read_vector, scalars = read_worker_result(store, "job", 0, 1, 10)
    assert read_vector.tobytes() == vector.tobytes()
    assert scalars["loss_sum"].dtype == np.float64
    assert scalars["loss_sum"].shape == ()
    assert float(scalars["loss_sum"]) == 0.1
    assert scalars["n_samples"].dtype == np.int64
    assert int(scalars["n_samples"]) == 7


def test_result_paths_match_result_path(tmp_path):
    store = store_with_rounds(tmp_path)

    assert [Path(path) for path in store.result_paths("job", 3, 4)] == [store.result_path("job", 3, worker)
                                                                         for worker in range(4)]


def test_same_result_same_bytes(tmp_path):
    store = store_with_rounds(tmp_path)
    write_worker_result(store, "job", 0, 0, GRADIENT, gradient_result(2.0))
    first = store.result_path("job", 0, 0).read_bytes()
    write_worker_result(store, "job", 0, 0, GRADIENT, gradient_result(2.0))

    assert store.result_path("job", 0, 0).read_bytes() == first


def test_vector_of_wrong_length_rejected(tmp_path, read_path):
    store = store_with_rounds(tmp_path)
    write_worker_result(store, "job", 0, 0, GRADIENT, gradient_result(1.0, n_params=10))

    with pytest.raises(ResultFileError, match=r"result file 'jobs/job/rounds/0/result-0.npy' does not hold 12 "
                                              r"float64 values \(its .npy header is \{'descr': '<f8', "
                                              r"'fortran_order': False, 'shape': \(10,\), \}\)"):
        reduce_worker_results(store, "job", 0, 1, GRADIENT, 12, 0, 12)
    assert reduce_worker_results(store, "job", 0, 1, GRADIENT, 10, 0, 10).vector.tolist() == [1.0] * 10


@pytest.mark.parametrize("written, problem", [
    (("other-job", 0, 0), r"belongs to job_id 'other-job', round 1 \(folder rounds/0\), worker 0, not to job_id "
                          r"'job', round 1 \(folder rounds/0\)"),
    (("job", 3, 0), r"belongs to job_id 'job', round 4 \(folder rounds/3\), worker 0, not to job_id 'job', "
                    r"round 1 \(folder rounds/0\), worker 0\."),
    (("job", 0, 5), r"belongs to job_id 'job', round 1 \(folder rounds/0\), worker 5, not to job_id 'job', "
                    r"round 1 \(folder rounds/0\), worker 0"),
])
def test_file_of_other_round_rejected(tmp_path, read_path, written, problem):
    store = store_with_rounds(tmp_path)
    job_id, round_index, worker = written
    write_worker_result(store, job_id, round_index, worker, GRADIENT, gradient_result(1.0))
    # The file of another job, round or worker, moved to where worker 0's file of the first round (index 0) belongs.
    os.replace(store.result_path(job_id, round_index, worker), store.result_path("job", 0, 0))

    with pytest.raises(ResultFileError, match=problem):
        reduce_worker_results(store, "job", 0, 1, GRADIENT, 10, 0, 10)


def test_file_cut_short_rejected(tmp_path, read_path):
    store = store_with_rounds(tmp_path)
    write_worker_result(store, "job", 0, 0, GRADIENT, gradient_result(1.0))
    path = store.result_path("job", 0, 0)
    payload = path.read_bytes()
    header_length = len(vector_header(10))
    inside_vector = "result file 'jobs/job/rounds/0/result-0.npy' ends after {} bytes, inside its 10 float64 values"
    cases = [
        (header_length, inside_vector.format(header_length)),
        (header_length + 40, inside_vector.format(header_length + 40)),
        (header_length + 79, inside_vector.format(header_length + 79)),
        (header_length + 80, r"result file 'jobs/job/rounds/0/result-0.npy' has no valid trailer after its vector "
                             r"\(0 bytes\)"),
        (len(payload) - 1, "result file 'jobs/job/rounds/0/result-0.npy' has no valid trailer"),
    ]

    for length, problem in cases:
        path.write_bytes(payload[:length])
        with pytest.raises(ResultFileError, match=problem):
            reduce_worker_results(store, "job", 0, 1, GRADIENT, 10, 0, 10)


@pytest.mark.parametrize("start, stop", [(0, 10), (4, 10)])
def test_empty_file_rejected(tmp_path, read_path, start, stop):
    store = store_with_rounds(tmp_path)
    store.result_path("job", 0, 0).write_bytes(b"")

    with pytest.raises(ResultFileError, match=r"result file 'jobs/job/rounds/0/result-0.npy' does not hold 10 "
                                              r"float64 values \(it is empty\)"):
        reduce_worker_results(store, "job", 0, 1, GRADIENT, 10, start, stop)


def test_foreign_bytes_rejected(tmp_path, read_path):
    store = store_with_rounds(tmp_path)
    store.result_path("job", 0, 0).write_bytes(b"PK\x03\x04" + bytes(200))

    with pytest.raises(ResultFileError, match=r"does not hold 10 float64 values \(it does not start with a .npy "
                                              r"header\)"):
        reduce_worker_results(store, "job", 0, 1, GRADIENT, 10, 0, 10)


@pytest.mark.parametrize("extra", [b"x", b" ", b"{}"])
def test_bytes_after_trailer_rejected(tmp_path, read_path, extra):
    store = store_with_rounds(tmp_path)
    write_worker_result(store, "job", 0, 0, GRADIENT, gradient_result(1.0))
    path = store.result_path("job", 0, 0)
    path.write_bytes(path.read_bytes() + extra)

    with pytest.raises(ResultFileError, match="has no valid trailer after its vector"):
        reduce_worker_results(store, "job", 0, 1, GRADIENT, 10, 0, 10)


def test_slice_of_foreign_file_rejected(tmp_path, read_path):
    # A reducer reads one slice of each file, but checks the header and trailer of the whole file.
    store = store_with_rounds(tmp_path)
    write_worker_result(store, "job", 0, 0, GRADIENT, gradient_result(1.0, n_params=1000))
    write_worker_result(store, "job", 0, 1, GRADIENT, gradient_result(1.0, n_params=1000))
    os.replace(store.result_path("job", 0, 1), store.result_path("job", 0, 0))

    with pytest.raises(ResultFileError, match=r"belongs to job_id 'job', round 1 \(folder rounds/0\), worker 1, not "
                                              r"to job_id 'job', round 1 \(folder rounds/0\), worker 0"):
        reduce_worker_results(store, "job", 0, 1, GRADIENT, 1000, 600, 1000)


def test_file_without_trailer_rejected(tmp_path, read_path):
    # The layout of earlier versions: the vector alone, with its small arrays in a .json beside it.
    store = store_with_rounds(tmp_path)
    store.write_npy(store.result_path("job", 0, 0), np.ones(10))

    with pytest.raises(ResultFileError, match="no valid trailer.*earlier version of Baton"):
        reduce_worker_results(store, "job", 0, 1, GRADIENT, 10, 0, 10)


def test_long_trailer_read_whole(tmp_path, read_path):
    # Counts of 2,000 clusters make a trailer several times longer than the first read.
    n_clusters, n_features = 2000, 3
    rng = np.random.default_rng(1)
    results = [{"sums": rng.standard_normal((n_clusters, n_features)), "counts": rng.random(n_clusters) * 1e5,
                "inertia": rng.random(1), "n_samples": np.int64(50)} for _ in range(3)]
    store = store_with_rounds(tmp_path)
    for worker, arrays in enumerate(results):
        write_worker_result(store, "job", 0, worker, KMEANS, arrays)
    assert store.result_path("job", 0, 0).stat().st_size > 8 * n_clusters * n_features + 3 * reduction.TRAILER_READ_BYTES

    reduced = reduce_worker_results(store, "job", 0, 3, KMEANS, n_clusters * n_features, 0, n_clusters * n_features)
    counts = np.zeros(n_clusters)
    for arrays in results:
        counts += arrays["counts"]
    assert reduced.scalars["counts"].tobytes() == counts.tobytes()
    assert int(reduced.scalars["n_samples"]) == 150


def running_sum(mode, results, start: int, stop: int) -> np.ndarray:
    """Sum the workers' vectors in worker order from zeros, one plain numpy addition per worker."""
    total = np.zeros(stop - start)
    for arrays in results:
        vector = np.ravel(arrays[mode.vector_name])[start:stop]
        if mode is GRADIENT:
            total += vector
        elif int(arrays["n_samples"]) > 0:
            total += vector * float(int(arrays["n_samples"]))
    return total


def special_values(n_params: int, seed: int) -> np.ndarray:
    """Return a vector of normal numbers with signed zeros, subnormals, infinities and NaN mixed in."""
    rng = np.random.default_rng(seed)
    vector = rng.standard_normal(n_params) * 10.0 ** rng.integers(-300, 300, n_params)
    specials = np.array([0.0, -0.0, 5e-324, -5e-324, np.inf, -np.inf, np.nan, 1e308, -1e308])
    picked = rng.random(n_params) < 0.3
    vector[picked] = rng.choice(specials, picked.sum())
    return vector


@pytest.mark.parametrize("mode_name, skipped", [("gradient_average", ()), ("model_average", (0, 2)),
                                                ("model_average", (0, 1, 2, 3))])
@pytest.mark.parametrize("start, stop", [(0, 3000), (1000, 2999)])
@pytest.mark.parametrize("block_elements", [training.REDUCTION_BLOCK_ELEMENTS, 512], ids=["one-block", "blocks"])
def test_reduction_equals_running_sum(tmp_path, monkeypatch, read_path, mode_name, skipped, start, stop,
                                      block_elements):
    # The reduction writes the first added vector into its total instead of adding it to
    # zeros, and the bytes must still be those of a running sum from zeros.
    monkeypatch.setattr(training, "REDUCTION_BLOCK_ELEMENTS", block_elements)
    mode = TRAINING_MODES[mode_name]
    n_workers, n_params = 4, 3000
    # Elements 0 to 1000 are -0.0 in every worker, so both slices start with them. A
    # running sum from zeros turns them into 0.0.
    results = []
    for worker in range(n_workers):
        vector = special_values(n_params, seed=worker)
        vector[:1001] = -0.0
        rows = np.int64(0 if worker in skipped else 3 + worker)
        results.append({mode.vector_name: vector, "loss_sum": np.float64(worker), "n_samples": rows})
    store = store_with_rounds(tmp_path)
    for worker, arrays in enumerate(results):
        write_worker_result(store, "job", 0, worker, mode, arrays)

    with np.errstate(over="ignore", invalid="ignore"):
        expected = running_sum(mode, results, start, stop)
    reduced = reduce_worker_results(store, "job", 0, n_workers, mode, n_params, start, stop)

    assert reduced.vector.tobytes() == expected.tobytes()
    assert not np.signbit(reduced.vector[0]), "a sum from zeros turns -0.0 into 0.0"


def test_short_reads_continue(tmp_path, monkeypatch):
    # preadv may return fewer bytes than requested before the end of a file (NFS may).
    store = store_with_rounds(tmp_path)
    vector = np.arange(5000, dtype=np.float64)
    write_worker_result(store, "job", 0, 0, GRADIENT, {"grad_sum": vector, "loss_sum": np.float64(2.5),
                                                       "n_samples": np.int64(9)})
    real_preadv = os.preadv
    calls = []

    def preadv_of_at_most_1000_bytes(fd, buffers, offset):
        calls.append(offset)
        first = memoryview(buffers[0])[:1000]
        return real_preadv(fd, [first], offset)

    monkeypatch.setattr(reduction.os, "preadv", preadv_of_at_most_1000_bytes)
    read_vector, scalars = read_worker_result(store, "job", 0, 0, 5000)

    assert len(calls) > 40
    assert read_vector.tobytes() == vector.tobytes()
    assert float(scalars["loss_sum"]) == 2.5


def test_reduced_slices_joined(tmp_path):
    store = store_with_rounds(tmp_path)
    scalars = {"loss_sum": np.float64(4.0), "n_samples": np.int64(12)}
    write_reduced_slice(store, "job", 2, 0, Reduction(vector=np.array([1.0, 2.0]), scalars=scalars))
    write_reduced_slice(store, "job", 2, 1, Reduction(vector=np.array([3.0, 4.0, 5.0]), scalars=scalars))

    joined = read_reduced_round(store, "job", 2, 2, 5)

    assert joined.vector.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert float(joined.scalars["loss_sum"]) == 4.0
    assert int(joined.scalars["n_samples"]) == 12


def test_reduced_slice_of_other_slice_rejected(tmp_path):
    store = store_with_rounds(tmp_path)
    scalars = {"loss_sum": np.float64(4.0), "n_samples": np.int64(12)}
    write_reduced_slice(store, "job", 2, 1, Reduction(vector=np.array([1.0, 2.0]), scalars=scalars))
    write_reduced_slice(store, "job", 2, 0, Reduction(vector=np.array([3.0, 4.0]), scalars=scalars))
    os.replace(store.reduced_path("job", 2, 1), store.reduced_path("job", 2, 0))
    write_reduced_slice(store, "job", 2, 1, Reduction(vector=np.array([1.0, 2.0]), scalars=scalars))

    with pytest.raises(ResultFileError, match=r"result file 'jobs/job/rounds/2/reduced-0.npy' belongs to job_id "
                                              r"'job', round 3 \(folder rounds/2\), slice 1, not to job_id 'job', "
                                              r"round 3 \(folder rounds/2\), slice 0"):
        read_reduced_round(store, "job", 2, 2, 4)


# Through the handlers ----------------------------------------------------------------------


def rename_job_in_trailer(path: Path, job_id: str) -> None:
    """Rewrite a result file as if job ``other-job`` had written it, keeping its vector."""
    payload = path.read_bytes()
    written = f'"job_id":"{job_id}"'.encode()
    assert payload.count(written) == 1
    path.write_bytes(payload.replace(written, b'"job_id":"other-job"'))


# (reducers, the file that is replaced, aggregate-queue deliveries before the one that reads it)
FOREIGN_FILE_CASES = {
    "result-read-by-aggregator": (1, "result-0.npy", 0),
    "result-read-by-reducer": (2, "result-0.npy", 0),
    "reduced-slice-read-by-aggregator": (2, "reduced-0.npy", 2),
}


@pytest.mark.parametrize("case", FOREIGN_FILE_CASES)
def test_foreign_file_fails_job_at_once(inprocess_stack, case):
    reducers, file_name, deliveries_before = FOREIGN_FILE_CASES[case]
    job_id = f"foreign-{case}"
    stack = inprocess_stack
    stack.submit(breast_cancer_spec(job_id, training={"n_workers": 2, "max_rounds": 2, "reducers": reducers}))
    while stack.step("JobsQueue") is not None or stack.step("TasksQueue") is not None:
        pass
    for _ in range(deliveries_before):
        assert not stack.step("AggregateQueue").failed
    rename_job_in_trailer(stack.efs_root / "jobs" / job_id / "rounds" / "0" / file_name, job_id)

    delivery = stack.step("AggregateQueue")

    assert not delivery.failed, "a result file that fails its check does not mend on a retry"
    assert ("reduce" in delivery.body) == (case == "result-read-by-reducer")
    record = stack.services.state.get_job(job_id)
    assert record.status == FAILED
    assert f"result file 'jobs/{job_id}/rounds/0/{file_name}' belongs to job_id 'other-job'" in record.error
    assert "not to job_id" in record.error
    assert "submit the job again under a new job id" in record.error
    assert str(stack.efs_root) not in record.error, "name the file as the user sees it on the mount"
    # The messages the round still had queued are dropped as stale, and none is retried.
    stack.run()
    assert not any(delivery.failed for delivery in stack.deliveries)
    assert stack.services.state.get_job(job_id).error == record.error
