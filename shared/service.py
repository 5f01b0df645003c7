"""The steps Baton's Lambda handlers run: start a job, run a task, reduce a slice, aggregate a round.

Each step is idempotent. A step either completes its effects in an order that a retry
can finish, or recognises that a message is stale and drops it:

start_job
    validate spec -> create job item (same spec: reuse) -> write spec.json -> prepare
    shards -> write round 0 state -> PREPARING to RUNNING -> send round 0 tasks
run_task
    check round is current -> read state and shard -> write the result file -> add worker to
    the round's done set -> if the set is complete, send the aggregate message (or, with
    training.reducers R > 1, the R reduce messages)
reduce_slice (R > 1 only)
    check round is current and complete -> sum slice k of every result in worker order ->
    write the reduced-<k> file -> add k to the round's reduced set -> if the set is complete, send
    the aggregate message
aggregate_round
    check round is current (and, with R > 1, its reduced set complete) -> sum the results
    in worker order, or concatenate the reduced slices -> write round r+1 state and the
    metrics file -> advance the round (conditional) -> send round r+1 tasks -> store the
    round's metrics in DynamoDB; or store the metrics and finish the job

Rounds here are 0-based indexes, as in messages, DynamoDB keys and EFS folders. What a
user reads (job errors, metrics records) carries ``round_number(index)``, which counts
from 1, as the CLI does.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import boto3
import numpy as np

from shared import cost
from shared import data as datasets
from shared import faults
from shared.config import Settings
from shared.efs import EfsStore
from shared.metrics import publish_round_metrics
from shared.errors import (DataError, EfsNotWritableError, InvalidMessageError, JobConflictError, JobSpecError,
                           PermanentError, StaleMessageError)
from shared.model_bucket import upload_model
from shared.optim import state_arrays, state_from_arrays
from shared.preparation import (PreparationStep, StaleStepError, begin_attempt, data_identity, record_sent,
                                run_preparation)
from shared.queues import AggregateMessage, QueueClient, TaskMessage, body_object
from shared.reduction import (check_reducers, read_reduced_round, reduce_worker_results, slice_bounds,
                              write_reduced_slice, write_worker_result)
from shared.source_files import FIX
from shared.spec import JobSpec, derive_job_id, load_job_message, parse_job_spec
from shared.state import (CONTINUED_FROM, PREPARATION_ATTEMPT, RUNNING, SUCCEEDED, JobRecord, StateStore,
                          can_record_job)
from shared.target_scaling import params_in_target_units
from shared.training import (Reduction, RoundUpdate, StoppingState, build_model, build_model_for_preparation,
                             build_optimizer, check_model_fits, check_stopping, check_validation_finite,
                             get_training_mode, manifest_problem, round_number)

logger = logging.getLogger(__name__)


@dataclass
class JobContext:
    """The spec, data manifest and open shards of one job, cached by a warm process."""

    spec: JobSpec
    manifest: dict
    shards: dict
    # The memory-mapped validation rows, once an aggregator has opened them.
    validation: "datasets.Shard | None" = None
    validation_loaded: bool = False

    def load_validation(self, store: EfsStore, job_id: str) -> "datasets.Shard | None":
        """Return the job's validation rows (None without any), opening them on first use."""
        if not self.validation_loaded:
            self.validation = datasets.load_validation(store, job_id, self.manifest)
            self.validation_loaded = True
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

    def job_context(self, job_id: str) -> JobContext:
        """Return the cached spec and manifest of ``job_id``, reading them from EFS once."""
        if job_id in self._jobs:
            self._jobs.move_to_end(job_id)
            return self._jobs[job_id]
        spec = parse_job_spec(datasets.read_job_json(self.store, self.store.spec_path(job_id)))
        manifest = datasets.read_job_json(self.store, self.store.data_dir(job_id) / "manifest.json",
                                          problem_of=_manifest_problem)
        context = JobContext(spec=spec, manifest=manifest, shards={})
        self._jobs[job_id] = context
        # A warm process may serve many jobs; keep only a few memory maps open.
        while len(self._jobs) > 4:
            self._jobs.popitem(last=False)
        return context


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return f"contains a JSON {type(manifest).__name__}, not the object a data manifest is"
    return manifest_problem(manifest)


def check_efs_writable(root: Path) -> None:
    """Write and delete a probe file under ``root``, so a bad mount fails on first use.

    Raises
    ------
    EfsNotWritableError
        If the folder is missing or this process cannot create a file in it.
    """
    probe = root / f".write-check-{uuid.uuid4().hex}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"ok")
        probe.unlink()
    except OSError as error:
        raise EfsNotWritableError(
            f"EFS root '{root}' is not writable by uid {os.getuid()} gid {os.getgid()} ({error.strerror}); "
            "the access point's RootDirectory.CreationInfo OwnerUid/OwnerGid must equal its PosixUser Uid/Gid "
            "(EfsAccessPoint in serverless.yml), or chown the folder to that user; locally, check EFS_ROOT") from error


