"""Ten jobs at once on one local stack: each must end exactly as it does alone."""

from __future__ import annotations

import numpy as np
import pytest

from shared.local.session import LocalStack
from shared.reference import train_reference
from shared.spec import parse_job_spec
from shared.state import SUCCEEDED
from tests.conftest import BREAST_CANCER_CSV

N_JOBS = 10


def job_spec(index: int) -> dict:
    """A different spec per job: seed, workers, batch size and learning rate all vary."""
    return {
        "job_id": f"concurrent-{index}",
        "model": {"name": "logistic_regression", "alpha": 1e-3},
        "optimizer": {"name": "momentum", "learning_rate": 0.02 + 0.01 * index, "momentum": 0.9},
        "data": {"path": "datasets/breast_cancer.csv", "format": "csv", "skip_rows": 1,
                 "validation_fraction": 0.2, "standardize": True},
        "training": {"n_workers": 2 + index % 3, "batch_size": 16 + 8 * (index % 4), "max_rounds": 8, "seed": index},
    }


@pytest.fixture(scope="module")
def finished_jobs(tmp_path_factory):
    efs_root = tmp_path_factory.mktemp("concurrency") / "efs"
    with LocalStack(efs_root, retry_delay_seconds=0, concurrency={"starter": 2, "worker": 6, "aggregator": 2}) as stack:
        stack.import_data(BREAST_CANCER_CSV, "datasets/breast_cancer.csv")
        for index in range(N_JOBS):
            stack.submit(job_spec(index))
        records = {index: stack.wait(f"concurrent-{index}", timeout_seconds=300) for index in range(N_JOBS)}
    return efs_root, records


def test_all_jobs_succeed(finished_jobs):
    _, records = finished_jobs

    for index, record in records.items():
        assert record.status == SUCCEEDED, f"job {index}: {record.error}"
        assert record.round == 8


@pytest.mark.parametrize("index", range(N_JOBS))
def test_job_equals_its_solo_run(finished_jobs, index):
    efs_root, _ = finished_jobs
    spec = job_spec(index)

    expected, _ = train_reference(parse_job_spec(spec), efs_root)
    trained = np.load(efs_root / "jobs" / spec["job_id"] / "model" / "params.npy")

    np.testing.assert_array_equal(trained, expected)


def test_jobs_differ_from_each_other(finished_jobs):
    efs_root, _ = finished_jobs
    params = [np.load(efs_root / "jobs" / f"concurrent-{index}" / "model" / "params.npy") for index in range(N_JOBS)]

    for first in range(N_JOBS):
        for second in range(first + 1, N_JOBS):
            assert not np.array_equal(params[first], params[second]), (first, second)
