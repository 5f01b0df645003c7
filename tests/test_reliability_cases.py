"""Reported failure cases, each handled and checked on its own."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import boto3
import numpy as np
import pytest
from moto import mock_aws

from shared.config import Settings
from shared.efs import EfsStore, check_efs_writable
from shared.errors import BatonError, EfsNotWritableError, InvalidMessageError
from shared.handlers import sqs_handler
from shared.local.stack import SERVERLESS_FILE, create_stack, load_stack_definition, parse_rate
from shared.queues import MAX_MESSAGE_BYTES, MAX_MESSAGE_INTEGER, QueueClient, parse_task
from shared.state import StateStore


@pytest.fixture
def aws():
    with mock_aws():
        definition = load_stack_definition(stage="cases")
        sqs = boto3.client("sqs", region_name="us-east-1")
        dynamodb = boto3.client("dynamodb", region_name="us-east-1")
        create_stack(definition, sqs, dynamodb)
        yield definition, sqs, dynamodb


def test_short_visibility_timeout_rejected(tmp_path):
    text = SERVERLESS_FILE.read_text()
    assert "tasksVisibilityTimeout: 1800" in text
    broken = tmp_path / "serverless.yml"
    broken.write_text(text.replace("tasksVisibilityTimeout: 1800", "tasksVisibilityTimeout: 60"))
    with pytest.raises(BatonError, match="VisibilityTimeout 60 s, below the 300 s timeout of function 'worker'"):
        load_stack_definition(broken, stage="cases")


def test_every_queue_covers_its_function_timeout():
    definition = load_stack_definition(stage="cases")
    for function in definition.functions.values():
        if function.queue_logical_id is None:
            continue
        visibility = int(definition.resources[function.queue_logical_id]["Properties"]["VisibilityTimeout"])
        assert visibility >= function.timeout_seconds, function.name


def test_every_mapping_caps_concurrency():
    # Without maximumConcurrency, Lambda throttling can return messages to the queue until
    # they are dead-lettered before any handler ran.
    definition = load_stack_definition(stage="cases")
    for function in definition.functions.values():
        if function.queue_logical_id is not None:
            assert isinstance(function.max_concurrency, int), function.name
            assert function.max_concurrency >= 2, function.name


def test_watchdog_is_scheduled():
    function = load_stack_definition(stage="cases").functions["watchdog"]
    assert function.queue_logical_id is None
    assert function.schedule_seconds == parse_rate("rate(5 minutes)") == 300


def record(message_id: str, body: dict) -> dict:
    return {"messageId": message_id, "receiptHandle": message_id, "body": json.dumps(body),
            "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "0", "SenderId": "t",
                           "ApproximateFirstReceiveTimestamp": "0"},
            "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q", "awsRegion": "us-east-1"}


def test_one_failing_record_returns_only_itself():
    seen = []

    def step(services, sqs_record, invocation):
        task = parse_task(sqs_record.body)
        seen.append((task["job_id"], task["round"]))
        if task["worker"] == 1:
            raise RuntimeError("boom")

    handler = sqs_handler("worker", step)
    event = {"Records": [record("a", {"job_id": "one", "round": 0, "worker": 0}),
                         record("b", {"job_id": "two", "round": 3, "worker": 1}),
                         record("c", {"job_id": "one", "round": 1, "worker": 2})]}
    from shared import handlers

    handlers.set_services(object())
    try:
        response = handler(event, None)
    finally:
        handlers.set_services(None)
    assert response == {"batchItemFailures": [{"itemIdentifier": "b"}]}
    assert seen == [("one", 0), ("two", 3), ("one", 1)]


def test_repeated_done_record_counts_once(aws):
    definition, _, dynamodb = aws
    state = StateStore(dynamodb, definition.table_name())
    first = state.record_worker_done("job", 0, 1)
    second = state.record_worker_done("job", 0, 1)
    assert first == (True, [1])
    assert second == (False, [1])


def test_duplicate_done_record_one_request(aws):
    definition, _, dynamodb = aws
    state = StateStore(dynamodb, definition.table_name())
    state.record_worker_done("job", 0, 0, {"worker_seconds": 1.0})
    calls = []

    def count_call(model, **_):
        calls.append(model.name)

    dynamodb.meta.events.register("before-call.dynamodb", count_call)
    try:
        result = state.record_worker_done("job", 0, 0, {"worker_seconds": 1.0})
    finally:
        dynamodb.meta.events.unregister("before-call.dynamodb", count_call)
    assert result == (False, [0])
    assert calls == ["UpdateItem"]
    assert state.get_round_usage("job", 0) == {"worker_seconds": 1.0}


def test_second_advance_of_round_refused(aws):
    definition, _, dynamodb = aws
    state = StateStore(dynamodb, definition.table_name())
    state.create_job("job", "fingerprint", "{}", 2)
    state.start_job("job", 10)
    assert state.advance_round("job", 0, {"train_loss": 1.0}) is True
    assert state.advance_round("job", 0, {"train_loss": 1.0}) is False
    assert state.get_job("job").round == 1


def test_oversized_message_refused(aws):
    definition, sqs, _ = aws
    queues = QueueClient(sqs, definition.settings("/tmp"))
    with pytest.raises(ValueError, match="1024-byte budget"):
        queues.send_task("j" * MAX_MESSAGE_BYTES, 0, 0)


def test_unwritable_efs_root_named(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # Running as root ignores file modes, so the refusal is simulated at open().
    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(EfsNotWritableError) as error:
        check_efs_writable(tmp_path)
    monkeypatch.undo()
    assert str(tmp_path) in str(error.value)
    assert "PosixUser" in str(error.value)
    assert "Permission denied" in str(error.value)


def test_missing_efs_root_named(tmp_path):
    with pytest.raises(EfsNotWritableError, match="not writable"):
        check_efs_writable(tmp_path / "not-mounted")


def test_readers_never_see_partial_file(tmp_path):
    store = EfsStore(tmp_path)
    path = tmp_path / "rounds" / "0" / "state.npz"
    arrays = {"params": np.arange(200_000, dtype=np.float64)}
    store.write_arrays(path, arrays)
    stop = threading.Event()
    errors = []

    def write_forever():
        while not stop.is_set():
            store.write_arrays(path, arrays)

    writers = [threading.Thread(target=write_forever) for _ in range(4)]
    for writer in writers:
        writer.start()
    try:
        for _ in range(200):
            try:
                assert np.array_equal(store.read_arrays(path)["params"], arrays["params"])
            except Exception as error:  # collect, so the writers are stopped before failing
                errors.append(error)
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    assert errors == []
    assert [entry.name for entry in path.parent.iterdir()] == ["state.npz"]


def test_many_workers_write_one_round_at_once(tmp_path):
    store = EfsStore(tmp_path)
    barrier = threading.Barrier(64)

    def worker(index: int):
        barrier.wait()
        store.write_arrays(store.result_path("job", 0, index), {"grad_sum": np.full(10, index, dtype=np.float64)})

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(64):
        assert store.read_arrays(store.result_path("job", 0, index))["grad_sum"][0] == index


def count_open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_no_descriptor_leak_over_1000_rounds(tmp_path):
    store = EfsStore(tmp_path)
    params = np.zeros(124)
    before = count_open_files()
    for round_index in range(1000):
        store.write_arrays(store.state_path("job", round_index), {"params": params + round_index})
        store.write_arrays(tmp_path / "jobs" / "job" / "rounds" / str(round_index) / "progress-0.npz",
                           {"position": np.int64(round_index), "_writer": np.str_("m")})
        store.write_json(store.metrics_path("job", round_index), {"round": round_index})
        assert store.read_arrays(store.state_path("job", round_index))["params"][0] == round_index
        store.prune_rounds("job", round_index, keep=3)
    assert count_open_files() <= before


@pytest.mark.parametrize("body, field", [
    ({"job_id": "a", "round": 0, "worker": 0, "continuation": 2**63 - 1}, "continuation"),
    ({"job_id": "a", "round": 0, "worker": 0, "continuation": 0}, "continuation"),
    ({"job_id": "a", "round": 10**30, "worker": 0}, "round"),
    ({"job_id": "a", "round": -1, "worker": 0}, "round"),
    ({"job_id": "a", "round": 0, "worker": -1}, "worker"),
])
def test_task_numbers_out_of_range_rejected(body, field):
    with pytest.raises(InvalidMessageError, match=f"message field '{field}' must be an integer from"):
        parse_task(json.dumps(body))


def test_task_numbers_at_limit_accepted():
    body = {"job_id": "a", "round": MAX_MESSAGE_INTEGER, "worker": 0, "continuation": MAX_MESSAGE_INTEGER}

    assert parse_task(json.dumps(body)) == body


def test_prune_keeps_last_rounds_counting_current(tmp_path):
    store = EfsStore(tmp_path)
    for round_index in range(8):
        store.round_dir("job", round_index).mkdir(parents=True)

    assert store.prune_rounds("job", 7, keep=3) == [0, 1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path / "jobs" / "job" / "rounds")) == ["5", "6", "7"]
    assert store.prune_rounds("job", 7, keep=3) == []


def test_prune_keeps_young_job_whole(tmp_path):
    store = EfsStore(tmp_path)
    for round_index in range(2):
        store.round_dir("job", round_index).mkdir(parents=True)

    assert store.prune_rounds("job", 1, keep=3) == []
    assert sorted(os.listdir(tmp_path / "jobs" / "job" / "rounds")) == ["0", "1"]


def test_prune_rejects_keeping_nothing(tmp_path):
    with pytest.raises(ValueError, match="keep must be at least 1"):
        EfsStore(tmp_path).prune_rounds("job", 5, keep=0)


@pytest.mark.parametrize("value", ["1", "0", "-3"])
def test_keep_checkpoints_below_two_rejected(value):
    with pytest.raises(BatonError, match=f"invalid KEEP_CHECKPOINTS {value}: Baton keeps at least 2"):
        Settings.from_env(environ={"KEEP_CHECKPOINTS": value})


def test_keep_checkpoints_read_from_environment():
    assert Settings.from_env(environ={}).keep_checkpoints == 3
    assert Settings.from_env(environ={"KEEP_CHECKPOINTS": "2"}).keep_checkpoints == 2