def read_round_state(store: EfsStore, job_id: str, round_index: int) -> tuple[np.ndarray, dict]:
    """Return the parameters and optimizer state stored for the start of ``round_index``.

    Raises
    ------
    DataError
        If the state file is not a whole ``.npz`` archive with the parameters. Baton writes
        it atomically, so only a change by something else leaves it so, and a retry cannot help.
    """
    path = store.state_path(job_id, round_index)
    try:
        arrays = store.read_arrays(path)
        arrays["params"]
    except (ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise DataError(f"round state file '{path.relative_to(store.root)}' is damaged ({type(error).__name__}: "
                        f"{error}): Baton writes it whole, so it was changed after it was written, and the job "
                        f"cannot go on from it; {FIX}") from None
    return arrays["params"], state_from_arrays(arrays)


def write_round_state(store: EfsStore, job_id: str, round_index: int, params: np.ndarray, optimizer_state: dict) -> None:
    """Store the parameters and optimizer state for the start of ``round_index``."""
    arrays = {"params": params, **state_arrays(optimizer_state)}
    store.write_arrays(store.state_path(job_id, round_index), arrays)


# Starter ---------------------------------------------------------------------------------


def start_job(services: Services, body: str, message_id: str) -> str:
    """Validate a job message, prepare its data and send its first round of tasks.

    Returns the job id. A message without a ``job_id`` gets one derived from its SQS
    message id, which stays the same across redeliveries. A message
    ``{"job_id", "prepare": {...}}`` is one step of a preparation split over several
    invocations (see :mod:`shared.preparation`); the step that completes the data
    starts round 0.

    Raises
    ------
    JobSpecError, DataError, JobConflictError
        Permanent: the caller marks the job failed and drops the message.
    """
    step_message = _preparation_step_message(body)
    if step_message is not None:
        job_id = step_message["job_id"]
        record = services.state.get_job(job_id)
        if record is None or record.status != "PREPARING":
            raise StaleMessageError(f"preparation message for job {job_id}, which is "
                                    f"{'missing' if record is None else record.status}")
        spec = parse_job_spec(datasets.read_job_json(services.store, services.store.spec_path(job_id)))
        _prepare_and_start(services, spec, PreparationStep.from_message(step_message))
        return job_id

    try:
        spec = load_job_message(body, default_job_id=derive_job_id(message_id))
    except JobSpecError as error:
        _check_spec_error_spares_job(services, body, error)
        raise
    faults.maybe_fail("starter.validated", job_id=spec.job_id)

    record, created = services.state.create_job(spec.job_id, spec.fingerprint(), spec.canonical_json(),
                                                spec.training.n_workers)
    first_round = record.first_round
    if record.status == RUNNING and record.round == first_round:
        # A redelivery after a crash between starting the job and sending its first round
        # would otherwise leave the job waiting. Workers drop the tasks that already ran.
        services.queues.send_tasks(spec.job_id, first_round, list(range(record.n_workers)))
        raise StaleMessageError(f"job {spec.job_id} is already RUNNING; re-sent its round {first_round} tasks")
    if record.status != "PREPARING":
        # A redelivered job message for a job that is already running or finished.
        raise StaleMessageError(f"job {spec.job_id} is already {record.status}")

    store = services.store
    _check_job_dir_under_root(store, spec.job_id)
    _check_no_foreign_files(store, spec)
    store.write_json(store.spec_path(spec.job_id), spec.to_dict())
    # A resume of a job that failed in preparation counts a new attempt, which starts over.
    begin_attempt(store, spec.job_id, int(record.attributes.get(PREPARATION_ATTEMPT, 0)))
    # A job item created now, beside preparation progress on EFS, means the state table is
    # newer than the files, as after a new local stack or a redeployed stack. The step
    # messages of that progress went with the old queues, so this message carries it on.
    _prepare_and_start(services, spec, None, continue_saved=created)
    return spec.job_id


def _check_job_dir_under_root(store: EfsStore, job_id: str) -> None:
    """Raise :class:`DataError` if the job's folder is a symbolic link that leads outside the EFS root."""
    if not store.is_under_root(store.job_dir(job_id)):
        raise DataError(f"job_id '{job_id}': the folder jobs/{job_id} on EFS leads outside the EFS root through a "
                        "symbolic link, and Baton writes only under the EFS root; remove the link or choose another "
                        "job_id")


def _check_no_foreign_files(store: EfsStore, spec: JobSpec) -> None:
    """Raise if EFS contains files of an earlier job with this id but a different spec.

    This happens when a state table was replaced (a redeployed stack, a new local run) but
    the file system kept its folders. Baton does not delete them, because they may hold a
    trained model.
    """
    path = store.spec_path(spec.job_id)
    if not path.exists():
        return
    try:
        earlier = store.read_json(path)
    except ValueError as error:
        raise DataError(f"file '{path.relative_to(store.root)}' of an earlier run of job '{spec.job_id}' is not valid "
                        f"JSON ({error}), so Baton cannot tell whether that run had this spec. Write this spec into it "
                        "if the earlier run had it, so that the job goes on from its rounds, or choose a new job_id")
    try:
        same = parse_job_spec(earlier).fingerprint() == spec.fingerprint()
    except PermanentError:
        same = False
    if not same:
        raise DataError(
            f"EFS already contains files of an earlier job '{spec.job_id}' with a different spec in "
            f"'{store.job_dir(spec.job_id)}'; choose a new job_id, or delete that folder if it is no longer needed "
            "(for a local job, `baton run --fresh` deletes it)")


def _job_created_from_spec(services: Services, job_id: str) -> JobRecord | None:
    """Return the item of ``job_id`` if a valid spec created it, else None.

    An item without a fingerprint only records the rejection of a spec sent under this id.
    """
    existing = services.state.get_job(job_id)
    return existing if existing is not None and existing.fingerprint else None


def starter_failure_job_id(services: Services, body: str, message_id: str, job_id: str) -> str:
    """Return the job id under which a failure of the starter on this message is recorded.

    That is the message's ``job_id``, unless the id belongs to a job created from another
    spec. That job must not be touched, so the failure goes under ``job-<message id>``,
    as a conflict does. Reads the job item once, so call it on failures only.
    """
    if _preparation_step_message(body) is not None:
        # A step of a preparation already under way belongs to the job that sent it.
        return job_id
    existing = _job_created_from_spec(services, job_id)
    if existing is None:
        return job_id
    rejected_id = derive_job_id(message_id)
    try:
        spec = load_job_message(body, default_job_id=job_id)
    except JobSpecError:
        return rejected_id
    return job_id if spec.fingerprint() == existing.fingerprint else rejected_id


def _check_spec_error_spares_job(services: Services, body: str, error: JobSpecError) -> None:
    """Turn a spec error into a conflict when its job id names a job that was created.

    The handler records a spec error under the message's job id. When that id belongs to a
    job created from a valid spec, that job must keep running, so the rejection is raised
    as a :class:`JobConflictError`, which the handler records under the message's own id.
    """
    job_id = (body_object(body) or {}).get("job_id")
    if not can_record_job(job_id):
        return
    existing = _job_created_from_spec(services, job_id)
    if existing is None:
        return
    raise JobConflictError(
        f"job id '{job_id}' belongs to an existing job (status {existing.status}), which is left as it is; "
        f"this message was rejected: {error}. Fix the spec and send it with a new job_id") from None


def _preparation_step_message(body: str) -> dict | None:
    """Return the decoded body if it is a preparation step message, else None."""
    message = body_object(body)
    if message is not None and "prepare" in message and isinstance(message.get("job_id"), str):
        return message
    return None


def _prepare_and_start(services: Services, spec: JobSpec, step: PreparationStep | None,
                       continue_saved: bool = False) -> None:
    """Run preparation from ``step``; once the data is ready, write round 0 and send its tasks.

    ``continue_saved`` is passed on to :func:`~shared.preparation.run_preparation`.
    """
    store = services.store
    try:
        outcome = run_preparation(store, spec, build_model_for_preparation(spec), step, continue_saved=continue_saved)
    except StaleStepError as error:
        raise StaleMessageError(str(error)) from None
    if outcome.manifest is None:
        # Sent before it is recorded: a crash in between makes this step run again, while
        # recording first could leave the chain with no message at all.
        services.queues.send_job(outcome.next_step.to_message(spec.job_id))
        record_sent(store, spec.job_id, outcome.next_step)
        logger.info("preparation continues", extra={"job_id": spec.job_id, "next_step": str(outcome.next_step)})
        return
    manifest = outcome.manifest
    faults.maybe_fail("starter.prepared", job_id=spec.job_id)

    model = build_model(spec, manifest)
    # NOTE: this checks against Lambda's largest memory, not the stack's setting, so a
    # model between the two still runs out of memory in the functions and dead-letters.
    check_model_fits(model)
    check_reducers(spec.training.reducers, model.n_params)
    optimizer = build_optimizer(spec)
    mode = get_training_mode(spec, model)
    rounds = mode.total_rounds(spec, manifest)
    record = services.state.get_job(spec.job_id)
    if record is None or record.status != "PREPARING":
        # Cancelled while the data was prepared: round 0 does not start.
        raise StaleMessageError(f"job {spec.job_id} is {'missing' if record is None else record.status}; "
                                "its round 0 does not start")
    identity = run_identity(store, spec)
    if _finished_on_efs(store, spec.job_id, identity, model.n_params):
        _finish_from_earlier_run(services, spec, rounds)
        return
    first_round = continuation_round(store, spec.job_id, rounds, identity)
    if first_round > 0:
        summary = {CONTINUED_FROM: first_round, **_backfill_round_metrics(services, spec, first_round)}
        _start_rounds(services, spec, rounds, first_round, summary)
        return
    params = mode.initial_params(
        spec, manifest, model, lambda max_rows: datasets.load_training_sample(store, spec.job_id, manifest, max_rows))
    _set_aside_earlier_run(store, spec.job_id)
    write_round_state(store, spec.job_id, 0, params, optimizer.init_state(params))
    # After the round 0 state: a run whose record is missing has nothing to go on from.
    store.write_json(store.job_dir(spec.job_id) / RUN_RECORD, identity)
    _start_rounds(services, spec, rounds, 0, {})


def _start_rounds(services: Services, spec: JobSpec, total_rounds: int, first_round: int,
                  summary: dict[str, Any]) -> None:
    """Move the job from PREPARING to RUNNING at ``first_round`` and send that round's tasks.

    The tasks are sent whether this delivery made the transition or an earlier one did, so
    a retry after a crash between the transition and the send still starts the round.
    Workers drop duplicates.

    Raises
    ------
    StaleMessageError
        If the job was cancelled or failed after the caller's last status check.
    """
    job_id = spec.job_id
    if not services.state.start_job(job_id, total_rounds, first_round=first_round, summary=summary):
        record = services.state.get_job(job_id)
        if record is None or record.status != RUNNING or record.round != first_round:
            raise StaleMessageError(f"job {job_id} is {'missing' if record is None else record.status} at round "
                                    f"{None if record is None else record.round}; its round {first_round} does not "
                                    "start")
    faults.maybe_fail("starter.started", job_id=job_id)

    services.queues.send_tasks(job_id, first_round, list(range(spec.training.n_workers)))
    logger.info("job started", extra={"job_id": job_id, "round": first_round, "total_rounds": total_rounds,
                                      "n_workers": spec.training.n_workers})


# The file in a job's folder that ties its round folders and model to the spec and the
# data they were trained on.
RUN_RECORD = "run.json"


def run_identity(store: EfsStore, spec: JobSpec) -> dict[str, str]:
    """Return what ``run.json`` records of a run: the spec's fingerprint and the prepared data's identity."""
    return {"data_sha256": data_identity(store, spec.job_id), "spec_fingerprint": spec.fingerprint()}


def continuation_round(store: EfsStore, job_id: str, total_rounds: int, identity: dict[str, str]) -> int:
    """Return the round from which the job goes on with an earlier, unfinished run's files.

    An unfinished run's files stay on EFS when its job item is gone, as after a local
    stack that stopped or a redeployed table. The same spec sent again then goes on from
    them, so no trained round is lost. A round ``r`` qualifies when its folder contains the
    state (``state.npz``) and the stopping state (``stopping.json``), and the metrics file
    of round ``r - 1`` exists. The aggregator writes the state, then the metrics file, then
    the stopping state, all before it advances, so together they show that round ``r - 1``
    was committed on EFS.

    The job goes on from the committed round before the last one, so the last committed
    round is aggregated again. Its aggregation may have decided to stop the job and then
    crashed before the model was written, and only the model records that decision. A
    round whose files do not load is passed over for the one before it.

    Parameters
    ----------
    store : EfsStore
    job_id : str
    total_rounds : int
        The job's round limit; round folders beyond it do not count.
    identity : dict
        The spec's fingerprint and the data's identity now (:func:`run_identity`). The
        earlier run's rounds count only if its run record (``run.json``) is the same.

    Returns
    -------
    int
        The 0-based round to go on from, or 0 for a fresh start: no files, a run of
        another spec or on other data, or only round 0 committed. A finished run whose
        model is whole is reused before this is asked. A finished run whose model is
        damaged goes on from its rounds like an unfinished run, and writes the model again.
    """
    rounds_dir = store.job_dir(job_id) / "rounds"
    if not rounds_dir.is_dir():
        return 0
    if not _same_run(store, job_id, identity):
        return 0

    def committed(round_index: int) -> bool:
        return (store.state_path(job_id, round_index).is_file()
                and (store.round_dir(job_id, round_index) / "stopping.json").is_file()
                and store.metrics_path(job_id, round_index - 1).is_file())

    indexes = [int(path.name) for path in rounds_dir.iterdir() if path.name.isdigit()]
    committed_rounds = sorted(index for index in indexes if 1 <= index <= total_rounds and committed(index))
    # Any committed round before the last will do: the rounds from there are aggregated
    # again, and each takes the same decisions as before.
    for round_index in reversed(committed_rounds[:-1]):
        if _round_files_load(store, job_id, round_index):
            return round_index
    return 0


def _round_files_load(store: EfsStore, job_id: str, round_index: int) -> bool:
    """Return whether a committed round's state, stopping state and previous metrics can be read."""
    try:
        read_round_state(store, job_id, round_index)
        for path in (store.round_dir(job_id, round_index) / "stopping.json", store.metrics_path(job_id, round_index - 1)):
            if not isinstance(store.read_json(path), dict):
                return False
    except (DataError, OSError, ValueError):
        return False
    return True


def _same_run(store: EfsStore, job_id: str, identity: dict[str, str]) -> bool:
    """Return whether the job's round folders and model were trained on this spec and data."""
    try:
        run = store.read_json(store.job_dir(job_id) / RUN_RECORD)
    except (OSError, ValueError):
        return False
    return run == identity


def _finished_on_efs(store: EfsStore, job_id: str, identity: dict[str, str], n_params: int) -> bool:
    """Return whether an earlier run of the job finished on this spec and data, leaving its whole model.

    The model's parameters must load as ``n_params`` finite values, and its description
    must name as many rounds as its final metrics.
    """
    model_dir = store.model_dir(job_id)
    if not ((model_dir / "model.json").is_file() and _same_run(store, job_id, identity)):
        return False
    try:
        params = store.read_npy(model_dir / "params.npy")
        model_info = store.read_json(model_dir / "model.json")
    except (OSError, ValueError, EOFError):
        return False
    return (params.shape == (n_params,) and bool(np.isfinite(params).all())
            and _model_info_problem(model_info) is None
            and model_info["final_metrics"].get("round") == model_info["rounds"])


def _finish_from_earlier_run(services: Services, spec: JobSpec, total_rounds: int) -> None:
    """Record as SUCCEEDED a job whose earlier run finished on EFS, without training it again.

    Training is deterministic, so the same spec on the same data would train the same
    model. The model is copied to the models bucket, when the stack has one, as the
    aggregator that finishes a job does, and the job item gets the earlier run's rounds,
    stop reason and metrics.
    """
    store, job_id = services.store, spec.job_id
    model_info_path = store.model_dir(job_id) / "model.json"
    model_info = datasets.read_job_json(store, model_info_path, problem_of=_model_info_problem)
    rounds_done = int(model_info["rounds"])
    if rounds_done > total_rounds:
        raise DataError(f"file '{model_info_path.relative_to(store.root)}' records {rounds_done} rounds, but the job "
                        f"has at most {total_rounds}, so it was changed after the job wrote it; {FIX}")
    summary = {CONTINUED_FROM: rounds_done, "stop_reason": model_info["stop_reason"],
               **_backfill_round_metrics(services, spec, rounds_done, model_info["final_metrics"])}
    # The model now belongs to this run: `baton fetch` copies no model older than spec.json.
    os.utime(model_info_path)
    if services.settings.models_bucket:
        summary["model_uri"] = upload_model(services.s3, services.settings.models_bucket, store, job_id)
    if not services.state.start_job(job_id, total_rounds, first_round=rounds_done, summary=summary,
                                    to_status=SUCCEEDED):
        raise StaleMessageError(f"job {job_id} is no longer PREPARING; it is not recorded as finished")
    logger.warning("job had finished in an earlier run; its model is reused", extra={
        "job_id": job_id, "rounds": rounds_done, "stop_reason": model_info["stop_reason"]})


def _model_info_problem(model_info: Any) -> str | None:
    if not isinstance(model_info, dict):
        return f"contains a JSON {type(model_info).__name__}, not the object a model description is"
    if not isinstance(model_info.get("rounds"), int) or model_info["rounds"] < 1:
        return "has no positive whole number of rounds"
    if not isinstance(model_info.get("final_metrics"), dict):
        return "has no final_metrics object"
    return None if isinstance(model_info.get("stop_reason"), str) else "has no stop_reason"


def _object_problem(value: Any) -> str | None:
    return None if isinstance(value, dict) else f"contains a JSON {type(value).__name__}, not an object"


def _metrics_problem(metrics: Any) -> str | None:
    if not isinstance(metrics, dict):
        return f"contains a JSON {type(metrics).__name__}, not the object a metrics file is"
    missing = [name for name in ("epoch", "train_loss", "total_cost_usd") if name not in metrics]
    return f"has no {', '.join(missing)}" if missing else None


def job_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """Return the fields of a round's metrics that the job item keeps: epoch, losses, cost so far."""
    summary = {"epoch": metrics["epoch"], "train_loss": metrics["train_loss"], "cost_usd": metrics["total_cost_usd"]}
    for name in ("validation_loss", "validation_accuracy", "validation_r2"):
        if name in metrics:
            summary[name] = metrics[name]
    return summary


def _backfill_round_metrics(services: Services, spec: JobSpec, rounds_done: int,
                            final_metrics: dict | None = None) -> dict[str, Any]:
    """Store an earlier run's metrics files of rounds ``0 .. rounds_done - 1`` on their round items.

    So ``baton fetch``, ``plot`` and ``watch`` show the whole job. Returns the job summary
    of the last of those rounds. Its metrics file must be intact, unless it is missing
    and ``final_metrics``, a finished model's copy of those metrics, is given.
    """
    store, job_id = services.store, spec.job_id
    metrics_by_round, skipped = {}, []
    for round_index in range(rounds_done - 1):
        try:
            round_metrics = store.read_json(store.metrics_path(job_id, round_index))
        except (OSError, ValueError):
            round_metrics = None
        if isinstance(round_metrics, dict):
            metrics_by_round[round_index] = round_metrics
        else:
            # Moved or damaged since that run; the round only lacks its metrics in the table.
            skipped.append(round_number(round_index))
    last_path = store.metrics_path(job_id, rounds_done - 1)
    if final_metrics is not None and not last_path.is_file():
        metrics = final_metrics
    else:
        metrics = datasets.read_job_json(store, last_path, problem_of=_metrics_problem)
    metrics_by_round[rounds_done - 1] = metrics
    services.state.put_earlier_round_metrics(job_id, metrics_by_round)
    logger.warning("an earlier run's metrics were stored in the table", extra={
        "job_id": job_id, "rounds": rounds_done, "rounds_without_metrics_in_table": skipped})
    return job_summary(metrics)


EARLIER_RUNS_FOLDER = "earlier-runs"


def _set_aside_earlier_run(store: EfsStore, job_id: str) -> Path | None:
    """Move the rounds, metrics and model of an earlier run of the job into ``earlier-runs/<n>/``.

    A job that starts round 0 has aggregated no round yet. So metrics, a model or round
    folders after round 0 on EFS belong to an earlier run of the same spec whose job item
    is gone, as after a new local stack or a redeployed table. Left in place, its metrics would
    mix with the new run's in ``fetch`` and ``plot``. Nothing is deleted, since they may
    hold a trained model. Returns the folder they were moved to, or None if there were none.

    Round 0's progress files go too, or a worker or the aggregator of the new round 0
    would take the earlier run's saved progress for its own. The rest of round 0 stays,
    because a twin delivery of this message may already have started it. Its results
    are harmless, since each worker writes its own before it is recorded as done, and a
    progress file moved from under a twin only makes its writer compute again.
    """
    job_dir = store.job_dir(job_id)
    rounds_dir = job_dir / "rounds"
    earlier = [job_dir / name for name in ("metrics", "model") if (job_dir / name).exists()]
    if rounds_dir.is_dir():
        earlier += [path for path in rounds_dir.iterdir() if not (path.name.isdigit() and int(path.name) == 0)]
    round_zero = store.round_dir(job_id, 0)
    if round_zero.is_dir():
        earlier += [path for path in round_zero.iterdir()
                    if path.name == "aggregate-progress.json" or path.name.startswith("progress-")]
    if not earlier:
        return None
    runs_dir = job_dir / EARLIER_RUNS_FOLDER
    if runs_dir.is_symlink() or (runs_dir.exists() and not runs_dir.is_dir()):
        raise DataError(f"'{runs_dir.relative_to(store.root)}' is a file or a link, but Baton moves the files of an "
                        f"earlier run of job '{job_id}' into a folder of that name; move it elsewhere, then run "
                        f"`baton resume {job_id}`")
    runs_dir.mkdir(exist_ok=True)
    number = 1 + sum(1 for path in runs_dir.iterdir() if path.name.isdigit())
    while True:
        destination = runs_dir / str(number)
        try:
            destination.mkdir()
            break
        except FileExistsError:
            # A twin delivery of this message took that number.
            number += 1
    (destination / "rounds").mkdir()
    for path in earlier:
        target = destination / path.relative_to(job_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            # One rename per folder (or progress file), within one file system.
            os.replace(path, target)
        except FileNotFoundError:
            # A twin delivery moved it first.
            continue
    logger.warning("moved the files of an earlier run of this job aside", extra={
        "job_id": job_id, "path": str(destination.relative_to(store.root))})
    return destination


# Continuation ----------------------------------------------------------------------------
#
# A worker or aggregator does its share as a sequence of bounded steps. Before each step
# after the first it asks its InvocationBudget whether time is running out; if so it saves
# its progress atomically on EFS and sends a continuation message naming the next link of
# the chain. Timeline of one link:
#
#   start ── step ── step ── ... ── remaining < margin ── save progress ── send {continuation: n+1}
#   (at least one step per link, so a chain always moves forward)
#
# A progress file records which link should run next (``next``) and the SQS message id of
# the link that wrote it (``writer``). A continuation message ``c`` then runs if
# ``next == c``, or if ``next == c + 1`` and the file was written by this very message (a
# retry after the save). Any message with ``c < next`` otherwise is a duplicate of an old
# link and is dropped, which merges duplicated chains back into one. A message without a
# ``continuation`` (the first task, or a re-send by the watchdog or resume) adopts whatever
# progress is on EFS.


class InvocationBudget:
    """Decides when an invocation should stop and continue in a new one.

    Parameters
    ----------
    remaining_millis : callable or None
        The Lambda context's ``get_remaining_time_in_millis``; None means unbounded.
    settings : Settings
        ``continuation_margin_seconds`` and ``max_steps_per_invocation``.
    """

    def __init__(self, remaining_millis: Callable[[], int] | None, settings: Settings):
        self._remaining_millis = remaining_millis
        self.max_steps = settings.max_steps_per_invocation
        self.steps = 0
        self.margin_millis = 0.0
        if remaining_millis is not None:
            # A quarter of the starting time at most, so a short timeout still leaves
            # three quarters of it for work.
            self.margin_millis = min(settings.continuation_margin_seconds * 1000.0, remaining_millis() / 4.0)

    def count_step(self) -> None:
        self.steps += 1

    def exhausted(self) -> bool:
        """Return whether the invocation should save its progress now."""
        if self.steps == 0:
            return False
        if self.max_steps and self.steps >= self.max_steps:
            return True
        return self._remaining_millis is not None and self._remaining_millis() < self.margin_millis


def _progress_path(store: EfsStore, job_id: str, round_index: int, worker: int | None) -> Path:
    name = "aggregate-progress.json" if worker is None else f"progress-{worker}.npz"
    return store.round_dir(job_id, round_index) / name


def _chain_position(saved_next: int, saved_writer: str, continuation: int | None, message_id: str) -> int | None:
    """Return the link number this message runs as, or None if it is a stale duplicate."""
    if continuation is None:
        return saved_next
    if saved_next == continuation:
        return continuation
    if saved_next == continuation + 1 and saved_writer == message_id:
        return continuation
    if saved_next > continuation:
        return None
    # A slower twin chain overwrote newer progress with older; the steps are deterministic,
    # so continuing from the older progress gives the same bytes.
    return continuation


def _load_worker_progress(store: EfsStore, path: Path, continuation: int | None,
                          message_id: str) -> tuple[dict[str, np.ndarray] | None, int, float]:
    """Return the saved progress (None to begin afresh), this link's number, and the
    seconds the earlier links of the chain took."""
    if not path.exists():
        return None, continuation or 0, 0.0
    arrays = store.read_arrays(path)
    link = _chain_position(int(arrays.pop("_next")), str(arrays.pop("_writer")), continuation, message_id)
    if link is None:
        raise StaleMessageError(f"continuation {continuation} is a duplicate of an earlier link; dropped")
    # Absent from progress files that an earlier version of Baton wrote.
    earlier_seconds = float(arrays.pop("_seconds", 0.0))
    return arrays, link, earlier_seconds


def send_round_complete(state: StateStore, queues: QueueClient, job_id: str, round_index: int,
                        reducers: int) -> str:
    """Send what a round whose workers are all recorded needs next; return what was sent.

    With one reducer that is the aggregate message. With ``reducers`` > 1 it is a reduce
    message for every slice not yet in the round's reduced set, or the aggregate message
    once the set is complete. Duplicates of either are dropped by their handlers.
    """
    if reducers > 1:
        reduced = set(state.get_reduced_slices(job_id, round_index))
        missing = [slice_index for slice_index in range(reducers) if slice_index not in reduced]
        if missing:
            queues.send_reduces(job_id, round_index, missing)
            return f"reduce messages for slices {missing}"
    queues.send_aggregate(job_id, round_index)
    return "aggregate"


# Worker ----------------------------------------------------------------------------------


def _check_round_is_current(services: Services, job_id: str, round_index: int):
    """Return the job's item and the round's done workers; raise if the round is not current."""
    record, done = services.state.get_job_and_done_workers(job_id, round_index)
    if record is None:
        raise StaleMessageError(f"job {job_id} does not exist")
    if record.status != RUNNING:
        raise StaleMessageError(f"job {job_id} is {record.status}")
    if round_index < record.round:
        raise StaleMessageError(f"round {round_index} of job {job_id} is over; the job is at round {record.round}")
    if round_index > record.round:
        # Tasks are sent only after the round advanced, and the job item is read
        # consistently, so Baton never sends such a message: drop it.
        raise StaleMessageError(f"round {round_index} of job {job_id} is ahead of the job's round {record.round}")
    return record, done


def run_task(services: Services, task: TaskMessage, message_id: str = "",
             remaining_millis: Callable[[], int] | None = None) -> dict[str, np.ndarray] | None:
    """Compute one worker's contribution to one round and record it.

    A redelivered task either finds its worker recorded or computes and writes the same
    bytes again.

    Parameters
    ----------
    services : Services
    task : TaskMessage
        The job, round and worker, and the link of a continuation chain when it is one.
    message_id : str
        The SQS message id, saved with the progress, so a redelivery of the link that saved
        it runs again.
    remaining_millis : callable, optional
        Returns the invocation's remaining time; without it the worker never stops early.

    Returns
    -------
    dict of str to ndarray or None
        The result arrays, or None when this invocation saved its progress and sent a
        continuation, or found its result already recorded.

    Raises
    ------
    StaleMessageError
        The job is not running, the round is over, or the message is an old link of a
        continuation chain.
    """
    job_id, round_index, worker = task["job_id"], task["round"], task["worker"]
    ids = {"job_id": job_id, "round": round_index, "worker": worker}
    task_started = time.monotonic()
    record, done = _check_round_is_current(services, job_id, round_index)
    if not 0 <= worker < record.n_workers:
        raise InvalidMessageError(f"task names worker {worker} but job {job_id} has {record.n_workers} workers "
                                  f"(0 to {record.n_workers - 1}); dropped")
    faults.maybe_fail("worker.before_read", **ids)

    # The result is on EFS before the worker is recorded, so a recorded worker is done.
    # Its aggregate message may not have been sent, though: send it again.
    context = services.job_context(job_id)
    spec, manifest, store = context.spec, context.manifest, services.store
    if worker in done:
        if len(done) == record.n_workers:
            send_round_complete(services.state, services.queues, job_id, round_index, spec.training.reducers)
        logger.info("task already recorded", extra={**ids, "workers_done": len(done)})
        return None

    if worker not in context.shards:
        context.shards[worker] = datasets.load_shard(store, job_id, manifest, worker)
    shard = context.shards[worker]
    params, _ = read_round_state(store, job_id, round_index)
    model = build_model(spec, manifest)
    mode = get_training_mode(spec, model)

    progress_path = _progress_path(store, job_id, round_index, worker)
    progress, link, earlier_seconds = _load_worker_progress(store, progress_path, task.get("continuation"),
                                                            message_id)
    if progress is None:
        progress = mode.begin(spec, manifest, model, params, shard, round_index, worker)

    budget = InvocationBudget(remaining_millis, services.settings)
    finished = False
    while not finished:
        if budget.exhausted():
            spent = earlier_seconds + time.monotonic() - task_started
            store.write_arrays(progress_path, {**progress, "_next": np.int64(link + 1), "_writer": np.str_(message_id),
                                               "_seconds": np.float64(spent)})
            faults.maybe_fail("worker.after_progress", **ids)
            services.queues.send_task(job_id, round_index, worker, continuation=link + 1)
            services.state.record_progress(job_id, round_index)
            logger.info("task continues", extra={**ids, "continuation": link + 1, "steps": budget.steps})
            return None
        progress, finished = mode.advance(spec, manifest, model, params, shard, round_index, worker, progress)
        budget.count_step()
    result = mode.finish(progress)

    write_worker_result(store, job_id, round_index, worker, mode, result)
    faults.maybe_fail("worker.after_write", **ids)

    # The worker's time over every link of its chain, and the links after the first, for
    # the round's cost estimate (shared/cost.py).
    task_seconds = earlier_seconds + time.monotonic() - task_started
    usage = {"worker_seconds": task_seconds, "worker_gb_seconds": cost.gb_seconds(task_seconds),
             "worker_continuations": link}
    newly_added, done = services.state.record_worker_done(job_id, round_index, worker, usage)
    faults.maybe_fail("worker.after_record", **ids)

    # The delivery that completed the set sends the aggregate (or reduce) messages. A retry
    # that finds the set already complete sends them again above, which covers a crash
    # between the record and the send. The aggregator and the reducers drop the duplicates.
    if len(done) == record.n_workers:
        send_round_complete(services.state, services.queues, job_id, round_index, spec.training.reducers)
    logger.info("task done", extra={**ids, "newly_recorded": newly_added, "workers_done": len(done),
                                    "continuations": link})
    return result


# Aggregator ------------------------------------------------------------------------------

# Validation rows evaluated per aggregator step. A constant, like the gradient chunk size,
# so the metrics do not depend on where an invocation happened to stop.
VALIDATION_CHUNK_ROWS = 65536


def _early_message(job_id: str, round_index: int, done: int, n_workers: int, kind: str) -> str:
    """Return why an aggregate or reduce message that came before its round's results is dropped.

    The round item is read consistently, and the worker whose record completes the set
    sends these messages only after that record, so Baton itself never sends one early.
    """
    return (f"{kind} message for round {round_number(round_index)} of job {job_id}, which has {done} of {n_workers} "
            "results; dropped, because the worker that records the last result sends it (and the watchdog "
            "re-sends it if it is lost)")


def _check_aggregate_is_current(services: Services, job_id: str, round_index: int):
    """Return the job's item and the round's usage totals; raise unless the round is ready to aggregate."""
    record, round_state = services.state.get_job_and_round(job_id, round_index)
    done = round_state.done
    if record is not None and record.round == round_index + 1:
        if round_state.has_metrics:
            # The aggregator stores the metrics after it sends the next tasks, so they were
            # sent. Dropping this copy, rather than sending them again, is what keeps a
            # duplicate from multiplying: each re-sent task of a complete round sends
            # another aggregate message.
            raise StaleMessageError(f"round {round_index} of job {job_id} was already aggregated; dropped")
        # The delivery that advanced this round stopped before it stored the metrics, so
        # maybe before it sent the next tasks: send them again (workers drop duplicates),
        # then store the metrics, which marks them sent. The metrics are stored whatever
        # the job's status, since a pause or cancel may have come in between.
        resent = record.status == RUNNING
        if resent:
            services.queues.send_tasks(job_id, record.round, list(range(record.n_workers)))
        _store_saved_metrics(services, job_id, round_index)
        raise StaleMessageError(f"round {round_index} of job {job_id} was already aggregated; "
                                + (f"re-sent round {record.round} tasks" if resent else f"job is {record.status}"))
    if record is None or record.status != RUNNING:
        raise StaleMessageError(f"job {job_id} is {'missing' if record is None else record.status}")
    if record.round != round_index:
        raise StaleMessageError(f"round {round_index} of job {job_id} is not current (job at round {record.round})")
    if len(done) != record.n_workers:
        raise StaleMessageError(_early_message(job_id, round_index, len(done), record.n_workers, "aggregate"))
    reducers = services.job_context(job_id).spec.training.reducers
    if reducers > 1:
        reduced = round_state.reduced
        if len(reduced) != reducers:
            # Only the reducer that completes the set sends the aggregate message, so this
            # one came early (a resume, a stray copy): re-send what is missing and drop it.
            sent = send_round_complete(services.state, services.queues, job_id, round_index, reducers)
            raise StaleMessageError(f"round {round_index} of job {job_id} has {len(reduced)} of {reducers} reduced "
                                    f"slices; re-sent {sent}, and the last reducer sends the aggregate message")
    return record, round_state.usage


def _store_saved_metrics(services: Services, job_id: str, round_index: int) -> None:
    """Store the metrics file of an advanced round in its round item, which lacks them.

    The aggregator stores a round's metrics in DynamoDB after sending the next tasks, so a
    delivery that stopped in between left them only in the file it wrote before advancing.
    """
    ids = {"job_id": job_id, "round": round_index}
    path = services.store.metrics_path(job_id, round_index)
    if not path.exists():
        logger.warning("round metrics not found in DynamoDB or on EFS; the round stays without them",
                       extra={**ids, "path": str(path)})
        return
    services.state.put_round_metrics(job_id, round_index, services.store.read_json(path))
    logger.info("stored the metrics of an advanced round from EFS", extra=ids)


def _load_aggregate_progress(store: EfsStore, path: Path, continuation: int | None,
                             message_id: str) -> tuple[dict, int, float]:
    """Return the aggregator's saved progress of a round (empty to begin), this link's
    number, and the seconds the earlier links of the chain took."""
    if not path.exists():
        return {}, continuation or 0, 0.0
    saved = store.read_json(path)
    link = _chain_position(saved.pop("next"), saved.pop("writer"), continuation, message_id)
    if link is None:
        raise StaleMessageError(f"aggregate continuation {continuation} is a duplicate of an earlier link; dropped")
    # Absent from progress files that an earlier version of Baton wrote.
    return saved, link, float(saved.pop("seconds", 0.0))


def _combine_metrics(partials: list[dict]) -> dict[str, float]:
    """Return validation metrics from per-chunk metrics, weighting each chunk by its rows."""
    if len(partials) == 1:
        return dict(partials[0]["metrics"])
    total_rows = sum(partial["rows"] for partial in partials)
    # NOTE: a row-weighted mean is exact for mean metrics (loss, accuracy) but only an
    # approximation of r2 when the validation set spans several chunks.
    names = partials[0]["metrics"].keys()
    return {name: sum(partial["metrics"][name] * partial["rows"] for partial in partials) / total_rows for name in names}


def aggregate_round(services: Services, message: AggregateMessage, message_id: str = "",
                    remaining_millis: Callable[[], int] | None = None) -> dict | None:
    """Combine a complete round, update the weights, and start the next round or finish.

    The work runs as steps that each leave a checkpoint on EFS: combining the results
    (writes the next round's state), evaluating each chunk of validation rows, and the
    commit (the metrics file, then the advance and the next tasks, or the finish). Between
    steps the aggregator may save its progress and continue in a new invocation.

    Parameters
    ----------
    services : Services
    message : AggregateMessage
        The round to aggregate, and the link of a continuation chain when it is one.
    message_id : str
        The SQS message id, saved with the progress, so a redelivery of the link that saved it runs again.
    remaining_millis : callable, optional
        Returns the invocation's remaining time; without it the steps never stop early.

    Returns
    -------
    dict or None
        The round's metrics, or None when the invocation continues in another one.
    """
    job_id, round_index = message["job_id"], message["round"]
    ids = {"job_id": job_id, "round": round_index}
    store, state = services.store, services.state
    record, usage_totals = _check_aggregate_is_current(services, job_id, round_index)
    faults.maybe_fail("aggregator.before_read", **ids)

    started = time.monotonic()
    context = services.job_context(job_id)
    spec, manifest = context.spec, context.manifest
    model, optimizer = build_model(spec, manifest), build_optimizer(spec)
    mode = get_training_mode(spec, model)
    next_round = round_index + 1

    progress_path = _progress_path(store, job_id, round_index, None)
    progress, link, earlier_seconds = _load_aggregate_progress(store, progress_path, message.get("continuation"),
                                                               message_id)
    validation = context.load_validation(store, job_id)
    n_chunks = 0 if validation is None else -(-validation.n_rows // VALIDATION_CHUNK_ROWS)
    progress.setdefault("partials", [])
    budget = InvocationBudget(remaining_millis, services.settings)

    def continue_later() -> None:
        store.write_json(progress_path, {**progress, "next": link + 1, "writer": message_id,
                                         "seconds": earlier_seconds + time.monotonic() - started})
        faults.maybe_fail("aggregator.after_progress", **ids)
        services.queues.send_aggregate(job_id, round_index, continuation=link + 1)
        state.record_progress(job_id, round_index)
        logger.info("aggregation continues", extra={**ids, "continuation": link + 1, "steps": budget.steps})

    # Step 1: combine the results into the next round's state. A later invocation of the
    # same round reads that state back from EFS instead.
    new_params = None
    if "train_loss" not in progress:
        update = _combine_round(services.store, spec, record, mode, model, optimizer, round_index)
        write_round_state(store, job_id, next_round, update.params, update.optimizer_state)
        faults.maybe_fail("aggregator.after_write", **ids)
        progress["train_loss"], progress["n_samples"] = float(update.train_loss), int(update.n_samples)
        new_params = update.params
        budget.count_step()

    # Step 2: evaluate the new parameters on the validation rows, one chunk per step.
    while len(progress["partials"]) < n_chunks:
        if budget.exhausted():
            continue_later()
            return None
        if new_params is None:
            new_params, _ = read_round_state(store, job_id, next_round)
        progress["partials"].append(_validation_chunk(model, params_in_target_units(model, manifest, new_params),
                                                      validation, len(progress["partials"])))
        budget.count_step()

    if budget.exhausted():
        continue_later()
        return None

    # Step 3: commit the round.
    metrics = _round_metrics(mode, spec, manifest, round_index, progress)
    metrics["aggregate_seconds"] = earlier_seconds + time.monotonic() - started
    metrics.update(cost.account_round(
        store, record, usage_totals, round_index, spec.training.batch_size, manifest["n_features"],
        validation_bytes=0 if validation is None else cost.array_bytes(validation.X),
        aggregate_seconds=metrics["aggregate_seconds"], reducers=spec.training.reducers,
        aggregate_continuations=link))
    store.write_json(store.metrics_path(job_id, round_index), metrics)
    faults.maybe_fail("aggregator.after_metrics", **ids)

    stop_reason = _stop_reason(store, spec, record, job_id, round_index, metrics)
    summary = job_summary(metrics)
    publish_round_metrics(job_id, round_index, metrics)

    if stop_reason is not None:
        if new_params is None:
            new_params, _ = read_round_state(store, job_id, next_round)
        write_final_model(services, job_id, model, new_params, next_round, metrics, stop_reason)
        if services.settings.models_bucket:
            summary["model_uri"] = upload_model(services.s3, services.settings.models_bucket, store, job_id)
        faults.maybe_fail("aggregator.before_finish", **ids)
        # Pruned before the finish, so a finished job keeps as many round folders as a
        # running one even when this delivery stops here. Its retry reads only rounds r
        # and r + 1, which stay.
        store.prune_rounds(job_id, next_round, services.settings.keep_checkpoints)
        # Before the finish: messages of a finished job are dropped, so no retry would
        # store the metrics afterwards.
        state.put_round_metrics(job_id, round_index, metrics)
        if state.finish_job(job_id, round_index, {**summary, "stop_reason": stop_reason}):
            logger.info("job succeeded", extra={**ids, **summary})
        return metrics

    advanced = state.advance_round(job_id, round_index, summary)
    faults.maybe_fail("aggregator.after_advance", **ids)
    if advanced:
        services.queues.send_tasks(job_id, next_round, list(range(record.n_workers)))
        # After the send, so the next round's workers do not wait for it. A retry of a
        # delivery that stopped before this line finds the round advanced and stores the
        # metrics from EFS (_check_aggregate_is_current).
        state.put_round_metrics(job_id, round_index, metrics)
        store.prune_rounds(job_id, next_round, services.settings.keep_checkpoints)
    logger.info("round aggregated", extra={**ids, "advanced": advanced, "continuations": link, **summary})
    return metrics


def _combine_round(store: EfsStore, spec: JobSpec, record: JobRecord, mode, model, optimizer,
                   round_index: int) -> RoundUpdate:
    """Return the next parameters and optimizer state from the round's worker results, or its reduced slices."""
    job_id = spec.job_id
    params, optimizer_state = read_round_state(store, job_id, round_index)
    reducers = spec.training.reducers
    if reducers > 1:
        reduction = read_reduced_round(store, job_id, round_index, reducers, model.n_params)
    else:
        reduction = reduce_worker_results(store, job_id, round_index, record.n_workers, mode, model.n_params,
                                          0, model.n_params)
    return mode.step(spec, model, optimizer, params, optimizer_state, reduction, round_index)


def _validation_chunk(model, params: np.ndarray, validation: "datasets.Shard", chunk: int) -> dict:
    """Return the metrics of ``params`` on validation chunk ``chunk`` and its row count, as progress stores them."""
    start = chunk * VALIDATION_CHUNK_ROWS
    stop = min(start + VALIDATION_CHUNK_ROWS, validation.n_rows)
    chunk_metrics = model.metrics(params, validation.rows(slice(start, stop)), np.asarray(validation.y[start:stop]))
    return {"rows": stop - start, "metrics": {name: float(value) for name, value in chunk_metrics.items()}}


def _round_metrics(mode, spec: JobSpec, manifest: dict, round_index: int, progress: dict) -> dict:
    """Return a round's training and validation metrics from the aggregator's progress.

    Raises
    ------
    DivergenceError
        If a validation metric is NaN or infinite.
    """
    metrics = {
        "round": round_number(round_index),
        "epoch": mode.epochs_after_round(spec, manifest, round_index),
        "train_loss": progress["train_loss"],
        "n_samples": progress["n_samples"],
    }
    if progress["partials"]:
        for name, value in _combine_metrics(progress["partials"]).items():
            metrics[f"validation_{name}"] = value
        check_validation_finite(round_index, metrics)
    metrics["loss"] = metrics.get("validation_loss", progress["train_loss"])
    return metrics


def _stop_reason(store: EfsStore, spec: JobSpec, record: JobRecord, job_id: str, round_index: int,
                 metrics: dict) -> str | None:
    """Return why the job stops after this round, or None when it goes on.

    The reasons are a stopping rule of the spec (``target_loss``, ``target_accuracy``,
    ``early_stopping``), the round limit (``max_rounds`` or ``max_epochs``, whichever set
    it) and ``budget``. The stopping state (best validation loss and its round) is stored
    in the round folders, so a retried or resumed aggregation reads the same history.
    """
    stopping_path = store.round_dir(job_id, round_index) / "stopping.json"
    previous = StoppingState.from_dict(datasets.read_job_json(store, stopping_path, problem_of=_object_problem)
                                       if stopping_path.exists() else None)
    stopping, stop_rule = check_stopping(spec, metrics, previous)
    store.write_json(store.round_dir(job_id, round_index + 1) / "stopping.json", stopping.to_dict())
    if stop_rule is not None:
        return stop_rule
    if round_index + 1 >= record.total_rounds:
        return "max_rounds" if record.total_rounds == spec.training.max_rounds else "max_epochs"
    if spec.training.budget_usd is not None and metrics["total_cost_usd"] >= spec.training.budget_usd:
        return "budget"
    return None


# Reducer ---------------------------------------------------------------------------------


def reduce_slice(services: Services, message: AggregateMessage, message_id: str = "") -> Reduction | None:
    """Sum one slice of a complete round's worker results and record it (scatter-reduce).

    Reducer ``k`` of ``training.reducers`` R reads parameters
    ``[k * d // R, (k + 1) * d // R)`` of every worker's result vector, in worker order,
    writes ``reduced-<k>.npy``, and adds ``k`` to the round's reduced set. The delivery
    that completes the set sends the aggregate message. A duplicate finds its slice
    recorded and only re-sends the aggregate message when the set is complete. A retry
    after a crash before the record writes the same bytes again.

    Returns the slice's reduction, or None when the slice was already recorded.

    Raises
    ------
    StaleMessageError
        The job is not running or the round is not the current one.
    InvalidMessageError
        The slice index is outside ``[0, training.reducers)``.
    """
    job_id, round_index, slice_index = message["job_id"], message["round"], message["reduce"]
    ids = {"job_id": job_id, "round": round_index, "reduce": slice_index}
    started = time.monotonic()
    store, state = services.store, services.state
    record, done = _check_round_is_current(services, job_id, round_index)
    context = services.job_context(job_id)
    spec, manifest = context.spec, context.manifest
    reducers = spec.training.reducers
    if reducers == 1:
        raise InvalidMessageError(f"reduce message for job {job_id}, which sums in its aggregator "
                                  "(training.reducers is 1); dropped")
    if not 0 <= slice_index < reducers:
        raise InvalidMessageError(f"reduce message names slice {slice_index} but job {job_id} has {reducers} reducers")
    if len(done) != record.n_workers:
        raise StaleMessageError(_early_message(job_id, round_index, len(done), record.n_workers, "reduce"))
    faults.maybe_fail("reducer.before_read", **ids)

    reduced = state.get_reduced_slices(job_id, round_index)
    if slice_index in reduced:
        if len(reduced) == reducers:
            services.queues.send_aggregate(job_id, round_index)
        logger.info("slice already reduced", extra={**ids, "slices_done": len(reduced)})
        return None

    model = build_model(spec, manifest)
    mode = get_training_mode(spec, model)
    start, stop = slice_bounds(model.n_params, reducers, slice_index)
    # NOTE: a reducer runs as one step, without the continuation the other handlers have.
    # It reads 1/R of what the single aggregator's combine step reads, and that step too
    # runs whole in one invocation, so a reducer never needs more time than R = 1 does.
    reduction = reduce_worker_results(store, job_id, round_index, record.n_workers, mode, model.n_params,
                                      start, stop)
    write_reduced_slice(store, job_id, round_index, slice_index, reduction)
    faults.maybe_fail("reducer.after_write", **ids)

    seconds = time.monotonic() - started
    usage = {"reducer_seconds": seconds, "reducer_gb_seconds": cost.gb_seconds(seconds)}
    newly_added, reduced = state.record_slice_reduced(job_id, round_index, slice_index, usage)
    faults.maybe_fail("reducer.after_record", **ids)

    # As with workers: the delivery that completes the set sends the aggregate message,
    # and a retry that finds its slice recorded sends it again above.
    if len(reduced) == reducers:
        services.queues.send_aggregate(job_id, round_index)
    logger.info("slice reduced", extra={**ids, "newly_recorded": newly_added, "slices_done": len(reduced),
                                        "parameters": [start, stop], "seconds": round(seconds, 3)})
    return reduction


def handle_aggregate_message(services: Services, message: AggregateMessage, message_id: str = "",
                             remaining_millis: Callable[[], int] | None = None):
    """Run a message of the aggregate queue: a reduce message or an aggregate message."""
    if "reduce" in message:
        return reduce_slice(services, message, message_id)
    return aggregate_round(services, message, message_id, remaining_millis)


def write_final_model(services: Services, job_id: str, model, params: np.ndarray, rounds_done: int, metrics: dict,
                      stop_reason: str) -> None:
    """Store the final parameters and a JSON description of the model on EFS.

    The parameters are stored in the targets' own units, also when the job trained on
    standardised targets (:func:`~shared.target_scaling.params_in_target_units`). When the
    data was standardised, the training statistics are copied beside the
    parameters (``model/standardize.npz``), so the model folder alone predicts from raw
    features: ``(x - mean) / scale``, without ``- mean`` when ``centered`` is false.
    """
    store = services.store
    context = services.job_context(job_id)
    model_dir = store.model_dir(job_id)
    store.write_npy(model_dir / "params.npy", params_in_target_units(model, context.manifest, params))
    statistics_path = store.data_dir(job_id) / "standardize.npz"
    standardized = statistics_path.exists()
    if standardized:
        store.write_arrays(model_dir / "standardize.npz", store.read_arrays(statistics_path))
    store.write_json(model_dir / "model.json", {
        "job_id": job_id,
        "model": context.spec.to_dict()["model"],
        "n_features": model.n_features,
        "classes": context.manifest["classes"],
        "standardized": standardized,
        "rounds": rounds_done,
        "stop_reason": stop_reason,
        "final_metrics": metrics,
    })
