"""Run Baton's handlers on one machine the way Lambda's SQS event source mappings would.

For each function, a number of lanes (its concurrency) each own one warm "container": a
separate Python process that imports the handler once and then serves invocations, like a
warm Lambda execution environment. A lane long-polls the function's queue, builds the same
event Lambda sends (records with ``messageId``, ``receiptHandle``, ``body`` and
``attributes``), invokes the container with a context that reports the remaining time, and
then deletes the records that succeeded.

Failed records are made visible again after ``retry_delay_seconds`` rather than after the
queue's full visibility timeout, so a local job does not wait half an hour for a retry.
A container that overruns the function's timeout is killed, as Lambda would, and its whole
batch is retried; the next invocation starts a fresh (cold) container. As on Lambda, a
container's start (its imports) does not count towards the invocation's timeout.

A function with a schedule event instead of an SQS event gets one lane that invokes it
every ``schedule_seconds`` with a scheduled-event payload.

When fault injection is on (:mod:`shared.faults`), the lanes also apply the delivery
faults: duplicated, delayed and reordered deliveries.

Timeline of one invocation::

    lane: receive ──> send event ──> wait up to timeout ──> delete successes
                                       │ (timeout: kill container, retry the batch)
    container:          handler(event, context) ──> batchItemFailures
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from shared import faults, tracing
from shared.local.stack import FunctionDefinition

logger = logging.getLogger(__name__)


class LocalContext:
    """The subset of the Lambda context object that Baton's handlers use."""

    def __init__(self, function_name: str, memory_mb: int, timeout_seconds: float):
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = memory_mb
        self.aws_request_id = str(uuid.uuid4())
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}"
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "local"
        self._deadline = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def _container_main(connection: Connection, handler_path: str, function: dict, environment: dict, log_path: str) -> None:
    """Entry point of a container process: import the handler, then serve invocations."""
    os.environ.update(environment)
    log_file = open(log_path, "a", buffering=1)
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)

    import importlib
    import sys
    import traceback

    sys.stdout = sys.stderr = log_file
    # Before the handler's import, which binds the service steps that tracing wraps.
    tracing.install_from_environment(function["name"])
    module_path, handler_name = handler_path.rsplit(".", 1)
    handler = getattr(importlib.import_module(module_path.replace("/", ".")), handler_name)
    connection.send(("ready", None))

    while True:
        try:
            event = connection.recv()
        except EOFError:
            return
        started = time.monotonic()
        context = LocalContext(function["name"], function["memory_mb"], function["timeout_seconds"])
        try:
            response = handler(event, context)
            tracing.record_invocation(event, started, time.monotonic())
            connection.send(("ok", response))
        except Exception as error:  # the handler itself crashed: Lambda reports a function error
            traceback.print_exc()
            connection.send(("error", f"{type(error).__name__}: {error}"))
        # After the reply, so that writing the spans does not delay the lane.
        tracing.flush()


@dataclass
class Container:
    """A warm handler process and its end of the pipe."""

    process: multiprocessing.Process
    connection: Connection
    invocations: int = 0


@dataclass
class InvocationRecord:
    """One invocation, as the runtime saw it; kept for tests and statistics."""

    function: str
    n_records: int
    outcome: str
    seconds: float


@dataclass
class FunctionLanes:
    """The lanes of one function and their counters."""

    definition: FunctionDefinition
    queue_url: str | None
    concurrency: int
    threads: list[threading.Thread] = field(default_factory=list)
    invocations: list[InvocationRecord] = field(default_factory=list)
    # Every message body a lane received, in order; tests check sizes and continuations.
    bodies: list[str] = field(default_factory=list)


