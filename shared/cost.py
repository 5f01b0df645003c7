"""Estimated AWS cost of a training round, from what the functions can measure.

The price table below is the one place prices live. Each round the aggregator builds a
:class:`RoundUsage` from:

- the workers' billed time: each worker adds its seconds and GB-seconds (seconds x
  ``AWS_LAMBDA_FUNCTION_MEMORY_SIZE`` / 1024) to the round item in DynamoDB. It does so
  in the update that records it as done, so a redelivered task is counted once;
- its own time and memory;
- the requests a round makes, counted from the message flow (:func:`count_round_requests`);
- the bytes of the files it reads and writes on EFS, and the size of the job's folder.

:func:`estimate_round_cost` prices that usage. The aggregator adds the result to the
job's running total (``cost_usd`` on the job item) and stops the job when the total
reaches ``training.budget_usd``.

Limitations
-----------
The figures are estimates and undercount slightly:

- Lambda bills from the start of the handler (and, for cold starts, the init phase); the
  functions measure from the start of their step, so the SQS batch handling, logging and
  init time are missing.
- The SQS pollers of the event source mappings receive even while the queues are idle
  (long polling, billed per request); only the receives that return a message are counted.
- CloudWatch Logs ingestion, CloudWatch metrics, the SQS interface endpoint's hourly
  charge, data transfer and the free tiers are left out. So is the copy of the final
  model to the models bucket: a few S3 PUT requests per job, and the bucket's storage,
  which lasts beyond the job.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Lambda memory to assume when AWS_LAMBDA_FUNCTION_MEMORY_SIZE is unset (local runs): the
# worker and aggregator default in serverless.yml.
DEFAULT_MEMORY_MB = 1769
SECONDS_PER_MONTH = 730 * 3600
BYTES_PER_GB = 1024**3


@dataclass(frozen=True)
class PriceTable:
    """On-demand prices in US dollars, for us-east-1.

    NOTE: these are AWS's published list prices for us-east-1 as of 2025, copied by hand.
    Other regions cost up to about 30 % more; check https://aws.amazon.com/pricing/ and
    pass your own table to :func:`estimate_round_cost` for a different region or date.

    Attributes
    ----------
    lambda_gb_second_x86_64, lambda_gb_second_arm64 : float
        Lambda compute per GB-second, by architecture.
    lambda_request : float
        Lambda per invocation ($0.20 per million).
    sqs_request : float
        SQS standard queue per request ($0.40 per million). A batch of up to 10 messages
        is one request, and each 64 KiB of payload is one more.
    dynamodb_read_unit, dynamodb_write_unit : float
        DynamoDB on-demand per read request unit ($0.125 per million) and write request
        unit ($0.625 per million).
    efs_gb_month : float
        EFS Standard storage per GB-month.
    efs_read_gb, efs_write_gb : float
        EFS Elastic throughput per GB read and per GB written.
    """

    lambda_gb_second_x86_64: float = 0.0000166667
    lambda_gb_second_arm64: float = 0.0000133334
    lambda_request: float = 0.20 / 1e6
    sqs_request: float = 0.40 / 1e6
    dynamodb_read_unit: float = 0.125 / 1e6
    dynamodb_write_unit: float = 0.625 / 1e6
    efs_gb_month: float = 0.30
    efs_read_gb: float = 0.03
    efs_write_gb: float = 0.06

    def lambda_gb_second(self, architecture: str) -> float:
        """Return the GB-second price for ``architecture`` ("x86_64" or "arm64")."""
        if architecture == "arm64":
            return self.lambda_gb_second_arm64
        if architecture == "x86_64":
            return self.lambda_gb_second_x86_64
        raise ValueError(f"unknown Lambda architecture {architecture!r}; expected 'x86_64' or 'arm64'")


PRICES = PriceTable()


@dataclass(frozen=True)
class RoundUsage:
    """What one round consumed.

    Attributes
    ----------
    architecture : str
        Lambda architecture of the functions, "x86_64" or "arm64".
    lambda_gb_seconds : float
        Billed compute of the round's invocations: seconds x memory in GB, summed.
    lambda_requests : int
        Invocations: one per worker and one for the aggregator.
    sqs_requests : int
        SQS requests: sends, receives and deletes.
    dynamodb_read_units, dynamodb_write_units : int
        DynamoDB request units consumed.
    efs_bytes_read, efs_bytes_written : int
        Bytes read from and written to EFS by the round's invocations.
    efs_stored_bytes : int
        Size of the job's folder on EFS.
    round_seconds : float
        Wall time of the round, for which the folder is billed as storage.
    """

    architecture: str
    lambda_gb_seconds: float
    lambda_requests: int
    sqs_requests: int
    dynamodb_read_units: int
    dynamodb_write_units: int
    efs_bytes_read: int
    efs_bytes_written: int
    efs_stored_bytes: int
    round_seconds: float


@dataclass(frozen=True)
class RoundCost:
    """A round's estimated cost in US dollars, by service."""

    lambda_usd: float
    sqs_usd: float
    dynamodb_usd: float
    efs_usd: float

    @property
    def total_usd(self) -> float:
        return self.lambda_usd + self.sqs_usd + self.dynamodb_usd + self.efs_usd

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total_usd": self.total_usd}


