"""The phase tracer of the local runtime, and the changes that made rounds cheaper."""

from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

from shared import aggregation, efs, tracing, worker
from shared.efs import EfsStore
from shared.local.session import LocalStack
from shared.state import SUCCEEDED, StateStore
from tests.conftest import A9A_DIR


@pytest.fixture
def installed(tmp_path):
    tracer = tracing.install("worker", tmp_path / "trace")
    try:
        yield tracer
    finally:
        tracing.uninstall()


def span(phase, name, start, end, pid, **ids):
    return {"phase": phase, "name": name, "start": start, "end": end, "pid": pid, "function": "f", **ids}


def test_tracing_off_without_variable():
    original = EfsStore.read_json
    assert tracing.install_from_environment("worker", {}) is None
    assert tracing.active_tracer() is None
    assert EfsStore.read_json is original


def test_install_wraps_and_uninstall_restores(tmp_path):
    original_read, original_step = EfsStore.read_json, worker.run_task
    original_aggregate = aggregation.aggregate_round
    tracing.install("worker", tmp_path / "trace")
    try:
        assert EfsStore.read_json is not original_read
        assert worker.run_task is not original_step
        # handle_aggregate_message looks the step up in its module, so the wrapper is what it calls.
        assert aggregation.aggregate_round is not original_aggregate
    finally:
        tracing.uninstall()
    assert EfsStore.read_json is original_read
    assert worker.run_task is original_step
    assert aggregation.aggregate_round is original_aggregate
    assert tracing.active_tracer() is None


def test_spans_carry_step_ids(installed, tmp_path):
    store = EfsStore(tmp_path / "efs")

    def step(services, message):
        store.write_json(store.spec_path("job-a"), {"x": 1})
        return store.read_json(store.spec_path("job-a"))

    traced = tracing._traced_step(step, "run_task", tracing._message_ids)
    assert traced(None, {"job_id": "job-a", "round": 3, "worker": 1}) == {"x": 1}
    tracing.flush()

    spans = tracing.read_spans(tmp_path / "trace")
    phases = [entry["phase"] for entry in spans]
    assert phases == ["step", "efs_write", "efs_read"]
    for entry in spans:
        assert (entry["job_id"], entry["round"], entry["worker"]) == ("job-a", 3, 1)
        assert entry["function"] == "worker"
        assert entry["end"] >= entry["start"]


def test_nested_calls_count_once(installed, tmp_path):
    store = EfsStore(tmp_path / "efs")
    store.write_json(tmp_path / "efs" / "a.json", [1])
    outer = tracing._timed("efs_read", lambda: store.read_json(tmp_path / "efs" / "a.json"), "outer")
    installed.spans.clear()
    outer()
    assert [entry["name"] for entry in installed.spans] == ["outer"]


def test_round_breakdown_sums_to_round_time():
    ids = {"job_id": "j"}
    spans = [
        # Aggregation of round 0 sends round 1's tasks, ending at t = 1.0.
        span("step", "aggregate_round", 0.5, 1.2, pid=9, round=0, **ids),
        span("send", "QueueClient.send_tasks", 0.9, 1.0, pid=9, round=0, **ids),
        # Worker 0 finishes first; worker 1 completes the round and sends the aggregate.
        span("step", "run_task", 1.1, 1.5, pid=1, round=1, worker=0, **ids),
        span("step", "run_task", 1.2, 2.0, pid=2, round=1, worker=1, **ids),
        span("state", "StateStore.get_job_and_done_workers", 1.2, 1.3, pid=2, round=1, worker=1, **ids),
        span("efs_read", "EfsStore.read_arrays", 1.3, 1.35, pid=2, round=1, worker=1, **ids),
        span("compute", "GradientAveraging.advance", 1.35, 1.55, pid=2, round=1, worker=1, **ids),
        span("efs_write", "EfsStore.write_arrays", 1.55, 1.6, pid=2, round=1, worker=1, **ids),
        span("state", "StateStore.record_worker_done", 1.6, 1.8, pid=2, round=1, worker=1, **ids),
        span("send", "QueueClient.send_aggregate", 1.8, 1.9, pid=2, round=1, worker=1, **ids),
        # Aggregation of round 1, up to the send of round 2's tasks at t = 2.8.
        span("step", "aggregate_round", 2.0, 3.0, pid=9, round=1, **ids),
        span("aggregation", "LogisticRegression.metrics", 2.1, 2.5, pid=9, round=1, **ids),
        span("send", "QueueClient.send_tasks", 2.6, 2.8, pid=9, round=1, **ids),
        span("efs_write", "EfsStore.prune_rounds", 2.8, 2.9, pid=9, round=1, **ids),
    ]
    (breakdown,) = tracing.round_breakdown(spans, "j")

    assert breakdown.round == 1
    assert breakdown.critical_worker == 1
    assert breakdown.seconds == pytest.approx(1.8)
    assert sum(breakdown.phases.values()) == pytest.approx(breakdown.seconds)
    assert breakdown.phases["compute"] == pytest.approx(0.2)
    assert breakdown.phases["state"] == pytest.approx(0.3)
    assert breakdown.phases["aggregation"] == pytest.approx(0.4)
    # Task dispatch 0.2, aggregate send 0.1, aggregate dispatch 0.1, tasks send 0.2.
    assert breakdown.phases["dispatch"] == pytest.approx(0.6)
    # The prune after the send is off the critical path.
    assert breakdown.phases["efs_write"] == pytest.approx(0.05)