class LocalRuntime:
    """Polls the stack's queues and runs each function's handler in container processes.

    Parameters
    ----------
    functions : dict of str to FunctionDefinition
    queue_urls : dict of str to str
        Queue URL by the logical id a function's event names.
    sqs : botocore SQS client
        Used by the lanes; a client is thread-safe.
    environment : dict
        Environment of every container: endpoint, dummy credentials, settings.
    log_dir : Path
        Each function's containers append their output to ``<log_dir>/<function>.log``.
    concurrency : dict of str to int, optional
        Lanes per function; defaults to the event's maximumConcurrency, else 1.
    timeout_seconds : dict of str to float, optional
        Per-function timeout overrides, for tests of timeouts.
    retry_delay_seconds : float, default=1.0
        Delay before a failed record is received again.
    poll_wait_seconds : int, default=1
        Long-poll wait of each receive.
    schedule_seconds : dict of str to float, optional
        Per-function interval overrides for scheduled functions, for tests.
    """

    def __init__(self, functions: dict[str, FunctionDefinition], queue_urls: dict[str, str], sqs, environment: dict,
                 log_dir: Path, concurrency: dict[str, int] | None = None,
                 timeout_seconds: dict[str, float] | None = None, retry_delay_seconds: float = 1.0,
                 poll_wait_seconds: int = 1, schedule_seconds: dict[str, float] | None = None):
        self.sqs = sqs
        self.environment = environment
        self.log_dir = Path(log_dir)
        self.retry_delay_seconds = retry_delay_seconds
        self.poll_wait_seconds = poll_wait_seconds
        self.timeouts = timeout_seconds or {}
        self.schedule_seconds = schedule_seconds or {}
        self._stop = threading.Event()
        self._mp = multiprocessing.get_context("spawn")
        self.lanes: dict[str, FunctionLanes] = {}
        for name, definition in functions.items():
            if definition.queue_logical_id is None:
                self.lanes[name] = FunctionLanes(definition, None, 1)
                continue
            lanes = (concurrency or {}).get(name) or definition.max_concurrency or 1
            self.lanes[name] = FunctionLanes(definition, queue_urls[definition.queue_logical_id], int(lanes))

    # Lifecycle ---------------------------------------------------------------------------

    def start(self) -> "LocalRuntime":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name, lanes in self.lanes.items():
            target = self._run_lane if lanes.queue_url is not None else self._run_schedule
            for index in range(lanes.concurrency):
                thread = threading.Thread(target=target, args=(lanes,), name=f"{name}-lane-{index}", daemon=True)
                lanes.threads.append(thread)
                thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for lanes in self.lanes.values():
            for thread in lanes.threads:
                thread.join(timeout=self.poll_wait_seconds + 30)

    def __enter__(self) -> "LocalRuntime":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # Containers --------------------------------------------------------------------------

    def _start_container(self, definition: FunctionDefinition) -> Container:
        parent_end, child_end = self._mp.Pipe()
        function = {
            "name": definition.name,
            "memory_mb": definition.memory_mb,
            "timeout_seconds": self.timeouts.get(definition.name, definition.timeout_seconds),
        }
        process = self._mp.Process(
            target=_container_main,
            args=(child_end, definition.handler, function, self.environment,
                  str(self.log_dir / f"{definition.name}.log")),
            daemon=True,
        )
        process.start()
        child_end.close()
        # Wait for the imports, which Lambda counts as the init phase, not the invocation.
        if not parent_end.poll(120) or parent_end.recv()[0] != "ready":
            process.kill()
            raise RuntimeError(f"the {definition.name} container did not start; see {self.log_dir}")
        return Container(process=process, connection=parent_end)

    @staticmethod
    def _kill(container: Container) -> None:
        container.process.kill()
        container.process.join(timeout=10)
        container.connection.close()

    # Lanes -------------------------------------------------------------------------------

    def _run_lane(self, lanes: FunctionLanes) -> None:
        definition = lanes.definition
        timeout = self.timeouts.get(definition.name, definition.timeout_seconds)
        reorder = faults.has_delivery_rule(definition.name, "reorder", self.environment)
        container: Container | None = None
        try:
            while not self._stop.is_set():
                messages = self.sqs.receive_message(
                    QueueUrl=lanes.queue_url,
                    # To reorder, take more than a batch and run it back to front.
                    MaxNumberOfMessages=10 if reorder else min(definition.batch_size, 10),
                    WaitTimeSeconds=self.poll_wait_seconds,
                    AttributeNames=["All"],
                    MessageAttributeNames=["All"],
                ).get("Messages", [])
                if not messages:
                    continue
                if reorder and not self._with_siblings(messages) and len(messages) < 10:
                    # The long poll returns as soon as the first message of a batch send
                    # lands, so ask once more for the rest: a message with no sibling of
                    # its job and round has no order to change.
                    messages += self.sqs.receive_message(
                        QueueUrl=lanes.queue_url, MaxNumberOfMessages=10 - len(messages), WaitTimeSeconds=1,
                        AttributeNames=["All"], MessageAttributeNames=["All"]).get("Messages", [])
                lanes.bodies.extend(message["Body"] for message in messages)
                if reorder and any(self._claim_delivery(definition.name, message, "reorder")
                                   for message in self._with_siblings(messages)):
                    messages.reverse()

                for start in range(0, len(messages), definition.batch_size):
                    try:
                        batch = self._apply_delivery_faults(lanes, messages[start:start + definition.batch_size])
                        if batch:
                            container = self._invoke_batch(lanes, container, batch, timeout)
                    except Exception:
                        # The lane must outlive a failed start or SQS call, as an event source
                        # mapping does; the messages come back after their visibility timeout.
                        logger.exception("%s lane failed to deliver a batch", definition.name)
                        container = None
                        self._stop.wait(self.retry_delay_seconds)
        finally:
            if container is not None:
                self._kill(container)

    def _invoke_batch(self, lanes: FunctionLanes, container: Container | None, messages: list[dict],
                      timeout: float, settle: bool = True) -> Container | None:
        """Invoke the function on one batch and settle it; return the container to reuse."""
        if container is None or not container.process.is_alive():
            container = self._start_container(lanes.definition)
        started = time.monotonic()
        outcome, failed_ids = self._invoke(container, lanes, messages, timeout)
        if outcome in ("timeout", "crashed"):
            self._kill(container)
            container = None
        lanes.invocations.append(InvocationRecord(lanes.definition.name, len(messages), outcome,
                                                  time.monotonic() - started))
        if settle:
            self._settle(lanes.queue_url, messages, failed_ids)
        return container

    # Delivery faults -----------------------------------------------------------------------

    @staticmethod
    def _message_ids(message: dict) -> dict:
        try:
            body = json.loads(message["Body"])
        except json.JSONDecodeError:
            return {}
        return body if isinstance(body, dict) else {}

    def _with_siblings(self, messages: list[dict]) -> list[dict]:
        """Return the messages that share their job and round with another message of ``messages``."""
        keys = [(ids.get("job_id"), ids.get("round")) for ids in map(self._message_ids, messages)]
        return [message for message, key in zip(messages, keys) if keys.count(key) > 1]

    def _claim_delivery(self, function: str, message: dict, kind: str) -> dict | None:
        return faults.claim_delivery_fault(function, self._message_ids(message), kinds=(kind,), environ=self.environment)

    def _apply_delivery_faults(self, lanes: FunctionLanes, messages: list[dict]) -> list[dict]:
        """Apply duplicate and delay rules to a batch; return the messages to invoke now."""
        if not faults.enabled(self.environment):
            return messages
        kept = []
        for message in messages:
            rule = faults.claim_delivery_fault(lanes.definition.name, self._message_ids(message),
                                               kinds=("duplicate", "delay"), environ=self.environment)
            kind = None if rule is None else rule["kind"]
            delay_seconds = 0 if rule is None else int(rule.get("delay_seconds", 0))
            if kind == "delay":
                # Held back: visible again only after the delay, so later messages overtake it.
                self.sqs.change_message_visibility(QueueUrl=lanes.queue_url, ReceiptHandle=message["ReceiptHandle"],
                                                   VisibilityTimeout=max(1, delay_seconds))
                logger.warning("fault: delayed %s message by %d s", lanes.definition.name, delay_seconds)
                continue
            if kind == "duplicate" and delay_seconds > 0:
                self.sqs.send_message(QueueUrl=lanes.queue_url, MessageBody=message["Body"],
                                      DelaySeconds=min(delay_seconds, 900))
                logger.warning("fault: a copy of a %s message arrives in %d s", lanes.definition.name, delay_seconds)
            elif kind == "duplicate":
                # The same record delivered in two invocations, as at-least-once delivery may.
                timeout = self.timeouts.get(lanes.definition.name, lanes.definition.timeout_seconds)
                container = self._invoke_batch(lanes, None, [message], timeout, settle=False)
                if container is not None:
                    self._kill(container)
                logger.warning("fault: delivered a %s message twice", lanes.definition.name)
            kept.append(message)
        return kept

    # Scheduled functions -------------------------------------------------------------------

    def _run_schedule(self, lanes: FunctionLanes) -> None:
        definition = lanes.definition
        interval = self.schedule_seconds.get(definition.name, definition.schedule_seconds or 60)
        timeout = self.timeouts.get(definition.name, definition.timeout_seconds)
        container: Container | None = None
        try:
            while not self._stop.wait(interval):
                if container is None or not container.process.is_alive():
                    try:
                        container = self._start_container(definition)
                    except RuntimeError:
                        logger.exception("%s container did not start; trying at the next interval", definition.name)
                        continue
                event = {"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}}
                started = time.monotonic()
                outcome = self._send_event(container, definition.name, event, timeout)
                if outcome in ("timeout", "crashed"):
                    self._kill(container)
                    container = None
                lanes.invocations.append(InvocationRecord(definition.name, 0, outcome, time.monotonic() - started))
        finally:
            if container is not None:
                self._kill(container)

    def _send_event(self, container: Container, function: str, event: dict, timeout: float) -> str:
        try:
            container.connection.send(event)
            if not container.connection.poll(timeout):
                logger.warning("%s timed out after %.1f s; killing its container", function, timeout)
                return "timeout"
            status, _ = container.connection.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            return "crashed"
        return "ok" if status == "ok" else "error"

    def _invoke(self, container: Container, lanes: FunctionLanes, messages: list[dict], timeout: float) -> tuple[str, set[str]]:
        """Send one event to ``container``; return the outcome and the ids of failed records."""
        all_ids = {message["MessageId"] for message in messages}
        event = {"Records": [self._record(lanes, message) for message in messages]}
        try:
            container.connection.send(event)
            if not container.connection.poll(timeout):
                logger.warning("%s container (pid %d) timed out after %.1f s; killing it and retrying messages %s",
                               lanes.definition.name, container.process.pid, timeout, sorted(all_ids))
                return "timeout", all_ids
            status, response = container.connection.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            logger.warning("%s container (pid %d, exit code %s) exited during an invocation; retrying messages %s",
                           lanes.definition.name, container.process.pid, container.process.exitcode, sorted(all_ids))
            return "crashed", all_ids

        if status != "ok":
            return "error", all_ids
        failures = (response or {}).get("batchItemFailures", [])
        failed_ids = {failure["itemIdentifier"] for failure in failures}
        return ("partial" if failed_ids else "ok"), failed_ids

    def _record(self, lanes: FunctionLanes, message: dict) -> dict:
        attributes = message.get("Attributes", {})
        return {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": {
                "ApproximateReceiveCount": attributes.get("ApproximateReceiveCount", "1"),
                "SentTimestamp": attributes.get("SentTimestamp", "0"),
                "SenderId": attributes.get("SenderId", "local"),
                "ApproximateFirstReceiveTimestamp": attributes.get("ApproximateFirstReceiveTimestamp", "0"),
            },
            "messageAttributes": message.get("MessageAttributes", {}),
            "md5OfBody": message.get("MD5OfBody", ""),
            "eventSource": "aws:sqs",
            "eventSourceARN": f"arn:aws:sqs:us-east-1:123456789012:{lanes.queue_url.rsplit('/', 1)[-1]}",
            "awsRegion": "us-east-1",
        }

    def _settle(self, queue_url: str, messages: list[dict], failed_ids: set[str]) -> None:
        """Delete the records that succeeded and schedule the others for a retry."""
        for message in messages:
            if message["MessageId"] in failed_ids:
                self.sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"],
                                                   VisibilityTimeout=int(self.retry_delay_seconds))
            else:
                self.sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
