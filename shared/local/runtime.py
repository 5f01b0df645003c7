"""Run Baton's handlers on one machine the way Lambda's SQS event source mappings would.

For each function, a number of lanes (its concurrency) each own one warm "container": a
separate Python process (:mod:`shared.local.container`) that imports the handler once and
then serves invocations, like a warm Lambda execution environment. A lane long-polls the
function's queue, builds the same event Lambda sends (records with ``messageId``,
``receiptHandle``, ``body`` and ``attributes``), invokes the container with a context that
reports the remaining time, and then deletes the records that succeeded.

Failed records are made visible again after ``retry_delay_seconds`` rather than after the
queue's full visibility timeout, so a local job does not wait half an hour for a retry.
A container that overruns the function's timeout is killed, as Lambda would, and its whole
batch is retried; the next invocation starts a fresh (cold) container. A container that
exits during an invocation, or before it has imported its handler, fails its batch the
same way: the lane logs one line, and every record of the batch is received again after
``retry_delay_seconds``. As on Lambda, a
container's start (its imports) does not count towards the invocation's timeout.

A function with a schedule event instead of an SQS event gets one lane that invokes it
every ``schedule_seconds`` with a scheduled-event payload.

``stop()`` kills the containers first and then waits for the lanes. A lane of a stopping
runtime ends without starting another container, and logs what the stop itself causes (a
container that exited, a request that failed) at debug level only, so stopping a stack
prints nothing. The lanes do the same once the stack's server has exited (see the
``server_exited`` parameter), because every request fails from then on and the stack's
owner reports the exit itself.

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
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from shared import faults
from shared.local.processes import python_module_command
from shared.local.stack import FunctionDefinition

logger = logging.getLogger(__name__)


# Seconds a new container may take to import its handler before it counts as failed.
CONTAINER_START_TIMEOUT_SECONDS = 120

# Seconds to wait for a container whose connection broke during an invocation to exit,
# so that the log line gives its exit code. Its socket closes a moment before the kernel
# reports the process as exited.
CONTAINER_EXIT_WAIT_SECONDS = 5.0

# Seconds a reorder lane keeps receiving for the rest of a round that a reorder rule
# targets. A round's tasks or reduce messages are sent in one batch request, so the rest
# reach the queue together with the first.
REORDER_GATHER_SECONDS = 2.0


class ContainerStartError(RuntimeError):
    """A container exited, or timed out, before it had imported its handler."""


class RuntimeStoppingError(ContainerStartError):
    """A lane requested a new container after the runtime began to stop."""


@dataclass(eq=False)
class Container:
    """A warm handler process and the runtime's end of its socket."""

    process: subprocess.Popen
    connection: Connection
    invocations: int = 0

    def is_alive(self) -> bool:
        return self.process.poll() is None


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
    # Held by a lane of a function with a reorder rule while it receives (see _receive).
    receive_lock: threading.Lock = field(default_factory=threading.Lock)


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
    inherited_fds : tuple of int, optional
        Open file descriptors that every container inherits.
    server_exited : callable, optional
        Returns whether the server behind ``sqs`` has exited. From then on the lanes log
        their failures at debug level, as during a stop.
    """

    def __init__(self, functions: dict[str, FunctionDefinition], queue_urls: dict[str, str], sqs, environment: dict,
                 log_dir: Path, concurrency: dict[str, int] | None = None,
                 timeout_seconds: dict[str, float] | None = None, retry_delay_seconds: float = 1.0,
                 poll_wait_seconds: int = 1, schedule_seconds: dict[str, float] | None = None,
                 inherited_fds: tuple[int, ...] = (), server_exited: Callable[[], bool] | None = None):
        self.sqs = sqs
        self.environment = environment
        self.log_dir = Path(log_dir)
        self.retry_delay_seconds = retry_delay_seconds
        self.poll_wait_seconds = poll_wait_seconds
        self.timeouts = timeout_seconds or {}
        self.schedule_seconds = schedule_seconds or {}
        self.inherited_fds = tuple(inherited_fds)
        self._server_exited = server_exited
        self._stop = threading.Event()
        # Every container process started, so that stop() can end any a lane left behind
        # and callers can check that none outlives the runtime.
        self._containers_lock = threading.Lock()
        self._live_containers: set[Container] = set()
        self.started_pids: list[int] = []
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
        """Kill every container, then wait for the lanes to end; a second call does nothing new.

        The kill ends the invocations in progress at once, where waiting for them could take
        up to the function's timeout. A lane owns its container's socket and closes it when
        the lane ends. A lane still running after the join timeout leaves its socket open,
        and it is closed here.
        """
        with self._containers_lock:
            # Set under the lock, so a lane that registers a container after this snapshot finds it set.
            self._stop.set()
            running = list(self._live_containers)
        for container in running:
            container.process.kill()
        for lanes in self.lanes.values():
            for thread in lanes.threads:
                thread.join(timeout=self.poll_wait_seconds + 30)
        with self._containers_lock:
            remaining = list(self._live_containers)
        for container in remaining:
            self._kill(container)

    def __enter__(self) -> "LocalRuntime":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # Containers --------------------------------------------------------------------------

    def _start_container(self, definition: FunctionDefinition) -> Container:
        """Start a container for ``definition`` and wait until it has imported its handler.

        Raises
        ------
        RuntimeStoppingError
            If the runtime is stopping, before or while the container starts.
        ContainerStartError
            If the container exits or times out before it has imported its handler.
        """
        if self._stop.is_set():
            raise RuntimeStoppingError(f"the runtime is stopping; no new {definition.name} container started")
        parent_socket, child_socket = socket.socketpair()
        function = {
            "name": definition.name,
            "memory_mb": definition.memory_mb,
            "timeout_seconds": self.timeouts.get(definition.name, definition.timeout_seconds),
        }
        log_path = self.log_dir / f"{definition.name}.log"
        try:
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    python_module_command("shared.local.container", str(child_socket.fileno()), str(os.getpid())),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, **self.environment}, pass_fds=(child_socket.fileno(), *self.inherited_fds),
                    # Its own process group, so a Ctrl-C in the terminal reaches only the stack's owner.
                    process_group=0)
        finally:
            child_socket.close()
        container = Container(process=process, connection=Connection(parent_socket.detach()))
        with self._containers_lock:
            self._live_containers.add(container)
            self.started_pids.append(process.pid)
            stopping = self._stop.is_set()
        if stopping:
            self._kill(container)
            raise RuntimeStoppingError(f"the runtime is stopping; stopped the new {definition.name} container")

        # Wait for the imports, which Lambda counts as the init phase, not the invocation.
        problem: str | None = f"did not import its handler within {CONTAINER_START_TIMEOUT_SECONDS} s"
        try:
            container.connection.send({"handler": definition.handler, "function": function})
            ready = (container.connection.poll(CONTAINER_START_TIMEOUT_SECONDS)
                     and container.connection.recv()[0] == "ready")
        except (EOFError, OSError):
            ready, problem = False, None
        if not ready:
            # The kill does not reach a process that has exited, so the code is its own.
            self._kill(container)
            problem = problem or f"exited with code {process.returncode} while importing its handler"
            raise ContainerStartError(f"the {definition.name} container (pid {process.pid}) {problem}; see {log_path}")
        return container

    def _kill(self, container: Container) -> None:
        container.process.kill()
        container.process.wait(timeout=10)
        container.connection.close()
        with self._containers_lock:
            self._live_containers.discard(container)

    def _log(self, level: int, message: str, *args, exc_info: bool | None = None) -> None:
        """Log a lane's problem at ``level``, or at debug level while the runtime stops or after the server exited.

        A stopping runtime kills its containers, and moto's server stops after it, so the
        lanes' failures from then on are caused by the stop and are not reported. After
        the server has exited, every request fails, and the stack's owner reports the
        exit in one line instead.
        """
        quiet = self._stop.is_set() or (self._server_exited is not None and self._server_exited())
        logger.log(logging.DEBUG if quiet else level, message, *args, exc_info=exc_info)

    # Lanes -------------------------------------------------------------------------------

    def _run_lane(self, lanes: FunctionLanes) -> None:
        definition = lanes.definition
        timeout = self.timeouts.get(definition.name, definition.timeout_seconds)
        reorder = faults.has_delivery_rule(definition.name, "reorder", self.environment)
        container: Container | None = None
        try:
            while not self._stop.is_set():
                try:
                    messages = self._receive(lanes, reorder)
                except Exception:
                    # Such as moto's server gone. At least a second apart, so the log does not flood.
                    self._log(logging.ERROR, "%s lane failed to receive messages; trying again",
                              definition.name, exc_info=True)
                    self._stop.wait(max(self.retry_delay_seconds, 1.0))
                    continue
                if not messages:
                    continue
                lanes.bodies.extend(message["Body"] for message in messages)
                if reorder and any(self._claim_delivery(definition.name, message, "reorder")
                                   for message in self._with_siblings(messages)):
                    messages.reverse()

                for start in range(0, len(messages), definition.batch_size):
                    if self._stop.is_set():
                        # The messages not invoked come back after their visibility timeout.
                        break
                    try:
                        batch = self._apply_delivery_faults(lanes, messages[start:start + definition.batch_size])
                        if batch:
                            container = self._invoke_batch(lanes, container, batch, timeout)
                    except Exception:
                        # The lane must outlive a failed start or SQS call, as an event source
                        # mapping does; the messages come back after their visibility timeout.
                        self._log(logging.ERROR, "%s lane failed to deliver a batch", definition.name, exc_info=True)
                        container = None
                        self._stop.wait(self.retry_delay_seconds)
        finally:
            if container is not None:
                self._kill(container)

    def _receive(self, lanes: FunctionLanes, reorder: bool) -> list[dict]:
        """Receive a lane's next messages: one batch, or for a reorder lane up to ten and a whole targeted round.

        A reorder lane takes more than a batch, to run it back to front. The lanes of such a
        function receive one at a time, and a lane that got messages of a round that a
        pending reorder rule targets receives again while more of them arrive, for at most
        ``REORDER_GATHER_SECONDS``. Otherwise a receive of ten could end inside the round's
        messages, or concurrent receives could take one each, and the rule would never
        find the round's messages together in one lane.
        """
        # Only the lanes of a function with a queue receive; a scheduled function's lane has none.
        assert lanes.queue_url is not None
        if not reorder:
            return self._receive_once(lanes.queue_url, min(lanes.definition.batch_size, 10), self.poll_wait_seconds)
        with lanes.receive_lock:
            messages = self._receive_once(lanes.queue_url, 10, self.poll_wait_seconds)
            received = messages
            deadline = time.monotonic() + REORDER_GATHER_SECONDS
            while self._has_reorder_target(lanes.definition.name, received) and time.monotonic() < deadline:
                received = self._receive_once(lanes.queue_url, 10, 1)
                messages += received
        return messages

    def _receive_once(self, queue_url: str, max_messages: int, wait_seconds: int) -> list[dict]:
        return self.sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=max_messages,
                                        WaitTimeSeconds=wait_seconds, AttributeNames=["All"],
                                        MessageAttributeNames=["All"]).get("Messages", [])

    def _invoke_batch(self, lanes: FunctionLanes, container: Container | None, messages: list[dict],
                      timeout: float, settle: bool = True) -> Container | None:
        """Invoke the function on one batch and settle it; return the container to reuse.

        A container that does not start (it exits or hangs while importing its handler)
        fails the batch as a crash during the invocation does: every record is retried
        after ``retry_delay_seconds``, and the next batch starts a fresh container.
        """
        assert lanes.queue_url is not None
        started = time.monotonic()
        if container is None or not container.is_alive():
            try:
                container = self._start_container(lanes.definition)
            except ContainerStartError as error:
                all_ids = {message["MessageId"] for message in messages}
                self._log(logging.WARNING, "%s; retrying messages %s in %.1f s with a new container",
                          error, sorted(all_ids), self.retry_delay_seconds)
                lanes.invocations.append(InvocationRecord(lanes.definition.name, len(messages), "start_failed",
                                                          time.monotonic() - started))
                if settle:
                    self._settle(lanes.queue_url, messages, all_ids)
                return None
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
        except (ValueError, RecursionError):
            return {}
        return body if isinstance(body, dict) else {}

    def _with_siblings(self, messages: list[dict]) -> list[dict]:
        """Return the messages that share their job and round with another message of ``messages``."""
        keys = [(ids.get("job_id"), ids.get("round")) for ids in map(self._message_ids, messages)]
        return [message for message, key in zip(messages, keys) if keys.count(key) > 1]

    def _has_reorder_target(self, function: str, messages: list[dict]) -> bool:
        """Return whether a reorder rule with a firing left targets a message of ``messages``."""
        return any(faults.pending_delivery_rule(function, "reorder", self._message_ids(message), self.environment)
                   for message in messages)

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
                if container is None or not container.is_alive():
                    try:
                        container = self._start_container(definition)
                    except ContainerStartError as error:
                        self._log(logging.WARNING, "%s; trying again at the next interval", error)
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
            self._log(logging.WARNING, "%s container (pid %d) %s during an invocation; retrying messages %s",
                      lanes.definition.name, container.process.pid, self._wait_for_exit(container), sorted(all_ids))
            return "crashed", all_ids

        if status != "ok":
            return "error", all_ids
        failures = (response or {}).get("batchItemFailures", [])
        failed_ids = {failure["itemIdentifier"] for failure in failures}
        return ("partial" if failed_ids else "ok"), failed_ids

    @staticmethod
    def _wait_for_exit(container: Container) -> str:
        """Wait up to ``CONTAINER_EXIT_WAIT_SECONDS`` for a container whose connection broke; return how it ended."""
        try:
            exit_code = container.process.wait(timeout=CONTAINER_EXIT_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            return f"closed its connection and had not exited {CONTAINER_EXIT_WAIT_SECONDS:g} s later"
        return f"exited with code {exit_code}"

    def _record(self, lanes: FunctionLanes, message: dict) -> dict:
        assert lanes.queue_url is not None
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
