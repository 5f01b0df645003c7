"""The adapters and the per-job cache that every step shares.

:class:`Services` builds the EFS store, the DynamoDB state store, the SQS queues and the
S3 client on first use, so tests and the local runtime can pass their own clients.
:class:`JobContext` keeps one job's spec, manifest and open shards in a warm process.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import boto3

from shared import shards
from shared.config import Settings
from shared.efs import EfsStore, check_efs_writable, not_an_object_problem, read_job_json
from shared.errors import DamagedShardError
from shared.queues import QueueClient
from shared.shards import Shard
from shared.source_files import file_identity
from shared.spec import JobSpec, parse_job_spec
from shared.state import StateStore
from shared.training import manifest_problem


@dataclass
class JobContext:
    """The spec, data manifest and open shards of one job, cached by a warm process."""

    spec: JobSpec
    manifest: dict
    shards: dict
    # The memory-mapped validation rows, once an aggregator has opened them.
    validation: Shard | None = None
    validation_loaded: bool = False
    # The job's preparation_attempt when the context was read; None when the caller gave none.
    data_version: int | None = None
    # The identities of spec.json and data/manifest.json before they were read (shared.source_files.file_identity).
    file_identities: tuple = ()

    def load_shard(self, store: EfsStore, job_id: str, worker: int) -> Shard:
        """Return worker ``worker``'s shard, mapping it on first use and checking its files on every call.

        The training statistics are checked too. A failed check drops the mapping, so the
        process maps the files again once ``baton resume`` has prepared them again.

        Raises
        ------
        DamagedShardError
            If a shard file or the statistics file is missing or not the one the
            preparation wrote (:func:`shared.shards.check_shard_unchanged`).
        """
        if worker in self.shards:
            try:
                shards.check_shard_unchanged(store, job_id, self.manifest, worker)
            except DamagedShardError:
                del self.shards[worker]
                raise
        else:
            self.shards[worker] = shards.load_shard(store, job_id, self.manifest, worker)
        shards.check_statistics_file(store, job_id, self.manifest)
        return self.shards[worker]

    def load_validation(self, store: EfsStore, job_id: str) -> Shard | None:
        """Return the job's validation rows (None without any), opening them on first use.

        Every later call checks the mapped files and the training statistics, as
        :meth:`load_shard` does, and drops the mapping when a check fails.
        """
        if not self.validation_loaded:
            self.validation = shards.load_validation(store, job_id, self.manifest)
            self.validation_loaded = True
        elif self.validation is not None:
            try:
                shards.check_shard_unchanged(store, job_id, self.manifest, shards.VALIDATION)
            except DamagedShardError:
                self.validation, self.validation_loaded = None, False
                raise
        shards.check_statistics_file(store, job_id, self.manifest)
        return self.validation


class Services:
    """The adapters a step needs, built lazily so tests and the local runtime can aim them."""

    def __init__(self, settings: Settings | None = None, dynamodb=None, sqs=None, s3=None):
        self.settings = settings or Settings.from_env()
        self._dynamodb = dynamodb
        self._sqs = sqs
        self._s3 = s3
        self._jobs: OrderedDict[str, JobContext] = OrderedDict()

    @cached_property
    def store(self) -> EfsStore:
        store = EfsStore(self.settings.efs_root, self.settings.data_roots())
        check_efs_writable(store.root)
        return store

    @cached_property
    def state(self) -> StateStore:
        return StateStore(self._dynamodb or boto3.client("dynamodb"), self.settings.state_table_name,
                          retention_seconds=self.settings.job_retention_seconds)

    @cached_property
    def queues(self) -> QueueClient:
        return QueueClient(self._sqs or boto3.client("sqs"), self.settings)

    @cached_property
    def s3(self):
        return self._s3 or boto3.client("s3")

    def job_context(self, job_id: str, data_version: int | None = None) -> JobContext:
        """Return the cached spec and manifest of ``job_id``, reading them from EFS once.

        ``data_version`` is the job item's ``preparation_attempt``. A context cached under
        another one is read again, with none of its shards: a resume that prepared the
        shards again replaced their files, and a cached memory map would still show the
        old, damaged file. A context is read again, too, when its ``spec.json`` or
        ``data/manifest.json`` is no longer the file it was read from (one ``stat`` call
        each). That happens when the job's folder was deleted and a spec was sent again
        under the same id, and then the cached shards and manifest are the deleted job's.
        """
        identities = (file_identity(self.store.spec_path(job_id), include_ctime=True),
                      file_identity(self.store.data_dir(job_id) / "manifest.json", include_ctime=True))
        if job_id in self._jobs:
            cached = self._jobs[job_id]
            if (data_version is None or cached.data_version == data_version) and cached.file_identities == identities:
                self._jobs.move_to_end(job_id)
                return cached
            del self._jobs[job_id]
        spec = parse_job_spec(read_job_json(self.store, self.store.spec_path(job_id)))
        manifest = read_manifest(self.store, job_id)
        context = JobContext(spec=spec, manifest=manifest, shards={}, data_version=data_version,
                             file_identities=identities)
        self._jobs[job_id] = context
        # A warm process may serve many jobs; keep only a few memory maps open.
        while len(self._jobs) > 4:
            self._jobs.popitem(last=False)
        return context


def read_manifest(store: EfsStore, job_id: str) -> dict:
    """Return the job's data manifest (``data/manifest.json``), which its preparation wrote last.

    Raises
    ------
    DamagedShardError
        If the file is missing, is not valid JSON or lacks a field, so that ``baton resume``
        prepares the data again. The preparation writes the file whole, so something else
        removed or changed it, and a retry would read the same bytes.
    """
    path = store.data_dir(job_id) / "manifest.json"
    try:
        manifest = store.read_json(path)
    except FileNotFoundError:
        problem = "is missing"
    except ValueError as error:
        problem = f"is damaged ({type(error).__name__}: {error})"
    else:
        field_problem = _manifest_problem(manifest)
        if field_problem is None:
            return manifest
        problem = field_problem
    raise DamagedShardError(f"data manifest '{path.relative_to(store.root)}' {problem}: the preparation writes it "
                            f"whole, so something else removed or changed it; run `baton resume {job_id}`: it "
                            "prepares the data again from the job's data source, which must be unchanged, and "
                            "the job goes on from its last completed round")


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return not_an_object_problem(manifest, "the object a data manifest is")
    return manifest_problem(manifest)
