"""The starter's step: validate a job message, prepare its data and start its first round.

A job whose earlier run left files on EFS finishes from that run's model or goes on from
its rounds (:mod:`shared.earlier_runs`). The starter also makes the repairs that
``baton resume`` asks for (:mod:`shared.repair`): it prepares a job's shards again, or
takes the job back to an earlier round.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from shared import faults, repair, shards
from shared.earlier_runs import (RUN_RECORD, continuation_round, finished_on_efs, run_identity,
                                 set_aside_earlier_run)
from shared.efs import EfsStore, read_job_json
from shared.errors import DataError, JobConflictError, JobSpecError, PermanentError, StaleMessageError
from shared.model_bucket import upload_model
from shared.preparation import (PreparationStep, StaleStepError, begin_attempt, record_sent, run_preparation,
                                s3_object_etag)
from shared.queues import body_object
from shared.reduction import check_reducers
from shared.round_files import metrics_problem, model_info_problem, write_round_state
from shared.services import Services
from shared.source_files import FIX
from shared.spec import JobSpec, derive_job_id, load_job_message, parse_job_spec
from shared.state import (CONTINUED_FROM, PREPARATION_ATTEMPT, PREPARING, RUNNING, SUCCEEDED, JobRecord,
                          can_record_job, job_item_fields)
from shared.training import (build_model, build_model_for_preparation, build_optimizer, check_model_fits,
                             get_training_mode, round_number)

logger = logging.getLogger(__name__)


def start_job(services: Services, body: str, message_id: str) -> str:
    """Validate a job message, prepare its data and send its first round of tasks.

    Returns the job id. A message without a ``job_id`` gets one derived from its SQS
    message id, which stays the same across redeliveries. A message
    ``{"job_id", "prepare": {...}}`` is one step of a preparation split over several
    invocations (see :mod:`shared.preparation`); the step that completes the data
    starts round 0. A message ``{"job_id", "repair": {...}}`` makes the repair that
    ``baton resume`` asked for (:func:`_run_repair`).

    Raises
    ------
    JobSpecError, DataError, JobConflictError
        Permanent: the caller marks the job failed and drops the message.
    """
    repair_body = _repair_message(body)
    if repair_body is not None:
        message = repair.RepairMessage.from_body(repair_body)
        _run_repair(services, message)
        return message.job_id

    step_message = _preparation_step_message(body)
    if step_message is not None:
        job_id = step_message["job_id"]
        record = services.state.get_job(job_id)
        if record is None or record.status != "PREPARING":
            raise StaleMessageError(f"preparation message for job {job_id}, which is "
                                    f"{'missing' if record is None else record.status}")
        spec = parse_job_spec(read_job_json(services.store, services.store.spec_path(job_id)))
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
    if record.repair is not None:
        # Its preparation would remove the data before the repair checks the sources.
        raise StaleMessageError(f"job {spec.job_id} is PREPARING for its {record.repair} repair, which its own "
                                "message carries; dropping a redelivered job message")

    store = services.store
    _check_job_dir_usable(store, spec.job_id)
    _check_no_foreign_files(store, spec)
    store.write_json(store.spec_path(spec.job_id), spec.to_dict())
    # A resume of a job that failed in preparation counts a new attempt, which starts over.
    begin_attempt(store, spec.job_id, int(record.attributes.get(PREPARATION_ATTEMPT, 0)))
    # A job item created now, beside preparation progress on EFS, means the state table is
    # newer than the files, as after a new local stack or a redeployed stack. The step
    # messages of that progress went with the old queues, so this message carries it on,
    # and it prepares the shards again if they were deleted or replaced meanwhile.
    _prepare_and_start(services, spec, None, continue_saved=created, rebuild_damaged_shards=created)
    return spec.job_id


def _check_job_dir_usable(store: EfsStore, job_id: str) -> None:
    """Raise :class:`DataError` if the job's folder leads outside the EFS root, or a file is in its place.

    Either would fail every retry of the job message in the same way, so the job fails at once.
    """
    job_dir = store.job_dir(job_id)
    if not store.is_under_root(job_dir):
        raise DataError(f"job_id '{job_id}': the folder jobs/{job_id} on EFS leads outside the EFS root through a "
                        "symbolic link, and Baton writes only under the EFS root; remove the link or choose another "
                        "job_id")
    for folder in (job_dir.parent, job_dir):
        if folder.exists() and not folder.is_dir():
            raise DataError(f"job_id '{job_id}': '{folder.relative_to(store.root)}' on EFS is a file, but Baton keeps "
                            f"the job's files in a folder of that name; move the file away, then run "
                            f"`baton resume {job_id}`")


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
                        "if the earlier run had it, so that the job goes on from its rounds, or choose a new job_id"
                        ) from error
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
    if _preparation_step_message(body) is not None or _repair_message(body) is not None:
        # A step of a preparation already under way, or a repair, belongs to the job that sent it.
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


def _repair_message(body: str) -> dict | None:
    """Return the decoded body if it is a repair message, else None.

    A repair message has the fields ``job_id`` and ``repair`` only, so a job spec with a
    stray ``repair`` field is rejected as a spec, naming the field.
    """
    message = body_object(body)
    if message is not None and set(message) == {"job_id", "repair"} and isinstance(message["job_id"], str):
        return message
    return None


def _run_repair(services: Services, message: repair.RepairMessage) -> None:
    """Make the repair that ``message`` names, if it is still the job's pending repair.

    A shards repair checks the sources before it removes the prepared data. Then it
    prepares the data again in as many steps as a new job would, and the step that
    completes the data ends the repair (:func:`_prepare_and_start`). A round_state repair
    ends here.

    Raises
    ------
    DataError
        If the repair cannot be made: a source changed, or no round state is intact.
    StaleMessageError
        If the message's repair is not the job's pending one.
    """
    store = services.store
    record = repair.current_repair(services.state, services.queues, message)
    spec = parse_job_spec(read_job_json(store, store.spec_path(message.job_id)))
    if message.kind == repair.ROUND_STATE:
        repair.rewind_to_intact_round(services, spec, record)
        return
    repair.check_sources_unchanged(store, spec.job_id, lambda uri: s3_object_etag(uri, services.s3))
    # The copies of s3:// sources stay, as their ETags were just checked: a new copy would
    # have another inode, and so another data identity than run.json records.
    begin_attempt(store, spec.job_id, record.preparation_attempt, keep_source_copies=True)
    _prepare_and_start(services, spec, None)


def _prepare_and_start(services: Services, spec: JobSpec, step: PreparationStep | None,
                       continue_saved: bool = False, rebuild_damaged_shards: bool = False) -> None:
    """Run preparation from ``step``; once the data is ready, write round 0 and send its tasks.

    ``continue_saved`` and ``rebuild_damaged_shards`` are passed on to
    :func:`~shared.preparation.run_preparation`.
    """
    store = services.store
    try:
        outcome = run_preparation(store, spec, build_model_for_preparation(spec), step, continue_saved=continue_saved,
                                  rebuild_damaged_shards=rebuild_damaged_shards)
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
    check_model_fits(model, services.settings.worker_memory_mb, services.settings.aggregator_memory_mb)
    check_reducers(spec.training.reducers, model.n_params)
    optimizer = build_optimizer(spec)
    mode = get_training_mode(spec, model)
    rounds = mode.total_rounds(spec, manifest)
    record = services.state.get_job(spec.job_id)
    if record is None or record.status != PREPARING:
        # Cancelled while the data was prepared: round 0 does not start.
        raise StaleMessageError(f"job {spec.job_id} is {'missing' if record is None else record.status}; "
                                "its round 0 does not start")
    if record.repair == repair.SHARDS:
        # The data was prepared again for a job that has trained rounds: it goes on from its round.
        repair.finish_shard_rebuild(services, spec, record)
        return
    if record.repair is not None:
        raise StaleMessageError(f"job {spec.job_id} is PREPARING for its {record.repair} repair; a preparation "
                                "message does not start it")
    identity = run_identity(store, spec)
    if finished_on_efs(store, spec.job_id, identity, model.n_params):
        _finish_from_earlier_run(services, spec, rounds)
        return
    first_round = continuation_round(store, spec.job_id, rounds, identity)
    if first_round > 0:
        summary = {CONTINUED_FROM: first_round, **_backfill_round_metrics(services, spec, first_round)}
        _start_rounds(services, spec, rounds, first_round, summary)
        return
    params = mode.initial_params(
        spec, manifest, model, lambda max_rows: shards.load_training_sample(store, spec.job_id, manifest, max_rows))
    set_aside_earlier_run(store, spec.job_id)
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


def _finish_from_earlier_run(services: Services, spec: JobSpec, total_rounds: int) -> None:
    """Record as SUCCEEDED a job whose earlier run finished on EFS, without training it again.

    Training is deterministic, so the same spec on the same data would train the same
    model. The model is copied to the models bucket, when the stack has one, as the
    aggregator that finishes a job does, and the job item gets the earlier run's rounds,
    stop reason and metrics.
    """
    store, job_id = services.store, spec.job_id
    model_info_path = store.model_dir(job_id) / "model.json"
    model_info = read_job_json(store, model_info_path, problem_of=model_info_problem)
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
        metrics = read_job_json(store, last_path, problem_of=metrics_problem)
    metrics_by_round[rounds_done - 1] = metrics
    services.state.put_earlier_round_metrics(job_id, metrics_by_round)
    logger.warning("an earlier run's metrics were stored in the table", extra={
        "job_id": job_id, "rounds": rounds_done, "rounds_without_metrics_in_table": skipped})
    return job_item_fields(metrics)
