"""The worker's step: compute one worker's share of a round, write it to EFS and record it.

:func:`send_round_complete` sends what a complete round needs next. The worker that
completes the round calls it, and so do the aggregator and the watchdog when they find
that message missing. :func:`kick_round` re-sends whatever the current round is missing,
for a resume, a repair and the watchdog.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

import numpy as np

from shared import cost
from shared import faults
from shared.continuation import ChainLink, InvocationBudget
from shared.errors import InvalidMessageError, StaleMessageError
from shared.queues import QueueClient, TaskMessage
from shared.reduction import write_worker_result
from shared.round_files import read_round_state, state_shapes
from shared.services import Services
from shared.state import RUNNING, JobRecord, StateStore
from shared.training import build_model, build_optimizer, get_training_mode

logger = logging.getLogger(__name__)


def check_round_is_current(services: Services, job_id: str, round_index: int):
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
    record, done = check_round_is_current(services, job_id, round_index)
    if not 0 <= worker < record.n_workers:
        raise InvalidMessageError(f"task names worker {worker} but job {job_id} has {record.n_workers} workers "
                                  f"(0 to {record.n_workers - 1}); dropped")
    faults.maybe_fail("worker.before_read", **ids)

    # The result is on EFS before the worker is recorded, so a recorded worker is done.
    # Its aggregate message may not have been sent, though: send it again.
    context = services.job_context(job_id, data_version=record.preparation_attempt)
    spec, manifest, store = context.spec, context.manifest, services.store
    if worker in done:
        if len(done) == record.n_workers:
            send_round_complete(services.state, services.queues, job_id, round_index, spec.training.reducers)
        logger.info("task already recorded", extra={**ids, "workers_done": len(done)})
        return None

    # Checked on every task, also when this warm process mapped the shard earlier, so that
    # no round trains on a file changed since the preparation.
    shard = context.load_shard(store, job_id, worker)
    model = build_model(spec, manifest)
    params, _ = read_round_state(store, job_id, round_index, state_shapes(model.n_params, build_optimizer(spec)))
    mode = get_training_mode(spec, model)

    link = ChainLink(store, job_id, round_index, worker, task.get("continuation"), message_id)
    progress = link.progress
    if progress is None:
        progress = mode.begin(spec, manifest, model, params, shard, round_index, worker)

    budget = InvocationBudget(remaining_millis, services.settings)
    finished = False
    while not finished:
        if budget.exhausted():
            link.continue_later(services, progress, task_started, budget.steps)
            return None
        progress, finished = mode.advance(spec, manifest, model, params, shard, round_index, worker, progress)
        budget.count_step()
    result = mode.finish(progress)

    write_worker_result(store, job_id, round_index, worker, mode, result)
    faults.maybe_fail("worker.after_write", **ids)

    # The worker's time over every link of its chain, and the links after the first, for
    # the round's cost estimate (shared/cost.py).
    task_seconds = link.total_seconds(task_started)
    usage = {"worker_seconds": task_seconds, "worker_gb_seconds": cost.gb_seconds(task_seconds),
             "worker_continuations": link.number}
    newly_added, done = services.state.record_worker_done(job_id, round_index, worker, usage)
    faults.maybe_fail("worker.after_record", **ids)

    # The delivery that completed the set sends the aggregate (or reduce) messages. A retry
    # that finds the set already complete sends them again above, which covers a crash
    # between the record and the send. The aggregator and the reducers drop the duplicates.
    if len(done) == record.n_workers:
        send_round_complete(services.state, services.queues, job_id, round_index, spec.training.reducers)
    logger.info("task done", extra={**ids, "newly_recorded": newly_added, "workers_done": len(done),
                                    "continuations": link.number})
    return result


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


def kick_round(state: StateStore, queues: QueueClient, record: JobRecord) -> str:
    """Re-send what the job's current round is missing; return what was sent.

    Workers not yet recorded get a task without a continuation number, so each adopts the
    progress it saved on EFS. When every worker is recorded, the reduce messages of the
    slices not yet reduced are sent (with ``training.reducers`` > 1), or else the
    aggregate message. Duplicates of any of them are dropped by the handlers.
    """
    done = set(state.get_done_workers(record.job_id, record.round))
    missing = [worker for worker in range(record.n_workers) if worker not in done]
    if not missing:
        return send_round_complete(state, queues, record.job_id, record.round, _reducers(record))
    queues.send_tasks(record.job_id, record.round, missing)
    return f"tasks for workers {missing}"


def _reducers(record: JobRecord) -> int:
    """Return the job's ``training.reducers``; 1 for a spec stored before the field existed."""
    return int(json.loads(record.spec_json).get("training", {}).get("reducers", 1))