def test_median_breakdown_sums_to_median_round():
    rounds = [tracing.RoundBreakdown("j", index, seconds, dict.fromkeys(tracing.BREAKDOWN_PHASES, seconds / 7))
              for index, seconds in enumerate((1.0, 2.0, 4.0))]
    medians = tracing.median_breakdown(rounds)
    assert medians["round"] == pytest.approx(2.0)
    assert sum(medians[phase] for phase in tracing.BREAKDOWN_PHASES) == pytest.approx(2.0)


def test_write_without_fsync_is_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(efs, "FSYNC", False)
    path = tmp_path / "folder" / "value.bin"
    efs.write_bytes_atomic(path, b"payload")
    assert path.read_bytes() == b"payload"
    assert [entry.name for entry in path.parent.iterdir()] == ["value.bin"]


def test_job_and_done_workers_in_one_read():
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        client.create_table(
            TableName="state", BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                  {"AttributeName": "sk", "AttributeType": "S"}])
        state = StateStore(client, "state")
        assert state.get_job_and_done_workers("missing", 0) == (None, [])

        state.create_job("job-a", "fingerprint", "{}", n_workers=3)
        record, done = state.get_job_and_done_workers("job-a", 0)
        assert record.job_id == "job-a"
        assert done == []

        state.record_worker_done("job-a", 0, 2)
        state.record_worker_done("job-a", 0, 0)
        record, done = state.get_job_and_done_workers("job-a", 0)
        assert record == state.get_job("job-a")
        assert done == [0, 2]


def test_local_stack_traces_rounds(tmp_path):
    spec = {
        "job_id": "traced",
        "model": {"name": "logistic_regression", "alpha": 1e-5},
        "optimizer": {"name": "sgd", "learning_rate": 0.5},
        "data": {"path": "datasets/a9a/a9a", "format": "libsvm", "n_features": 123},
        "training": {"n_workers": 2, "batch_size": 64, "max_rounds": 4, "seed": 3},
    }
    with LocalStack(tmp_path / "efs", concurrency={"worker": 2}, trace_dir=tmp_path / "trace") as stack:
        stack.import_data(A9A_DIR / "a9a", "datasets/a9a/a9a")
        stack.submit(spec)
        assert stack.wait("traced", timeout_seconds=180).status == SUCCEEDED
    spans = tracing.read_spans(tmp_path / "trace")

    functions = {(entry["function"], entry["phase"]) for entry in spans}
    assert ("worker", "invoke") in functions
    assert ("worker", "compute") in functions
    assert ("aggregator", "aggregation") in functions
    breakdowns = tracing.round_breakdown(spans, "traced")
    assert [entry.round for entry in breakdowns] == [1, 2]
    for entry in breakdowns:
        assert sum(entry.phases.values()) == pytest.approx(entry.seconds)
        assert entry.phases["compute"] > 0
        assert entry.critical_worker in (0, 1)
