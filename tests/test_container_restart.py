"""A lane whose container dies while importing its handler retries the batch in a new container.

The container is a real process of the local runtime, killed by its pid while its import
waits on a gate file (tests/gated_handler.py). The queue's visibility timeout is the tasks
queue's 1,800 s, so a batch left unsettled would not come back within the test.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3

from shared.local.runtime import LocalRuntime
from shared.local.stack import FunctionDefinition

# Long enough for a container start on a loaded 2-core machine; only a failing test waits this long.
WAIT_SECONDS = 120


def wait_for(condition: Callable[[], object], description: str) -> object:
    """Return the first true value of ``condition``, polled until ``WAIT_SECONDS`` have passed."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {WAIT_SECONDS} s waiting for {description}")


def pids_of(gate: Path, prefix: str) -> list[int]:
    return sorted(int(path.name.removeprefix(prefix)) for path in gate.glob(f"{prefix}*"))


def test_container_killed_while_importing(tmp_path, moto_endpoint, caplog):
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint, region_name="us-east-1")
    url = sqs.create_queue(QueueName=f"gated-{uuid.uuid4().hex[:8]}",
                           Attributes={"VisibilityTimeout": "1800"})["QueueUrl"]
    message_id = sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"job_id": "gated"}))["MessageId"]
    gate = tmp_path / "gate"
    gate.mkdir()
    definition = FunctionDefinition(name="gated", handler="tests.gated_handler.handler", timeout_seconds=60,
                                    memory_mb=128, queue_logical_id="GatedQueue", batch_size=1, max_concurrency=1)
    runtime = LocalRuntime({"gated": definition}, {"GatedQueue": url}, sqs, {"BATON_TEST_GATE_DIR": str(gate)},
                           tmp_path / "logs", retry_delay_seconds=0)
    lanes = runtime.lanes["gated"]

    with caplog.at_level(logging.WARNING, logger="shared.local.runtime"), runtime:
        killed_pid = wait_for(lambda: pids_of(gate, "importing-"), "the first container's import")[0]
        os.kill(killed_pid, signal.SIGKILL)
        wait_for(lambda: lanes.invocations, "the lane to record the failed start")
        (gate / "open").touch()
        wait_for(lambda: len(lanes.invocations) >= 2, "the batch to run in a new container")

    assert [record.outcome for record in lanes.invocations] == ["start_failed", "ok"]
    handled = pids_of(gate, "handled-")
    assert len(handled) == 1
    assert handled[0] != killed_pid
    assert json.loads((gate / f"handled-{handled[0]}").read_text()) == [message_id]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "0"
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "0"

    warnings = [record for record in caplog.records if record.name == "shared.local.runtime"]
    assert len(warnings) == 1
    assert f"pid {killed_pid}" in warnings[0].getMessage()
    assert "exited with code -9 while importing its handler" in warnings[0].getMessage()
    assert message_id in warnings[0].getMessage()
    assert warnings[0].exc_info is None, "a failed start is one log line, not a traceback"
