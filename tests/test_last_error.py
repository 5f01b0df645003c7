"""A retried handler error is stored on the job item, and the watchdog's failure quotes it.

With the deployed defaults a task is received for the fifth and last time about 2 hours
after its first failure, while the watchdog gives up on the stalled round after about an
hour. These tests run the real worker on a job whose worker 1 raises on every attempt (an
injected fault), with failed messages kept invisible as the tasks queue's visibility
timeout keeps them.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace

import pytest
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError
from click.testing import CliRunner

from shared.cli import main
from functions.worker import handler as worker_handler
from shared.control import drain_dead_letters, resume_job, run_watchdog
from shared.errors import BatonError
from shared.handlers import set_services, sqs_handler
from shared.services import Services
from shared.state import CANCELLED, FAILED, RUNNING, SUCCEEDED
from tests.inprocess import FakeContext, sqs_event

JOB_ID = "worker-fails"
LOST_WORKER = 1
# The fault's error, as the worker raises it before reading its shard.
FAULT_TYPE = "InjectedFault"
FAULT_TEXT = "injected fault at worker.before_read"


def a9a_spec(**training) -> dict:
    return {
        "job_id": JOB_ID,
        "model": {"name": "logistic_regression", "alpha": 1e-4},
        "optimizer": {"name": "momentum", "learning_rate": 0.5, "momentum": 0.9},
        "data": {"path": "datasets/a9a/a9a", "format": "libsvm", "n_features": 123},
        "training": {"n_workers": 4, "batch_size": 64, "max_rounds": 5, "seed": 3, **training},
    }


@pytest.fixture
def failing_worker(monkeypatch, tmp_path):
    """Make worker LOST_WORKER raise on every attempt, as a transient error would."""
    rule = {"step": "worker.before_read", "kind": "raise", "worker": LOST_WORKER, "times": 1000}
    monkeypatch.setenv("BATON_FAULTS_ENABLED", "true")
    monkeypatch.setenv("BATON_FAULTS", json.dumps([rule]))
    monkeypatch.setenv("BATON_FAULTS_DIR", str(tmp_path / "faults"))


def start_with_failing_worker(stack) -> None:
    """Run the starter until the job is RUNNING; the failing_worker fixture makes worker 1 fail."""
    stack.submit(a9a_spec())
    state = stack.services.state
    while state.get_job(JOB_ID) is None or state.get_job(JOB_ID).status != RUNNING:
        assert stack.step("JobsQueue") is not None, state.get_job(JOB_ID)


def deliver_tasks(stack) -> list:
    """Deliver every visible task; return the deliveries that failed."""
    failed = []
    while (delivery := stack.step("TasksQueue")) is not None:
        if delivery.failed:
            failed.append(delivery)
    return failed


def raw_job_item(stack) -> dict:
    return stack.dynamodb.get_item(TableName=stack.settings.state_table_name,
                                   Key={"pk": {"S": f"JOB#{JOB_ID}"}, "sk": {"S": "JOB"}}, ConsistentRead=True)["Item"]


def test_failed_receive_records_last_error(inprocess_stack, failing_worker):
    start_with_failing_worker(inprocess_stack)
    inprocess_stack.retry_delay_seconds = 3600
    updated_at = inprocess_stack.services.state.get_job(JOB_ID).attributes["updated_at"]

    failed = deliver_tasks(inprocess_stack)

    assert [delivery.body["worker"] for delivery in failed] == [LOST_WORKER]
    record = inprocess_stack.services.state.get_job(JOB_ID)
    assert record.status == RUNNING
    assert record.error is None
    # The watchdog reads updated_at as progress, and a failed receive is not progress.
    assert record.attributes["updated_at"] == updated_at
    last_error = record.attributes["last_error"]
    assert last_error["function"] == "worker"
    assert last_error["receive_count"] == 1
    assert last_error["error_type"] == FAULT_TYPE
    assert FAULT_TEXT in last_error["error"]
    assert last_error["round"] == 0
    assert last_error["worker"] == LOST_WORKER
    assert last_error["message_id"]


def test_status_shows_last_error_of_running_job(inprocess_stack, failing_worker):
    start_with_failing_worker(inprocess_stack)
    inprocess_stack.retry_delay_seconds = 3600
    deliver_tasks(inprocess_stack)
    message_id = inprocess_stack.services.state.get_job(JOB_ID).attributes["last_error"]["message_id"]

    status_result = CliRunner().invoke(main, ["status", JOB_ID, "--stage", "test"])
    as_json = CliRunner().invoke(main, ["status", JOB_ID, "--stage", "test", "--json"])

    assert status_result.exit_code == 0, status_result.output
    assert f"job {JOB_ID}: RUNNING" in status_result.output
    last_error_lines = [line for line in status_result.output.splitlines() if line.strip().startswith("last_error")]
    assert len(last_error_lines) == 1, status_result.output
    assert f"round 1: worker failed on message {message_id} (receive 1): {FAULT_TYPE}: {FAULT_TEXT}" in last_error_lines[0]
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["last_error"]["error_type"] == FAULT_TYPE


def test_watchdog_failure_quotes_worker_error(inprocess_stack, failing_worker):
    start_with_failing_worker(inprocess_stack)
    inprocess_stack.retry_delay_seconds = 3600
    settings = inprocess_stack.services.settings
    later = time.time() + settings.stall_seconds + 60

    failed = deliver_tasks(inprocess_stack)
    # Each run re-sends the lost worker's task, which fails at once as a new message.
    for _ in range(settings.watchdog_max_attempts + 1):
        run_watchdog(inprocess_stack.services, now=later)
        failed += deliver_tasks(inprocess_stack)

    record = inprocess_stack.services.state.get_job(JOB_ID)
    assert record.status == FAILED
    assert len(failed) == settings.watchdog_max_attempts + 1
    assert all(delivery.body["worker"] == LOST_WORKER for delivery in failed)
    # Every message failed once, so no handler reached the last receive and failed the job.
    assert "dead-letter queue" not in record.error
    assert record.error.startswith("round 1 made no progress"), record.error
    assert "; the last error was: worker failed on message " in record.error
    assert f"(receive 1): {FAULT_TYPE}: {FAULT_TEXT}" in record.error
    assert record.error.endswith(f"fix the cause, then run `baton resume {JOB_ID}`")


def test_resume_clears_last_error(inprocess_stack, failing_worker):
    start_with_failing_worker(inprocess_stack)
    inprocess_stack.retry_delay_seconds = 3600
    deliver_tasks(inprocess_stack)
    later = time.time() + inprocess_stack.services.settings.stall_seconds + 60
    for _ in range(inprocess_stack.services.settings.watchdog_max_attempts + 1):
        run_watchdog(inprocess_stack.services, now=later)
    assert inprocess_stack.services.state.get_job(JOB_ID).status == FAILED

    record = resume_job(inprocess_stack.services.state, inprocess_stack.services.queues, JOB_ID)

    assert record.status == RUNNING
    assert record.error is None
    assert "last_error" not in record.attributes


def test_watchdog_omits_last_error_of_other_round(inprocess_stack, failing_worker):
    start_with_failing_worker(inprocess_stack)
    state = inprocess_stack.services.state
    state.record_last_error(JOB_ID, {"function": "aggregator", "message_id": "earlier", "receive_count": 2,
                                     "error_type": "TimeoutError", "error": "an earlier round's error", "round": 7})
    # Lose round 1's tasks, so it stalls with no handler error of its own.
    inprocess_stack.sqs.purge_queue(QueueUrl=inprocess_stack.queue_urls["TasksQueue"])
    later = time.time() + inprocess_stack.services.settings.stall_seconds + 60

    for _ in range(inprocess_stack.services.settings.watchdog_max_attempts + 1):
        run_watchdog(inprocess_stack.services, now=later)

    record = state.get_job(JOB_ID)
    assert record.status == FAILED
    assert "earlier round's error" not in record.error
    assert "check the worker and aggregator logs" in record.error


def test_dead_letter_quotes_error_of_same_message(inprocess_stack, failing_worker):
    start_with_failing_worker(inprocess_stack)
    stack = inprocess_stack
    # The default driver makes a failed task visible again at once: let it fail 4 times.
    failures = 0
    while failures < 4:
        delivery = stack.step("TasksQueue")
        failures += delivery.failed
    message_id = stack.services.state.get_job(JOB_ID).attributes["last_error"]["message_id"]
    assert stack.services.state.get_job(JOB_ID).attributes["last_error"]["receive_count"] == 4
    # The fifth receive times out before the handler records anything: receive it without
    # running the handler and let it come back, so the next receive moves it to the
    # dead-letter queue. The other workers' tasks go back as they were.
    url = stack.queue_urls["TasksQueue"]
    for message in stack.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]:
        stack.sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
    received = stack.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
    assert message_id not in [message["MessageId"] for message in received]
    assert stack.queue_depth("TasksDeadLetterQueue") == 1

    assert drain_dead_letters(stack.services) == 1

    record = stack.services.state.get_job(JOB_ID)
    assert record.status == FAILED
    assert f"a {stack.settings.tasks_queue_name} message ({message_id}) reached the dead-letter queue" in record.error
    # Five receives by the worker; the drain's own receive is not counted.
    assert "reached the dead-letter queue after 5 receives;" in record.error
    assert f"its last recorded error was: worker failed on message {message_id} (receive 4): " in record.error
    assert f"{FAULT_TYPE}: {FAULT_TEXT}" in record.error


def test_dead_letter_ignores_error_of_other_message(inprocess_stack, failing_worker):
    start_with_failing_worker(inprocess_stack)
    stack = inprocess_stack
    stack.services.state.record_last_error(JOB_ID, {"function": "worker", "message_id": "another-message",
                                                    "receive_count": 1, "error_type": "ValueError",
                                                    "error": "another message's error", "round": 0})
    stack.send("TasksDeadLetterQueue", {"job_id": JOB_ID, "round": 0, "worker": LOST_WORKER})

    assert drain_dead_letters(stack.services) == 1

    record = stack.services.state.get_job(JOB_ID)
    assert record.status == FAILED
    assert "another message's error" not in record.error
    assert "none of its receives recorded an error" in record.error
    assert "search the worker function's log for the message id" in record.error


def always_fails(services, record, invocation):
    raise RuntimeError("step failed on purpose")


def handle_failing_message(stack, services: Services | None = None) -> BatchProcessingError:
    """Run a worker handler whose step always raises on one task of the job; return the batch error.

    ``services`` replaces the stack's adapters for this one call.
    """
    event = sqs_event([{"MessageId": "msg-1", "ReceiptHandle": "handle-1",
                        "Body": json.dumps({"job_id": JOB_ID, "round": 0, "worker": 0}),
                        "Attributes": {"ApproximateReceiveCount": "1"}}], "tasks")
    handler = sqs_handler("worker", always_fails)
    set_services(services or stack.services)
    try:
        with pytest.raises(BatchProcessingError) as raised:
            handler(event, FakeContext())
    finally:
        set_services(stack.services)
    return raised.value


@pytest.mark.parametrize("final_status", [SUCCEEDED, FAILED, CANCELLED])
def test_finished_job_item_untouched(inprocess_stack, final_status):
    state = inprocess_stack.services.state
    state.create_job(JOB_ID, "fingerprint", json.dumps(a9a_spec()), n_workers=4)
    state.start_job(JOB_ID, total_rounds=5)
    if final_status == SUCCEEDED:
        assert state.finish_job(JOB_ID, 0, {"stop_reason": "max_rounds"})
    elif final_status == FAILED:
        assert state.fail_job(JOB_ID, "failed before the test")
    else:
        assert state.set_status(JOB_ID, CANCELLED, (RUNNING,))
    before = raw_job_item(inprocess_stack)

    handle_failing_message(inprocess_stack)

    assert raw_job_item(inprocess_stack) == before


def test_missing_job_item_not_created(inprocess_stack):
    handle_failing_message(inprocess_stack)

    assert inprocess_stack.services.state.get_job(JOB_ID) is None


def test_record_failure_logged_not_raised(inprocess_stack, caplog):
    settings = inprocess_stack.settings
    broken = Services(replace(settings, state_table_name="no-such-table"), dynamodb=inprocess_stack.dynamodb,
                      sqs=inprocess_stack.sqs)

    error = handle_failing_message(inprocess_stack, broken)

    # The record fails with the step's error, not with the failed DynamoDB update.
    assert [type(value).__name__ for _, value, _ in error.child_exceptions] == ["RuntimeError"]
    warnings = [record for record in caplog.records if record.getMessage() == "could not record the error on the job item"]
    assert len(warnings) == 1
    assert "ResourceNotFoundException" in warnings[0].record_error


def lose_one_receive(stack) -> str:
    """Receive the one visible task without running the handler, as a timed-out invocation would, and let it come back.

    Returns the message id.
    """
    url = stack.queue_urls["TasksQueue"]
    messages = stack.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert len(messages) == 1
    stack.sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=messages[0]["ReceiptHandle"], VisibilityTimeout=0)
    return messages[0]["MessageId"]


def start_job(stack, n_workers: int = 1) -> None:
    stack.submit(a9a_spec(n_workers=n_workers))
    while stack.services.state.get_job(JOB_ID) is None or stack.services.state.get_job(JOB_ID).status != RUNNING:
        assert stack.step("JobsQueue") is not None


def fail_worker_once(monkeypatch, tmp_path, worker: int) -> None:
    rule = {"step": "worker.before_read", "kind": "raise", "worker": worker, "times": 1}
    monkeypatch.setenv("BATON_FAULTS_ENABLED", "true")
    monkeypatch.setenv("BATON_FAULTS", json.dumps([rule]))
    monkeypatch.setenv("BATON_FAULTS_DIR", str(tmp_path / "faults"))


def test_silent_receive_recorded_on_next(inprocess_stack):
    start_job(inprocess_stack)
    message_id = lose_one_receive(inprocess_stack)

    assert deliver_tasks(inprocess_stack) == []

    assert inprocess_stack.step("AggregateQueue") is not None
    record = inprocess_stack.services.state.get_job(JOB_ID)
    assert record.status == RUNNING
    assert record.round == 1, "the redelivered task completed round 1"
    last_error = record.attributes["last_error"]
    assert last_error["message_id"] == message_id
    assert last_error["receive_count"] == 1
    assert last_error["error_type"] == "NoErrorReported"
    assert last_error["function"] == "worker"
    assert last_error["worker"] == 0
    assert "most likely timed out, ran out of memory or was throttled" in last_error["error"]
    assert "'Task timed out' calls for a larger workerTimeout stage parameter" in last_error["error"]


def test_recorded_error_kept_on_next_receive(inprocess_stack, monkeypatch, tmp_path):
    fail_worker_once(monkeypatch, tmp_path, worker=LOST_WORKER)
    start_job(inprocess_stack, n_workers=4)

    failed = deliver_tasks(inprocess_stack)

    # Receive 1 failed and receive 2 succeeded: receive 1's error stays.
    assert [delivery.body["worker"] for delivery in failed] == [LOST_WORKER]
    last_error = inprocess_stack.services.state.get_job(JOB_ID).attributes["last_error"]
    assert last_error["error_type"] == FAULT_TYPE
    assert last_error["receive_count"] == 1


def test_silent_receive_after_recorded_error(inprocess_stack, monkeypatch, tmp_path):
    fail_worker_once(monkeypatch, tmp_path, worker=0)
    start_job(inprocess_stack)
    assert inprocess_stack.step("TasksQueue").failed
    # Receive 2 ends silently, and receive 3 succeeds.
    message_id = lose_one_receive(inprocess_stack)

    assert deliver_tasks(inprocess_stack) == []

    last_error = inprocess_stack.services.state.get_job(JOB_ID).attributes["last_error"]
    assert last_error["message_id"] == message_id
    assert last_error["error_type"] == "NoErrorReported"
    assert last_error["receive_count"] == 2


def fail_first_tasks(monkeypatch, tmp_path, times: int) -> None:
    """Make the first ``times`` task deliveries raise, whichever workers they are for."""
    rule = {"step": "worker.before_read", "kind": "raise", "times": times}
    monkeypatch.setenv("BATON_FAULTS_ENABLED", "true")
    monkeypatch.setenv("BATON_FAULTS", json.dumps([rule]))
    monkeypatch.setenv("BATON_FAULTS_DIR", str(tmp_path / "faults"))


# Seconds a failed task stays invisible in the two tests below: long enough for the steps
# between a failure and its retry.
RETRY_DELAY_SECONDS = 2


def test_other_error_not_taken_for_silence(inprocess_stack, monkeypatch, tmp_path):
    fail_first_tasks(monkeypatch, tmp_path, times=2)
    start_job(inprocess_stack, n_workers=2)
    inprocess_stack.retry_delay_seconds = RETRY_DELAY_SECONDS
    first = inprocess_stack.step("TasksQueue")
    second = inprocess_stack.step("TasksQueue")
    assert first.failed and second.failed

    time.sleep(RETRY_DELAY_SECONDS + 0.2)
    assert deliver_tasks(inprocess_stack) == []

    # The first task's retry finds the second task's error, recorded after the first task
    # was first received, so its own error may have been replaced: it keeps that error.
    last_error = inprocess_stack.services.state.get_job(JOB_ID).attributes["last_error"]
    assert last_error["error_type"] == FAULT_TYPE
    assert last_error["worker"] == second.body["worker"]


def test_silence_after_other_error_recorded(inprocess_stack, monkeypatch, tmp_path):
    fail_first_tasks(monkeypatch, tmp_path, times=1)
    start_job(inprocess_stack, n_workers=2)
    inprocess_stack.retry_delay_seconds = RETRY_DELAY_SECONDS
    assert inprocess_stack.step("TasksQueue").failed
    # The other task is first received after that error was recorded, and ends silently.
    time.sleep(0.01)
    message_id = lose_one_receive(inprocess_stack)

    time.sleep(RETRY_DELAY_SECONDS + 0.2)
    assert deliver_tasks(inprocess_stack) == []

    last_error = inprocess_stack.services.state.get_job(JOB_ID).attributes["last_error"]
    assert last_error["message_id"] == message_id
    assert last_error["error_type"] == "NoErrorReported"


def test_missing_table_named(inprocess_stack):
    broken = Services(replace(inprocess_stack.settings, state_table_name="baton-nostack-state"),
                      dynamodb=inprocess_stack.dynamodb, sqs=inprocess_stack.sqs)
    event = sqs_event([{"MessageId": "msg-1", "ReceiptHandle": "handle-1",
                        "Body": json.dumps({"job_id": JOB_ID, "round": 0, "worker": 0}),
                        "Attributes": {"ApproximateReceiveCount": "1"}}], "tasks")
    set_services(broken)
    try:
        with pytest.raises(BatchProcessingError) as raised:
            worker_handler(event, FakeContext())
    finally:
        set_services(inprocess_stack.services)

    (error,) = [value for _, value, _ in raised.value.child_exceptions]
    assert isinstance(error, BatonError)
    assert "DynamoDB table 'baton-nostack-state' not found (BatchGetItem)" in str(error)
    assert "npx serverless deploy --stage STAGE" in str(error)


def test_long_failure_message_shortened(inprocess_stack):
    from shared.state import MAX_ERROR_CHARS

    # A message that quotes a whole input, over DynamoDB's 400 KB item limit.
    message = "data file 'wide.csv' has no column 'lable'; its columns are " + "c, " * 300_000 + "use one of them"
    state = inprocess_stack.services.state

    assert state.fail_job("wide-header", message)

    error = state.get_job("wide-header").error
    assert len(error) == MAX_ERROR_CHARS
    assert error.startswith("data file 'wide.csv' has no column 'lable'")
    assert error.endswith("c, use one of them")
    note = re.search(r" \[\.\.\. ([0-9,]+) characters left out \.\.\.\] ", error)
    assert note is not None
    # The note counts every character it stands for, its own length included.
    assert int(note.group(1).replace(",", "")) == len(message) - (len(error) - len(note.group(0)))
