"""Predict the time and cost of a Baton job before running it, on AWS or on this machine.

The model follows one round through the message flow of docs/architecture.md. The
aggregator sends the tasks, and the event source mapping starts the workers. Each worker
reads the weights and its batch from EFS, computes a gradient, writes its result and
records itself in DynamoDB. The last one sends the aggregate message. The aggregator then
reads every result, takes the optimizer step, evaluates the validation rows and does its
bookkeeping, then sends the next round's tasks.

Every figure the model assumes about AWS sits in :class:`AwsAssumptions`, with its source;
docs/planner.md lists them with links. Figures measured on this machine sit in
:class:`ComputeProfile` and :class:`LocalProfile`, and ``bench/planner_check.py`` measures
them again and checks the local predictions against local runs. Prices come from
:data:`shared.cost.PRICES`.

NOTE: the AWS side has not been checked against a deployed stack. Only the local model
is validated by measurement; the AWS constants marked as estimates are guesses.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import numpy as np

from shared import cost
from shared.config import DEFAULT_KEEP_CHECKPOINTS

MIB = 2**20
GIB = 2**30
TIB = 2**40
PAGE_BYTES = 4096
FLOAT32_BYTES = 4
FLOAT64_BYTES = 8
INT32_BYTES = 4

MIN_LAMBDA_MEMORY_MB = 128
MAX_LAMBDA_MEMORY_MB = 10240
MAX_WORKERS = 1000  # training.n_workers limit in shared/spec.py
THROUGHPUT_MODES = ("elastic", "bursting")


class PlanError(ValueError):
    """An invalid planner input; the message names the option and the fix."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option
        self.problem = message


# Assumptions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AwsAssumptions:
    """Assumptions about AWS, each with its source (docs/planner.md has the links).

    Attributes marked "estimate" have no public figure behind them.
    """

    # Lambda configuration-memory page: 1,769 MB is the equivalent of one vCPU, and CPU
    # grows in proportion to memory between 128 and 10,240 MB.
    memory_mb_per_vcpu: float = 1769.0
    # Estimate: share of the compute that numpy spreads over a second and later vCPU. The
    # gradient of a linear model is two matrix-vector products, which OpenBLAS may thread
    # for dense data; scipy's sparse products run on one thread.
    dense_parallel_fraction: float = 0.5
    # Estimate: speed of one Lambda vCPU relative to one core of the machine that measured
    # the ComputeProfile. AWS publishes no per-vCPU speed for Lambda.
    lambda_vcpu_speed: float = 1.0
    # Estimate: a cold start of a Python 3.12 function that imports numpy, scipy and
    # aws-lambda-powertools from a 152 MiB package (docs/deployment.md). The Lambda
    # operator guide lists what a cold start does (download the code, start the runtime,
    # run the init code) but gives no figure for such a package.
    cold_start_seconds: float = 2.5
    # Estimate: handler overhead per invocation (event parsing, JSON logs, metrics flush).
    invocation_overhead_seconds: float = 0.010
    # Estimate: time from a message becoming visible to the handler starting, with the
    # event source mapping's pollers already long-polling. No public figure.
    esm_dispatch_seconds: float = 0.100
    # Lambda SQS scaling page: a standard queue starts with five concurrent batches and
    # adds up to 300 per minute while messages wait.
    esm_initial_concurrency: int = 5
    esm_added_concurrency_per_minute: int = 300
    # Estimate: one SQS API call from a Lambda function in the same Region, through the
    # VPC interface endpoint. No public latency figure.
    sqs_request_seconds: float = 0.015
    # DynamoDB knowledge-center page: GetItem and PutItem average single-digit
    # milliseconds on the service side; 8 ms adds the client's share (estimate).
    dynamodb_request_seconds: float = 0.008
    # EFS performance page, Regional General Purpose: reads as low as 250 µs to about
    # 1 ms, writes about 2.7 ms. The planner takes the slower read figure, since a
    # Lambda client's latency is not the best case.
    efs_read_op_seconds: float = 0.001
    efs_write_op_seconds: float = 0.0027
    # Estimate: a stat, unlink or directory entry costs about one read round trip.
    efs_metadata_op_seconds: float = 0.001
    # EFS performance page: maximum per-client throughput, 1,500 MiB/s in Elastic mode
    # and 500 MiB/s in Bursting or Provisioned mode.
    efs_client_bytes_per_second_elastic: float = 1500 * MIB
    efs_client_bytes_per_second_bursting: float = 500 * MIB
    # Estimate: a Lambda function's network bandwidth. AWS publishes none; it caps the
    # EFS per-client figure above.
    lambda_network_bytes_per_second: float = 150 * MIB
    # EFS performance page, Regional Elastic: 20 to 60 GiB/s of reads and 1 to 5 GiB/s of
    # writes per file system, by Region. The planner takes the low end.
    efs_elastic_read_bytes_per_second: float = 20 * GIB
    efs_elastic_write_bytes_per_second: float = 1 * GIB
    # EFS throughput-mode knowledge-center page: Bursting mode gives 50 KiB/s per GiB
    # stored as baseline, and every file system may burst to 100 MiB/s (100 MiB/s per TiB
    # stored above 1 TiB) while it has burst credits.
    efs_bursting_baseline_per_stored_gib: float = 50 * 1024
    efs_bursting_burst_per_stored_tib: float = 100 * MIB
    efs_bursting_min_burst_bytes_per_second: float = 100 * MIB
    # RFDK PadEfsStorage page: with no credits left, a Bursting file system gets the
    # greater of 1 MiB/s and its storage-based baseline.
    efs_bursting_min_baseline_bytes_per_second: float = 1 * MIB
    # Estimate: credits a new Bursting file system starts with, taken as one full burst
    # hour at the minimum burst rate. Set it to the file system's BurstCreditBalance
    # metric for a real one.
    efs_bursting_initial_credit_bytes: float = 100 * MIB * 3600
    # Estimate: coefficient of variation of worker times, for the straggler term.
    straggler_cv: float = 0.10
    # Measured: peak resident memory of a worker process on a9a (docs/benchmarks.md,
    # 132 MiB), rounded up for the Lambda runtime itself.
    base_process_mb: float = 200.0
    # serverless.yml: worker timeout and the tasks queue's maximumConcurrency default.
    worker_timeout_seconds: float = 300.0
    default_max_concurrency: int = 100
    # shared/config.py: round folders kept on EFS (KEEP_CHECKPOINTS), the current one's included.
    keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS


AWS = AwsAssumptions()


@dataclass(frozen=True)
class ComputeProfile:
    """Compute costs measured on one core of this machine (:func:`measure_compute_profile`).

    Attributes
    ----------
    seconds_per_dense_value : float
        Loss and gradient of a linear model, per (row x feature) of a dense float32 batch.
    seconds_per_sparse_value : float
        The same per stored nonzero of a CSR batch.
    seconds_per_row : float
        Fixed cost per batch row (gathering the row, the loss terms).
    seconds_per_shuffled_row : float
        Drawing the epoch's order, a permutation of the whole shard, which a worker
        process does once per epoch (``shared/sampling.py`` keeps it for the epoch).
    seconds_per_parameter : float
        Adding one worker result's parameter into the sum, and the optimizer step, per
        parameter.
    seconds_per_call : float
        Fixed cost of one gradient call (Python and numpy overhead).
    description : str
        The machine and date of the measurement.
    """

    seconds_per_dense_value: float = 1.1e-9
    seconds_per_sparse_value: float = 6.0e-9
    seconds_per_row: float = 4.0e-8
    seconds_per_shuffled_row: float = 1.2e-8
    seconds_per_parameter: float = 3.0e-9
    seconds_per_call: float = 1.0e-4
    description: str = "defaults measured on a 2-core AMD EPYC with numpy 2.4"


@dataclass(frozen=True)
class VmOption:
    """One EC2 instance to compare against, and how fast it runs the same rounds.

    The VM runs the same algorithm in one process per vCPU: each step's batch is split over
    the vCPUs, then combined in shared memory, with no queues, database or network file
    system. Its speed per vCPU is the measured :class:`ComputeProfile` (same assumption as
    ``lambda_vcpu_speed``), times ``parallel_efficiency``.
    """

    name: str = "c5.4xlarge"
    vcpus: int = 16
    memory_gib: float = 32.0
    # AWS EC2 Auto Scaling guide, "Spot price per unit hour example": On-Demand c5.4xlarge
    # in US East (N. Virginia) at $0.68 per hour. AWS calls those figures example prices.
    hourly_usd: float = 0.68
    # Estimate: share of linear speed-up over 16 processes on 8 physical cores.
    parallel_efficiency: float = 0.7
    # Estimate: gp3 EBS default throughput, for data sets larger than the VM's memory.
    disk_bytes_per_second: float = 125 * MIB
    # Estimate: coordinating the processes and the optimizer step, per step.
    step_overhead_seconds: float = 0.002


