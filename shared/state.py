"""Job and round state in one DynamoDB table.

Items, all under the partition key ``pk = "JOB#<job_id>"``:

``sk = "JOB"``
    The job: ``status``, ``round`` (the round now running), ``n_workers``,
    ``total_rounds``, ``fingerprint`` (hash of the spec), ``spec`` (its JSON), ``error``,
    ``last_error`` (the latest handler error that SQS will retry, see
    :meth:`StateStore.record_last_error`), the latest metrics, ``watchdog_attempts``
    (re-sends the watchdog made in the current round), timestamps, and once the job ended,
    ``expires_at``. A job that failed on a file that ``baton resume`` repairs has
    ``repair`` (the kind of repair, kept until the repair ends), and a resume counts
    ``repair_attempt`` (see :mod:`shared.repair`). Its ``item_type = "JOB"`` and ``created_at`` key the sparse global
    secondary index ``jobs-by-creation``, which lists job items only, oldest first, so
    :meth:`StateStore.list_jobs` never reads round items.
``sk = "ROUND#<r, 8 digits>"``
    Round ``r``: ``done``, the number set of workers whose result is on EFS, ``reduced``,
    the number set of reducers whose slice of the sums is on EFS (only when
    ``training.reducers`` > 1), ``updated_at`` (the last recorded progress: a worker or
    reducer done, or a continuation), and, once the round is aggregated, its metrics and
    ``expires_at``.

``expires_at`` is the table's time to live attribute: DynamoDB deletes an item within
days of that time (seconds since the epoch). It is set only when the stack keeps job
items for a limited time (``JOB_RETENTION_DAYS``), and removed from a job item that a
resume makes live again.

Job statuses::

    PREPARING ──> RUNNING ──> SUCCEEDED
        │           │  ^
        │           v  │ resume
        │         PAUSED
        └───────────┴──────> FAILED ──(resume)──> RUNNING, or PREPARING if it never ran
                                                  or has a repair to make first
    any status but SUCCEEDED ──(cancel)──> CANCELLED

Every state change is a conditional write, so at-least-once delivery cannot double-count
a worker or advance a round twice.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError

from shared.errors import JobConflictError
from shared.spec import JOB_ID_PATTERN

logger = logging.getLogger(__name__)

PREPARING = "PREPARING"
RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
PAUSED = "PAUSED"
CANCELLED = "CANCELLED"
TERMINAL_STATUSES = (SUCCEEDED, FAILED, CANCELLED)

# A condition expression that is true while the job is in none of TERMINAL_STATUSES, with the
# expression values it names. The expression names "#status" for the status attribute.
NOT_TERMINAL = "NOT #status IN (" + ", ".join(f":terminal{index}" for index in range(len(TERMINAL_STATUSES))) + ")"
NOT_TERMINAL_VALUES = {f":terminal{index}": {"S": status} for index, status in enumerate(TERMINAL_STATUSES)}
JOB_STATUSES = (PREPARING, RUNNING, PAUSED, SUCCEEDED, FAILED, CANCELLED)


# The global secondary index of job items (serverless.yml's StateTable), and its partition
# key: only job items carry that attribute.
JOBS_INDEX = "jobs-by-creation"
ITEM_TYPE = "item_type"
JOB_ITEM_TYPE = "JOB"

# Characters of a failure message kept as the job's ``error``. A message names a value and
# a fix in far fewer. One that quotes a whole input (a header of 20,000 column names) would
# otherwise push the job item past DynamoDB's 400 KB limit, and the failure would not be
# recorded at all.
MAX_ERROR_CHARS = 4000


def shorten_error(message: str, max_chars: int = MAX_ERROR_CHARS) -> str:
    """Return ``message`` cut to ``max_chars`` characters, keeping its start and its end.

    The start names what failed and on which value, and the end usually gives the fix, so
    the middle is replaced by a note of how many characters were left out.
    """
    if len(message) <= max_chars:
        return message
    left_out = len(message) - max_chars
    while True:
        note = f" [... {left_out:,} characters left out ...] "
        room = max_chars - len(note)
        if len(message) - room == left_out:
            break
        left_out = len(message) - room
    tail = room // 4
    return message[:room - tail] + note + message[len(message) - tail:]


def _partition_key(job_id: str) -> str:
    """Return the partition key of every item of the job."""
    return f"JOB#{job_id}"


def _add_summary_update(names: dict[str, str], values: dict[str, Any], assignments: list[str], removals: list[str],
                        summary: dict[str, Any] | None, removed: tuple[str, ...]) -> None:
    """Add to an UpdateItem request the job item fields that ``summary`` sets and the ones ``removed`` names."""
    for index, (name, value) in enumerate((summary or {}).items()):
        names[f"#s{index}"] = name
        values[f":s{index}"] = _to_attribute(value)
        assignments.append(f"#s{index} = :s{index}")
    for index, name in enumerate(removed):
        names[f"#r{index}"] = name
        removals.append(f"#r{index}")


def _job_key(job_id: str) -> dict:
    return {"pk": {"S": _partition_key(job_id)}, "sk": {"S": "JOB"}}


def can_record_job(job_id: object) -> bool:
    """Return whether a failure may be recorded under ``job_id``: a string of the job id form.

    A rejected spec whose id breaks the form (empty, too long, with spaces or ``/``) has
    its failure recorded under ``job-<message id>`` instead, so every job item has an id
    that ``baton status`` and the other commands accept, and a key that fits DynamoDB's.
    """
    return isinstance(job_id, str) and JOB_ID_PATTERN.match(job_id) is not None


def _round_key(job_id: str, round_index: int) -> dict:
    return {"pk": {"S": _partition_key(job_id)}, "sk": {"S": f"ROUND#{round_index:08d}"}}


def _is_condition_failure(error: ClientError) -> bool:
    return error.response["Error"]["Code"] == "ConditionalCheckFailedException"


def _to_attribute(value: Any) -> dict:
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, float) and not math.isfinite(value):
        # DynamoDB numbers have no NaN or infinity, so such a value is stored as absent.
        return {"NULL": True}
    if isinstance(value, (int, float)):
        return {"N": repr(value) if isinstance(value, float) else str(value)}
    if value is None:
        return {"NULL": True}
    return {"S": str(value)}


def _from_attribute(attribute: dict) -> Any:
    (kind, value), = attribute.items()
    if kind == "N":
        number = Decimal(value)
        if not number.is_finite():
            # Written by an earlier version into a moto table. DynamoDB itself rejects NaN and infinity.
            return float(number)
        return int(number) if number == number.to_integral_value() and "." not in value and "e" not in value.lower() else float(number)
    if kind == "NS":
        return sorted(int(Decimal(member)) for member in value)
    if kind == "NULL":
        return None
    if kind == "M":
        return {key: _from_attribute(inner) for key, inner in value.items()}
    return value


# The job item's count of preparations started again by a resume (absent: none).
PREPARATION_ATTEMPT = "preparation_attempt"
# The job item's round from which a job went on with an earlier run's files on EFS.
CONTINUED_FROM = "continued_from"
# The job item's pending repair: the ``repair`` of the RepairableDataError that failed the
# job, kept while the job is PREPARING for the repair and removed when it runs again.
REPAIR = "repair"
# The job item's count of repairs started by a resume, which names each repair's messages.
REPAIR_ATTEMPT = "repair_attempt"
# The job item's count of rounds trained again after a rewind to an earlier round state.
ROUNDS_RERUN = "rounds_rerun"


@dataclass(frozen=True)
class JobRecord:
    """A snapshot of a job item."""

    job_id: str
    status: str
    round: int
    n_workers: int
    total_rounds: int
    fingerprint: str
    spec_json: str
    error: str | None
    attributes: dict[str, Any]

    @classmethod
    def from_item(cls, item: dict) -> "JobRecord":
        values = {name: _from_attribute(attribute) for name, attribute in item.items()}
        return cls(
            job_id=values["pk"].removeprefix(_partition_key("")),
            status=values["status"],
            round=int(values.get("round", 0)),
            n_workers=int(values.get("n_workers", 0)),
            total_rounds=int(values.get("total_rounds", 0)),
            fingerprint=values.get("fingerprint", ""),
            spec_json=values.get("spec", "{}"),
            error=values.get("error"),
            attributes=values,
        )

    @property
    def first_round(self) -> int:
        """Return the round the job started at: 0, or above 0 when it went on from an earlier run's files."""
        return int(self.attributes.get(CONTINUED_FROM, 0))

    @property
    def repair(self) -> str | None:
        """Return the kind of repair the job waits for or is making (``shards``, ``round_state``), or None."""
        return self.attributes.get(REPAIR)

    @property
    def repair_attempt(self) -> int:
        return int(self.attributes.get(REPAIR_ATTEMPT, 0))

    @property
    def preparation_attempt(self) -> int:
        return int(self.attributes.get(PREPARATION_ATTEMPT, 0))


