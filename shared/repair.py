"""Repairs that ``baton resume`` makes before a job runs again: rebuilt shards, or a rewind.

A worker or aggregator that finds a prepared shard file missing, damaged or replaced
raises :class:`~shared.errors.DamagedShardError`, and one that finds the current round's
state file damaged raises :class:`~shared.errors.DamagedRoundStateError`. The handler fails
the job and stores the error's ``repair`` on the job item. ``baton resume`` then moves the
job from FAILED to PREPARING, counts a ``repair_attempt`` and sends the starter a repair
message ``{"job_id", "repair": {"kind", "attempt"}}``, which runs here:

shards
    check that no data source changed since the preparation, and remove the prepared
    data. Prepare it again through the usual steps, which give the same split and the
    same bytes. Check that the data identity in ``run.json`` still holds, then move the
    job to RUNNING at the same round.
round_state
    find the latest round, at or before the current one, whose state and stopping files
    are intact. Remove the progress, result and reduced files of that round and the later
    ones, their metrics files and their round items. Then move the job to RUNNING at
    that round.

Training is deterministic per seed, round and worker, so the job ends with the weights of
a run without the fault. Every step above is idempotent, and the move back to RUNNING is
a conditional write on the status, the repair, its attempt and the round, so a repeated
resume or a redelivered message repairs the job once. A repair that cannot be made (a
changed source, no intact round state) fails the job again with the reason, and the job
keeps its pending repair and its files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from shared import source_files
from shared.earlier_runs import RUN_RECORD, run_identity
from shared.efs import EfsStore, read_job_json
from shared.errors import (DamagedRoundStateError, DamagedShardError, DataError, InvalidMessageError,
                           StaleMessageError)
from shared.preparation import recorded_sources
from shared.queues import QueueClient
from shared.round_files import metrics_problem, round_start_problem, state_shapes
from shared.services import Services
from shared.source_files import FIX
from shared.spec import JobSpec
from shared.state import PREPARING, RUNNING, JobRecord, StateStore, job_item_fields
from shared.training import build_model, build_optimizer
from shared.worker import kick_round

logger = logging.getLogger(__name__)

SHARDS = DamagedShardError.repair
ROUND_STATE = DamagedRoundStateError.repair
KINDS = (SHARDS, ROUND_STATE)

# The job item's fields that show the latest round's metrics (shared.state.job_item_fields),
# cost_usd aside.
_METRIC_FIELDS = ("epoch", "train_loss", "validation_loss", "validation_accuracy", "validation_r2")


@dataclass(frozen=True)
class RepairMessage:
    """The jobs-queue message that requests repair attempt ``attempt`` of a job from the starter."""

    job_id: str
    kind: str
    attempt: int

    def to_body(self) -> dict:
        return {"job_id": self.job_id, "repair": {"kind": self.kind, "attempt": self.attempt}}

    @classmethod
    def from_body(cls, message: dict) -> "RepairMessage":
        """Return the repair message of a decoded body that has a ``repair`` field.

        Raises
        ------
        InvalidMessageError
            If the ``repair`` field is not ``{"kind": <kind>, "attempt": <int of 1 or more>}``.
        """
        repair = message.get("repair")
        attempt = repair.get("attempt") if isinstance(repair, dict) else None
        valid_attempt = isinstance(attempt, int) and not isinstance(attempt, bool) and attempt >= 1
        if not (isinstance(repair, dict) and repair.get("kind") in KINDS and valid_attempt):
            raise InvalidMessageError(f"malformed repair message {message!r}; expected {{'job_id': ..., 'repair': "
                                      f"{{'kind': one of {list(KINDS)}, 'attempt': <int of 1 or more>}}}}; dropped")
        return cls(message["job_id"], repair["kind"], repair["attempt"])


def current_repair(state: StateStore, queues: QueueClient, message: RepairMessage) -> JobRecord:
    """Return the job item if ``message`` is the job's pending repair; raise StaleMessageError otherwise.

    A message of a repair that already ended re-sends what the job's current round is
    missing before it is dropped. It may be a retry after a crash between the job's move
    back to RUNNING and the send of its tasks, or a duplicate. Workers drop tasks that ran.
    """
    record = state.get_job(message.job_id)
    if record is None:
        raise StaleMessageError(f"repair message for job {message.job_id}, which does not exist")
    if record.status == PREPARING and record.repair == message.kind and record.repair_attempt == message.attempt:
        return record
    if record.status == RUNNING and record.repair is None and record.repair_attempt == message.attempt:
        sent = kick_round(state, queues, record)
        raise StaleMessageError(f"repair {message.attempt} of job {message.job_id} has ended; re-sent {sent}")
    raise StaleMessageError(f"repair {message.attempt} ({message.kind}) of job {message.job_id} is not the job's "
                            f"pending repair (job {record.status}, repair {record.repair}, attempt "
                            f"{record.repair_attempt}); dropped")


def check_sources_unchanged(store: EfsStore, job_id: str, s3_etag: Callable[[str], str | None]) -> None:
    """Raise :class:`DataError` if a data source of the job changed since its preparation recorded it.

    Shards prepared from a changed source would not be the data the job's rounds were
    trained on, so the job cannot go on with them. ``s3_etag(uri)`` returns an ``s3://``
    object's current ETag.
    """
    changed = source_files.find_source_change(recorded_sources(store, job_id), s3_etag)
    if changed is None:
        return
    record, change = changed
    raise DataError(f"job '{job_id}' cannot prepare its shards again: {source_files.describe_source(record)} changed "
                    f"after the job prepared its shards from it ({change}), and the job's rounds were trained on the "
                    f"file as it was. Nothing was deleted. To train on the file as it is now, {FIX}")


def finish_shard_rebuild(services: Services, spec: JobSpec, record: JobRecord) -> None:
    """End a shards repair whose preparation just finished: RUNNING again at the job's round, and its tasks sent.

    Raises
    ------
    DataError
        If the prepared data's identity differs from the one ``run.json`` records for the
        job's rounds, for example because a source changed while the preparation ran.
    """
    store, job_id = services.store, spec.job_id
    identity = run_identity(store, spec)
    try:
        recorded = store.read_json(store.job_dir(job_id) / RUN_RECORD)
    except (OSError, ValueError):
        # NOTE: a job started before run.json existed, or whose run.json is damaged, is
        # checked only by its source records, before the shards were removed.
        recorded = None
    if isinstance(recorded, dict) and recorded.get("data_sha256") != identity["data_sha256"]:
        raise DataError(f"job '{job_id}' prepared its shards again, but the data differs from the data its rounds "
                        f"were trained on ('{RUN_RECORD}' records another data identity), so the job cannot go on "
                        f"with them; a data source most likely changed while the shards were prepared. To train on "
                        f"the data as it is now, {FIX}")
    _end_repair(services, record, record.round)


def rewind_to_intact_round(services: Services, spec: JobSpec, record: JobRecord) -> None:
    """Make a round_state repair: go back to the latest intact round state and run the rounds from there again.

    Raises
    ------
    DataError
        If no kept round, at or before the job's current round, has an intact state file
        and stopping state.
    """
    store, job_id = services.store, spec.job_id
    shapes = state_shapes(build_model(spec, services.job_context(job_id).manifest).n_params, build_optimizer(spec))
    target = find_intact_round(store, job_id, record.round, shapes, services.settings.keep_checkpoints)
    clear_rounds_from(store, job_id, target)
    # Round record.round + 1 too: an aggregation of the current round may have stored its
    # sets or metrics before the damaged state stopped it.
    services.state.delete_round_items(job_id, range(target, record.round + 2))
    summary, removed = _summary_before(store, job_id, target)
    _end_repair(services, record, target, summary, removed)


def find_intact_round(store: EfsStore, job_id: str, current_round: int, shapes: dict[str, tuple[int, ...]],
                      keep_checkpoints: int) -> int:
    """Return the latest round, at or before ``current_round``, whose folder can start the round again.

    Its state file must pass the checks of :func:`~shared.round_files.read_round_state` for
    the job's ``shapes`` (:func:`~shared.round_files.state_shapes`), and a round after the
    first needs the ``stopping.json`` that its aggregation reads.

    Raises
    ------
    DataError
        Naming each kept round and what is wrong with it, when none qualifies.
    """
    rounds_dir = store.job_dir(job_id) / "rounds"
    kept_rounds = [int(entry.name) for entry in rounds_dir.iterdir() if entry.name.isdigit()] \
        if rounds_dir.is_dir() else []
    problems = []
    for round_index in sorted((index for index in kept_rounds if index <= current_round), reverse=True):
        problem = round_start_problem(store, job_id, round_index, shapes)
        if problem is None:
            return round_index
        problems.append(f"'rounds/{round_index}': {problem}")
    found = "; ".join(problems) if problems else "no round folder is left"
    raise DataError(f"job '{job_id}' has no intact round state to go back to ({found}). Baton keeps the folders of "
                    f"the last {keep_checkpoints} rounds (KEEP_CHECKPOINTS), so the rounds before them cannot be "
                    f"trained from again; {FIX}")


def _is_round_output(name: str) -> bool:
    """Return whether a round folder's file ``name`` is one that running the round again writes anew.

    The state and the stopping state are not: a round's own are its start, and a later
    round's are written again by the aggregation before it, before anything reads them.
    The names are those of shared.round_files.round_progress_path and shared.efs.EfsStore.
    """
    return (name == "aggregate-progress.json" or (name.startswith("progress-") and name.endswith(".npz"))
            or (name.startswith(("result-", "reduced-")) and name.endswith(".npy")))


def clear_rounds_from(store: EfsStore, job_id: str, first_round: int) -> None:
    """Remove what rounds ``first_round`` and later computed, so they run again from their start.

    That is their progress, result and reduced files, and their metrics files, so the
    metrics history shows each round once, from its last run. Missing files are skipped,
    so a repeated call is harmless.
    """
    job_dir = store.job_dir(job_id)
    rounds_dir = job_dir / "rounds"
    for folder in rounds_dir.iterdir() if rounds_dir.is_dir() else ():
        if not (folder.name.isdigit() and int(folder.name) >= first_round):
            continue
        for entry in folder.iterdir():
            if _is_round_output(entry.name):
                entry.unlink(missing_ok=True)
    metrics_dir = job_dir / "metrics"
    for entry in metrics_dir.iterdir() if metrics_dir.is_dir() else ():
        # metrics/<r + 1>.json contains the metrics of round index r.
        number = entry.name.removesuffix(".json")
        if entry.name.endswith(".json") and number.isdigit() and int(number) - 1 >= first_round:
            entry.unlink(missing_ok=True)


def _summary_before(store: EfsStore, job_id: str, round_index: int) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Return the job item's metric fields as they were when round ``round_index`` started, and those to remove.

    ``cost_usd`` is left as it is: the rounds that run again were paid for, and the job's
    cost counts them.
    """
    if round_index == 0:
        return {}, _METRIC_FIELDS
    try:
        metrics = read_job_json(store, store.metrics_path(job_id, round_index - 1), problem_of=metrics_problem)
    except (OSError, DataError):
        # Only the job item's display of the latest metrics would lag; the training does not read it.
        return {}, ()
    summary = job_item_fields(metrics)
    summary.pop("cost_usd")
    return summary, tuple(name for name in _METRIC_FIELDS if name not in summary)


def _end_repair(services: Services, record: JobRecord, to_round: int, summary: dict[str, Any] | None = None,
                removed: tuple[str, ...] = ()) -> None:
    """Move the job from its repair back to RUNNING at ``to_round``, then send the round's tasks.

    Raises
    ------
    StaleMessageError
        If the job left its repair meanwhile, because it was cancelled or a twin delivery
        repaired it. A job cancelled during a rewind gets ``to_round`` as its round, so
        that it agrees with the metrics and round items the rewind removed. After a twin's repair the round's tasks are sent again, and workers
        drop the duplicates.
    """
    state, job_id, kind = services.state, record.job_id, record.repair
    assert kind is not None, "only a job with a pending repair gets here"
    ids = {"job_id": job_id, "repair": kind, "attempt": record.repair_attempt}
    if not state.end_repair(job_id, kind, record.repair_attempt, record.round, to_round, summary, removed):
        # NOTE: a retry after a crash between the deletions and this write finds the job
        # CANCELLED in current_repair and is dropped, so that job keeps its later round.
        if to_round < record.round and state.rewind_cancelled_job(job_id, kind, record.repair_attempt, record.round,
                                                                   to_round, summary, removed):
            raise StaleMessageError(f"job {job_id} was cancelled during its rewind; its round is set back to "
                                    f"{to_round}, where its metrics now end; dropped")
        current_repair(state, services.queues, RepairMessage(job_id, kind, record.repair_attempt))
        raise StaleMessageError(f"repair {record.repair_attempt} of job {job_id} is still pending, but its round "
                                "moved; dropped")
    running = state.get_job(job_id)
    if running is None:
        raise StaleMessageError(f"job {job_id} was deleted from the state table while its repair ended; dropped")
    sent = kick_round(state, services.queues, running)
    logger.warning("job repaired; it runs again", extra={**ids, "from_round": record.round, "round": to_round,
                                                         "sent": sent})
