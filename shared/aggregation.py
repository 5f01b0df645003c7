"""The aggregator's steps: reduce one slice of a round, or combine a round and start the next.

With ``training.reducers`` R > 1, R reducers each sum one slice of the workers' results
(:func:`reduce_slice`) before the aggregator concatenates the slices. The aggregator
writes the next round's state and the round's metrics, then advances the round and sends
its tasks, or finishes the job and writes the model (:func:`aggregate_round`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from shared import cost
from shared import faults
from shared.continuation import ChainLink, InvocationBudget
from shared.efs import EfsStore
from shared.errors import InvalidMessageError, StaleMessageError
from shared.metrics import publish_round_metrics
from shared.model_bucket import upload_model
from shared.queues import AggregateMessage
from shared.reduction import read_reduced_round, reduce_worker_results, slice_bounds, write_reduced_slice
from shared.round_files import (read_round_state, read_stopping_history, state_shapes, write_final_model,
                                write_round_state)
from shared.services import Services
from shared.shards import Shard
from shared.spec import JobSpec
from shared.state import RUNNING, JobRecord, job_item_fields
from shared.target_scaling import params_in_target_units
from shared.training import (Reduction, RoundUpdate, StoppingState, build_model, build_optimizer, check_stopping,
                             check_validation_finite, get_training_mode, round_number)
from shared.worker import check_round_is_current, send_round_complete

logger = logging.getLogger(__name__)


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


# Validation metrics that are sums over the rows, which chunks add up instead of averaging.
SUM_METRICS = ("inertia",)


def _combine_metrics(partials: list[dict]) -> dict[str, float]:
    """Return validation metrics from per-chunk metrics, as one pass over all the rows gives them.

    Mean metrics (loss, accuracy, mse) are weighted by each chunk's rows and sums
    (:data:`SUM_METRICS`) are added. ``r2`` is computed again from the chunks' residual
    and total sums of squares, the latter combined around the mean of all the targets.
    """
    if len(partials) == 1:
        return dict(partials[0]["metrics"])
    total_rows = sum(partial["rows"] for partial in partials)
    names = partials[0]["metrics"].keys()
    combined = {name: sum(partial["metrics"][name] * partial["rows"] for partial in partials) / total_rows
                for name in names}
    for name in SUM_METRICS:
        if name in names:
            combined[name] = sum(partial["metrics"][name] for partial in partials)
    # Progress files written by an earlier version of Baton lack the target statistics,
    # and then r2 stays the row-weighted mean of the chunks' values.
    if "r2" in names and all("target_mean" in partial for partial in partials):
        combined["r2"] = _combined_r2(partials, total_rows)
    return combined


def _combined_r2(partials: list[dict], total_rows: int) -> float:
    """Return ``1 - SS_res / SS_tot`` over every chunk, from each chunk's mse and target statistics."""
    residual_sum_of_squares = sum(partial["metrics"]["mse"] * partial["rows"] for partial in partials)
    target_mean = sum(partial["target_mean"] * partial["rows"] for partial in partials) / total_rows
    total_sum_of_squares = sum(partial["target_sum_of_squares"]
                               + partial["rows"] * (partial["target_mean"] - target_mean) ** 2
                               for partial in partials)
    if total_sum_of_squares > 0.0:
        return 1.0 - residual_sum_of_squares / total_sum_of_squares
    return 1.0 if residual_sum_of_squares == 0.0 else 0.0


