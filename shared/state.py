"""Job and round state in one DynamoDB table.

Items, all under the partition key ``pk = "JOB#<job_id>"``:

``sk = "JOB"``
    The job: ``status``, ``round`` (the round now running), ``n_workers``,
    ``total_rounds``, ``fingerprint`` (hash of the spec), ``spec`` (its JSON), ``error``,
    the latest metrics, and timestamps.
``sk = "ROUND#<r, 8 digits>"``
    Round ``r``: ``done``, the number set of workers whose result is on EFS, and, once the
    round is aggregated, its metrics.

Every state change is a conditional write, so at-least-once delivery cannot double-count
a worker or advance a round twice.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError

from shared.errors import JobConflictError

logger = logging.getLogger(__name__)

PREPARING = "PREPARING"
RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
TERMINAL_STATUSES = (SUCCEEDED, FAILED)


def _job_key(job_id: str) -> dict:
    return {"pk": {"S": f"JOB#{job_id}"}, "sk": {"S": "JOB"}}


def _round_key(job_id: str, round_index: int) -> dict:
    return {"pk": {"S": f"JOB#{job_id}"}, "sk": {"S": f"ROUND#{round_index:08d}"}}


def _is_condition_failure(error: ClientError) -> bool:
    return error.response["Error"]["Code"] == "ConditionalCheckFailedException"


def _to_attribute(value: Any) -> dict:
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, (int, float)):
        return {"N": repr(value) if isinstance(value, float) else str(value)}
    if value is None:
        return {"NULL": True}
    return {"S": str(value)}


def _from_attribute(attribute: dict) -> Any:
    (kind, value), = attribute.items()
    if kind == "N":
        number = Decimal(value)
        return int(number) if number == number.to_integral_value() and "." not in value and "e" not in value.lower() else float(number)
    if kind == "NS":
        return sorted(int(Decimal(member)) for member in value)
    if kind == "NULL":
        return None
    if kind == "M":
        return {key: _from_attribute(inner) for key, inner in value.items()}
    return value


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
            job_id=values["pk"].removeprefix("JOB#"),
            status=values["status"],
            round=int(values.get("round", 0)),
            n_workers=int(values.get("n_workers", 0)),
            total_rounds=int(values.get("total_rounds", 0)),
            fingerprint=values.get("fingerprint", ""),
            spec_json=values.get("spec", "{}"),
            error=values.get("error"),
            attributes=values,
        )


class StateStore:
    """Job and round state in DynamoDB.

    Parameters
    ----------
    client : botocore DynamoDB client
    table_name : str
    """

    def __init__(self, client, table_name: str):
        self.client = client
        self.table_name = table_name

    def get_job(self, job_id: str) -> JobRecord | None:
        """Return the job's item read consistently, or None if there is none."""
        response = self.client.get_item(TableName=self.table_name, Key=_job_key(job_id), ConsistentRead=True)
        item = response.get("Item")
        return None if item is None else JobRecord.from_item(item)

    def create_job(self, job_id: str, fingerprint: str, spec_json: str, n_workers: int) -> JobRecord:
        """Create the job in status PREPARING, or return it if the same spec created it before.

        Raises
        ------
        JobConflictError
            If the job id is taken by a job with a different spec.
        """
        now = time.time()
        item = {
            **_job_key(job_id),
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
            self.client.put_item(TableName=self.table_name, Item=item, ConditionExpression="attribute_not_exists(pk)")
        except ClientError as error:
            if not _is_condition_failure(error):
                raise
            existing = self.get_job(job_id)
            if existing.fingerprint != fingerprint:
                raise JobConflictError(
                    f"job id '{job_id}' is already used by a job with a different spec (status {existing.status}); "
                    "choose a new job_id, or resend the original spec to resume that job") from None
            return existing
        return JobRecord.from_item(item)

    def start_job(self, job_id: str, total_rounds: int) -> bool:
        """Move the job from PREPARING to RUNNING at round 0; False if it had already moved."""
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key=_job_key(job_id),
                UpdateExpression="SET #status = :running, total_rounds = :total, updated_at = :now",
                ConditionExpression="#status = :preparing",
                ExpressionAttributeNames={"#status": "status"},
                ExpressionAttributeValues={
                    ":running": {"S": RUNNING},
                    ":preparing": {"S": PREPARING},
                    ":total": {"N": str(total_rounds)},
                    ":now": {"N": repr(time.time())},
                },
            )
        except ClientError as error:
            if _is_condition_failure(error):
                return False
            raise
        return True

    def record_worker_done(self, job_id: str, round_index: int, worker: int) -> tuple[bool, list[int]]:
        """Add ``worker`` to round ``round_index``'s set of finished workers.

        Adding to a set is idempotent, unlike incrementing a counter. The add is also
        conditional on the worker's absence, so exactly one delivery of a worker's task
        sees ``newly_added`` True.

        Returns
        -------
        newly_added : bool
        done : list of int
            The workers recorded so far, sorted.
        """
        try:
            response = self.client.update_item(
                TableName=self.table_name,
                Key=_round_key(job_id, round_index),
                UpdateExpression="ADD done :worker SET updated_at = :now",
                ConditionExpression="attribute_not_exists(done) OR NOT contains(done, :worker_number)",
                ExpressionAttributeValues={
                    ":worker": {"NS": [str(worker)]},
                    ":worker_number": {"N": str(worker)},
                    ":now": {"N": repr(time.time())},
                },
                ReturnValues="ALL_NEW",
            )
        except ClientError as error:
            if not _is_condition_failure(error):
                raise
            return False, self.get_done_workers(job_id, round_index)
        return True, _from_attribute(response["Attributes"]["done"])

    def get_done_workers(self, job_id: str, round_index: int) -> list[int]:
        """Return the sorted workers recorded as done in round ``round_index``."""
        response = self.client.get_item(
            TableName=self.table_name, Key=_round_key(job_id, round_index), ConsistentRead=True)
        item = response.get("Item", {})
        return _from_attribute(item["done"]) if "done" in item else []

    def put_round_metrics(self, job_id: str, round_index: int, metrics: dict[str, float]) -> None:
        """Store round ``round_index``'s metrics on its round item; repeating it is harmless."""
        names = {f"#m{i}": name for i, name in enumerate(metrics)}
        values = {f":m{i}": _to_attribute(value) for i, value in enumerate(metrics.values())}
        assignments = ", ".join(f"#m{i} = :m{i}" for i in range(len(metrics)))
        self.client.update_item(
            TableName=self.table_name,
            Key=_round_key(job_id, round_index),
            UpdateExpression=f"SET {assignments}",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    def list_round_metrics(self, job_id: str) -> list[dict[str, Any]]:
        """Return the metrics of every aggregated round, in round order."""
        rounds = []
        paginator = self.client.get_paginator("query")
        pages = paginator.paginate(
            TableName=self.table_name,
            KeyConditionExpression="pk = :pk AND begins_with(sk, :prefix)",
            ExpressionAttributeValues={":pk": {"S": f"JOB#{job_id}"}, ":prefix": {"S": "ROUND#"}},
            ConsistentRead=True,
        )
        for page in pages:
            for item in page["Items"]:
                values = {name: _from_attribute(attribute) for name, attribute in item.items()}
                if "loss" in values:
                    rounds.append({key: value for key, value in values.items() if key not in ("pk", "sk", "done")})
        return sorted(rounds, key=lambda entry: entry["round"])

    def advance_round(self, job_id: str, from_round: int, summary: dict[str, Any]) -> bool:
        """Move a RUNNING job from round ``from_round`` to the next; False if it already moved.

        The condition on the current round is what keeps a twice-fired aggregation from
        skipping a round.
        """
        return self._conditional_job_update(
            job_id,
            from_round,
            sets={"round": from_round + 1, **summary},
        )

    def finish_job(self, job_id: str, from_round: int, summary: dict[str, Any]) -> bool:
        """Mark a RUNNING job at round ``from_round`` SUCCEEDED; False if it had already moved."""
        return self._conditional_job_update(
            job_id, from_round, sets={"status": SUCCEEDED, "round": from_round + 1, **summary})

    def fail_job(self, job_id: str, message: str) -> bool:
        """Mark the job FAILED with ``message`` unless it already finished.

        Creates the item when the job never got one, for example when its spec was
        rejected. Returns False if the job had already succeeded or failed.
        """
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key=_job_key(job_id),
                UpdateExpression=(
                    "SET #status = :failed, #error = :message, updated_at = :now, "
                    "created_at = if_not_exists(created_at, :now), #round = if_not_exists(#round, :zero)"),
                ConditionExpression="attribute_not_exists(#status) OR NOT #status IN (:succeeded, :failed)",
                ExpressionAttributeNames={"#status": "status", "#error": "error", "#round": "round"},
                ExpressionAttributeValues={
                    ":failed": {"S": FAILED},
                    ":succeeded": {"S": SUCCEEDED},
                    ":message": {"S": message},
                    ":now": {"N": repr(time.time())},
                    ":zero": {"N": "0"},
                },
            )
        except ClientError as error:
            if _is_condition_failure(error):
                return False
            raise
        return True

    def list_jobs(self) -> list[JobRecord]:
        """Return every job item. Scans the table, so meant for the CLI, not for handlers."""
        jobs = []
        paginator = self.client.get_paginator("scan")
        pages = paginator.paginate(
            TableName=self.table_name,
            FilterExpression="sk = :job",
            ExpressionAttributeValues={":job": {"S": "JOB"}},
        )
        for page in pages:
            jobs.extend(JobRecord.from_item(item) for item in page["Items"])
        return sorted(jobs, key=lambda job: job.attributes.get("created_at", 0))

    def _conditional_job_update(self, job_id: str, from_round: int, sets: dict[str, Any]) -> bool:
        names = {"#status": "status", "#round": "round"}
        values = {":running": {"S": RUNNING}, ":from_round": {"N": str(from_round)}}
        assignments = []
        for index, (name, value) in enumerate({**sets, "updated_at": time.time()}.items()):
            names[f"#s{index}"] = name
            values[f":s{index}"] = _to_attribute(value)
            assignments.append(f"#s{index} = :s{index}")
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key=_job_key(job_id),
                UpdateExpression="SET " + ", ".join(assignments),
                # Only a running job at exactly this round may move on.
                ConditionExpression="#status = :running AND #round = :from_round",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ClientError as error:
            if _is_condition_failure(error):
                return False
            raise
        return True


def spec_from_record(record: JobRecord) -> dict:
    """Return the raw spec stored on a job item."""
    return json.loads(record.spec_json)