def estimate_round_cost(usage: RoundUsage, prices: PriceTable = PRICES) -> RoundCost:
    """Price one round's usage."""
    lambda_usd = (usage.lambda_gb_seconds * prices.lambda_gb_second(usage.architecture)
                  + usage.lambda_requests * prices.lambda_request)
    sqs_usd = usage.sqs_requests * prices.sqs_request
    dynamodb_usd = (usage.dynamodb_read_units * prices.dynamodb_read_unit
                    + usage.dynamodb_write_units * prices.dynamodb_write_unit)
    storage_gb_months = usage.efs_stored_bytes / BYTES_PER_GB * usage.round_seconds / SECONDS_PER_MONTH
    efs_usd = (storage_gb_months * prices.efs_gb_month
               + usage.efs_bytes_read / BYTES_PER_GB * prices.efs_read_gb
               + usage.efs_bytes_written / BYTES_PER_GB * prices.efs_write_gb)
    return RoundCost(lambda_usd=lambda_usd, sqs_usd=sqs_usd, dynamodb_usd=dynamodb_usd, efs_usd=efs_usd)


@dataclass(frozen=True)
class RequestCounts:
    """SQS requests and DynamoDB request units of one round."""

    sqs_requests: int
    dynamodb_read_units: int
    dynamodb_write_units: int


def count_round_requests(n_workers: int, job_item_bytes: int, round_item_bytes: int = 1024,
                         reducers: int = 1, continuations: int = 0) -> RequestCounts:
    """Count the requests one round makes, from the message flow in shared/worker.py and aggregation.py.

    Parameters
    ----------
    n_workers : int
        Workers in the round, at least 1.
    job_item_bytes : int
        Size of the job's DynamoDB item, which holds the spec. A strongly consistent read
        costs one read unit per 4 KB, and a write one write unit per 1 KB of the item.
    round_item_bytes : int, default=1024
        Size of a round item: the done set and the round's metrics.
    reducers : int, default=1
        ``training.reducers``. Above 1 the last worker sends a reduce message per slice
        (in batches of 10) instead of the aggregate message; each reducer is received and
        deleted (2 SQS), reads the job item, the done set and the reduced set, and records
        its slice (a write); the last one sends the aggregate message (1 SQS), and the
        aggregator also reads the reduced set.
    continuations : int, default=0
        Invocations after the first of the round's workers and aggregator, which carried
        on work that an earlier invocation saved. Each sends its continuation message,
        which is received and deleted (3 SQS), reads the job item and the round item, and
        stamps the round item with its progress (a write).

    Notes
    -----
    Per worker: the event source mapping's receive and delete (2 SQS); a read of the job
    item and of the round's done set (reads); the conditional update that records the
    worker (writes). The last worker sends the aggregate message (1 SQS).
    The aggregator: receive and delete (2 SQS); reads of the job item and the done set;
    a write of the round's metrics and the conditional update of the job item; the next
    round's tasks in batches of 10 (SQS).
    """
    if n_workers < 1:
        raise ValueError(f"n_workers must be at least 1, got {n_workers}")
    job_read = math.ceil(job_item_bytes / 4096)
    round_read = math.ceil(round_item_bytes / 4096)
    job_write = math.ceil(job_item_bytes / 1024)
    round_write = math.ceil(round_item_bytes / 1024)

    worker_sqs = 2 * n_workers + 1
    worker_reads = n_workers * (job_read + round_read)
    worker_writes = n_workers * round_write

    aggregator_sqs = 2 + math.ceil(n_workers / 10)
    aggregator_reads = job_read + round_read
    aggregator_writes = round_write + job_write

    reducer_sqs = reducer_reads = reducer_writes = 0
    if reducers > 1:
        reducer_sqs = math.ceil(reducers / 10) - 1 + 2 * reducers + 1
        reducer_reads = reducers * (job_read + 2 * round_read) + round_read
        reducer_writes = reducers * round_write

    if continuations < 0:
        raise ValueError(f"continuations must be at least 0, got {continuations}")
    continuation_sqs = 3 * continuations
    continuation_reads = continuations * (job_read + round_read)
    continuation_writes = continuations * round_write

    return RequestCounts(
        sqs_requests=worker_sqs + aggregator_sqs + reducer_sqs + continuation_sqs,
        dynamodb_read_units=worker_reads + aggregator_reads + reducer_reads + continuation_reads,
        dynamodb_write_units=worker_writes + aggregator_writes + reducer_writes + continuation_writes,
    )


def lambda_architecture() -> str:
    """Return the Lambda architecture name of this process's machine."""
    return "arm64" if platform.machine() in ("aarch64", "arm64") else "x86_64"


def function_memory_mb() -> int:
    """Return this function's memory setting in MB, from Lambda's environment."""
    raw = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
    if raw is None:
        return DEFAULT_MEMORY_MB
    try:
        return int(raw)
    except ValueError as error:
        raise ValueError(f"invalid AWS_LAMBDA_FUNCTION_MEMORY_SIZE {raw!r}; expected megabytes") from error


def gb_seconds(seconds: float, memory_mb: int | None = None) -> float:
    """Return the GB-seconds of ``seconds`` at ``memory_mb`` (default: this function's)."""
    return seconds * (function_memory_mb() if memory_mb is None else memory_mb) / 1024


def folder_bytes(path: Path) -> int:
    """Return the total size of the files under ``path``, 0 if it does not exist."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    # Pruned or renamed between the listing and the stat.
                    continue
    return total


def folder_file_sizes(path: Path) -> tuple[dict[str, int], int]:
    """Return the sizes of the files directly in ``path`` by name, and the total under it.

    One listing of the folder, for a caller that needs both several of its files' sizes and
    the folder's total. Subfolders count in the total only. A missing folder gives
    ``({}, 0)``.
    """
    sizes: dict[str, int] = {}
    total = 0
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return sizes, total
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            total += folder_bytes(Path(entry.path))
        elif entry.is_file(follow_symlinks=False):
            try:
                sizes[entry.name] = entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
            total += sizes[entry.name]
    return sizes, total


def file_bytes(path: Path) -> int:
    """Return the size of ``path``, 0 if it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# Bytes of each job's folders that stay fixed once its data is prepared (spec, data and
# preparation files), measured once per process. Only a new preparation, after a resume,
# changes them, and it also changes the data folder's modification time, part of the key.
_prepared_bytes: dict[tuple[str, int], int] = {}

# Folders of a job that change from round to round, and the final model.
_ROUND_FOLDERS = ("rounds", "metrics", "model")


def stored_job_bytes(store, job_id: str, round_index: int, round_folder_bytes: int) -> int:
    """Estimate the bytes job ``job_id`` keeps on EFS while round ``round_index`` runs.

    A walk of the whole job folder would take one file operation per file, and the files
    grow with the workers and the rounds. So the prepared files are measured once per
    process, each folder in ``rounds/`` is counted as ``round_folder_bytes``, and the
    metrics folder as one file per finished round the size of the latest one. The folders
    are listed rather than taken from ``KEEP_CHECKPOINTS``. While the aggregator accounts
    round ``r``, they are the kept folders up to round ``r`` and the round ``r + 1`` folder
    it has just written. The oldest is pruned once the round advances
    (``EfsStore.prune_rounds``).
    """
    job_dir = store.job_dir(job_id)
    try:
        key = (str(job_dir), store.data_dir(job_id).stat().st_mtime_ns)
    except FileNotFoundError:
        key = (str(job_dir), 0)
    if key not in _prepared_bytes:
        total = 0
        for entry in os.scandir(job_dir) if job_dir.is_dir() else ():
            if entry.name in _ROUND_FOLDERS:
                continue
            total += folder_bytes(Path(entry.path)) if entry.is_dir() else file_bytes(Path(entry.path))
        _prepared_bytes[key] = total

    rounds_dir = job_dir / "rounds"
    kept_rounds = len(os.listdir(rounds_dir)) if rounds_dir.is_dir() else 0
    metrics_bytes = round_index * file_bytes(store.metrics_path(job_id, round_index - 1)) if round_index else 0
    return _prepared_bytes[key] + kept_rounds * round_folder_bytes + metrics_bytes