def describe_last_error(last_error: dict[str, Any]) -> str:
    """Return a job item's ``last_error`` map as one line: the function, message, receive and error."""
    return (f"{last_error.get('function', 'a handler')} failed on message {last_error.get('message_id', '?')} "
            f"(receive {last_error.get('receive_count', '?')}): "
            f"{last_error.get('error_type', 'Exception')}: {last_error.get('error', '')}")


def job_item_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    """Return the fields of a round's metrics that the job item keeps: epoch, losses, cost so far."""
    summary = {"epoch": metrics["epoch"], "train_loss": metrics["train_loss"], "cost_usd": metrics["total_cost_usd"]}
    for name in ("validation_loss", "validation_accuracy", "validation_r2"):
        if name in metrics:
            summary[name] = metrics[name]
    return summary


def _round_usage(item: dict) -> dict[str, float]:
    return {name: float(_from_attribute(item[name])) for name in item if name.startswith(("worker_", "reducer_"))}


# DynamoDB's largest BatchWriteItem. Items it leaves unprocessed are sent again, up to 5
# attempts in all, after waits of 0.05, 0.1, 0.2 and 0.4 s.
BATCH_WRITE_LIMIT = 25
BATCH_WRITE_ATTEMPTS = 5
BATCH_WRITE_BACKOFF_SECONDS = 0.05

# A round item stores the round's metrics in one map attribute (``put_round_metrics``).
# A single SET clause took moto's server about half the time of fourteen (measured on the
# local stack), and on DynamoDB the item costs the same either way.
METRICS_ATTRIBUTE = "metrics"
# Items written before the map held each metric as its own attribute, "loss" among them.
LEGACY_METRICS_MARKER = "loss"


