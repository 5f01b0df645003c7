"""A job whose invocations may do one step each still trains to the same bytes."""

from __future__ import annotations

import json

import pytest

from shared.local.session import LocalStack
from tests.reliability_support import FAST_RETRY_SECONDS, a9a_spec, params_digest, write_a9a_subset

# One worker whose batch spans three gradient chunks (4096 rows each), and an aggregator
# whose round is three steps (combine, one validation chunk, commit): with one step per
# invocation every round takes four continuations.
ROUNDS = 14
SPEC = {"n_workers": 1, "batch_size": 10800, "max_rounds": ROUNDS, "max_epochs": ROUNDS, "seed": 5}


def run_job(tmp_path, job_id: str, environment: dict) -> tuple[str, dict]:
    efs_root = tmp_path / job_id / "efs"
    data_path = write_a9a_subset(efs_root, 12000)
    with LocalStack(efs_root, extra_environment=environment, retry_delay_seconds=FAST_RETRY_SECONDS,
                    concurrency={"worker": 1}) as stack:
        stack.submit(a9a_spec(job_id, data_path, **SPEC))
        record = stack.wait(job_id, timeout_seconds=240)
        bodies = {name: list(lanes.bodies) for name, lanes in stack.runtime.lanes.items()}
    assert record.status == "SUCCEEDED", record.error
    return params_digest(efs_root, job_id), bodies


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("continuation")
    bounded = run_job(tmp_path, "bounded", {"MAX_STEPS_PER_INVOCATION": "1"})
    unbounded = run_job(tmp_path, "unbounded", {})
    return bounded, unbounded


def count_continuations(bodies: dict) -> int:
    return sum("continuation" in json.loads(body) for lane in bodies.values() for body in lane)


def test_bounded_run_needs_many_continuations(runs):
    (_, bodies), _ = runs
    assert count_continuations(bodies) >= 50


def test_worker_and_aggregator_both_continue(runs):
    (_, bodies), _ = runs
    assert any("continuation" in json.loads(body) for body in bodies["worker"])
    assert any("continuation" in json.loads(body) for body in bodies["aggregator"])


def test_unbounded_run_has_no_continuations(runs):
    _, (_, bodies) = runs
    assert count_continuations(bodies) == 0


def test_bounded_weights_equal_unbounded(runs):
    (bounded_digest, _), (unbounded_digest, _) = runs
    assert bounded_digest is not None
    assert bounded_digest == unbounded_digest


def test_messages_stay_under_1_kb(runs):
    for (_, bodies) in runs:
        for name, lane_bodies in bodies.items():
            if name == "starter":
                continue
            assert max((len(body.encode()) for body in lane_bodies), default=0) < 1024, name
