"""Runtime settings, read from the environment in one place.

Precedence is: an explicit argument to :meth:`Settings.from_env`, then the process
environment, then the default below. The handlers never know whether they run on AWS or
in the local runtime: AWS endpoints come from the standard variables (``AWS_ENDPOINT_URL``
and friends, read by boto3 itself), and the file-system root from ``EFS_ROOT``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Mapping

from shared.efs import JOBS_FOLDER
from shared.errors import BatonError

# Round folders kept on EFS (KEEP_CHECKPOINTS), the current round's included. At least 2:
# after a round advances, a duplicate aggregation of the previous round may still run. It
# reads that round's folder, stopping.json included, and rewrites the current round's
# state and stopping.json, which come out the same only while that folder exists.
DEFAULT_KEEP_CHECKPOINTS = 3
MIN_KEEP_CHECKPOINTS = 2


def parse_bool(name: str, raw: str) -> bool:
    """Parse a boolean setting strictly: only true/false, 1/0, yes/no are accepted."""
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no", ""):
        return False
    raise BatonError(f"invalid boolean for {name}: {raw!r}; use true or false")


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
    faults_enabled : bool
        Whether the fault injector reads ``BATON_FAULTS``. Tests only.
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
    """

    efs_root: str = "/mnt/efs"
    jobs_queue_name: str = "baton-dev-jobs"
    tasks_queue_name: str = "baton-dev-tasks"
    aggregate_queue_name: str = "baton-dev-aggregate"
    state_table_name: str = "baton-dev-state"
    allowed_data_roots: str = ""
    keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS
    faults_enabled: bool = False
    continuation_margin_seconds: float = 30.0
    max_steps_per_invocation: int = 0
    stall_seconds: float = 900.0
    watchdog_max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.keep_checkpoints < MIN_KEEP_CHECKPOINTS:
            raise BatonError(
                f"invalid KEEP_CHECKPOINTS {self.keep_checkpoints}: Baton keeps at least {MIN_KEEP_CHECKPOINTS} round "
                "folders (the current round's and the previous one, which a duplicate aggregation may still read); "
                f"set it to {MIN_KEEP_CHECKPOINTS} or more")

    def data_roots(self) -> tuple[str, ...]:
        """Return the folders of ``allowed_data_roots``, without empty entries or slashes at the ends.

        Raises
        ------
        BatonError
            If a folder is absolute or contains ``..`` or ``.``, or if the setting is not
            empty but names no folder (only commas).
        """
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
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Build settings from ``overrides``, then ``environ``, then the defaults."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in fields(cls):
            env_name = "BATON_FAULTS_ENABLED" if field.name == "faults_enabled" else field.name.upper()
            if field.name in overrides:
                values[field.name] = overrides[field.name]
                continue
            raw = environ.get(env_name)
            if raw is None:
                continue
            if field.type == "bool":
                values[field.name] = parse_bool(env_name, raw)
            elif field.type == "int":
                try:
                    values[field.name] = int(raw)
                except ValueError as error:
                    raise BatonError(f"invalid integer for {env_name}: {raw!r}") from error
            elif field.type == "float":
                try:
                    values[field.name] = float(raw)
                except ValueError as error:
                    raise BatonError(f"invalid number for {env_name}: {raw!r}") from error
            else:
                values[field.name] = raw
        return cls(**values)