def _round_metrics(item: dict) -> dict[str, Any] | None:
    """Return the metrics stored on a round item, in either layout, or None if it has none."""
    if METRICS_ATTRIBUTE in item:
        return _from_attribute(item[METRICS_ATTRIBUTE])
    if LEGACY_METRICS_MARKER in item:
        return {name: _from_attribute(attribute) for name, attribute in item.items()
                if name not in ("pk", "sk", "done", "reduced")}
    return None


@dataclass(frozen=True)
class RoundState:
    """A round item's sets and usage: done workers, reduced slices, the usage totals, and
    whether the aggregator stored the round's metrics.

    Workers and reducers add their usage in the same conditional update that adds them to
    their set, so a complete set comes with complete usage.
    """

    done: list[int]
    reduced: list[int]
    usage: dict[str, float]
    has_metrics: bool = False

    @classmethod
    def from_item(cls, item: dict) -> "RoundState":
        return cls(done=_from_attribute(item["done"]) if "done" in item else [],
                   reduced=_from_attribute(item["reduced"]) if "reduced" in item else [],
                   usage=_round_usage(item),
                   has_metrics=METRICS_ATTRIBUTE in item or LEGACY_METRICS_MARKER in item)


# The table's time to live attribute (serverless.yml, StateTable).
EXPIRES_AT = "expires_at"