VM = VmOption()


# Inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The job to plan: data, model size and how long it trains.

    Attributes
    ----------
    rows : int
        Training rows.
    features : int
        Features per row.
    density : float
        Share of nonzero features; 1.0 is a dense (float32) matrix, less is CSR.
    batch_size : int
        Rows per worker per round (``training.batch_size``).
    epochs : float or None
        Passes over the training rows; one of ``epochs`` and ``rounds`` is set.
    rounds : int or None
        Rounds to run.
    params : int or None
        Model parameters; None means ``features + 1`` (a linear model).
    optimizer_slots : int
        Arrays of the optimizer state per parameter (1 for momentum, 2 for Adam).
    validation_rows : int
        Rows the aggregator evaluates every round.
    data_bytes : int or None
        Size of the training data on EFS; None derives it from the other fields.
    """

    rows: int
    features: int
    batch_size: int
    density: float = 1.0
    epochs: float | None = 1.0
    rounds: int | None = None
    params: int | None = None
    optimizer_slots: int = 1
    validation_rows: int = 0
    data_bytes: int | None = None

    @property
    def n_params(self) -> int:
        return self.params if self.params is not None else self.features + 1

    @property
    def sparse(self) -> bool:
        return self.density < 1.0

    @property
    def row_bytes(self) -> float:
        """Bytes of one row on EFS: float32 values, plus int32 indices and offsets if sparse."""
        if self.data_bytes is not None:
            return self.data_bytes / self.rows
        if self.sparse:
            return self.features * self.density * (FLOAT32_BYTES + INT32_BYTES) + 8 + FLOAT32_BYTES
        return self.features * FLOAT32_BYTES + FLOAT32_BYTES

    @property
    def total_data_bytes(self) -> float:
        return self.row_bytes * self.rows

    @property
    def state_bytes(self) -> float:
        """Bytes of a round state: parameters and optimizer arrays, float64."""
        return self.n_params * FLOAT64_BYTES * (1 + self.optimizer_slots)

    @property
    def result_bytes(self) -> float:
        """Bytes of a worker result: the gradient sum and two scalars, in an .npz."""
        return self.n_params * FLOAT64_BYTES + 512

    def values_per_row(self) -> float:
        return self.features * self.density


@dataclass(frozen=True)
class Deployment:
    """Deployment settings of a job on AWS.

    Attributes
    ----------
    workers : int
        ``training.n_workers``.
    memory_mb : int
        Worker memory (serverless.yml ``workerMemory``).
    aggregator_memory_mb : int
        Aggregator memory (``aggregatorMemory``).
    max_concurrency : int
        The tasks queue's ``maximumConcurrency`` (``workerMaxConcurrency``).
    throughput_mode : str
        EFS throughput mode, "elastic" (the stack's) or "bursting".
    architecture : str
        Lambda architecture, for the price.
    """

    workers: int
    memory_mb: int = 1769
    aggregator_memory_mb: int = 1769
    max_concurrency: int = AWS.default_max_concurrency
    throughput_mode: str = "elastic"
    architecture: str = "x86_64"


# The job spec's ranges of training.max_epochs, training.max_rounds and training.batch_size.
MAX_EPOCHS = 10_000
MAX_ROUNDS = 10_000_000
MAX_BATCH_SIZE = 1_000_000
# Baton's optimizers keep at most two arrays per parameter (adam's two moments).
MAX_OPTIMIZER_SLOTS = 2
# EFS quotas page (docs.aws.amazon.com/efs/latest/ug/limits.html): the size of a single file.
MAX_EFS_FILE_BYTES = 52_673_613_135_872
# A plan longer than this gets a warning that it is beyond any practical job.
PRACTICAL_SECONDS = 365 * 86400


def check_workload(workload: Workload) -> None:
    """Raise :class:`PlanError` naming the option when ``workload`` cannot be planned or cannot run."""
    if workload.rows < 1:
        raise PlanError("--rows", f"must be at least 1, got {workload.rows}; pass the number of training rows")
    if workload.features < 1:
        raise PlanError("--features", f"must be at least 1, got {workload.features}; pass the number of features per row")
    if not 0 < workload.density <= 1:
        raise PlanError("--density", f"must be in (0, 1], got {workload.density}; use 1 for dense data or the share of nonzeros")
    if not 1 <= workload.batch_size <= MAX_BATCH_SIZE:
        raise PlanError("--batch-size", f"must be from 1 to {MAX_BATCH_SIZE:,} (training.batch_size), got "
                                        f"{workload.batch_size}; pass rows per worker per round")
    if workload.epochs is None and workload.rounds is None:
        raise PlanError("--epochs", "neither --epochs nor --rounds was given; pass one of them")
    if workload.epochs is not None and not 0 < workload.epochs <= MAX_EPOCHS:
        raise PlanError("--epochs", f"must be greater than 0 and at most {MAX_EPOCHS:,} (training.max_epochs), "
                                    f"got {workload.epochs}")
    if workload.rounds is not None and not 1 <= workload.rounds <= MAX_ROUNDS:
        raise PlanError("--rounds", f"must be from 1 to {MAX_ROUNDS:,} (training.max_rounds), got {workload.rounds}")
    if workload.params is not None and workload.params < 1:
        raise PlanError("--params", f"must be at least 1, got {workload.params}; omit it for a linear model")
    if not 0 <= workload.optimizer_slots <= MAX_OPTIMIZER_SLOTS:
        raise PlanError("--optimizer-slots", f"must be from 0 to {MAX_OPTIMIZER_SLOTS}, got {workload.optimizer_slots}; "
                                             "use 0 for sgd, 1 for momentum, nesterov or adagrad, 2 for adam")
    if workload.validation_rows < 0:
        raise PlanError("--validation-rows", f"must be 0 or more, got {workload.validation_rows}")
    if workload.data_bytes is not None and workload.data_bytes <= 0:
        raise PlanError("--data-bytes", f"must be greater than 0, got {workload.data_bytes}; omit it to derive the size")
    _check_sizes(workload)


def _check_sizes(workload: Workload) -> None:
    """Raise :class:`PlanError` when the data would not fit in one EFS file or a round state in a Lambda function."""
    efs_file = format_bytes(MAX_EFS_FILE_BYTES)
    # The state first: too many features is then blamed on --features, not on the data's size.
    if workload.state_bytes > MAX_LAMBDA_MEMORY_MB * MIB:
        option = "--params" if workload.params is not None else "--features"
        raise PlanError(option, f"a round state of {_count(workload.n_params, 'parameter')} and "
                                f"{_count(workload.optimizer_slots, 'optimizer array')} takes {format_bytes(workload.state_bytes)} as float64, more than the "
                                f"{MAX_LAMBDA_MEMORY_MB:,} MB a Lambda function can have, and every worker loads it whole")
    if workload.data_bytes is not None and workload.data_bytes > MAX_EFS_FILE_BYTES:
        raise PlanError("--data-bytes", f"{workload.data_bytes:,} bytes ({format_bytes(workload.data_bytes)}) is more "
                                        f"than one EFS file can hold ({efs_file}), and a job's training data is one file")
    if workload.data_bytes is None and workload.total_data_bytes > MAX_EFS_FILE_BYTES:
        raise PlanError("--rows", f"{_count(workload.rows, 'row')} of {_count(workload.features, 'feature')} at density "
                                  f"{workload.density:g} make {format_bytes(workload.total_data_bytes)} of data, more than "
                                  f"one EFS file can hold ({efs_file}), and a job's training data is one file; "
                                  "check --rows, --features and --density")
    validation_bytes = workload.validation_rows * workload.row_bytes
    if validation_bytes > MAX_EFS_FILE_BYTES:
        raise PlanError("--validation-rows", f"{_count(workload.validation_rows, 'row')} make {format_bytes(validation_bytes)} "
                                             f"of validation data, more than one EFS file can hold ({efs_file})")


def check_deployment(deployment: Deployment, workload: Workload | None = None) -> None:
    """Raise :class:`PlanError` naming the option when ``deployment`` is invalid on AWS."""
    if deployment.workers < 1:
        raise PlanError("--workers", f"must be at least 1, got {deployment.workers}")
    if deployment.workers > MAX_WORKERS:
        raise PlanError("--workers", f"must be at most {MAX_WORKERS} (training.n_workers), got {deployment.workers}")
    if workload is not None and deployment.workers > workload.rows:
        raise PlanError("--workers", f"{deployment.workers} workers for {workload.rows} rows leaves empty shards; "
                                     "use at most one worker per row")
    for option, value in (("--memory", deployment.memory_mb), ("--aggregator-memory", deployment.aggregator_memory_mb)):
        if not MIN_LAMBDA_MEMORY_MB <= value <= MAX_LAMBDA_MEMORY_MB:
            raise PlanError(option, f"{value} MB is outside Lambda's range; use {MIN_LAMBDA_MEMORY_MB} to "
                                    f"{MAX_LAMBDA_MEMORY_MB} MB")
    if not 2 <= deployment.max_concurrency <= 1000:
        raise PlanError("--max-concurrency", f"must be 2 to 1000 (an SQS event source mapping's range), "
                                             f"got {deployment.max_concurrency}")
    if deployment.throughput_mode not in THROUGHPUT_MODES:
        raise PlanError("--throughput-mode", f"unknown mode {deployment.throughput_mode!r}; use elastic or bursting")
    if deployment.architecture not in ("x86_64", "arm64"):
        raise PlanError("--architecture", f"unknown architecture {deployment.architecture!r}; use x86_64 or arm64")


# Shared arithmetic -------------------------------------------------------------------------


def rounds_per_epoch(workload: Workload, workers: int) -> int:
    """Return rounds per epoch, as shared/sampling.py counts them (largest shard / batch)."""
    shard_rows = math.ceil(workload.rows / workers)
    return max(1, math.ceil(shard_rows / workload.batch_size))


def total_rounds(workload: Workload, workers: int) -> int:
    """Return the rounds the job runs: from ``rounds``, else from ``epochs``."""
    if workload.rounds is not None:
        return workload.rounds
    assert workload.epochs is not None  # check_workload rejects a workload with neither
    return max(1, math.ceil(workload.epochs * rounds_per_epoch(workload, workers)))


# The round phase in which the aggregator evaluates the validation rows.
VALIDATION_PHASE = "aggregator: validation"


def batch_rows(workload: Workload, workers: int) -> int:
    """Return the rows one worker computes on per round (a shard smaller than a batch caps it)."""
    return min(workload.batch_size, math.ceil(workload.rows / workers))


def gradient_seconds(workload: Workload, rows: float, profile: ComputeProfile) -> float:
    """Return one core's time for the loss and gradient over ``rows`` rows."""
    per_value = profile.seconds_per_sparse_value if workload.sparse else profile.seconds_per_dense_value
    return profile.seconds_per_call + rows * (profile.seconds_per_row + workload.values_per_row() * per_value)


def lambda_speed(memory_mb: float, workload: Workload, aws: AwsAssumptions = AWS) -> float:
    """Return a function's compute speed relative to one measured core, from its memory.

    Below 1,769 MB the function gets a share of a vCPU. Above it, only the threaded part
    of a dense gradient (``dense_parallel_fraction``) uses the extra vCPUs.
    """
    vcpus = memory_mb / aws.memory_mb_per_vcpu
    if vcpus <= 1:
        return vcpus * aws.lambda_vcpu_speed
    parallel = 0.0 if workload.sparse else aws.dense_parallel_fraction
    # Amdahl: the serial part runs on one vCPU, the parallel part on all of them.
    return aws.lambda_vcpu_speed / ((1 - parallel) + parallel / vcpus)


def straggler_factor(workers: int, cv: float) -> float:
    """Return the expected slowest of ``workers`` times over the mean (normal tail estimate)."""
    if workers <= 1:
        return 1.0
    return 1.0 + cv * math.sqrt(2 * math.log(workers))


# Round model --------------------------------------------------------------------------------


@dataclass
class RoundEstimate:
    """Predicted time of one round, by phase, and what the round consumed.

    ``phases`` maps a phase name to seconds on the round's critical path, in order; their
    sum is ``seconds``.
    """

    phases: dict[str, float]
    worker_seconds: float
    aggregator_seconds: float
    efs_bytes_read: float
    efs_bytes_written: float

    @property
    def seconds(self) -> float:
        return sum(self.phases.values())


@dataclass(frozen=True)
class Platform:
    """Per-operation costs of the services a round uses, on AWS or on this machine."""

    queue_request_seconds: float
    database_request_seconds: float
    dispatch_seconds: float
    invocation_overhead_seconds: float
    read_op_seconds: float
    write_op_seconds: float
    metadata_op_seconds: float
    client_read_bytes_per_second: float
    client_write_bytes_per_second: float
    total_read_bytes_per_second: float
    total_write_bytes_per_second: float
    worker_speed: float
    aggregator_speed: float
    cpu_slots: float
    max_concurrency: int
    straggler_cv: float
    # Requests the queue and database server handles at once; moto's server handles one.
    request_slots: float = math.inf
    # Server time per request when many clients call at once (None: the request latency).
    request_service_seconds: float | None = None
    # Queue requests of the poller around each invocation (receive and delete) that load
    # the server without being on the round's critical path.
    poller_requests_per_invocation: int = 0
    cold_start_seconds: float = 0.0
    # Pages of the shard a worker keeps cached between rounds, as a share of the shard.
    shard_cache_share: float = 1.0


def aws_platform(deployment: Deployment, workload: Workload, aws: AwsAssumptions = AWS,
                 efs_total_bytes_per_second: float | None = None) -> Platform:
    """Return the AWS per-operation costs for ``deployment``.

    ``efs_total_bytes_per_second`` overrides the file system's throughput (Bursting mode
    with or without credits); None uses Elastic mode's.
    """
    client = (aws.efs_client_bytes_per_second_elastic if deployment.throughput_mode == "elastic"
              else aws.efs_client_bytes_per_second_bursting)
    client = min(client, aws.lambda_network_bytes_per_second)
    total_read = efs_total_bytes_per_second or aws.efs_elastic_read_bytes_per_second
    total_write = efs_total_bytes_per_second or aws.efs_elastic_write_bytes_per_second
    shard_bytes = workload.total_data_bytes / deployment.workers
    cache_bytes = max(0.0, (deployment.memory_mb - aws.base_process_mb) * MIB - 3 * workload.state_bytes)
    # The event source mapping hands any task to any warm instance, so an instance caches
    # pages of every shard it served: a batch row is cached with the chance that a row of
    # the whole data set is.
    return Platform(
        queue_request_seconds=aws.sqs_request_seconds,
        database_request_seconds=aws.dynamodb_request_seconds,
        dispatch_seconds=aws.esm_dispatch_seconds,
        invocation_overhead_seconds=aws.invocation_overhead_seconds,
        read_op_seconds=aws.efs_read_op_seconds,
        write_op_seconds=aws.efs_write_op_seconds,
        metadata_op_seconds=aws.efs_metadata_op_seconds,
        client_read_bytes_per_second=client,
        client_write_bytes_per_second=client,
        total_read_bytes_per_second=total_read,
        total_write_bytes_per_second=total_write,
        worker_speed=lambda_speed(deployment.memory_mb, workload, aws),
        aggregator_speed=lambda_speed(deployment.aggregator_memory_mb, workload, aws),
        cpu_slots=math.inf,
        max_concurrency=deployment.max_concurrency,
        straggler_cv=aws.straggler_cv,
        cold_start_seconds=aws.cold_start_seconds,
        shard_cache_share=min(1.0, cache_bytes / workload.total_data_bytes) if shard_bytes > 0 else 1.0,
    )


def _transfer_seconds(bytes_each: float, clients: int, client_rate: float, total_rate: float) -> float:
    """Return the time for ``clients`` clients to move ``bytes_each`` at once."""
    if bytes_each <= 0:
        return 0.0
    rate = min(client_rate, total_rate / max(1, clients))
    return bytes_each / rate


def shard_pages_read(workload: Workload, workers: int, epoch_index: int, cache_share: float) -> float:
    """Return EFS page reads per worker per round for its batch rows.

    A worker reads its shard memory-mapped, so each batch row it has not cached costs a
    page read. In the first epoch every page is new; later epochs find ``cache_share`` of
    the shard still in memory.
    """
    per_epoch = rounds_per_epoch(workload, workers)
    shard_rows = math.ceil(workload.rows / workers)
    shard_pages = math.ceil(shard_rows * workload.row_bytes / PAGE_BYTES)
    pages_per_row = max(1.0, workload.row_bytes / PAGE_BYTES)
    rows = batch_rows(workload, workers)
    # Rows of a batch are spread over the shard, so a batch touches at most one page set
    # per row, and an epoch at most the whole shard once when it stays cached.
    first_epoch = min(rows * pages_per_row, shard_pages / per_epoch if cache_share >= 1 else rows * pages_per_row)
    if epoch_index == 0:
        return first_epoch
    return first_epoch * (1.0 - cache_share)


def estimate_round(workload: Workload, workers: int, platform: Platform, profile: ComputeProfile,
                   cold: bool = False, epoch_index: int = 1) -> RoundEstimate:
    """Predict one round of gradient averaging on ``platform``.

    Parameters
    ----------
    workload : Workload
    workers : int
    platform : Platform
        Per-operation costs, from :func:`aws_platform` or :func:`local_platform`.
    profile : ComputeProfile
    cold : bool, default=False
        Whether every function starts cold (the first round).
    epoch_index : int, default=1
        Which epoch the round falls in; epoch 0 reads every batch page from EFS.
    """
    n = workers
    rows = batch_rows(workload, n)
    shard_rows = math.ceil(workload.rows / n)
    concurrent = min(n, platform.max_concurrency)
    waves = math.ceil(n / platform.max_concurrency)
    phases: dict[str, float] = {}

    # The aggregator sends the tasks in batches of 10, and the event source mapping starts
    # the workers.
    phases["send tasks and dispatch"] = (math.ceil(n / 10) * platform.queue_request_seconds
                                         + platform.dispatch_seconds)
    if cold:
        phases["cold starts"] = platform.cold_start_seconds

    # One worker, start to finish, with nothing else running.
    worker: dict[str, float] = {}
    worker["invocation"] = platform.invocation_overhead_seconds
    # One batched read of the job item and the done set, then the conditional ADD to the set.
    database_requests = 2
    worker["DynamoDB"] = database_requests * platform.database_request_seconds
    worker["read weights"] = platform.read_op_seconds + _transfer_seconds(
        workload.state_bytes, concurrent, platform.client_read_bytes_per_second, platform.total_read_bytes_per_second)
    pages = shard_pages_read(workload, n, epoch_index, platform.shard_cache_share)
    worker["read batch"] = pages * platform.read_op_seconds + _transfer_seconds(
        pages * PAGE_BYTES, concurrent, platform.client_read_bytes_per_second, platform.total_read_bytes_per_second)
    # A worker process draws its shard's order once per epoch and keeps it for the epoch.
    shuffle = shard_rows * profile.seconds_per_shuffled_row / rounds_per_epoch(workload, n)
    compute = gradient_seconds(workload, rows, profile) + shuffle
    worker["compute"] = compute / platform.worker_speed
    # Atomic write: create and write, fsync, rename.
    worker["write result"] = 3 * platform.write_op_seconds + _transfer_seconds(
        workload.result_bytes, concurrent, platform.client_write_bytes_per_second, platform.total_write_bytes_per_second)
    worker_seconds = sum(worker.values())
    for name, seconds in worker.items():
        phases[f"worker: {name}"] = seconds * waves
    phases["worker: stragglers"] = worker_seconds * waves * (straggler_factor(concurrent, platform.straggler_cv) - 1)

    # Workers that share a request server or CPU cores queue for them: the phase lasts
    # at least as long as the shared resource needs for every worker's share.
    requests_per_worker = database_requests + platform.poller_requests_per_invocation
    service_seconds = platform.request_service_seconds or platform.database_request_seconds
    # The aggregator stores the previous round's metrics after sending these tasks, so on a
    # shared request server that write queues with the workers' requests.
    request_bound = (n * requests_per_worker + 1) * service_seconds / platform.request_slots
    cpu_seconds = worker_seconds - database_requests * platform.database_request_seconds
    cpu_bound = n * cpu_seconds / platform.cpu_slots
    path = worker_seconds * waves + phases["worker: stragglers"]
    phases["worker: queueing for shared server and cores"] = max(0.0, request_bound - path, cpu_bound - path)
    phases["send aggregate and dispatch"] = platform.queue_request_seconds + platform.dispatch_seconds

    # The aggregator, alone.
    aggregator: dict[str, float] = {}
    aggregator["invocation"] = platform.invocation_overhead_seconds
    # Job item and round item (done set and usage) in one batched read, then the advance of
    # the round. The round's metrics are stored after the next tasks are sent, off the path.
    aggregator["DynamoDB"] = 2 * platform.database_request_seconds
    read_rate = platform.client_read_bytes_per_second
    # Two reads of the state, as in the bytes below, and one file per result (its vector
    # and its small values together).
    aggregator["read results"] = (2 + n) * platform.read_op_seconds + (
        (2 * workload.state_bytes + n * workload.result_bytes) / read_rate)
    aggregator["combine and step"] = (n + 2 + workload.optimizer_slots) * workload.n_params * profile.seconds_per_parameter \
        / platform.aggregator_speed
    # The next state, the metrics file and the stopping file, each written atomically.
    aggregator["write weights"] = 9 * platform.write_op_seconds + workload.state_bytes / platform.client_write_bytes_per_second
    if workload.validation_rows:
        validation = gradient_seconds(workload, workload.validation_rows, profile)
        aggregator[VALIDATION_PHASE.removeprefix("aggregator: ")] = validation / platform.aggregator_speed
    # Cost accounting stats both states, every result and the latest metrics file and
    # lists the round folders; pruning deletes the oldest round folder.
    aggregator["bookkeeping"] = (n + 4 + (n + 3)) * platform.metadata_op_seconds
    aggregator_seconds = sum(aggregator.values())
    for name, seconds in aggregator.items():
        phases[f"aggregator: {name}"] = seconds

    bytes_read = n * (workload.state_bytes + pages * PAGE_BYTES) + 2 * workload.state_bytes + n * workload.result_bytes
    bytes_written = n * workload.result_bytes + workload.state_bytes
    return RoundEstimate(phases=phases, worker_seconds=worker_seconds, aggregator_seconds=aggregator_seconds,
                         efs_bytes_read=bytes_read, efs_bytes_written=bytes_written)


# Whole job on AWS --------------------------------------------------------------------------


@dataclass
class BurstSummary:
    """Throughput of a Bursting-mode file system over the job, as its burst credits run out."""

    burst_bytes_per_second: float
    baseline_bytes_per_second: float
    initial_credit_bytes: float
    rounds_at_burst: int
    rounds_at_baseline: int


@dataclass
class VmEstimate:
    """The same rounds on one rented VM."""

    vm: VmOption
    seconds: float
    cost_usd: float
    method: str


@dataclass
class JobPlan:
    """Predicted time and cost of a whole job on AWS, with the VM comparison."""

    workload: Workload
    deployment: Deployment
    rounds: int
    rounds_per_epoch: int
    first_round: RoundEstimate
    first_epoch_round: RoundEstimate
    round: RoundEstimate
    total_seconds: float
    cost_usd: dict[str, float]
    vm: VmEstimate
    burst: BurstSummary | None = None
    baseline_round: RoundEstimate | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Return the plan as plain JSON-ready values."""
        result = {
            "workload": asdict(self.workload),
            "deployment": asdict(self.deployment),
            "rounds": self.rounds,
            "rounds_per_epoch": self.rounds_per_epoch,
            "first_round_seconds": self.first_round.seconds,
            "first_epoch_round_seconds": self.first_epoch_round.seconds,
            "round_seconds": self.round.seconds,
            "round_phases_seconds": dict(self.round.phases),
            "total_seconds": self.total_seconds,
            "cost_usd": dict(self.cost_usd),
            "vm": {"name": self.vm.vm.name, "vcpus": self.vm.vm.vcpus, "hourly_usd": self.vm.vm.hourly_usd,
                   "seconds": self.vm.seconds, "cost_usd": self.vm.cost_usd, "method": self.vm.method},
            "warnings": list(self.warnings),
        }
        if self.burst is not None:
            result["efs_burst"] = asdict(self.burst)
            result["baseline_round_seconds"] = self.baseline_round.seconds if self.baseline_round else None
        return result


def stored_bytes(workload: Workload, workers: int, aws: AwsAssumptions = AWS) -> float:
    """Return the job's bytes on EFS: the imported data, its shards and the kept round folders.

    Each kept folder contains a round state and every worker's result.
    """
    round_folder = workload.state_bytes + workers * workload.result_bytes
    return 2 * workload.total_data_bytes + aws.keep_checkpoints * round_folder


def bursting_rates(workload: Workload, workers: int, aws: AwsAssumptions = AWS) -> tuple[float, float]:
    """Return a Bursting file system's burst and baseline throughput for this job's files."""
    stored = stored_bytes(workload, workers, aws)
    burst = max(aws.efs_bursting_min_burst_bytes_per_second, stored / TIB * aws.efs_bursting_burst_per_stored_tib)
    baseline = max(aws.efs_bursting_min_baseline_bytes_per_second, stored / GIB * aws.efs_bursting_baseline_per_stored_gib)
    return burst, baseline


def rounds_until_credits_run_out(round_estimate: RoundEstimate, baseline: float, credits: float) -> float:
    """Return how many rounds ``credits`` bytes of burst credits last (inf if never spent).

    A round spends its metered bytes and earns the baseline rate for its duration.
    """
    metered = round_estimate.efs_bytes_read + round_estimate.efs_bytes_written
    spent = metered - baseline * round_estimate.seconds
    if spent <= 0:
        return math.inf
    return credits / spent


def _round_usage(estimate: RoundEstimate, workload: Workload, deployment: Deployment, cold: bool,
                 aws: AwsAssumptions) -> cost.RoundUsage:
    cold_seconds = aws.cold_start_seconds if cold else 0.0
    # Lambda bills the init phase of a cold start as well (shared/cost.py notes it).
    worker_gb_seconds = deployment.workers * (estimate.worker_seconds + cold_seconds) * deployment.memory_mb / 1024
    aggregator_gb_seconds = (estimate.aggregator_seconds + cold_seconds) * deployment.aggregator_memory_mb / 1024
    requests = cost.count_round_requests(deployment.workers, job_item_bytes=2048)
    return cost.RoundUsage(
        architecture=deployment.architecture,
        lambda_gb_seconds=worker_gb_seconds + aggregator_gb_seconds,
        lambda_requests=deployment.workers + 1,
        sqs_requests=requests.sqs_requests,
        dynamodb_read_units=requests.dynamodb_read_units,
        dynamodb_write_units=requests.dynamodb_write_units,
        efs_bytes_read=int(estimate.efs_bytes_read),
        efs_bytes_written=int(estimate.efs_bytes_written),
        efs_stored_bytes=int(stored_bytes(workload, deployment.workers, aws)),
        round_seconds=estimate.seconds,
    )


def _add_costs(total: dict[str, float], round_cost: cost.RoundCost, count: float) -> None:
    for name, value in round_cost.to_dict().items():
        total[name] = total.get(name, 0.0) + value * count


def estimate_vm(workload: Workload, workers: int, rounds: int, profile: ComputeProfile, vm: VmOption = VM) -> VmEstimate:
    """Predict the same rounds on one VM: measured compute spread over its vCPUs, no services."""
    speed = vm.vcpus * vm.parallel_efficiency
    rows = batch_rows(workload, workers) * workers
    shard_rows = math.ceil(workload.rows / workers)
    shuffle = workers * shard_rows * profile.seconds_per_shuffled_row / rounds_per_epoch(workload, workers)
    step = (gradient_seconds(workload, rows, profile) + shuffle) / speed
    step += (3 + workload.optimizer_slots) * workload.n_params * profile.seconds_per_parameter + vm.step_overhead_seconds
    if workload.validation_rows:
        step += gradient_seconds(workload, workload.validation_rows, profile) / speed
    epochs = rounds / rounds_per_epoch(workload, workers)
    fits = workload.total_data_bytes < 0.8 * vm.memory_gib * GIB
    passes = 1 if fits else max(1.0, epochs)
    reading = passes * workload.total_data_bytes / vm.disk_bytes_per_second
    seconds = rounds * step + reading
    billed_hours = max(seconds, 60.0) / 3600
    method = (f"measured compute per row on this machine, spread over {vm.vcpus} vCPUs at "
              f"{vm.parallel_efficiency:.0%} efficiency; data read from disk "
              f"{'once (fits in memory)' if fits else 'every epoch'} at {vm.disk_bytes_per_second / MIB:.0f} MiB/s")
    return VmEstimate(vm=vm, seconds=seconds, cost_usd=billed_hours * vm.hourly_usd, method=method)


def worker_memory_needed_mb(workload: Workload, workers: int, aws: AwsAssumptions = AWS) -> float:
    """Return the memory a worker needs: the runtime, the state, its batch and its result."""
    rows = batch_rows(workload, workers)
    batch = rows * workload.row_bytes * 3  # the rows, their float64 products and the gradient terms
    return aws.base_process_mb + (2 * workload.state_bytes + batch + workload.result_bytes) / MIB


def plan_job(workload: Workload, deployment: Deployment, profile: ComputeProfile = ComputeProfile(),
             aws: AwsAssumptions = AWS, vm: VmOption = VM) -> JobPlan:
    """Predict the time and cost of ``workload`` run with ``deployment`` on AWS.

    Raises
    ------
    PlanError
        An input is invalid; the message names the option.
    """
    check_workload(workload)
    check_deployment(deployment, workload)
    n = deployment.workers
    rounds = total_rounds(workload, n)
    per_epoch = rounds_per_epoch(workload, n)
    warnings: list[str] = []

    burst = None
    baseline_round = None
    total_rate = None
    if deployment.throughput_mode == "bursting":
        burst_rate, baseline_rate = bursting_rates(workload, n, aws)
        total_rate = burst_rate

    def estimate(cold: bool, epoch_index: int, rate: float | None) -> RoundEstimate:
        platform = aws_platform(deployment, workload, aws, efs_total_bytes_per_second=rate)
        return estimate_round(workload, n, platform, profile, cold=cold, epoch_index=epoch_index)

    first = estimate(True, 0, total_rate)
    # The pollers start at a few concurrent batches and add more per minute while messages
    # wait. NOTE: later rounds assume the pollers stay scaled up between rounds, which AWS
    # does not promise; it scales back "when traffic is low" without saying how fast.
    concurrent = min(n, deployment.max_concurrency)
    first.phases["event source mapping scale-up"] = (
        max(0, concurrent - aws.esm_initial_concurrency) / aws.esm_added_concurrency_per_minute * 60)
    first_epoch = estimate(False, 0, total_rate)
    later = estimate(False, 1, total_rate)
    first_epoch_rounds = min(rounds, per_epoch) - 1
    later_rounds = rounds - 1 - first_epoch_rounds
    # (round estimate, how many such rounds, cold, epoch index)
    schedule = [(first, 1, True, 0), (first_epoch, first_epoch_rounds, False, 0), (later, later_rounds, False, 1)]

    if deployment.throughput_mode == "bursting":
        credits = aws.efs_bursting_initial_credit_bytes
        burst_rounds = 0.0
        new_schedule = []
        baseline_round = estimate(False, 1, baseline_rate)  # type: ignore[possibly-undefined]  # set above in bursting mode
        for round_estimate, count, cold, epoch_index in schedule:
            lasting = rounds_until_credits_run_out(round_estimate, baseline_rate, credits)
            at_burst = count if lasting >= count else math.floor(lasting)
            if at_burst < count:
                credits = 0.0
            elif lasting != math.inf:
                credits -= at_burst * (round_estimate.efs_bytes_read + round_estimate.efs_bytes_written
                                       - baseline_rate * round_estimate.seconds)
            burst_rounds += at_burst
            new_schedule.append((round_estimate, at_burst, cold, epoch_index))
            if count - at_burst:
                new_schedule.append((estimate(cold, epoch_index, baseline_rate), count - at_burst, cold, epoch_index))
        schedule = new_schedule
        burst = BurstSummary(burst_bytes_per_second=burst_rate,  # type: ignore[possibly-undefined]  # as above
                             baseline_bytes_per_second=baseline_rate,
                             initial_credit_bytes=aws.efs_bursting_initial_credit_bytes,
                             rounds_at_burst=int(burst_rounds), rounds_at_baseline=rounds - int(burst_rounds))
        if burst.rounds_at_baseline:
            warnings.append(f"EFS burst credits run out after {burst.rounds_at_burst} of {rounds} rounds; later "
                            f"rounds get the {baseline_rate / MIB:.1f} MiB/s baseline. Elastic mode avoids this.")

    total_seconds = sum(round_estimate.seconds * count for round_estimate, count, _, _ in schedule)
    costs: dict[str, float] = {}
    for round_estimate, count, cold, _ in schedule:
        if count:
            _add_costs(costs, cost.estimate_round_cost(_round_usage(round_estimate, workload, deployment, cold, aws)), count)

    rows_per_round = batch_rows(workload, n)
    if rows_per_round < workload.batch_size:
        warnings.append(f"each worker's shard has about {rows_per_round:,} rows, fewer than the "
                        f"{workload.batch_size:,} of --batch-size, so every round computes on the whole shard; "
                        "this plan counts the shard's rows")
    validation_seconds = later.phases.get(VALIDATION_PHASE, 0.0)
    if validation_seconds > later.seconds / 2:
        warnings.append(f"evaluating {_count(workload.validation_rows, 'validation row')} takes "
                        f"{format_seconds(validation_seconds)} of each {format_seconds(later.seconds)} round, because "
                        "the aggregator evaluates them after every round; fewer validation rows (a smaller "
                        "data.validation_fraction or validation file) shorten every round")

    needed = worker_memory_needed_mb(workload, n, aws)
    if needed > deployment.memory_mb:
        warnings.append(f"a worker needs about {needed:,.0f} MB but --memory is {deployment.memory_mb} MB; "
                        "raise --memory or add workers")
    if later.worker_seconds > aws.worker_timeout_seconds:
        warnings.append(f"a worker's share takes {later.worker_seconds:,.0f} s, over the {aws.worker_timeout_seconds:.0f} s "
                        "timeout; it continues in further invocations, which this plan does not count")
    if n > deployment.max_concurrency:
        warnings.append(f"{n} workers exceed the tasks queue's maximum concurrency {deployment.max_concurrency}, so each "
                        f"round runs in {math.ceil(n / deployment.max_concurrency)} waves")
    if total_seconds > PRACTICAL_SECONDS:
        warnings.append(f"the job would run for {format_seconds(total_seconds)}, longer than a year: no such job is "
                        "practical, and the model was never checked at this size; check --rows, --epochs and "
                        "--batch-size, or add workers")

    return JobPlan(workload=workload, deployment=deployment, rounds=rounds, rounds_per_epoch=per_epoch,
                   first_round=first, first_epoch_round=first_epoch, round=later, total_seconds=total_seconds, cost_usd=costs,
                   vm=estimate_vm(workload, n, rounds, profile, vm), burst=burst, baseline_round=baseline_round,
                   warnings=warnings)


# Recommendation ----------------------------------------------------------------------------

WORKER_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
MEMORY_GRID_MB = (512, 1024, 1769, 2048, 3008, 3538, 5307, 7076, 10240)


FIXED_BATCHES = ("global", "per-worker")


@dataclass
class Recommendation:
    """The cheapest configuration that meets a deadline, or the fastest when none does.

    ``fixed_batch`` is "global" when every candidate kept ``global_batch`` rows per round,
    and "per-worker" when each kept ``batch_size`` rows per worker. Of those two fields,
    the one that does not apply is None.
    """

    deadline_seconds: float
    fixed_batch: str
    global_batch: int | None
    batch_size: int | None
    best: JobPlan | None
    fastest: JobPlan | None
    candidates: int
    met: bool

    def to_dict(self) -> dict:
        def summary(plan: JobPlan | None) -> dict | None:
            if plan is None:
                return None
            return {"workers": plan.deployment.workers, "memory_mb": plan.deployment.memory_mb,
                    "batch_size": plan.workload.batch_size,
                    "global_batch": plan.workload.batch_size * plan.deployment.workers, "rounds": plan.rounds,
                    "max_concurrency": plan.deployment.max_concurrency, "total_seconds": plan.total_seconds,
                    "cost_usd": plan.cost_usd["total_usd"]}

        return {"deadline_seconds": self.deadline_seconds, "fixed_batch": self.fixed_batch,
                "global_batch": self.global_batch, "batch_size": self.batch_size, "met": self.met,
                "candidates": self.candidates, "best": summary(self.best), "fastest": summary(self.fastest)}


def recommend(workload: Workload, deployment: Deployment, deadline_seconds: float,
              profile: ComputeProfile = ComputeProfile(), aws: AwsAssumptions = AWS,
              workers_grid: Iterable[int] = WORKER_GRID, memory_grid: Iterable[int] = MEMORY_GRID_MB,
              fixed_batch: str = "global") -> Recommendation:
    """Return the cheapest workers x memory that finishes within ``deadline_seconds``.

    Every candidate takes the settings of ``deployment`` but its workers, memory and
    maximum concurrency, which is raised to the worker count.

    With ``fixed_batch`` "global", every candidate keeps the global batch
    (``deployment.workers x workload.batch_size``), split over its workers, so each runs
    the same optimisation. With "per-worker", every candidate keeps ``workload.batch_size``
    rows per worker and ``deployment.workers`` is not used: the global batch grows with
    the workers, so more workers take fewer, larger steps over the same epochs.

    Candidates whose workers would need more memory than they have are skipped. Ties in
    cost go to the faster one.
    """
    if deadline_seconds <= 0:
        raise PlanError("--deadline", f"must be greater than 0, got {deadline_seconds}; pass a time such as 2h or 90m")
    if fixed_batch not in FIXED_BATCHES:
        raise ValueError(f"unknown fixed_batch {fixed_batch!r}; expected 'global' or 'per-worker'")
    check_workload(workload)
    check_deployment(deployment, workload)
    global_batch = deployment.workers * workload.batch_size if fixed_batch == "global" else None
    plans = []
    for workers in workers_grid:
        if workers > workload.rows or workers > MAX_WORKERS:
            continue
        if global_batch is None:
            candidate_workload = workload
        elif workers > global_batch:
            continue
        else:
            candidate_workload = replace(workload, batch_size=max(1, round(global_batch / workers)))
        for memory in memory_grid:
            if worker_memory_needed_mb(candidate_workload, workers, aws) > memory:
                continue
            candidate = replace(deployment, workers=workers, memory_mb=memory,
                                max_concurrency=max(deployment.max_concurrency, min(workers, 1000)))
            plans.append(plan_job(candidate_workload, candidate, profile, aws))
    meeting = [plan for plan in plans if plan.total_seconds <= deadline_seconds]
    fastest = min(plans, key=lambda plan: plan.total_seconds, default=None)
    best = min(meeting, key=lambda plan: (plan.cost_usd["total_usd"], plan.total_seconds), default=None)
    return Recommendation(deadline_seconds=deadline_seconds, fixed_batch=fixed_batch, global_batch=global_batch,
                          batch_size=workload.batch_size if global_batch is None else None, best=best,
                          fastest=fastest, candidates=len(plans), met=best is not None)


# This machine ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalProfile:
    """Per-operation costs of the local runtime, measured on this machine.

    Attributes
    ----------
    request_seconds : float
        One SQS or DynamoDB call to moto's server on 127.0.0.1, from boto3, with no other
        client calling.
    request_service_seconds : float
        Wall time per call while several clients call at once: the server's throughput.
    read_op_seconds, write_op_seconds : float
        Opening and reading a small file; one step of an atomic write (the write, fsync
        and rename together take three).
    metadata_op_seconds : float
        One stat of a file.
    read_bytes_per_second, write_bytes_per_second : float
        Large-file throughput of the local folder, write including fsync.
    cores : int
        CPU cores the handlers, the pollers and moto's server share.
    invocation_overhead_seconds : float
        The lane's work around one handler call: pickling the event through the pipe,
        the handler's logging, and the receive and delete calls' client side.
    compute : ComputeProfile
    """

    request_seconds: float
    request_service_seconds: float
    read_op_seconds: float
    write_op_seconds: float
    metadata_op_seconds: float
    read_bytes_per_second: float
    write_bytes_per_second: float
    cores: int
    invocation_overhead_seconds: float
    compute: ComputeProfile


def local_platform(profile: LocalProfile, lanes: int) -> Platform:
    """Return the per-operation costs of the local runtime with ``lanes`` worker containers.

    Every container, the lanes' polling threads and moto's server share ``profile.cores``
    cores, so workers beyond the core count queue for CPU. moto's server handles one
    request at a time, so the workers' requests queue there too.
    """
    return Platform(
        queue_request_seconds=profile.request_seconds,
        database_request_seconds=profile.request_seconds,
        # The long-polling receive returns as soon as the message is sent.
        dispatch_seconds=profile.request_seconds,
        invocation_overhead_seconds=profile.invocation_overhead_seconds,
        read_op_seconds=profile.read_op_seconds,
        write_op_seconds=profile.write_op_seconds,
        metadata_op_seconds=profile.metadata_op_seconds,
        client_read_bytes_per_second=profile.read_bytes_per_second,
        client_write_bytes_per_second=profile.write_bytes_per_second,
        total_read_bytes_per_second=profile.read_bytes_per_second * profile.cores,
        total_write_bytes_per_second=profile.write_bytes_per_second,
        worker_speed=1.0,
        aggregator_speed=1.0,
        cpu_slots=profile.cores,
        max_concurrency=lanes,
        # Local runs show little spread between workers; the CPU queue is modelled above.
        straggler_cv=0.0,
        cold_start_seconds=0.0,
        shard_cache_share=1.0,
        # moto's server is one Python process, and it runs DynamoDB requests under a lock.
        request_slots=1,
        request_service_seconds=profile.request_service_seconds,
        # Each lane receives the message and deletes it after the handler returns.
        poller_requests_per_invocation=2,
    )


def predict_local_round(workload: Workload, workers: int, profile: LocalProfile,
                        lanes: int | None = None) -> RoundEstimate:
    """Predict a warm round of the local runtime (``baton run``), with ``lanes`` worker containers.

    The shard is a local file in the page cache, so batch rows cost no reads.
    """
    lanes = workers if lanes is None else lanes
    platform = local_platform(profile, lanes)
    return estimate_round(workload, workers, platform, profile.compute, cold=False, epoch_index=1)


# Measurement -------------------------------------------------------------------------------


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Return the median wall time of ``run()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return float(np.median(timings))


def measure_compute_profile(quick: bool = False) -> ComputeProfile:
    """Measure :class:`ComputeProfile` on one core of this machine with Baton's own model code."""
    import scipy.sparse

    from shared.models import LogisticRegression

    repeats = 5 if quick else 15
    rng = np.random.default_rng(0)
    rows, features = 4096, 512
    model = LogisticRegression(n_features=features)
    params = rng.normal(size=model.n_params) * 0.01
    y = (rng.random(rows) < 0.5).astype(np.float64)

    dense = rng.normal(size=(rows, features)).astype(np.float32)
    narrow = dense[:, :8].copy()
    model_narrow = LogisticRegression(n_features=8)
    params_narrow = params[:9].copy()
    call = median_seconds(lambda: model_narrow.loss_grad(params_narrow, narrow[:1], y[:1]), repeats)
    narrow_seconds = median_seconds(lambda: model_narrow.loss_grad(params_narrow, narrow, y), repeats)
    dense_seconds = median_seconds(lambda: model.loss_grad(params, dense, y), repeats)
    per_row = max(0.0, (narrow_seconds - call) / rows)
    per_dense_value = max(1e-12, (dense_seconds - narrow_seconds) / (rows * (features - 8)))

    density = 0.05
    sparse = scipy.sparse.random(rows, features, density=density, format="csr", dtype=np.float32, random_state=1)
    sparse_seconds = median_seconds(lambda: model.loss_grad(params, sparse, y), repeats)
    per_sparse_value = max(1e-12, (sparse_seconds - call - rows * per_row) / sparse.nnz)

    shard_rows = 200_000
    shuffle_seconds = median_seconds(lambda: np.sort(np.random.default_rng([1, 2, 3]).permutation(shard_rows)[:256]),
                                      repeats)
    vector = rng.normal(size=1_000_000)
    total = np.zeros_like(vector)
    add_seconds = median_seconds(lambda: np.add(total, vector, out=total), repeats)
    return ComputeProfile(
        seconds_per_dense_value=per_dense_value,
        seconds_per_sparse_value=per_sparse_value,
        seconds_per_row=per_row,
        seconds_per_shuffled_row=shuffle_seconds / shard_rows,
        seconds_per_parameter=add_seconds / vector.size,
        seconds_per_call=call,
        description=f"measured on this machine on {time.strftime('%Y-%m-%d')}",
    )


def measure_file_costs(folder, quick: bool = False) -> dict[str, float]:
    """Measure atomic writes, reads and stats in ``folder`` with shared/efs.py's own writer.

    Returns ``read_op_seconds``, ``write_op_seconds`` (a third of a small atomic write),
    ``metadata_op_seconds``, ``read_bytes_per_second`` and ``write_bytes_per_second``.
    """
    import os
    from pathlib import Path

    from shared.efs import write_bytes_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    repeats = 5 if quick else 20
    small, large = b"x" * 1024, os.urandom((8 if quick else 32) * MIB)
    small_path, large_path = folder / "small.bin", folder / "large.bin"

    small_write = median_seconds(lambda: write_bytes_atomic(small_path, small), repeats)
    large_write = median_seconds(lambda: write_bytes_atomic(large_path, large), max(3, repeats // 4))
    small_read = median_seconds(lambda: small_path.read_bytes(), repeats)
    large_read = median_seconds(lambda: large_path.read_bytes(), max(3, repeats // 4))
    stat = median_seconds(lambda: small_path.stat(), repeats)
    return {
        "read_op_seconds": small_read,
        "write_op_seconds": small_write / 3,
        "metadata_op_seconds": stat,
        "read_bytes_per_second": len(large) / max(1e-9, large_read - small_read),
        "write_bytes_per_second": len(large) / max(1e-9, large_write - small_write),
    }


def measure_request_seconds(endpoint_url: str, quick: bool = False, clients: int = 4) -> tuple[float, float]:
    """Measure SQS and DynamoDB calls to the moto server at ``endpoint_url``.

    The DynamoDB calls are the worker's own (:class:`shared.state.StateStore`): the
    batched read of the job item and the round's done set, and the conditional update
    that adds a worker with its usage, on a job item with an a9a job spec. moto's time
    per call depends on the item and the expression, so a bare call would understate it.
    Creates one queue and one table named ``planner-probe`` on that server. Returns the
    median latency of one call with no other client, and the wall time per call while
    ``clients`` threads call at once.
    """
    import json
    import threading

    import boto3

    from shared.state import StateStore

    options = {"endpoint_url": endpoint_url, "region_name": "us-east-1",
               "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    sqs, dynamodb = boto3.client("sqs", **options), boto3.client("dynamodb", **options)
    queue_url = sqs.create_queue(QueueName="planner-probe")["QueueUrl"]
    dynamodb.create_table(TableName="planner-probe", BillingMode="PAY_PER_REQUEST",
                          AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                                {"AttributeName": "sk", "AttributeType": "S"}],
                          KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                                     {"AttributeName": "sk", "KeyType": "RANGE"}])
    spec_json = json.dumps({
        "job_id": "probe", "model": {"name": "logistic_regression", "alpha": 1e-5},
        "optimizer": {"name": "momentum", "learning_rate": 0.5, "momentum": 0.9},
        "data": {"path": "datasets/a9a/a9a", "format": "libsvm", "n_features": 123,
                 "validation_path": "datasets/a9a/a9a.t"},
        "training": {"n_workers": clients, "batch_size": 256, "max_rounds": 96, "seed": 0},
    })
    StateStore(dynamodb, "planner-probe").create_job("probe", "probe", spec_json, clients)
    rounds = iter(range(10**9))
    repeats = 20 if quick else 60
    usage = {"worker_seconds": 0.01, "worker_gb_seconds": 0.02}

    def database_round_trip(state: StateStore, worker: int = 0) -> None:
        round_index = next(rounds)
        state.get_job_and_done_workers("probe", round_index)
        state.record_worker_done("probe", round_index, worker, usage)

    def queue_round_trip(client=sqs) -> None:
        client.send_message(QueueUrl=queue_url, MessageBody='{"job_id": "probe", "round": 0, "worker": 0}')
        message = client.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=1, WaitTimeSeconds=1)["Messages"][0]
        client.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])

    state = StateStore(dynamodb, "planner-probe")
    database = median_seconds(lambda: database_round_trip(state), repeats) / 2
    queue = median_seconds(queue_round_trip, repeats) / 3
    latency = (database + queue) / 2

    # Each thread has its own clients, as each container has; 5 calls per loop.
    def client_loop(worker: int) -> None:
        own_sqs, own_state = boto3.client("sqs", **options), StateStore(boto3.client("dynamodb", **options),
                                                                          "planner-probe")
        for _ in range(repeats // 2):
            database_round_trip(own_state, worker)
            queue_round_trip(own_sqs)

    threads = [threading.Thread(target=client_loop, args=(worker,)) for worker in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    service = (time.perf_counter() - started) / (clients * (repeats // 2) * 5)
    return latency, service


# Scaling table for docs/planner.md --------------------------------------------------------

# A large dense data set: 25 million rows of 1,000 float32 features, about 100 GB.
SCALING_WORKLOAD = Workload(rows=25_000_000, features=1000, batch_size=1024, density=1.0, epochs=1.0,
                            optimizer_slots=1, validation_rows=100_000)
SCALING_WORKERS = (8, 64, 256)
SCALING_GLOBAL_BATCH = 8192
SCALING_PER_WORKER_BATCH = 1024
SCALING_MEMORY_MB = 1769


def scaling_rows(fixed: str, workload: Workload = SCALING_WORKLOAD, workers: Iterable[int] = SCALING_WORKERS,
                 memory_mb: int = SCALING_MEMORY_MB, profile: ComputeProfile = ComputeProfile(),
                 aws: AwsAssumptions = AWS) -> list[dict[str, float]]:
    """Return one epoch's predicted figures per worker count, with ``fixed`` "global" or "per-worker" batch.

    Efficiency is samples per second per worker relative to the smallest worker count. The
    tasks queue's maximum concurrency is set to the worker count, so no round runs in waves.
    """
    if fixed not in ("global", "per-worker"):
        raise ValueError(f"unknown batch mode {fixed!r}; expected 'global' or 'per-worker'")
    rows = []
    for count in workers:
        batch = SCALING_GLOBAL_BATCH // count if fixed == "global" else SCALING_PER_WORKER_BATCH
        job = replace(workload, batch_size=batch, epochs=1.0, rounds=None)
        deployment = Deployment(workers=count, memory_mb=memory_mb, max_concurrency=max(2, min(count, 1000)))
        plan = plan_job(job, deployment, profile, aws)
        # One epoch: every batch row comes from EFS once, so the first epoch's round applies.
        round_estimate = plan.first_epoch_round
        samples_per_second = batch * count / round_estimate.seconds
        rows.append({
            "workers": count,
            "batch_per_worker": batch,
            "round_seconds": round_estimate.seconds,
            "compute_seconds": round_estimate.phases["worker: compute"],
            "read_batch_seconds": round_estimate.phases["worker: read batch"],
            "bookkeeping_seconds": round_estimate.phases["aggregator: bookkeeping"],
            "samples_per_second": samples_per_second,
            "epoch_hours": plan.total_seconds / 3600,
            "epoch_cost_usd": plan.cost_usd["total_usd"],
            "vm_epoch_hours": plan.vm.seconds / 3600,
            "vm_epoch_cost_usd": plan.vm.cost_usd,
        })
    base = rows[0]
    for row in rows:
        row["efficiency"] = (row["samples_per_second"] / row["workers"]) / (base["samples_per_second"] / base["workers"])
    return rows


def scaling_table_markdown(profile: ComputeProfile = ComputeProfile(), aws: AwsAssumptions = AWS) -> str:
    """Return the two scaling tables of docs/planner.md (tests check that the page matches)."""
    header = ("| workers | batch per worker | s per round | of which compute | of which batch reads | "
              "of which bookkeeping | samples/s | efficiency | hours per epoch | USD per epoch | VM hours | VM USD |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    parts = []
    for fixed, title in (("global", f"Fixed global batch of {SCALING_GLOBAL_BATCH:,} rows"),
                         ("per-worker", f"Fixed batch of {SCALING_PER_WORKER_BATCH:,} rows per worker")):
        lines = [f"{title}:", "", header]
        for row in scaling_rows(fixed, profile=profile, aws=aws):
            lines.append(f"| {row['workers']} | {row['batch_per_worker']} | {row['round_seconds']:.2f} | "
                         f"{row['compute_seconds']:.3f} | {row['read_batch_seconds']:.2f} | "
                         f"{row['bookkeeping_seconds']:.2f} | {row['samples_per_second']:,.0f} | "
                         f"{row['efficiency']:.0%} | {row['epoch_hours']:.2f} | {row['epoch_cost_usd']:.2f} | "
                         f"{row['vm_epoch_hours']:.2f} | {row['vm_epoch_cost_usd']:.2f} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# Text output --------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """Return seconds from "90", "90s", "45m", "2h" or "1.5d".

    Raises
    ------
    PlanError
        The text is not a positive number with an optional unit.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = text.strip().lower()
    scale = units.get(value[-1:], None) if value else None
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise PlanError("--deadline", f"cannot read {text!r} as a duration; use seconds or a unit, such as 90m or 2h") \
            from None
    if not math.isfinite(seconds):
        raise PlanError("--deadline", f"{text!r} is not a finite duration; pass a time such as 90m or 2h")
    if seconds <= 0:
        raise PlanError("--deadline", f"must be greater than 0, got {text!r}; pass a time such as 90m or 2h")
    return seconds


def format_seconds(seconds: float) -> str:
    """Return a duration for people: milliseconds, seconds, minutes, hours, days or years."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    if seconds < 365 * 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{seconds / (365 * 86400):,.1f} years"


def format_bytes(count: float) -> str:
    """Return a size for people, in KiB to EiB."""
    for unit, size in (("EiB", 2**60), ("PiB", 2**50), ("TiB", TIB), ("GiB", GIB), ("MiB", MIB)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count / 1024:.1f} KiB"


def format_usd(amount: float) -> str:
    """Return a cost for people: four decimals below $1,000, cents with thousands separators above."""
    if amount < 1000:
        return f"${amount:.4f}"
    return f"${amount:,.2f}"


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" if number == 1 else f"{number:,} {noun}s"


def format_plan(plan: JobPlan) -> str:
    """Return the plan as a readable report with the round's breakdown as a table."""
    workload, deployment, costs = plan.workload, plan.deployment, plan.cost_usd
    kind = "dense" if not workload.sparse else f"sparse, {workload.density:.1%} nonzero"
    lines = [
        f"Plan: {_count(deployment.workers, 'worker')} x {deployment.memory_mb} MB ({deployment.architecture}), "
        f"aggregator {deployment.aggregator_memory_mb} MB, EFS {deployment.throughput_mode} throughput",
        f"data: {workload.rows:,} rows x {workload.features:,} features ({kind}), "
        f"{format_bytes(workload.total_data_bytes)}; {workload.n_params:,} parameters; "
        f"batch {workload.batch_size:,} rows per worker",
        f"rounds: {plan.rounds:,} ({plan.rounds_per_epoch:,} per epoch)",
        "",
        f"time per round (warm, after the first epoch): {format_seconds(plan.round.seconds)}",
        "",
        f"  {'phase':<50} {'ms':>12}",
    ]
    for name, seconds in plan.round.phases.items():
        lines.append(f"  {name:<50} {seconds * 1000:>12,.1f}")
    lines += [
        "",
        f"first round (cold starts, first reads): {format_seconds(plan.first_round.seconds)}",
        f"time to finish: {format_seconds(plan.total_seconds)}",
        f"cost: {format_usd(costs['total_usd'])} (Lambda {format_usd(costs['lambda_usd'])}, "
        f"SQS {format_usd(costs['sqs_usd'])}, DynamoDB {format_usd(costs['dynamodb_usd'])}, "
        f"EFS {format_usd(costs['efs_usd'])})",
    ]
    if plan.burst is not None:
        lines.append(f"EFS bursting: {plan.burst.burst_bytes_per_second / MIB:.0f} MiB/s with credits for "
                     f"{plan.burst.rounds_at_burst:,} rounds, then {plan.burst.baseline_bytes_per_second / MIB:.1f} "
                     f"MiB/s for {plan.burst.rounds_at_baseline:,}")
    vm = plan.vm
    lines += [
        "",
        f"one VM instead: {vm.vm.name} ({vm.vm.vcpus} vCPUs, {vm.vm.memory_gib:.0f} GiB) at ${vm.vm.hourly_usd:.2f} "
        "per hour On-Demand in us-east-1 (docs/planner.md gives the source)",
        f"  time {format_seconds(vm.seconds)}, cost {format_usd(vm.cost_usd)} (billed for at least 60 s)",
        f"  estimated from {vm.method}",
    ]
    for warning in plan.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def format_recommendation(recommendation: Recommendation) -> str:
    """Return the recommendation as a few readable lines."""
    deadline = format_seconds(recommendation.deadline_seconds)
    if recommendation.global_batch is not None:
        batch = f"every candidate keeps the global batch of {recommendation.global_batch:,} rows, split over its workers"
    else:
        batch = (f"every candidate keeps {recommendation.batch_size:,} rows per worker, so the global batch grows with "
                 "the workers; pass --workers to keep one global batch instead")
    lines = ["", f"Cheapest configuration that finishes within {deadline} "
                 f"({recommendation.candidates} configurations checked):", f"  {batch}"]
    if recommendation.best is not None:
        best = recommendation.best
        lines.append(f"  {_count(best.deployment.workers, 'worker')} x {best.deployment.memory_mb} MB, batch "
                     f"{best.workload.batch_size:,} per worker, workerMaxConcurrency {best.deployment.max_concurrency}: "
                     f"{format_seconds(best.total_seconds)}, {format_usd(best.cost_usd['total_usd'])}")
    else:
        lines.append(f"  none meets the deadline of {deadline}.")
        if recommendation.fastest is not None:
            fastest = recommendation.fastest
            lines.append(f"  the fastest is {_count(fastest.deployment.workers, 'worker')} x {fastest.deployment.memory_mb} MB: "
                         f"{format_seconds(fastest.total_seconds)}, {format_usd(fastest.cost_usd['total_usd'])}; "
                         "extend the deadline, or train fewer epochs")
        else:
            lines.append("  no configuration fits: every candidate's workers need more memory than Lambda's "
                         f"{MAX_LAMBDA_MEMORY_MB:,} MB; lower --batch-size or the model size")
    return "\n".join(lines)