def account_round(store, record, usage_totals: dict[str, float], round_index: int, batch_size: int, n_features: int,
                  validation_bytes: int, aggregate_seconds: float, prices: PriceTable = PRICES,
                  reducers: int = 1, aggregate_continuations: int = 0) -> dict[str, float]:
    """Measure and price round ``round_index`` of a job, for the aggregator's metrics.

    Parameters
    ----------
    store : EfsStore
    record : JobRecord
        The job item as the aggregator read it before committing the round; its
        ``updated_at`` marks the start of the round and its ``cost_usd`` the total so far.
    usage_totals : dict of str to float
        The usage the round's workers and reducers added to its round item
        (``StateStore.get_round_usage``): their seconds and GB-seconds, and the workers'
        continuation invocations.
    round_index : int
    batch_size, n_features : int
        For the bytes each worker reads from its shard, counted as dense float64 rows.
    validation_bytes : int
        Bytes of the validation rows the aggregator read.
    aggregate_seconds : float
        The aggregator's own time in this round, over all its invocations.
    reducers : int, default=1
        ``training.reducers``; the reducers' time is in ``usage_totals``.
    aggregate_continuations : int, default=0
        The aggregator's invocations in this round after its first.

    Returns
    -------
    dict
        ``round_seconds``, ``worker_seconds``, ``lambda_invocations``, ``efs_bytes_read``,
        ``efs_bytes_written``, ``cost_usd`` (this round) and ``total_cost_usd`` (the job
        so far, this round included).
    """
    job_id, n_workers = record.job_id, record.n_workers
    now = time.time()
    round_seconds = max(0.0, now - float(record.attributes.get("updated_at", now)))

    worker_gb_seconds = usage_totals.get("worker_gb_seconds", 0.0)
    reducer_gb_seconds = usage_totals.get("reducer_gb_seconds", 0.0)

    round_files, round_folder_bytes = folder_file_sizes(store.round_dir(job_id, round_index))
    state_bytes = round_files.get(store.state_path(job_id, round_index).name, 0)
    next_state_bytes = file_bytes(store.state_path(job_id, round_index + 1))
    result_bytes = sum(round_files.get(store.result_path(job_id, round_index, worker).name, 0)
                       for worker in range(n_workers))
    # Written by the reducers and read by the aggregator; none when the aggregator sums alone.
    reduced_bytes = sum(round_files.get(store.reduced_path(job_id, round_index, index).name, 0)
                        for index in range(reducers)) if reducers > 1 else 0
    batch_bytes = batch_size * n_features * 8
    bytes_read = (n_workers * (state_bytes + batch_bytes) + state_bytes + result_bytes + validation_bytes
                  + reduced_bytes)
    bytes_written = result_bytes + next_state_bytes + reduced_bytes

    continuations = int(usage_totals.get("worker_continuations", 0)) + aggregate_continuations
    requests = count_round_requests(n_workers, job_item_bytes=len(record.spec_json) + 512, reducers=reducers,
                                    continuations=continuations)
    invocations = n_workers + 1 + (reducers if reducers > 1 else 0) + continuations
    usage = RoundUsage(
        architecture=lambda_architecture(),
        lambda_gb_seconds=worker_gb_seconds + reducer_gb_seconds + gb_seconds(aggregate_seconds),
        lambda_requests=invocations,
        sqs_requests=requests.sqs_requests,
        dynamodb_read_units=requests.dynamodb_read_units,
        dynamodb_write_units=requests.dynamodb_write_units,
        efs_bytes_read=bytes_read,
        efs_bytes_written=bytes_written,
        # This round's folder (state, results, reduced slices, progress files) stands for
        # each kept round: one stat per file of one round, however many rounds are kept.
        efs_stored_bytes=stored_job_bytes(store, job_id, round_index, round_folder_bytes),
        round_seconds=round_seconds,
    )
    round_cost = estimate_round_cost(usage, prices).total_usd
    return {
        "round_seconds": round_seconds,
        "worker_seconds": usage_totals.get("worker_seconds", 0.0),
        "lambda_invocations": invocations,
        "efs_bytes_read": bytes_read,
        "efs_bytes_written": bytes_written,
        "cost_usd": round_cost,
        "total_cost_usd": float(record.attributes.get("cost_usd", 0.0)) + round_cost,
    }


def array_bytes(array) -> int:
    """Return the bytes of a dense or scipy sparse matrix's data, 0 for None."""
    if array is None:
        return 0
    if hasattr(array, "indptr"):
        return int(array.data.nbytes + array.indices.nbytes + array.indptr.nbytes)
    return int(getattr(array, "nbytes", 0))
