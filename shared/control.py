"""Job control outside the message flow: pause, cancel, resume, and the stall watchdog.

Every command is a conditional status change in DynamoDB followed, for resume, by
re-sending what the job's current round still needs. Nothing on EFS is deleted, so a
resumed job continues from the state file of its current round, which the aggregator wrote
before it advanced the round. A job that failed on a missing, damaged or replaced shard
file, or on a damaged round state, is repaired first. The resume sends the starter, which
has the file system, a message to prepare the shards again or to go back to an earlier
round (:mod:`shared.repair`).

The watchdog runs on a schedule. It turns messages found in the dead-letter queues into
job failures, and re-sends the missing messages of a RUNNING round that recorded no
progress for ``stall_seconds``; after ``watchdog_max_attempts`` re-sends of one round it
marks the job failed with the reason. Both failure messages quote the handler error stored
on the job item (``last_error``) when it applies, because the watchdog itself never sees
the error.
"""

from __future__ import annotations

import json
import logging
import time

from shared import faults, repair
from shared.errors import DIVERGED_WORDS, BatonError
from shared.queues import QueueClient, body_object
from shared.services import Services
from shared.spec import derive_job_id
from shared.starter import starter_failure_job_id
from shared.state import (CANCELLED, EXPIRES_AT, FAILED, PAUSED, PREPARING, RUNNING, TERMINAL_STATUSES, JobRecord,
                          StateStore, can_record_job, describe_last_error)
from shared.training import round_number
from shared.worker import kick_round

logger = logging.getLogger(__name__)

# Dead-letter queue messages handled per queue in one watchdog run, so a flood cannot
# keep one invocation busy past its timeout; the rest wait for the next run.
MAX_DEAD_LETTERS_PER_RUN = 100


class JobControlError(BatonError):
    """A pause, cancel or resume does not apply to the job in its current status."""


def _require_job(state: StateStore, job_id: str) -> JobRecord:
    record = state.get_job(job_id)
    if record is None:
        raise JobControlError(f"no job '{job_id}' in table {state.table_name}; check the job id, --stage and "
                              "--endpoint-url, or for a job sent moments ago wait a few seconds, until the starter "
                              "has recorded it")
    return record


def pause_job(state: StateStore, job_id: str) -> JobRecord:
    """Pause a RUNNING job: messages that arrive while it is paused are dropped.

    Raises
    ------
    JobControlError
        If the job does not exist or is not RUNNING.
    """
    record = _require_job(state, job_id)
    if not state.set_status(job_id, PAUSED, (RUNNING,)):
        record = _require_job(state, job_id)
        raise JobControlError(f"job '{job_id}' is {record.status}; only a RUNNING job can be paused")
    logger.info("job paused", extra={"job_id": job_id, "round": record.round})
    return _require_job(state, job_id)


def cancel_job(state: StateStore, job_id: str) -> JobRecord:
    """Cancel a job for good; its files stay on EFS.

    Raises
    ------
    JobControlError
        If the job does not exist, already succeeded or is already cancelled.
    """
    _require_job(state, job_id)
    if not state.set_status(job_id, CANCELLED, (PREPARING, RUNNING, PAUSED, FAILED)):
        record = _require_job(state, job_id)
        raise JobControlError(f"job '{job_id}' is {record.status}; it cannot be cancelled")
    logger.info("job cancelled", extra={"job_id": job_id})
    return _require_job(state, job_id)


def resume_job(state: StateStore, queues: QueueClient, job_id: str) -> JobRecord:
    """Resume a PAUSED or FAILED job from its current round.

    A job that failed before its first round (for example on a missing data file or a
    malformed line) is prepared again from its stored spec, from the first step, so fix
    the cause first. A job that failed on a file that the starter repairs (a shard file,
    a round state) becomes PREPARING while the starter repairs it, and then RUNNING; a
    resume of a job in that repair sends its repair message again, which the starter
    makes once.

    Raises
    ------
    JobControlError
        If the job does not exist, is not PAUSED or FAILED, or has no stored spec.
    """
    record = _require_job(state, job_id)
    if record.status == PREPARING and record.repair is not None:
        # The repair's message may have been lost between the status change and the send.
        queues.send_job(repair.RepairMessage(job_id, record.repair, record.repair_attempt).to_body())
        logger.info("repair message sent again", extra={"job_id": job_id, "repair": record.repair,
                                                        "attempt": record.repair_attempt})
        return record
    if record.status == FAILED and record.total_rounds == 0:
        spec = json.loads(record.spec_json)
        if not spec:
            raise JobControlError(f"job '{job_id}' was rejected before it had a valid spec; submit a corrected spec "
                                  "under a new job id")
        if not state.set_status(job_id, PREPARING, (FAILED,), clear_error=True, new_preparation=True):
            raise JobControlError(f"job '{job_id}' changed status while resuming; check it and retry")
        queues.send_job(spec)
        logger.info("job restarted from its spec", extra={"job_id": job_id})
        return _require_job(state, job_id)

    if record.status not in (PAUSED, FAILED):
        raise JobControlError(f"job '{job_id}' is {record.status}; only a PAUSED or FAILED job can be resumed")
    if record.status == FAILED and DIVERGED_WORDS in (record.error or ""):
        # Training is deterministic, so the same spec from the same round diverges again.
        raise JobControlError(f"job '{job_id}' failed because training diverged, and a resume would take the same "
                              "steps again; send the spec again under a new job id with the change its error "
                              f"suggests (`baton status {job_id}` shows it)")
    if record.status == FAILED and record.repair is not None:
        return _start_repair(state, queues, record)
    if not state.set_status(job_id, RUNNING, (record.status,), clear_error=True):
        raise JobControlError(f"job '{job_id}' changed status while resuming; check it and retry")
    sent = kick_round(state, queues, record)
    logger.info("job resumed", extra={"job_id": job_id, "round": record.round, "sent": sent})
    return _require_job(state, job_id)


def _start_repair(state: StateStore, queues: QueueClient, record: JobRecord) -> JobRecord:
    """Move a FAILED job with a pending repair to PREPARING, and send the starter its repair message.

    The conditional move counts a new repair attempt, so of two concurrent resumes only
    one starts a repair.
    """
    job_id, kind = record.job_id, record.repair
    attempt = state.begin_repair(job_id, kind, new_preparation=kind == repair.SHARDS)
    if attempt is None:
        raise JobControlError(f"job '{job_id}' changed status while resuming; check it and retry")
    queues.send_job(repair.RepairMessage(job_id, kind, attempt).to_body())
    logger.info("job repair started", extra={"job_id": job_id, "round": record.round, "repair": kind,
                                             "attempt": attempt})
    return _require_job(state, job_id)


def drain_dead_letters(services: Services) -> int:
    """Mark the job of every dead-lettered message FAILED, then delete the message.

    A job that its handler already marked failed on the last receive keeps that error.
    Otherwise, for example when every receive timed out before the handler could record
    anything, the error names the message and quotes the job's ``last_error`` if an
    earlier receive of the same message stored it. Returns the number of messages handled.
    """
    settings, state, sqs = services.settings, services.state, services.queues.client
    handled = 0
    functions = {settings.jobs_queue_name: "starter", settings.tasks_queue_name: "worker",
                 settings.aggregate_queue_name: "aggregator"}
    for queue_name, function_name in functions.items():
        url = services.queues.url(f"{queue_name}-dlq")
        for _ in range(MAX_DEAD_LETTERS_PER_RUN // 10):
            messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                           AttributeNames=["All"]).get("Messages", [])
            if not messages:
                break
            for message in messages:
                job_id = _dead_letter_job_id(message)
                if job_id is not None and queue_name == settings.jobs_queue_name:
                    # A job message whose id belongs to a job of another spec must not fail it.
                    job_id = starter_failure_job_id(services, message["Body"], message["MessageId"], job_id)
                record = None if job_id is None else state.get_job(job_id)
                if job_id is not None and _superseded(record, message):
                    logger.info("dead-lettered message predates the job's resume; deleted",
                                extra={"job_id": job_id, "queue": queue_name})
                elif job_id is not None:
                    newly_failed = state.fail_job(
                        job_id, f"a {queue_name} message ({message['MessageId']}) reached the dead-letter queue"
                                f"{_handler_receives_text(message, settings.max_receive_count)}; "
                                f"{_dead_letter_cause(record, message['MessageId'], function_name)}; "
                                f"fix the cause, then run `baton resume {job_id}`")
                    logger.error("dead-lettered message", extra={"job_id": job_id, "queue": queue_name,
                                                                 "body": message["Body"][:200],
                                                                 "newly_failed": newly_failed})
                else:
                    logger.error("dead-lettered message without a job id", extra={"queue": queue_name,
                                                                                  "body": message["Body"][:200]})
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
                handled += 1
    return handled


def _handler_receives_text(message: dict, max_receive_count: int) -> str:
    """Return " after N receives", N being how often the handler received a dead-lettered ``message``.

    The message's ``ApproximateReceiveCount`` includes this drain's own receive, and on AWS
    those of earlier drains that failed before deleting it. SQS moves a message after
    ``maxReceiveCount`` receives, so the count is capped there. Returns "" when the count
    is missing or shows no handler receive (a message sent to the dead-letter queue directly).
    """
    try:
        handler_receives = min(int(message.get("Attributes", {})["ApproximateReceiveCount"]) - 1, max_receive_count)
    except (KeyError, ValueError):
        return ""
    if handler_receives < 1:
        return ""
    return f" after {handler_receives} receive{'' if handler_receives == 1 else 's'}"


def _dead_letter_cause(record: JobRecord | None, message_id: str, function_name: str) -> str:
    """Return what is known of the error of dead-lettered message ``message_id``.

    The job's ``last_error`` is quoted only when it is this message's: an error of another
    message would be taken for this one's, whose receives may all have timed out.
    """
    last_error = None if record is None else record.attributes.get("last_error")
    if isinstance(last_error, dict) and last_error.get("message_id") == message_id:
        return f"its last recorded error was: {describe_last_error(last_error)}"
    return (f"none of its receives recorded an error, so each most likely timed out, ran out of memory or was "
            f"throttled before it ran; search the {function_name} function's log for the message id")


def _stall_cause(record: JobRecord) -> str:
    """Return the cause of a stalled round, as the watchdog's failure message gives it.

    A ``last_error`` stored in another round is left out, because it did not stall this one.
    """
    last_error = record.attributes.get("last_error")
    if isinstance(last_error, dict) and last_error.get("round", record.round) == record.round:
        return f"the last error was: {describe_last_error(last_error)}"
    return "check the worker and aggregator logs"


def _superseded(record: JobRecord | None, message: dict) -> bool:
    """Return whether ``message`` was sent before the job's last resume or restart."""
    if record is None or record.status not in (RUNNING, PREPARING, PAUSED):
        return False
    changed_at = record.attributes.get("status_changed_at")
    sent_millis = message.get("Attributes", {}).get("SentTimestamp")
    return changed_at is not None and sent_millis is not None and int(sent_millis) / 1000 < float(changed_at)


def _dead_letter_job_id(message: dict) -> str | None:
    body = body_object(message["Body"])
    if isinstance(body, dict) and can_record_job(body.get("job_id")):
        return body["job_id"]
    # A job message without a usable job_id names its job after its message id, which
    # SQS keeps when it moves the message to the dead-letter queue.
    return derive_job_id(message["MessageId"]) if isinstance(body, dict) else None


# Ended jobs that one watchdog run gives an expiry: two conditional writes each.
MAX_EXPIRIES_PER_RUN = 200


def run_watchdog(services: Services, now: float | None = None) -> dict[str, int]:
    """Drain the dead-letter queues, re-send the messages of stalled rounds, and give
    ended jobs their time to live.

    Returns counts of what was done, for logs and tests.
    """
    now = time.time() if now is None else now
    settings, state = services.settings, services.state
    counts = {"dead_letters": drain_dead_letters(services), "resent": 0, "failed": 0, "expiring": 0}

    # The jobs index contains job items only. A record there may lag the table by a moment,
    # so the conditional writes below act only on a job still running at the record's round.
    records = state.list_jobs()
    for record in records:
        if record.status != RUNNING:
            continue
        last_progress = max(float(record.attributes.get("updated_at", 0)),
                            state.round_updated_at(record.job_id, record.round) or 0.0)
        if now - last_progress < settings.stall_seconds:
            continue

        attempts = state.count_watchdog_attempt(record.job_id, record.round)
        if attempts is None:
            continue
        ids = {"job_id": record.job_id, "round": record.round}
        if attempts > settings.watchdog_max_attempts:
            # The scan above may predate the handlers' latest last_error, so read the item again.
            current = state.get_job(record.job_id) or record
            reason = (f"round {round_number(record.round)} made no progress for {settings.stall_seconds:.0f} s after "
                      f"{settings.watchdog_max_attempts} re-sends by the watchdog; {_stall_cause(current)}; "
                      f"fix the cause, then run `baton resume {record.job_id}`")
            if state.fail_job(record.job_id, reason):
                counts["failed"] += 1
                logger.error("job failed by the watchdog", extra={**ids, "reason": reason})
            continue

        faults.maybe_fail("watchdog.before_resend", **ids)
        sent = kick_round(state, services.queues, record)
        counts["resent"] += 1
        logger.warning("stalled round re-sent", extra={**ids, "attempt": attempts, "sent": sent,
                                                        "stalled_seconds": round(now - last_progress, 1)})

    # After the stalled rounds, and a bounded number per run, so that a backlog of ended
    # jobs (the first runs after retention is switched on) cannot delay the re-sends or
    # run into the watchdog's timeout.
    unexpired = [record for record in records
                 if record.status in TERMINAL_STATUSES and EXPIRES_AT not in record.attributes]
    if state.retention_seconds is not None:
        for record in unexpired[:MAX_EXPIRIES_PER_RUN]:
            if state.expire_ended_job(record.job_id, float(record.attributes.get("updated_at", now))):
                counts["expiring"] += 1
        if len(unexpired) > MAX_EXPIRIES_PER_RUN:
            logger.info("ended jobs left without an expiry until the next run",
                        extra={"jobs_left": len(unexpired) - MAX_EXPIRIES_PER_RUN})
    return counts