class StateStore:
    """Job and round state in DynamoDB.

    Parameters
    ----------
    client : botocore DynamoDB client
    table_name : str
    retention_seconds : float, optional
        How long after a round's aggregation, or a job's end, DynamoDB keeps its item.
        None keeps items forever.
    """

    def __init__(self, client, table_name: str, retention_seconds: float | None = None):
        self.client = client
        self.table_name = table_name
        self.retention_seconds = retention_seconds

    def _expiry(self, since: float) -> dict:
        """Return the ``expires_at`` attribute value for an item whose retention starts at ``since``."""
        return {"N": str(int(since + self.retention_seconds))}

    def get_job(self, job_id: str) -> JobRecord | None:
        """Return the job's item read consistently, or None if there is none."""
        response = self.client.get_item(TableName=self.table_name, Key=_job_key(job_id), ConsistentRead=True)
        item = response.get("Item")
        return None if item is None else JobRecord.from_item(item)

    def create_job(self, job_id: str, fingerprint: str, spec_json: str, n_workers: int) -> tuple[JobRecord, bool]:
        """Create the job in status PREPARING, or return it if the same spec created it before.

        An item without a fingerprint records only the rejection of an invalid spec sent
        under this id. A valid spec replaces it, so a user can fix the spec and send it again.

        Returns
        -------
        record : JobRecord
        created : bool
            True if this call created the item, False if it existed already.

        Raises
        ------
        JobConflictError
            If the job id is taken by a job with a different spec.
        """
        now = time.time()
        item = {
            **_job_key(job_id),
            ITEM_TYPE: {"S": JOB_ITEM_TYPE},
            "status": {"S": PREPARING},
            "round": {"N": "0"},
            "n_workers": {"N": str(n_workers)},
            "total_rounds": {"N": "0"},
            "fingerprint": {"S": fingerprint},
            "spec": {"S": spec_json},
            "created_at": {"N": repr(now)},
            "updated_at": {"N": repr(now)},
        }
        try:
            self.client.put_item(TableName=self.table_name, Item=item,
                                 ConditionExpression="attribute_not_exists(pk) OR attribute_not_exists(fingerprint)")
        except ClientError as error:
            if not _is_condition_failure(error):
                raise
            existing = self.get_job(job_id)
            if existing.fingerprint != fingerprint:
                # Sending the original spec again would not help: the starter drops a
                # job message for a job that is past PREPARING, whatever its status.
                fix = "send this spec under a new job_id"
                if existing.status in (PAUSED, FAILED):
                    fix += f"; `baton resume {job_id}` would continue that job with its own spec"
                raise JobConflictError(
                    f"job id '{job_id}' is already used by a job with a different spec (status {existing.status}); "
                    f"{fix}") from None
            return existing, False
        return JobRecord.from_item(item), True

    def start_job(self, job_id: str, total_rounds: int, first_round: int = 0,
                  summary: dict[str, Any] | None = None, to_status: str = RUNNING) -> bool:
        """Move the job from PREPARING to ``to_status`` (RUNNING by default) at ``first_round``;
        False if it had already moved.

        ``first_round`` is above 0 when the job goes on from an earlier run's files, and
        ``summary`` then sets the job item's fields that the aggregator keeps, such as
        ``cost_usd``. ``to_status`` SUCCEEDED records a job whose earlier run had
        finished, at the round it finished.
        """
        names = {"#status": "status", "#round": "round"}
        values = {
            ":to": {"S": to_status},
            ":preparing": {"S": PREPARING},
            ":total": {"N": str(total_rounds)},
            ":round": {"N": str(first_round)},
            ":now": {"N": repr(time.time())},
        }
        assignments = ["#status = :to", "total_rounds = :total", "#round = :round", "updated_at = :now"]
        for index, (name, value) in enumerate((summary or {}).items()):
            names[f"#s{index}"] = name
            values[f":s{index}"] = _to_attribute(value)
            assignments.append(f"#s{index} = :s{index}")
        return self._update_if(
            _job_key(job_id),
            UpdateExpression="SET " + ", ".join(assignments),
            ConditionExpression="#status = :preparing",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    def record_worker_done(self, job_id: str, round_index: int, worker: int,
                           usage: dict[str, float] | None = None) -> tuple[bool, list[int]]:
        """Add ``worker`` to round ``round_index``'s set of finished workers.

        Adding to a set is idempotent, unlike incrementing a counter. The add is also
        conditional on the worker's absence, so exactly one delivery of a worker's task
        sees ``newly_added`` True. ``usage`` (for example ``{"worker_seconds": 1.5}``) is
        added to the round item's totals in the same update, so it too counts once.

        Returns
        -------
        newly_added : bool
        done : list of int
            The workers recorded so far, sorted.
        """
        return self._add_to_round_set(job_id, round_index, "done", worker, usage)

    def record_slice_reduced(self, job_id: str, round_index: int, slice_index: int,
                             usage: dict[str, float] | None = None) -> tuple[bool, list[int]]:
        """Add reducer ``slice_index`` to round ``round_index``'s set of reduced slices.

        The same conditional set add as :meth:`record_worker_done`, on the attribute
        ``reduced``; ``usage`` (``reducer_seconds``, ``reducer_gb_seconds``) counts once.

        Returns
        -------
        newly_added : bool
        reduced : list of int
            The slices recorded so far, sorted.
        """
        return self._add_to_round_set(job_id, round_index, "reduced", slice_index, usage)

    def _add_to_round_set(self, job_id: str, round_index: int, attribute: str, member: int,
                          usage: dict[str, float] | None) -> tuple[bool, list[int]]:
        # Usage totals are numbers that ADD increments; their names go through placeholders.
        usage_names = {f"#u{index}": name for index, name in enumerate(sorted(usage or {}))}
        values = {
            ":member": {"NS": [str(member)]},
            ":member_number": {"N": str(member)},
            ":now": {"N": repr(time.time())},
        }
        increments = ""
        for placeholder, name in usage_names.items():
            values[":" + placeholder[1:]] = _to_attribute(float(usage[name]))
            increments += f", {placeholder} :{placeholder[1:]}"
        names = {**usage_names, "#set": attribute}
        try:
            response = self.client.update_item(
                TableName=self.table_name,
                Key=_round_key(job_id, round_index),
                UpdateExpression=f"ADD #set :member{increments} SET updated_at = :now",
                ConditionExpression="attribute_not_exists(#set) OR NOT contains(#set, :member_number)",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
                # A member already in the set fails the condition; the failure then carries
                # the item, so a duplicate learns the set without a second request.
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as error:
            if not _is_condition_failure(error):
                raise
            item = error.response.get("Item")
            if item is None:
                return False, self._get_round_set(job_id, round_index, attribute)
            return False, _from_attribute(item[attribute]) if attribute in item else []
        return True, _from_attribute(response["Attributes"][attribute])

    def get_round_usage(self, job_id: str, round_index: int) -> dict[str, float]:
        """Return the usage totals the workers and reducers added to round ``round_index``."""
        response = self.client.get_item(
            TableName=self.table_name, Key=_round_key(job_id, round_index), ConsistentRead=True)
        return _round_usage(response.get("Item", {}))

    def get_done_workers(self, job_id: str, round_index: int) -> list[int]:
        """Return the sorted workers recorded as done in round ``round_index``."""
        return self._get_round_set(job_id, round_index, "done")

    def get_reduced_slices(self, job_id: str, round_index: int) -> list[int]:
        """Return the sorted slices recorded as reduced in round ``round_index``."""
        return self._get_round_set(job_id, round_index, "reduced")

    def _get_round_set(self, job_id: str, round_index: int, attribute: str) -> list[int]:
        response = self.client.get_item(
            TableName=self.table_name, Key=_round_key(job_id, round_index), ConsistentRead=True)
        item = response.get("Item", {})
        return _from_attribute(item[attribute]) if attribute in item else []

    def get_job_and_done_workers(self, job_id: str, round_index: int) -> tuple[JobRecord | None, list[int]]:
        """Return the job's item and round ``round_index``'s done workers, both read consistently."""
        record, round_state = self.get_job_and_round(job_id, round_index)
        return record, round_state.done

    def get_job_and_round(self, job_id: str, round_index: int) -> tuple[JobRecord | None, "RoundState"]:
        """Return the job's item and round ``round_index``'s item, both read consistently.

        One BatchGetItem request in place of a GetItem for each, which saves a request on
        every task and aggregation. Keys that DynamoDB leaves unprocessed (under
        throttling) are read with GetItem.
        """
        keys = [_job_key(job_id), _round_key(job_id, round_index)]
        response = self.client.batch_get_item(RequestItems={self.table_name: {"Keys": keys, "ConsistentRead": True}})
        if response.get("UnprocessedKeys"):
            round_item = self.client.get_item(TableName=self.table_name, Key=keys[1], ConsistentRead=True)
            return self.get_job(job_id), RoundState.from_item(round_item.get("Item", {}))
        items = {item["sk"]["S"]: item for item in response["Responses"].get(self.table_name, [])}
        job_item, round_item = items.get("JOB"), items.get(keys[1]["sk"]["S"], {})
        record = None if job_item is None else JobRecord.from_item(job_item)
        return record, RoundState.from_item(round_item)

    def put_round_metrics(self, job_id: str, round_index: int, metrics: dict[str, float]) -> None:
        """Store round ``round_index``'s metrics on its round item; repeating it is harmless."""
        expression = "SET #metrics = :metrics"
        values = {":metrics": {"M": {name: _to_attribute(value) for name, value in metrics.items()}}}
        if self.retention_seconds is not None:
            expression += f", {EXPIRES_AT} = :expires"
            values[":expires"] = self._expiry(time.time())
        self.client.update_item(
            TableName=self.table_name,
            Key=_round_key(job_id, round_index),
            UpdateExpression=expression,
            ExpressionAttributeNames={"#metrics": METRICS_ATTRIBUTE},
            ExpressionAttributeValues=values,
        )

    def put_earlier_round_metrics(self, job_id: str, metrics_by_round: dict[int, dict[str, Any]]) -> None:
        """Write round items holding only the given metrics, for rounds an earlier run trained.

        For a job that goes on from an earlier run's files after the table lost it: those
        rounds have no items, so each is written whole, up to 25 in one BatchWriteItem
        request. An item already there is replaced, losing its sets and usage.

        Raises
        ------
        RuntimeError
            If DynamoDB still leaves items unprocessed after a few attempts, as under
            lasting throttling. Writing them again is harmless, so the caller's message
            may be retried.
        """
        expiry = {} if self.retention_seconds is None else {EXPIRES_AT: self._expiry(time.time())}
        requests = [{"PutRequest": {"Item": {
            **_round_key(job_id, round_index),
            METRICS_ATTRIBUTE: {"M": {name: _to_attribute(value) for name, value in metrics.items()}},
            **expiry,
        }}} for round_index, metrics in sorted(metrics_by_round.items())]
        self._batch_write(job_id, requests)

    def delete_round_items(self, job_id: str, round_indexes: range) -> None:
        """Delete the items of rounds ``round_indexes``: done and reduced sets, usage and metrics.

        For a job rewound to an earlier round, whose later rounds run again from nothing.
        A missing item is no error, so a repeated call is harmless.

        Raises
        ------
        RuntimeError
            As :meth:`put_earlier_round_metrics` does.
        """
        self._batch_write(job_id, [{"DeleteRequest": {"Key": _round_key(job_id, round_index)}}
                                   for round_index in round_indexes])

    def _batch_write(self, job_id: str, requests: list[dict]) -> None:
        """Send round item ``requests`` (PutRequest, DeleteRequest) in BatchWriteItem calls.

        Items that DynamoDB leaves unprocessed are sent again, up to
        :data:`BATCH_WRITE_ATTEMPTS` attempts in all.
        """
        for start in range(0, len(requests), BATCH_WRITE_LIMIT):
            pending = requests[start:start + BATCH_WRITE_LIMIT]
            for attempt in range(BATCH_WRITE_ATTEMPTS):
                if attempt:
                    time.sleep(BATCH_WRITE_BACKOFF_SECONDS * 2 ** (attempt - 1))
                response = self.client.batch_write_item(RequestItems={self.table_name: pending})
                pending = response.get("UnprocessedItems", {}).get(self.table_name, [])
                if not pending:
                    break
            else:
                raise RuntimeError(f"DynamoDB left {len(pending)} round items of job {job_id} unprocessed after "
                                   f"{BATCH_WRITE_ATTEMPTS} attempts; the message is retried")

    def list_round_metrics(self, job_id: str, first_round: int = 0) -> list[dict[str, Any]]:
        """Return the metrics of every aggregated round from the 0-based index ``first_round`` on, in round order.

        A poller passes the round after the last one it has, so each poll reads only new
        round items instead of the whole job.
        """
        rounds = []
        paginator = self.client.get_paginator("query")
        pages = paginator.paginate(
            TableName=self.table_name,
            # Round keys sort in round order (8 digits), and "ROUND$" sorts after all of them.
            KeyConditionExpression="pk = :pk AND sk BETWEEN :first AND :end",
            ExpressionAttributeValues={
                ":pk": {"S": _partition_key(job_id)},
                ":first": _round_key(job_id, max(0, first_round))["sk"],
                ":end": {"S": "ROUND$"},
            },
            ConsistentRead=True,
        )
        for page in pages:
            for item in page["Items"]:
                metrics = _round_metrics(item)
                if metrics is not None:
                    rounds.append(metrics)
        return sorted(rounds, key=lambda entry: entry["round"])

    def advance_round(self, job_id: str, from_round: int, summary: dict[str, Any]) -> bool:
        """Move a RUNNING job from round ``from_round`` to the next; False if it already moved.

        The condition on the current round is what keeps a twice-fired aggregation from
        skipping a round.
        """
        return self._conditional_job_update(
            job_id,
            from_round,
            sets={"round": from_round + 1, "watchdog_attempts": 0, **summary},
        )

    def finish_job(self, job_id: str, from_round: int, summary: dict[str, Any]) -> bool:
        """Mark a RUNNING job at round ``from_round`` SUCCEEDED; False if it had already moved."""
        return self._conditional_job_update(
            job_id, from_round, sets={"status": SUCCEEDED, "round": from_round + 1, **summary})

    def fail_job(self, job_id: str, message: str, repair: str | None = None) -> bool:
        """Mark the job FAILED with ``message`` unless it already finished.

        Creates the item when the job never got one, for example when its spec was
        rejected. Returns False if the job had already succeeded, failed or been cancelled.
        ``repair`` sets the job's pending repair, which ``baton resume`` makes. Without it a
        pending repair is kept, so a repair that fails on a transient error is made again
        by the next resume.
        """
        expression = ("SET #status = :failed, #error = :message, updated_at = :now, "
                      "created_at = if_not_exists(created_at, :now), #round = if_not_exists(#round, :zero), "
                      f"{ITEM_TYPE} = :job_item")
        values = {
            **NOT_TERMINAL_VALUES,
            ":failed": {"S": FAILED},
            ":message": {"S": shorten_error(message)},
            ":now": {"N": repr(time.time())},
            ":zero": {"N": "0"},
            ":job_item": {"S": JOB_ITEM_TYPE},
        }
        if repair is not None:
            expression += f", {REPAIR} = :repair"
            values[":repair"] = {"S": repair}
        return self._update_if(
            _job_key(job_id),
            UpdateExpression=expression,
            ConditionExpression=f"attribute_not_exists(#status) OR {NOT_TERMINAL}",
            ExpressionAttributeNames={"#status": "status", "#error": "error", "#round": "round"},
            ExpressionAttributeValues=values,
        )

    def record_last_error(self, job_id: str, last_error: dict[str, Any], unless_recorded_since: int | None = None,
                          first_received_at: float = 0.0) -> bool:
        """Store ``last_error`` as the job item's ``last_error`` map, without changing the status.

        Handlers call this on a failed receive that SQS will retry, so the error is on the
        job long before the last receive. The update leaves ``updated_at`` alone, because
        the watchdog reads that as the job's progress, and a retry is no progress.

        Parameters
        ----------
        job_id : str
        last_error : dict
            Strings and numbers only, for example ``function``, ``message_id``,
            ``receive_count``, ``error_type``, ``error`` and ``recorded_at``.
        unless_recorded_since : int, optional
            Keep an error already stored for the same ``message_id`` from this receive or
            a later one, and an error of another message recorded at or after
            ``first_received_at``, which may have replaced this message's own: then
            nothing is written.
        first_received_at : float, default=0.0
            When SQS first delivered the message (seconds since the epoch); 0 when unknown,
            which keeps every error of another message.

        Returns
        -------
        bool
            False when the job has no item, or has succeeded, failed or been cancelled, or
            keeps its error under ``unless_recorded_since``: then nothing is written.
        """
        condition = f"attribute_exists(#status) AND {NOT_TERMINAL}"
        values = {
            ":last_error": {"M": {name: _to_attribute(value) for name, value in last_error.items()}},
            **NOT_TERMINAL_VALUES,
        }
        if unless_recorded_since is not None:
            condition += (" AND (attribute_not_exists(last_error)"
                          " OR (last_error.message_id = :message_id AND last_error.receive_count < :since)"
                          " OR (last_error.message_id <> :message_id AND last_error.recorded_at < :first_received))")
            values[":message_id"] = _to_attribute(last_error["message_id"])
            values[":since"] = _to_attribute(unless_recorded_since)
            values[":first_received"] = _to_attribute(float(first_received_at))
        return self._update_if(
            _job_key(job_id),
            UpdateExpression="SET last_error = :last_error",
            # attribute_exists keeps the update from creating an item without a status.
            ConditionExpression=condition,
            ExpressionAttributeNames={"#status": "status"},
            ExpressionAttributeValues=values,
        )

    def record_progress(self, job_id: str, round_index: int) -> None:
        """Stamp round ``round_index`` with the current time; the watchdog reads it."""
        self.client.update_item(
            TableName=self.table_name,
            Key=_round_key(job_id, round_index),
            UpdateExpression="SET updated_at = :now",
            ExpressionAttributeValues={":now": {"N": repr(time.time())}},
        )

    def round_updated_at(self, job_id: str, round_index: int) -> float | None:
        """Return when round ``round_index`` last recorded progress, or None if never."""
        response = self.client.get_item(
            TableName=self.table_name, Key=_round_key(job_id, round_index), ConsistentRead=True)
        value = response.get("Item", {}).get("updated_at")
        return None if value is None else float(value["N"])

    def count_watchdog_attempt(self, job_id: str, round_index: int) -> int | None:
        """Add one to the watchdog's re-send count of a RUNNING job still at ``round_index``.

        Returns the new count, or None when the job is no longer running at that round.
        """
        try:
            response = self.client.update_item(
                TableName=self.table_name,
                Key=_job_key(job_id),
                UpdateExpression="SET watchdog_attempts = if_not_exists(watchdog_attempts, :zero) + :one, "
                                 "updated_at = :now",
                ConditionExpression="#status = :running AND #round = :round",
                ExpressionAttributeNames={"#status": "status", "#round": "round"},
                ExpressionAttributeValues={
                    ":zero": {"N": "0"}, ":one": {"N": "1"}, ":running": {"S": RUNNING},
                    ":round": {"N": str(round_index)}, ":now": {"N": repr(time.time())},
                },
                ReturnValues="UPDATED_NEW",
            )
        except ClientError as error:
            if _is_condition_failure(error):
                return None
            raise
        return int(response["Attributes"]["watchdog_attempts"]["N"])

    def set_status(self, job_id: str, to_status: str, from_statuses: tuple[str, ...], clear_error: bool = False,
                   new_preparation: bool = False) -> bool:
        """Move the job to ``to_status`` if its status is one of ``from_statuses``.

        Returns False when the job does not exist or is in another status. Pause, cancel and
        resume are built on this, so a command racing a round's end cannot undo a finish.
        ``new_preparation`` also adds one to the job's ``preparation_attempt``, which makes
        the starter prepare the data again from the first step. ``clear_error`` also
        removes a pending ``repair``, which belongs to the old run too.
        """
        names = {"#status": "status"}
        values = {":to": {"S": to_status}, ":now": {"N": repr(time.time())}, ":zero": {"N": "0"},
                  ":job_item": {"S": JOB_ITEM_TYPE}}
        for index, status in enumerate(from_statuses):
            values[f":from{index}"] = {"S": status}
        expression = (f"SET #status = :to, updated_at = :now, status_changed_at = :now, watchdog_attempts = :zero, "
                      f"{ITEM_TYPE} = :job_item")
        removed = [] if to_status in TERMINAL_STATUSES else [EXPIRES_AT]
        if clear_error:
            # The handler errors recorded before the job failed or paused belong to the old run.
            removed += ["#error", "last_error", REPAIR]
            names["#error"] = "error"
        if removed:
            expression += " REMOVE " + ", ".join(removed)
        if new_preparation:
            expression += f" ADD {PREPARATION_ATTEMPT} :one"
            values[":one"] = {"N": "1"}
        return self._update_if(
            _job_key(job_id),
            UpdateExpression=expression,
            ConditionExpression=f"#status IN ({', '.join(f':from{i}' for i in range(len(from_statuses)))})",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    def begin_repair(self, job_id: str, repair: str, new_preparation: bool) -> int | None:
        """Move a FAILED job whose pending repair is ``repair`` to PREPARING, and count a repair attempt.

        The error and ``last_error`` go, as on any resume, and the pending repair stays
        until :meth:`end_repair`. ``new_preparation`` also adds one to
        ``preparation_attempt``, so the starter removes the job's prepared data once.

        Returns the new ``repair_attempt``, or None when the job is not FAILED with that
        pending repair, as after a concurrent resume or cancel.
        """
        expression = (f"SET #status = :preparing, updated_at = :now, status_changed_at = :now, "
                      f"watchdog_attempts = :zero REMOVE #error, last_error, {EXPIRES_AT} "
                      f"ADD {REPAIR_ATTEMPT} :one")
        if new_preparation:
            expression += f", {PREPARATION_ATTEMPT} :one"
        try:
            response = self.client.update_item(
                TableName=self.table_name,
                Key=_job_key(job_id),
                UpdateExpression=expression,
                ConditionExpression=f"#status = :failed AND {REPAIR} = :repair",
                ExpressionAttributeNames={"#status": "status", "#error": "error"},
                ExpressionAttributeValues={
                    ":preparing": {"S": PREPARING}, ":failed": {"S": FAILED}, ":repair": {"S": repair},
                    ":now": {"N": repr(time.time())}, ":zero": {"N": "0"}, ":one": {"N": "1"},
                },
                ReturnValues="UPDATED_NEW",
            )
        except ClientError as error:
            if _is_condition_failure(error):
                return None
            raise
        return int(response["Attributes"][REPAIR_ATTEMPT]["N"])

    def end_repair(self, job_id: str, repair: str, attempt: int, from_round: int, to_round: int,
                   summary: dict[str, Any] | None = None, removed: tuple[str, ...] = ()) -> bool:
        """Move a job from its repair back to RUNNING at ``to_round``; False if it had already moved.

        Only the repair attempt ``attempt`` of kind ``repair`` of a PREPARING job at round
        ``from_round`` ends here, so a repeated or late repair message cannot move the
        job's round twice. ``to_round`` below ``from_round`` rewinds the job, which counts
        the rounds to train again in ``rounds_rerun``. ``summary`` sets the job item's
        fields that the aggregator keeps, and ``removed`` names fields to remove.
        """
        names = {"#status": "status", "#round": "round"}
        values = {
            ":running": {"S": RUNNING}, ":preparing": {"S": PREPARING}, ":repair": {"S": repair},
            ":attempt": {"N": str(attempt)}, ":from_round": {"N": str(from_round)}, ":to_round": {"N": str(to_round)},
            ":now": {"N": repr(time.time())}, ":zero": {"N": "0"},
        }
        assignments = ["#status = :running", "#round = :to_round", "updated_at = :now", "watchdog_attempts = :zero"]
        removals = [REPAIR]
        _add_summary_update(names, values, assignments, removals, summary, removed)
        expression = "SET " + ", ".join(assignments) + " REMOVE " + ", ".join(removals)
        if to_round < from_round:
            expression += f" ADD {ROUNDS_RERUN} :rerun"
            values[":rerun"] = {"N": str(from_round - to_round)}
        return self._update_if(
            _job_key(job_id),
            UpdateExpression=expression,
            # Each part names what a stale message could otherwise undo: another status (a
            # cancel), another repair or attempt (a later resume), another round (a rewind done).
            ConditionExpression=(f"#status = :preparing AND {REPAIR} = :repair AND {REPAIR_ATTEMPT} = :attempt "
                                 "AND #round = :from_round"),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    def rewind_cancelled_job(self, job_id: str, repair: str, attempt: int, from_round: int, to_round: int,
                             summary: dict[str, Any] | None = None, removed: tuple[str, ...] = ()) -> bool:
        """Set the round of a job cancelled during its rewind back to ``to_round``; False if it was not so.

        The rewind removed the metrics and round items of rounds ``to_round`` and later
        before the cancel landed, so the job item then agrees with the history that is
        left. Only a CANCELLED job that still has repair attempt ``attempt`` of kind
        ``repair`` pending at round ``from_round`` changes. ``rounds_rerun`` does not,
        because no round ran again.
        """
        names = {"#status": "status", "#round": "round"}
        values = {
            ":cancelled": {"S": CANCELLED}, ":repair": {"S": repair}, ":attempt": {"N": str(attempt)},
            ":from_round": {"N": str(from_round)}, ":to_round": {"N": str(to_round)}, ":now": {"N": repr(time.time())},
        }
        assignments = ["#round = :to_round", "updated_at = :now"]
        removals: list[str] = []
        _add_summary_update(names, values, assignments, removals, summary, removed)
        expression = "SET " + ", ".join(assignments) + (" REMOVE " + ", ".join(removals) if removals else "")
        return self._update_if(
            _job_key(job_id),
            UpdateExpression=expression,
            ConditionExpression=(f"#status = :cancelled AND {REPAIR} = :repair AND {REPAIR_ATTEMPT} = :attempt "
                                 "AND #round = :from_round"),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    def expire_ended_job(self, job_id: str, ended_at: float) -> bool:
        """Give an ended job's item, and the item of the round it ended in, their ``expires_at``.

        Only a job in one of TERMINAL_STATUSES without ``expires_at`` gets one, so a job
        resumed in the meantime is left alone. Returns False in that case, or when the
        store keeps items forever. The earlier rounds got theirs with their metrics.
        """
        if self.retention_seconds is None:
            return False
        expires = self._expiry(ended_at)
        terminal = ", ".join(NOT_TERMINAL_VALUES)
        try:
            response = self.client.update_item(
                TableName=self.table_name,
                Key=_job_key(job_id),
                UpdateExpression=f"SET {EXPIRES_AT} = :expires",
                ConditionExpression=f"#status IN ({terminal}) AND attribute_not_exists({EXPIRES_AT})",
                ExpressionAttributeNames={"#status": "status"},
                ExpressionAttributeValues={":expires": expires, **NOT_TERMINAL_VALUES},
                ReturnValues="ALL_NEW",
            )
        except ClientError as error:
            if _is_condition_failure(error):
                return False
            raise
        last_round = JobRecord.from_item(response["Attributes"]).round
        # The round item exists only if a worker or the aggregator wrote it.
        self._update_if(_round_key(job_id, last_round), UpdateExpression=f"SET {EXPIRES_AT} = :expires",
                        ConditionExpression="attribute_exists(pk)", ExpressionAttributeValues={":expires": expires})
        return True

    def list_jobs(self) -> list[JobRecord]:
        """Return every job item, oldest first.

        Reads the ``jobs-by-creation`` index, so the cost grows with the number of jobs, not
        of rounds. The index is eventually consistent: a job created or changed in the last
        second may be missing or show its previous state, so a caller that acts on a record
        does it with a conditional write.
        """
        jobs = []
        paginator = self.client.get_paginator("query")
        pages = paginator.paginate(
            TableName=self.table_name,
            IndexName=JOBS_INDEX,
            KeyConditionExpression="#item_type = :job_item",
            ExpressionAttributeNames={"#item_type": ITEM_TYPE},
            ExpressionAttributeValues={":job_item": {"S": JOB_ITEM_TYPE}},
        )
        for page in pages:
            jobs.extend(JobRecord.from_item(item) for item in page["Items"])
        return jobs

    def _update_if(self, key: dict, **request: Any) -> bool:
        """Run one conditional UpdateItem on ``key``; return False when its condition fails."""
        try:
            self.client.update_item(TableName=self.table_name, Key=key, **request)
        except ClientError as error:
            if _is_condition_failure(error):
                return False
            raise
        return True

    def _conditional_job_update(self, job_id: str, from_round: int, sets: dict[str, Any]) -> bool:
        names = {"#status": "status", "#round": "round"}
        values = {":running": {"S": RUNNING}, ":from_round": {"N": str(from_round)}}
        assignments = []
        # item_type also puts a job created before the jobs index into it, at its next round.
        for index, (name, value) in enumerate({**sets, "updated_at": time.time(), ITEM_TYPE: JOB_ITEM_TYPE}.items()):
            names[f"#s{index}"] = name
            values[f":s{index}"] = _to_attribute(value)
            assignments.append(f"#s{index} = :s{index}")
        return self._update_if(
            _job_key(job_id),
            UpdateExpression="SET " + ", ".join(assignments),
            # Only a running job at exactly this round may move on.
            ConditionExpression="#status = :running AND #round = :from_round",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )
