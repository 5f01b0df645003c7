"""Messages between Baton's functions.

Every message is a small JSON object; arrays always live on EFS.

=============  =============================================  ======================
queue          body                                           consumer
=============  =============================================  ======================
jobs           the job spec                                   starter
jobs           ``{"job_id", "prepare": {"step", "index"}}``   starter
jobs           ``{"job_id", "repair": {"kind", "attempt"}}``  starter
tasks          ``{"job_id", "round", "worker"}``              worker
aggregate      ``{"job_id", "round"}``                        aggregator
aggregate      ``{"job_id", "round", "reduce"}``              aggregator, as reducer
=============  =============================================  ======================

A task or aggregate message may also carry ``"continuation": n`` (n >= 1): the n-th link
of a chain of invocations that share one round's work (see :mod:`shared.continuation`). A
reduce message (``"reduce": k``, 0 <= k < ``training.reducers``) asks for slice k of the
round's sums; it never carries a continuation. A ``prepare`` message is one step of a
preparation (:mod:`shared.preparation`), and a ``repair`` message the repair that a
resume asks for (:mod:`shared.repair`).
"""

from __future__ import annotations

import json
from typing import Any, NotRequired, TypedDict

from shared.config import Settings
from shared.errors import InvalidMessageError
from shared.spec import encode_job_message

# SendMessageBatch takes at most 10 entries.
SQS_BATCH_LIMIT = 10


# Bodies of task and aggregate messages stay far below this; arrays travel through EFS.
MAX_MESSAGE_BYTES = 1024

# Largest round, worker, slice or continuation number a message may carry: the handlers
# store these numbers in int64 arrays, some after adding 1.
MAX_MESSAGE_INTEGER = 2**62


class TaskMessage(TypedDict):
    job_id: str
    round: int
    worker: int
    continuation: NotRequired[int]


class AggregateMessage(TypedDict):
    job_id: str
    round: int
    continuation: NotRequired[int]
    reduce: NotRequired[int]


def decode_body(body: str) -> Any:
    """Decode a message body as JSON.

    Raises
    ------
    InvalidMessageError
        If the body is not JSON, or nests arrays or objects too deeply for Python to decode.
    """
    try:
        return json.loads(body)
    except json.JSONDecodeError as error:
        raise InvalidMessageError(f"message body is not valid JSON: {error.msg}") from None
    except (RecursionError, TypeError, ValueError) as error:
        raise InvalidMessageError(f"message body cannot be decoded ({type(error).__name__}: {error})") from None


def body_object(body: str) -> dict | None:
    """Return the body decoded as a JSON object, or None for any body that is not one."""
    try:
        message = decode_body(body)
    except InvalidMessageError:
        return None
    return message if isinstance(message, dict) else None


def _check_count(message: dict, name: str, minimum: int) -> None:
    """Raise unless ``message[name]`` is an integer from ``minimum`` to :data:`MAX_MESSAGE_INTEGER`."""
    value = message[name]
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= MAX_MESSAGE_INTEGER:
        raise InvalidMessageError(f"message field '{name}' must be an integer from {minimum} to "
                                  f"{MAX_MESSAGE_INTEGER:,}, got {value!r}")


def _parse(body: str, required: dict[str, type]) -> dict[str, Any]:
    message = decode_body(body)
    if not isinstance(message, dict):
        raise InvalidMessageError(f"message body must be a JSON object, got {type(message).__name__}")
    for name, kind in required.items():
        value = message.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidMessageError(f"message field '{name}' must be {kind.__name__}, got {value!r}")
        if kind is int:
            _check_count(message, name, minimum=0)
    if "continuation" in message:
        _check_count(message, "continuation", minimum=1)
    return message


def _body(job_id: str, round_index: int, worker: int | None = None, continuation: int | None = None,
          reduce: int | None = None) -> str:
    message: dict[str, Any] = {"job_id": job_id, "round": round_index}
    if worker is not None:
        message["worker"] = worker
    if reduce is not None:
        message["reduce"] = reduce
    if continuation is not None:
        message["continuation"] = continuation
    body = json.dumps(message)
    if len(body.encode()) >= MAX_MESSAGE_BYTES:
        raise ValueError(f"message body is {len(body.encode())} bytes, over the {MAX_MESSAGE_BYTES}-byte budget: {body[:80]}")
    return body


def parse_task(body: str) -> TaskMessage:
    """Decode a tasks-queue message body."""
    return _parse(body, {"job_id": str, "round": int, "worker": int})  # type: ignore[return-value]


def parse_aggregate(body: str) -> AggregateMessage:
    """Decode an aggregate-queue message body: an aggregate message or a reduce message."""
    message = _parse(body, {"job_id": str, "round": int})
    if "reduce" in message:
        _check_count(message, "reduce", minimum=0)
        if "continuation" in message:
            raise InvalidMessageError("a reduce message never carries 'continuation'; got both")
    return message  # type: ignore[return-value]


class QueueClient:
    """Sends Baton's messages. Queue URLs are looked up on first use and cached.

    Parameters
    ----------
    client : botocore SQS client
    settings : Settings
    """

    def __init__(self, client, settings: Settings):
        self.client = client
        self.settings = settings
        self._urls: dict[str, str] = {}

    def url(self, queue_name: str) -> str:
        if queue_name not in self._urls:
            self._urls[queue_name] = self.client.get_queue_url(QueueName=queue_name)["QueueUrl"]
        return self._urls[queue_name]

    def send_job(self, spec: dict) -> str:
        """Send a job spec to the jobs queue; return the message id."""
        response = self.client.send_message(
            QueueUrl=self.url(self.settings.jobs_queue_name), MessageBody=encode_job_message(spec))
        return response["MessageId"]

    def send_tasks(self, job_id: str, round_index: int, workers: list[int]) -> None:
        """Send one task message per worker for round ``round_index``."""
        bodies = [_body(job_id, round_index, worker) for worker in workers]
        self._send_batch(self.settings.tasks_queue_name, bodies)

    def send_task(self, job_id: str, round_index: int, worker: int, continuation: int | None = None) -> None:
        """Send one task message, for example the next link of a worker's continuation chain."""
        self.client.send_message(QueueUrl=self.url(self.settings.tasks_queue_name),
                                 MessageBody=_body(job_id, round_index, worker, continuation))

    def send_aggregate(self, job_id: str, round_index: int, continuation: int | None = None) -> None:
        """Ask the aggregator to combine round ``round_index``, or to continue doing so."""
        self.client.send_message(QueueUrl=self.url(self.settings.aggregate_queue_name),
                                 MessageBody=_body(job_id, round_index, continuation=continuation))

    def send_reduces(self, job_id: str, round_index: int, slices: list[int]) -> None:
        """Ask reducers to sum the given slices of round ``round_index``, one message per slice."""
        bodies = [_body(job_id, round_index, reduce=slice_index) for slice_index in slices]
        self._send_batch(self.settings.aggregate_queue_name, bodies)

    def _send_batch(self, queue_name: str, bodies: list[str]) -> None:
        url = self.url(queue_name)
        for start in range(0, len(bodies), SQS_BATCH_LIMIT):
            chunk = bodies[start:start + SQS_BATCH_LIMIT]
            entries = [{"Id": str(index), "MessageBody": body} for index, body in enumerate(chunk)]
            response = self.client.send_message_batch(QueueUrl=url, Entries=entries)
            failed = response.get("Failed", [])
            if failed:
                # Raising makes the caller's message come back, and re-sending is idempotent.
                raise RuntimeError(f"SQS rejected {len(failed)} of {len(entries)} messages to {queue_name}: {failed[0]}")
