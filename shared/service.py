"""The three steps Baton's Lambda handlers run: start a job, run a task, aggregate a round.

Each step is idempotent. A step either completes its effects in an order that a retry
can finish, or recognises that a message is stale and drops it:

start_job
    validate spec -> create job item (same spec: reuse) -> write spec.json -> prepare
    shards -> write round 0 state -> PREPARING to RUNNING -> send round 0 tasks
run_task
    check round is current -> read state and shard -> write result file -> add worker to
    the round's done set -> if the set is complete, send the aggregate message
aggregate_round
    check round is current -> read results in worker order -> write round r+1 state and
    metrics -> advance the round (conditional) or finish the job -> send round r+1 tasks
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import boto3
import numpy as np

from shared import data as datasets
from shared import faults
from shared.config import Settings
from shared.efs import EfsStore
from shared.errors import PermanentError, StaleMessageError
from shared.preparation import PreparationStep, StaleStepError, record_sent, run_preparation
from shared.queues import AggregateMessage, QueueClient, TaskMessage
from shared.sampling import epoch_of_round
from shared.spec import JobSpec, load_job_message, parse_job_spec
from shared.state import RUNNING, StateStore
from shared.training import build_model, build_model_for_preparation, build_optimizer, get_training_mode

logger = logging.getLogger(__name__)

OPTIMIZER_PREFIX = "optimizer."


@dataclass
class JobContext:
    """What a warm process caches about one job: its spec, data manifest and model."""

    spec: JobSpec
    manifest: dict
    shards: dict


class Services:
    """The adapters a step needs, built lazily so tests and the local runtime can aim them."""

    def __init__(self, settings: Settings | None = None, dynamodb=None, sqs=None):
        self.settings = settings or Settings.from_env()
        self._dynamodb = dynamodb
        self._sqs = sqs
        self._jobs: OrderedDict[str, JobContext] = OrderedDict()

    @cached_property
    def store(self) -> EfsStore:
        return EfsStore(self.settings.efs_root)

    @cached_property
    def state(self) -> StateStore:
        return StateStore(self._dynamodb or boto3.client("dynamodb"), self.settings.state_table_name)

    @cached_property
    def queues(self) -> QueueClient:
        return QueueClient(self._sqs or boto3.client("sqs"), self.settings)

    def job_context(self, job_id: str) -> JobContext:
        """Return the cached spec and manifest of ``job_id``, reading them from EFS once."""
        if job_id in self._jobs:
            self._jobs.move_to_end(job_id)
            return self._jobs[job_id]
        spec = parse_job_spec(self.store.read_json(self.store.spec_path(job_id)))
        manifest = self.store.read_json(self.store.data_dir(job_id) / "manifest.json")
        context = JobContext(spec=spec, manifest=manifest, shards={})
        self._jobs[job_id] = context
        # A warm process may serve many jobs; keep only a few memory maps open.
        while len(self._jobs) > 4:
            self._jobs.popitem(last=False)
        return context


def read_round_state(store: EfsStore, job_id: str, round_index: int) -> tuple[np.ndarray, dict]:
    """Return the parameters and optimizer state stored for the start of ``round_index``."""
    arrays = store.read_arrays(store.state_path(job_id, round_index))
    optimizer_state = {
        name[len(OPTIMIZER_PREFIX):]: value for name, value in arrays.items() if name.startswith(OPTIMIZER_PREFIX)}
    return arrays["params"], optimizer_state


def write_round_state(store: EfsStore, job_id: str, round_index: int, params: np.ndarray, optimizer_state: dict) -> None:
    """Store the parameters and optimizer state for the start of ``round_index``."""
    arrays = {"params": params, **{OPTIMIZER_PREFIX + name: value for name, value in optimizer_state.items()}}
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
        spec = parse_job_spec(services.store.read_json(services.store.spec_path(job_id)))
        _prepare_and_start(services, spec, PreparationStep.from_message(step_message))
        return job_id

    spec = load_job_message(body, default_job_id=f"job-{message_id[:18]}")
    faults.maybe_fail("starter.validated", job_id=spec.job_id)

    record = services.state.create_job(spec.job_id, spec.fingerprint(), spec.canonical_json(), spec.training.n_workers)
    if record.status != "PREPARING":
        # A redelivered job message for a job that is already running or finished.
        raise StaleMessageError(f"job {spec.job_id} is already {record.status}")

    store = services.store
    store.write_json(store.spec_path(spec.job_id), spec.to_dict())
    _prepare_and_start(services, spec, None)
    return spec.job_id


def _preparation_step_message(body: str) -> dict | None:
    """Return the decoded body if it is a preparation step message, else None."""
    try:
        message = json.loads(body)
    except json.JSONDecodeError:
        return None
    if isinstance(message, dict) and "prepare" in message and isinstance(message.get("job_id"), str):
        return message
    return None


def _prepare_and_start(services: Services, spec: JobSpec, step: PreparationStep | None) -> None:
    """Run preparation from ``step``; once the data is ready, write round 0 and send its tasks."""
    store = services.store
    try:
        outcome = run_preparation(store, spec, build_model_for_preparation(spec), step)
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
    optimizer = build_optimizer(spec)
    mode = get_training_mode(spec, model)
    params = mode.initial_params(
        spec, model, lambda max_rows: datasets.load_training_sample(store, spec.job_id, manifest, max_rows))
    write_round_state(store, spec.job_id, 0, params, optimizer.init_state(params))

    rounds = mode.total_rounds(spec, manifest)
    services.state.start_job(spec.job_id, rounds)
    faults.maybe_fail("starter.started", job_id=spec.job_id)

    # Sent whether or not this delivery made the transition, so a retry after a crash
    # between the transition and the send still starts round 0. Workers drop duplicates.
    services.queues.send_tasks(spec.job_id, 0, list(range(spec.training.n_workers)))
    logger.info("job started", extra={"job_id": spec.job_id, "total_rounds": rounds,
                                      "n_workers": spec.training.n_workers})


# Worker ----------------------------------------------------------------------------------


def _check_round_is_current(services: Services, job_id: str, round_index: int):
    record = services.state.get_job(job_id)
    if record is None:
        raise StaleMessageError(f"job {job_id} does not exist")
    if record.status != RUNNING:
        raise StaleMessageError(f"job {job_id} is {record.status}")
    if round_index < record.round:
        raise StaleMessageError(f"round {round_index} of job {job_id} is over; the job is at round {record.round}")
    if round_index > record.round:
        # Tasks are only sent after the round advanced, so this is a read racing ahead.
        raise RuntimeError(f"round {round_index} of job {job_id} is ahead of the job's round {record.round}; retrying")
    return record


def run_task(services: Services, task: TaskMessage) -> dict[str, np.ndarray]:
    """Compute one worker's contribution to one round and record it.

    Returns the result arrays. A redelivered task computes and writes the same bytes again,
    and finds its worker already recorded.
    """
    job_id, round_index, worker = task["job_id"], task["round"], task["worker"]
    record = _check_round_is_current(services, job_id, round_index)
    if not 0 <= worker < record.n_workers:
        raise PermanentError(f"task names worker {worker} but job {job_id} has {record.n_workers} workers")

    faults.maybe_fail("worker.before_read", job_id=job_id, round=round_index, worker=worker)
    context = services.job_context(job_id)
    spec, manifest, store = context.spec, context.manifest, services.store

    if worker not in context.shards:
        context.shards[worker] = datasets.load_shard(store, job_id, manifest, worker)
    shard = context.shards[worker]

    params, _ = read_round_state(store, job_id, round_index)
    model = build_model(spec, manifest)
    result = get_training_mode(spec, model).worker_result(spec, manifest, model, params, shard, round_index, worker)

    store.write_arrays(store.result_path(job_id, round_index, worker), result)
    faults.maybe_fail("worker.after_write", job_id=job_id, round=round_index, worker=worker)

    newly_added, done = services.state.record_worker_done(job_id, round_index, worker)
    faults.maybe_fail("worker.after_record", job_id=job_id, round=round_index, worker=worker)

    # The delivery that completed the set sends the aggregate message. A redelivery that
    # finds the set already complete sends it again, covering a crash between the record
    # and the send; the aggregator drops the duplicate.
    if len(done) == record.n_workers:
        services.queues.send_aggregate(job_id, round_index)
    logger.info("task done", extra={"job_id": job_id, "round": round_index, "worker": worker,
                                    "newly_recorded": newly_added, "workers_done": len(done)})
    return result


# Aggregator ------------------------------------------------------------------------------


def aggregate_round(services: Services, message: AggregateMessage) -> dict | None:
    """Combine a complete round, update the weights, and start the next round or finish.

    Returns the round's metrics, or None for a duplicate whose round already moved on.
    """
    job_id, round_index = message["job_id"], message["round"]
    store, state = services.store, services.state

    record = state.get_job(job_id)
    if record is None or record.status != RUNNING:
        raise StaleMessageError(f"job {job_id} is {'missing' if record is None else record.status}")
    if record.round == round_index + 1:
        # This round was aggregated, but the delivery that did it may have stopped before
        # sending the next tasks. Sending them again is safe: workers drop duplicates.
        services.queues.send_tasks(job_id, record.round, list(range(record.n_workers)))
        raise StaleMessageError(f"round {round_index} of job {job_id} was already aggregated; re-sent round {record.round} tasks")
    if record.round != round_index:
        raise StaleMessageError(f"round {round_index} of job {job_id} is not current (job at round {record.round})")

    done = state.get_done_workers(job_id, round_index)
    if len(done) != record.n_workers:
        raise RuntimeError(f"round {round_index} of job {job_id} has {len(done)} of {record.n_workers} results; retrying")

    started = time.monotonic()
    context = services.job_context(job_id)
    spec, manifest = context.spec, context.manifest
    model, optimizer = build_model(spec, manifest), build_optimizer(spec)

    params, optimizer_state = read_round_state(store, job_id, round_index)
    results = [store.read_arrays(store.result_path(job_id, round_index, worker)) for worker in range(record.n_workers)]
    update = get_training_mode(spec, model).combine(spec, model, optimizer, params, optimizer_state, results, round_index)

    next_round = round_index + 1
    write_round_state(store, job_id, next_round, update.params, update.optimizer_state)
    faults.maybe_fail("aggregator.after_write", job_id=job_id, round=round_index)

    metrics = {
        "round": round_index,
        "epoch": epoch_of_round(round_index, manifest["shard_rows"], spec.training.batch_size),
        "train_loss": update.train_loss,
        "n_samples": update.n_samples,
    }
    validation = datasets.load_validation(store, job_id, manifest)
    if validation is not None:
        for name, value in model.metrics(update.params, validation.X, np.asarray(validation.y)).items():
            metrics[f"validation_{name}"] = value
    metrics["loss"] = metrics.get("validation_loss", update.train_loss)
    metrics["aggregate_seconds"] = time.monotonic() - started

    store.write_json(store.metrics_path(job_id, round_index), metrics)
    state.put_round_metrics(job_id, round_index, metrics)

    reached_target = (spec.training.target_validation_loss is not None and "validation_loss" in metrics
                      and metrics["validation_loss"] <= spec.training.target_validation_loss)
    summary = {"epoch": metrics["epoch"], "train_loss": metrics["train_loss"]}
    for name in ("validation_loss", "validation_accuracy"):
        if name in metrics:
            summary[name] = metrics[name]

    if next_round >= record.total_rounds or reached_target:
        write_final_model(services, job_id, model, update.params, next_round, metrics)
        if state.finish_job(job_id, round_index, {**summary, "stop_reason": "target" if reached_target else "max_rounds"}):
            logger.info("job succeeded", extra={"job_id": job_id, "round": round_index, **summary})
        return metrics

    advanced = state.advance_round(job_id, round_index, summary)
    faults.maybe_fail("aggregator.after_advance", job_id=job_id, round=round_index)
    if advanced:
        services.queues.send_tasks(job_id, next_round, list(range(record.n_workers)))
        store.prune_rounds(job_id, next_round, services.settings.keep_checkpoints)
    logger.info("round aggregated", extra={"job_id": job_id, "round": round_index, "advanced": advanced, **summary})
    return metrics


def write_final_model(services: Services, job_id: str, model, params: np.ndarray, rounds_done: int, metrics: dict) -> None:
    """Store the final parameters and a JSON description of the model on EFS."""
    store = services.store
    context = services.job_context(job_id)
    model_dir = store.model_dir(job_id)
    store.write_npy(model_dir / "params.npy", params)
    store.write_json(model_dir / "model.json", {
        "job_id": job_id,
        "model": context.spec.to_dict()["model"],
        "n_features": model.n_features,
        "classes": context.manifest["classes"],
        "rounds": rounds_done,
        "final_metrics": metrics,
    })
