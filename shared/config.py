"""Runtime settings, read from the environment in one place.

Precedence is: an explicit argument to :meth:`Settings.from_env`, then the process
environment, then the default below. The handlers never know whether they run on AWS or
in the local runtime: AWS endpoints come from the standard variables (``AWS_ENDPOINT_URL``
and friends, read by boto3 itself), and the file-system root from ``EFS_ROOT``.

Two process-wide switches are not fields of :class:`Settings`, because the modules they
steer read them from the process environment alone: :func:`faults_enabled` and
:func:`efs_fsync_enabled`. Every value, theirs included, goes through
:func:`parse_setting`, so each variable follows the same rules and a bad value gets the
same kind of error.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import MISSING, dataclass, fields
from typing import Mapping

from shared.errors import BatonError

# Round folders kept on EFS (KEEP_CHECKPOINTS), the current round's included. At least 2:
# after a round advances, a duplicate aggregation of the previous round may still run. It
# reads that round's folder, stopping.json included, and rewrites the current round's
# state and stopping.json, which come out the same only while that folder exists.
DEFAULT_KEEP_CHECKPOINTS = 3
MIN_KEEP_CHECKPOINTS = 2

# Days DynamoDB keeps the items of a job after it ended (JOB_RETENTION_DAYS).
DEFAULT_JOB_RETENTION_DAYS = 90

# Must match custom.maxReceiveCount in serverless.yml: the receive on which a failure
# sends the message to its dead-letter queue.
DEFAULT_MAX_RECEIVE_COUNT = 5

# Lambda's smallest and largest memory settings, in MB; no deployment can go beyond them.
LAMBDA_MIN_MEMORY_MB = 128
LAMBDA_MAX_MEMORY_MB = 10_240

# The service name of serverless.yml, which starts the name of every queue and table.
SERVICE_NAME = "baton"

FAULTS_ENABLED_VARIABLE = "BATON_FAULTS_ENABLED"
# serverless.yml's memory settings of the worker and aggregator functions, such as
# "worker=1769,aggregator=3008"; see :func:`function_memory_variables`.
FUNCTION_MEMORY_VARIABLE = "FUNCTION_MEMORY_MB"
EFS_FSYNC_VARIABLE = "BATON_EFS_FSYNC"

_TRUE_TEXTS = ("1", "true", "yes")
_FALSE_TEXTS = ("0", "false", "no")


def stack_resource_name(stage: str, resource: str) -> str:
    """Return the name of a queue or table of the stack deployed as ``stage``.

    ``resource`` is ``"jobs"``, ``"tasks"`` or ``"aggregate"`` for a queue and ``"state"``
    for the table, as custom.names in serverless.yml builds them:
    ``${self:service}-${sls:stage}-<resource>``.
    """
    return f"{SERVICE_NAME}-{stage}-{resource}"


def parse_setting(name: str, type_name: str, raw: str, default: bool | int | float | str) -> bool | int | float | str:
    """Parse the text of environment variable ``name`` as a value of ``type_name``.

    Parameters
    ----------
    name : str
        The variable, named in the error.
    type_name : {"bool", "int", "float", "str"}
    raw : str
        The variable's text. An empty or blank text means ``default``, whatever the type,
        as a stage parameter left empty in serverless.yml sends it. A boolean takes
        true/false, 1/0 or yes/no in any case. Other strings are returned as they are.
    default : bool, int, float or str
        The value used when the variable is unset, shown in the error as the fix.

    Raises
    ------
    BatonError
        Naming the variable, its value and what to set it to.
    """
    if not raw.strip():
        return default
    if type_name == "bool":
        lowered = raw.strip().lower()
        if lowered in _TRUE_TEXTS:
            return True
        if lowered in _FALSE_TEXTS:
            return False
        expected = "true or false"
        fix = (f"set it to true or false (1/0 and yes/no also work), or unset it to use the default, "
               f"{str(default).lower()}")
    elif type_name == "int":
        try:
            return int(raw)
        except ValueError:
            expected = "an integer"
            fix = f"set it to a whole number such as {default}, or unset it to use the default"
    elif type_name == "float":
        try:
            return float(raw)
        except ValueError:
            expected = "a number"
            fix = f"set it to a number such as {default}, or unset it to use the default"
    elif type_name == "str":
        return raw
    else:
        raise TypeError(f"setting {name} has type {type_name!r}, which parse_setting does not handle")
    raise BatonError(f"invalid {name} {raw!r}: expected {expected}; {fix}")


def function_memory_variables(raw: str) -> dict[str, str]:
    """Split ``FUNCTION_MEMORY_MB`` into the variables of its functions.

    ``"worker=1769,aggregator=3008"`` gives ``{"WORKER_MEMORY_MB": "1769",
    "AGGREGATOR_MEMORY_MB": "3008"}``, which :meth:`Settings.from_env` then reads as
    ``worker_memory_mb`` and ``aggregator_memory_mb``.

    Raises
    ------
    BatonError
        If an entry is not ``function=megabytes`` for the worker or the aggregator.
    """
    variables = {}
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        function, _, megabytes = entry.partition("=")
        if function.strip() not in ("worker", "aggregator") or not megabytes.strip():
            raise BatonError(f"invalid entry {entry!r} in {FUNCTION_MEMORY_VARIABLE} {raw!r}: expected worker=MB or "
                             "aggregator=MB, such as worker=1769,aggregator=1769, as serverless.yml's provider "
                             "environment sets it")
        variables[f"{function.strip().upper()}_MEMORY_MB"] = megabytes.strip()
    return variables


def _read_switch(name: str, default: bool, environ: Mapping[str, str] | None) -> bool:
    environ = os.environ if environ is None else environ
    raw = environ.get(name)
    return default if raw is None else bool(parse_setting(name, "bool", raw, default))


def faults_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Return whether ``BATON_FAULTS_ENABLED`` switches fault injection on. It is off by default.

    Only an environment sets it, the process's unless ``environ`` is given, and never a
    job spec, a message or an override of :meth:`Settings.from_env`.
    """
    return _read_switch(FAULTS_ENABLED_VARIABLE, False, environ)