def aggregate_round(services: Services, message: AggregateMessage, message_id: str = "",
                    remaining_millis: Callable[[], int] | None = None) -> dict | None:
    """Combine a complete round, update the weights, and start the next round or finish.

    The work runs as steps that each leave a checkpoint on EFS. Combining the results
    writes the next round's state. Each chunk of validation rows is evaluated in a step
    of its own. The commit writes the metrics file, then advances the round and sends
    the next tasks, or finishes the job. Between
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
    store = services.store
    record, usage_totals = _check_aggregate_is_current(services, job_id, round_index)
    faults.maybe_fail("aggregator.before_read", **ids)

    started = time.monotonic()
    context = services.job_context(job_id, data_version=record.preparation_attempt)
    spec, manifest = context.spec, context.manifest
    model, optimizer = build_model(spec, manifest), build_optimizer(spec)
    mode = get_training_mode(spec, model)
    next_round = round_index + 1

    link = ChainLink(store, job_id, round_index, None, message.get("continuation"), message_id)
    progress = {} if link.progress is None else link.progress
    validation = context.load_validation(store, job_id)
    n_chunks = 0 if validation is None else -(-validation.n_rows // VALIDATION_CHUNK_ROWS)
    progress.setdefault("partials", [])
    budget = InvocationBudget(remaining_millis, services.settings)

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
            link.continue_later(services, progress, started, budget.steps)
            return None
        if new_params is None:
            new_params, _ = read_round_state(store, job_id, next_round, state_shapes(model.n_params, optimizer))
        progress["partials"].append(_validation_chunk(model, params_in_target_units(model, manifest, new_params),
                                                      validation, len(progress["partials"])))
        budget.count_step()

    if budget.exhausted():
        link.continue_later(services, progress, started, budget.steps)
        return None

    # Step 3: commit the round. Write its metrics file and stopping state, then finish the job or
    # start the next round.
    metrics = _round_metrics(mode, spec, manifest, round_index, progress)
    metrics["aggregate_seconds"] = link.total_seconds(started)
    metrics.update(cost.account_round(
        store, record, usage_totals, round_index, spec.training.batch_size, manifest["n_features"],
        validation_bytes=0 if validation is None else cost.array_bytes(validation.X),
        aggregate_seconds=metrics["aggregate_seconds"], reducers=spec.training.reducers,
        aggregate_continuations=link.number))
    store.write_json(store.metrics_path(job_id, round_index), metrics)
    faults.maybe_fail("aggregator.after_metrics", **ids)

    stop_rule = _write_stopping_state(store, spec, job_id, round_index, metrics)
    stop_reason = _stop_reason(spec, record, round_index, metrics, stop_rule)
    summary = job_item_fields(metrics)
    publish_round_metrics(job_id, round_index, metrics)

    if stop_reason is not None:
        if new_params is None:
            new_params, _ = read_round_state(store, job_id, next_round, state_shapes(model.n_params, optimizer))
        _finish_with_model(services, job_id, round_index, model, new_params, metrics, summary, stop_reason)
        return metrics

    advanced = _start_next_round(services, record, round_index, metrics, summary)
    logger.info("round aggregated", extra={**ids, "advanced": advanced, "continuations": link.number, **summary})
    return metrics


def _finish_with_model(services: Services, job_id: str, round_index: int, model, params: np.ndarray, metrics: dict,
                       summary: dict, stop_reason: str) -> None:
    """Write the final model of a job that stops after ``round_index``, and record the job as SUCCEEDED.

    The model is also copied to the models bucket when the stack has one.
    """
    ids = {"job_id": job_id, "round": round_index}
    store, state, next_round = services.store, services.state, round_index + 1
    write_final_model(services, job_id, model, params, next_round, metrics, stop_reason)
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


def _start_next_round(services: Services, record: JobRecord, round_index: int, metrics: dict, summary: dict) -> bool:
    """Advance the job past ``round_index``, send the next round's tasks, and return whether this call advanced it."""
    job_id, next_round = record.job_id, round_index + 1
    store, state = services.store, services.state
    advanced = state.advance_round(job_id, round_index, summary)
    faults.maybe_fail("aggregator.after_advance", job_id=job_id, round=round_index)
    if advanced:
        services.queues.send_tasks(job_id, next_round, list(range(record.n_workers)))
        # After the send, so the next round's workers do not wait for it. A retry of a
        # delivery that stopped before this line finds the round advanced and stores the
        # metrics from EFS (_check_aggregate_is_current).
        state.put_round_metrics(job_id, round_index, metrics)
        store.prune_rounds(job_id, next_round, services.settings.keep_checkpoints)
    return advanced