def efs_fsync_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Return whether writes to EFS are fsynced (``BATON_EFS_FSYNC``). They are by default.

    The local runtime turns it off, because its folder standing in for EFS need not
    survive a crash of the machine.
    """
    return _read_switch(EFS_FSYNC_VARIABLE, True, environ)


@dataclass(frozen=True)
class Settings:
    """Names and paths a handler needs.

    Attributes
    ----------
    efs_root : str
        Mount point of the shared file system (``/mnt/efs`` on Lambda, a folder locally).
    jobs_queue_name, tasks_queue_name, aggregate_queue_name : str
        SQS queue names. URLs are looked up lazily with ``GetQueueUrl``.
    state_table_name : str
        DynamoDB table holding job and round state.
    allowed_data_roots : str
        Comma-separated folders under ``efs_root`` that job data paths may point into,
        such as ``datasets,teams/vision``. Empty means any folder under ``efs_root`` but
        ``jobs/``, which no data path may name.
    keep_checkpoints : int
        Round folders (``rounds/<r>/``) kept on EFS, the current round's included, for a
        running and for a finished job. Older ones are pruned. At least
        :data:`MIN_KEEP_CHECKPOINTS`.
    max_receive_count : int
        The receive of a message on which a handler marks its job FAILED, because SQS
        moves the message to its dead-letter queue after it. Must match the stack's
        custom.maxReceiveCount in serverless.yml.
    continuation_margin_seconds : float
        A worker or aggregator with less time left than this saves its progress and
        continues in a new invocation. Capped at a quarter of the time an invocation
        starts with, so short local timeouts still leave room for work.
    max_steps_per_invocation : int
        Upper bound on training-mode steps per invocation; 0 means no bound. Tests set it
        to force continuations.
    stall_seconds : float
        The watchdog treats a running round with no recorded progress for this long as
        stalled. Must exceed the worker and aggregator timeouts.
    watchdog_max_attempts : int
        Re-sends the watchdog tries on one stalled round before it marks the job failed.
    models_bucket : str
        S3 bucket that receives a copy of every finished job's model
        (shared/model_bucket.py), for users outside the stack's VPC. Empty keeps models
        on EFS only.
    job_retention_days : int
        Days that DynamoDB keeps a job's items: a finished, failed or cancelled job's item
        from the watchdog's first run after the job ended, and each round item from the
        round's aggregation. DynamoDB's time to live then deletes them; the job's files on
        EFS stay. 0 keeps them forever.
    worker_memory_mb, aggregator_memory_mb : int
        The memory of the stack's worker and aggregator functions, in MB, read from
        ``WORKER_MEMORY_MB`` and ``AGGREGATOR_MEMORY_MB`` or from the
        ``FUNCTION_MEMORY_MB`` that serverless.yml sets from params.workerMemory and
        params.aggregatorMemory. The starter rejects a model whose arrays would not fit
        in either. Unset, they are Lambda's largest.
    """

    efs_root: str = "/mnt/efs"
    jobs_queue_name: str = stack_resource_name("dev", "jobs")
    tasks_queue_name: str = stack_resource_name("dev", "tasks")
    aggregate_queue_name: str = stack_resource_name("dev", "aggregate")
    state_table_name: str = stack_resource_name("dev", "state")
    allowed_data_roots: str = ""
    keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS
    max_receive_count: int = DEFAULT_MAX_RECEIVE_COUNT
    continuation_margin_seconds: float = 30.0
    max_steps_per_invocation: int = 0
    stall_seconds: float = 900.0
    watchdog_max_attempts: int = 3
    models_bucket: str = ""
    job_retention_days: int = DEFAULT_JOB_RETENTION_DAYS
    worker_memory_mb: int = LAMBDA_MAX_MEMORY_MB
    aggregator_memory_mb: int = LAMBDA_MAX_MEMORY_MB

    def __post_init__(self) -> None:
        if self.keep_checkpoints < MIN_KEEP_CHECKPOINTS:
            raise BatonError(
                f"invalid KEEP_CHECKPOINTS {self.keep_checkpoints}: Baton keeps at least {MIN_KEEP_CHECKPOINTS} round "
                "folders (the current round's and the previous one, which a duplicate aggregation may still read); "
                f"set it to {MIN_KEEP_CHECKPOINTS} or more")
        if self.max_receive_count < 1:
            raise BatonError(
                f"invalid MAX_RECEIVE_COUNT {self.max_receive_count}: SQS receives every message at least once, so "
                "it must be at least 1; set it to the stack's custom.maxReceiveCount in serverless.yml "
                f"({DEFAULT_MAX_RECEIVE_COUNT} unless changed there)")
        if not (math.isfinite(self.stall_seconds) and self.stall_seconds > 0):
            raise BatonError(f"invalid STALL_SECONDS {self.stall_seconds}: the watchdog needs a positive number of "
                             "seconds; set it above the worker and aggregator timeouts, or unset it to use 900")
        if not (math.isfinite(self.continuation_margin_seconds) and self.continuation_margin_seconds >= 0):
            raise BatonError(f"invalid CONTINUATION_MARGIN_SECONDS {self.continuation_margin_seconds}: it must be a "
                             "number of seconds of 0 or more; unset it to use 30")
        if self.max_steps_per_invocation < 0:
            raise BatonError(f"invalid MAX_STEPS_PER_INVOCATION {self.max_steps_per_invocation}: it must be 0 (no "
                             "bound) or more; unset it to use 0")
        if self.models_bucket and not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", self.models_bucket):
            raise BatonError(f"invalid MODELS_BUCKET {self.models_bucket!r}: an S3 bucket name has 3 to 63 "
                             "lower-case letters, digits, dots and hyphens; set params.modelsBucket in "
                             "serverless.yml to such a name, or leave it empty to keep models on EFS only")
        if self.job_retention_days < 0:
            raise BatonError(f"invalid JOB_RETENTION_DAYS {self.job_retention_days}: it must be a number of days, "
                             f"or 0 to keep job items forever; set params.jobRetentionDays in serverless.yml, or "
                             f"unset it to use {DEFAULT_JOB_RETENTION_DAYS}")
        for name, value in (("WORKER_MEMORY_MB", self.worker_memory_mb),
                            ("AGGREGATOR_MEMORY_MB", self.aggregator_memory_mb)):
            if not LAMBDA_MIN_MEMORY_MB <= value <= LAMBDA_MAX_MEMORY_MB:
                raise BatonError(f"invalid {name} {value}: Lambda memory is {LAMBDA_MIN_MEMORY_MB} to "
                                 f"{LAMBDA_MAX_MEMORY_MB} MB; set the function's memory parameter in serverless.yml "
                                 "in that range, or unset the variable")
        if self.watchdog_max_attempts < 0:
            raise BatonError(f"invalid WATCHDOG_MAX_ATTEMPTS {self.watchdog_max_attempts}: it must be 0 (fail a "
                             "stalled job at once) or more; unset it to use 3")

    @property
    def job_retention_seconds(self) -> float | None:
        """Return how long DynamoDB keeps a job's items, in seconds, or None to keep them forever."""
        return self.job_retention_days * 86400.0 if self.job_retention_days else None

    def data_roots(self) -> tuple[str, ...]:
        """Return the folders of ``allowed_data_roots``, without empty entries or slashes at the ends.

        Raises
        ------
        BatonError
            If a folder is absolute or contains ``..`` or ``.``, or if the setting is not
            empty but names no folder (only commas).
        """
        # shared.efs imports this module for its fsync switch, so the import waits until here.
        from shared.efs import JOBS_FOLDER

        roots = []
        for entry in self.allowed_data_roots.split(","):
            folder = entry.strip().strip("/")
            if not entry.strip():
                continue
            if entry.strip().startswith("/") or any(part in ("", ".", "..") for part in folder.split("/")):
                raise BatonError(
                    f"invalid folder {entry.strip()!r} in ALLOWED_DATA_ROOTS {self.allowed_data_roots!r}: "
                    "give folders relative to the EFS root, such as datasets, without '.', '..' or a leading '/'")
            if folder.split("/")[0] == JOBS_FOLDER:
                raise BatonError(f"invalid folder {entry.strip()!r} in ALLOWED_DATA_ROOTS {self.allowed_data_roots!r}: "
                                 "jobs/ contains the jobs' own state and is never read as data; name the folders "
                                 "your data is in, such as datasets")
            roots.append(folder)
        if self.allowed_data_roots.strip() and not roots:
            raise BatonError(f"invalid ALLOWED_DATA_ROOTS {self.allowed_data_roots!r}: it names no folder; name the "
                             "folders your data is in, such as datasets, or leave it empty to allow every folder "
                             "under the EFS root")
        return tuple(roots)

    @classmethod
    def for_stage(cls, stage: str) -> "Settings":
        """Build settings that name the queues and table of the stack deployed as ``stage``.

        The process environment is not read, so the names cannot come from another stack.
        """
        names = {
            "jobs_queue_name": stack_resource_name(stage, "jobs"),
            "tasks_queue_name": stack_resource_name(stage, "tasks"),
            "aggregate_queue_name": stack_resource_name(stage, "aggregate"),
            "state_table_name": stack_resource_name(stage, "state"),
        }
        return cls.from_env(environ={}, **names)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Build settings from ``overrides``, then ``environ``, then the defaults.

        Each field is read from the variable of its name in upper case, such as
        ``KEEP_CHECKPOINTS``, through :func:`parse_setting`.

        The process-wide switches ``BATON_FAULTS_ENABLED`` and ``BATON_EFS_FSYNC`` are
        checked here too, so a bad one stops a handler or ``baton run`` before any work
        with the same kind of error.

        Raises
        ------
        BatonError
            If a variable has a value of the wrong type or out of range, naming the
            variable, its value and the fix.
        """
        environ = os.environ if environ is None else environ
        if FUNCTION_MEMORY_VARIABLE in environ:
            environ = {**function_memory_variables(environ[FUNCTION_MEMORY_VARIABLE]), **environ}
        faults_enabled(environ)
        efs_fsync_enabled(environ)
        values = {}
        for field in fields(cls):
            if field.name in overrides:
                values[field.name] = overrides[field.name]
                continue
            env_name = field.name.upper()
            raw = environ.get(env_name)
            if raw is not None:
                # The __future__ import makes field.type the annotation's text, and every field has a default.
                assert isinstance(field.type, str)
                assert field.default is not MISSING
                values[field.name] = parse_setting(env_name, field.type, raw, field.default)
        return cls(**values)