def _combine_round(store: EfsStore, spec: JobSpec, record: JobRecord, mode, model, optimizer,
                   round_index: int) -> RoundUpdate:
    """Return the next parameters and optimizer state from the round's worker results, or its reduced slices."""
    job_id = spec.job_id
    params, optimizer_state = read_round_state(store, job_id, round_index, state_shapes(model.n_params, optimizer))
    reducers = spec.training.reducers
    if reducers > 1:
        reduction = read_reduced_round(store, job_id, round_index, reducers, model.n_params)
    else:
        reduction = reduce_worker_results(store, job_id, round_index, record.n_workers, mode, model.n_params,
                                          0, model.n_params)
    return mode.step(spec, model, optimizer, params, optimizer_state, reduction, round_index)


def _validation_chunk(model, params: np.ndarray, validation: Shard, chunk: int) -> dict:
    """Return the metrics of ``params`` on validation chunk ``chunk`` and its row count, as progress stores them."""
    start = chunk * VALIDATION_CHUNK_ROWS
    stop = min(start + VALIDATION_CHUNK_ROWS, validation.n_rows)
    targets = np.asarray(validation.y[start:stop])
    chunk_metrics = model.metrics(params, validation.rows(slice(start, stop)), targets)
    partial = {"rows": stop - start, "metrics": {name: float(value) for name, value in chunk_metrics.items()}}
    if "r2" in chunk_metrics:
        # What _combined_r2 needs to compute r2 over all the chunks exactly.
        targets = targets.astype(np.float64)
        partial["target_mean"] = float(targets.mean())
        partial["target_sum_of_squares"] = float(np.sum((targets - partial["target_mean"]) ** 2))
    return partial


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
        check_validation_finite(round_index, metrics, spec)
    metrics["loss"] = metrics.get("validation_loss", progress["train_loss"])
    return metrics


def _write_stopping_state(store: EfsStore, spec: JobSpec, job_id: str, round_index: int, metrics: dict) -> str | None:
    """Apply a round's metrics to the spec's stopping rules, and store the new stopping state for the next round.

    Returns the stopping rule that fired (``target_loss``, ``target_accuracy``,
    ``early_stopping``), or None. The stopping state (best validation loss and its round)
    is stored in the round folders, so a retried or resumed aggregation reads the same
    history.
    """
    history = read_stopping_history(store, job_id, round_index)
    previous = StoppingState.from_dict(history)
    stopping, stop_rule = check_stopping(spec, metrics, previous)
    store.write_json(store.round_dir(job_id, round_index + 1) / "stopping.json", stopping.to_dict())
    return stop_rule


def _stop_reason(spec: JobSpec, record: JobRecord, round_index: int, metrics: dict,
                 stop_rule: str | None) -> str | None:
    """Return why the job stops after this round, or None when it goes on.

    The reasons are ``stop_rule``, the stopping rule of the spec that fired
    (:func:`_write_stopping_state`), the round limit (``max_rounds`` or ``max_epochs``,
    whichever set it) and ``budget``.
    """
    if stop_rule is not None:
        return stop_rule
    if round_index + 1 >= record.total_rounds:
        return "max_rounds" if record.total_rounds == spec.training.max_rounds else "max_epochs"
    if spec.training.budget_usd is not None and metrics["total_cost_usd"] >= spec.training.budget_usd:
        return "budget"
    return None


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
    record, done = check_round_is_current(services, job_id, round_index)
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
                             remaining_millis: Callable[[], int] | None = None) -> dict | Reduction | None:
    """Run a message of the aggregate queue: a reduce message or an aggregate message.

    Parameters
    ----------
    services : Services
    message : AggregateMessage
        A message with ``reduce`` goes to :func:`reduce_slice`, any other to
        :func:`aggregate_round`.
    message_id : str
        The SQS message id, which continuation chains save as the writer of their progress.
    remaining_millis : callable, optional
        Returns the invocation's remaining time; passed to :func:`aggregate_round`.

    Returns
    -------
    dict, Reduction or None
        What the step returned: the round's metrics, the reduced slice, or None.
    """
    if "reduce" in message:
        return reduce_slice(services, message, message_id)
    return aggregate_round(services, message, message_id, remaining_millis)
