"""The part every Lambda handler shares: SQS batch processing, logging and error routing.

Each record is processed on its own, and only failed records are reported back, so one bad
record never returns its neighbours to the queue. What happens to an error depends on
whether a retry can help:

====================  ==========================================  ===========
error                 effect                                      retried
====================  ==========================================  ===========
PermanentError        job marked FAILED with the message          no
StaleMessageError     logged and dropped                          no
anything else         record reported as failed; the error is     yes, until
                      stored as the job's ``last_error``, and on  dead-lettered
                      the last allowed receive the job is marked
                      FAILED
====================  ==========================================  ===========

``last_error`` puts a retried error on the job item early. With the deployed defaults
(visibility timeout 1800 s on the tasks and aggregate queues, 5 receives), the last
receive comes about 2 hours after the first, and the watchdog usually gives up on the
stalled round before then. Its failure message quotes ``last_error``. A job message whose
``job_id`` belongs to a job of another spec records its errors under ``job-<message id>``
instead, so it never touches that job.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from botocore.exceptions import ClientError

# Re-exported, because serverless.yml and tests/test_stack.py name the handlers' receive count here.
from shared.config import DEFAULT_MAX_RECEIVE_COUNT  # noqa: F401
from shared.errors import (BatonError, InvalidMessageError, JobConflictError, PermanentError, RepairableDataError,
                           StaleMessageError)
from shared.json_numbers import shown
from shared.queues import body_object
from shared.services import Services
from shared.spec import derive_job_id
from shared.state import can_record_job

logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "baton"))
# The service layer logs through the standard library; give its loggers the same JSON
# formatter, so their lines carry the job, round and worker keys appended per record.
copy_config_to_registered_loggers(source_logger=logger, include={"shared"})

# Characters of an error's text kept in the job's last_error. The job item, spec included,
# must stay under DynamoDB's 400 KB item limit.
MAX_LAST_ERROR_CHARS = 2000

# failure_job_id(services, record, job_id) of sqs_handler: the job that a retried error of
# record is recorded on, given the job id of its message.
FailureJobId = Callable[[Services, SQSRecord, str], str]

_services: Services | None = None


def get_services() -> Services:
    """Return the process-wide adapters, built on first use so imports stay free of AWS calls."""
    global _services
    if _services is None:
        _services = Services()
    return _services


def set_services(services: Services | None) -> None:
    """Replace the process-wide adapters; for tests."""
    global _services
    _services = services


def _message_ids(body: str) -> dict[str, Any]:
    """Return the ids a log line or a failure needs, from a body that may be malformed."""
    message = body_object(body)
    if message is None:
        return {}
    return {key: message[key] for key in ("job_id", "round", "worker", "reduce") if key in message}


def silent_end_text(function_name: str) -> str:
    """Return the error recorded for a receive of ``function_name`` that ended without reporting one."""
    return (f"the receive ended without reporting an error, so the invocation most likely timed out, ran out of "
            f"memory or was throttled before it ran. Search the {function_name} function's log for the message "
            f"id: 'Task timed out' calls for a larger {function_name}Timeout stage parameter, and 'Runtime "
            f"exited' for a larger {function_name}Memory")


def _record_last_error(services: Services, function_name: str, record: SQSRecord, ids: dict[str, Any],
                       receive_count: int, error_type: str, error_text: str,
                       unless_recorded_since: int | None = None, first_received_at: float = 0.0) -> bool:
    """Store an error of receive ``receive_count`` as the job's ``last_error``; return whether it was stored.

    A failure to store it is logged, not raised: it must not replace the step's error,
    which the caller re-raises so that the record is retried.
    """
    last_error: dict[str, Any] = {
        "function": function_name,
        "message_id": record.message_id,
        "receive_count": receive_count,
        "error_type": error_type,
        "error": error_text[:MAX_LAST_ERROR_CHARS],
        "recorded_at": time.time(),
    }
    # The ids come from the message body, which may be malformed: keep only integers.
    for key in ("round", "worker", "reduce"):
        value = ids.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            last_error[key] = value
    try:
        stored = services.state.record_last_error(ids["job_id"], last_error, unless_recorded_since, first_received_at)
    except Exception as record_error:
        logger.warning("could not record the error on the job item",
                       extra={"record_error": f"{type(record_error).__name__}: {record_error}"})
        return False
    if not stored and unless_recorded_since is None:
        logger.info("error not recorded on the job item, which is missing or finished")
    return stored


def _record_silent_receive(services: Services, function_name: str, record: SQSRecord, ids: dict[str, Any],
                           receive_count: int, failure_job_id: FailureJobId | None) -> None:
    """Record that the previous receive of a redelivered message ended without an error.

    Every retried error is stored when it happens. So when the previous receive of a message
    left no error on the job item, it ended in a way no handler can catch: a timeout, an
    out-of-memory kill, a crash of the process or a throttle.

    The job item stores one error, so an error of another message recorded since this
    message was first received may have replaced this message's own. Then nothing is
    recorded, because the previous receive may have reported an error after all.
    """
    previous = receive_count - 1
    job_id = _job_of_failure(services, record, ids["job_id"], failure_job_id)
    if job_id is None:
        return
    ids = {**ids, "job_id": job_id}
    text = silent_end_text(function_name)
    first_received_at = int(record.attributes.approximate_first_receive_timestamp or 0) / 1000.0
    if _record_last_error(services, function_name, record, ids, previous, "NoErrorReported", text,
                          unless_recorded_since=previous, first_received_at=first_received_at):
        logger.warning("the previous receive of this message ended without reporting an error; recorded it as "
                       "the job's last_error", extra={"receive_count": receive_count})


def _job_of_failure(services: Services, record: SQSRecord, job_id: str,
                    failure_job_id: FailureJobId | None) -> str | None:
    """Return the job to record a retried error of ``record`` on, or None if ``failure_job_id`` raised.

    That is ``job_id``, the message's, unless ``failure_job_id`` names another job.
    """
    if failure_job_id is None:
        return job_id
    try:
        return failure_job_id(services, record, job_id)
    except Exception as read_error:
        logger.warning("could not read the job item to record the error on",
                       extra={"record_error": f"{type(read_error).__name__}: {read_error}"})
        return None


def missing_stack_resource(error: Exception, settings) -> str | None:
    """Return what to do about a DynamoDB table or SQS queue of the stack that does not exist, or None.

    Such an error comes from a function run against a stage that was never deployed (as
    with ``serverless invoke local --stage``), or whose table or queue names in the
    environment are wrong.
    """
    if not isinstance(error, ClientError):
        return None
    code = error.response.get("Error", {}).get("Code", "")
    if code == "ResourceNotFoundException":
        return (f"DynamoDB table '{settings.state_table_name}' not found ({error.operation_name}); deploy the stack "
                "of this stage first (`npx serverless deploy --stage STAGE`), or set STATE_TABLE_NAME to its table")
    if code in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
        queues = ", ".join(f"'{name}'" for name in (settings.jobs_queue_name, settings.tasks_queue_name,
                                                     settings.aggregate_queue_name))
        return (f"an SQS queue of the stack was not found ({error.operation_name}; the queues are {queues}); "
                "deploy the stack of this stage first, or set JOBS_QUEUE_NAME, TASKS_QUEUE_NAME and "
                "AGGREGATE_QUEUE_NAME to its queues")
    return None


@dataclass(frozen=True)
class Invocation:
    """The Lambda invocation running a step: its message id and remaining time."""

    message_id: str
    # The context's get_remaining_time_in_millis, or None without a context.
    remaining_millis: Callable[[], int] | None


def sqs_handler(function_name: str, step: Callable[[Services, SQSRecord, Invocation], Any], *,
                unnamed_job_id: Callable[[str], str] | None = None,
                failure_job_id: FailureJobId | None = None) -> Callable:
    """Build a Lambda handler that runs ``step`` on each SQS record of a batch.

    Parameters
    ----------
    function_name : str
        Name used in logs and recorded errors, for example ``"worker"``.
    step : callable
        ``step(services, record, invocation)``; its exceptions are routed as the module
        docstring describes.
    unnamed_job_id : callable, optional
        ``unnamed_job_id(message_id)`` returns the job id that ``step`` gives a message
        whose ``job_id`` is missing or not of the job id form
        (:func:`shared.state.can_record_job`). Without it, the handler takes the message's
        ``job_id`` as it is.
    failure_job_id : callable, optional
        ``failure_job_id(services, record, job_id)`` returns the job that a retried error
        of ``record`` is recorded on, given the job id of its message. Without it, that is
        the message's job. If it raises, the error is logged and recorded on no job.
    """

    def run_record(record: SQSRecord, context: Any) -> None:
        """Run ``step`` on one record and route its error as the module docstring describes.

        The record's ids are added to every log line until it ends. On a redelivered
        message, a previous receive that recorded no error is recorded first. Only the
        errors that a retry may fix are re-raised, which makes the batch report the record
        as failed, so SQS delivers it again.
        """
        ids = _message_ids(record.body)
        try:
            services = get_services()
        except BatonError as error:
            # A setting in the function's environment is invalid, so no record can run and
            # none can be recorded on its job. The message is retried until it is
            # dead-lettered, and this log line gives the reason.
            logger.error("invalid function configuration; the message will be retried", extra={
                "function": function_name, "message_id": record.message_id, **ids, "error": str(error)})
            raise
        if unnamed_job_id is not None and not can_record_job(ids.get("job_id")):
            # A job id of another form (empty, too long for a DynamoDB key, with spaces)
            # would give an item that the CLI cannot name, or none at all. So the failure
            # goes under the id derived from the message id, and the log keeps the given one.
            given_job_id = ids.get("job_id")
            ids["job_id"] = unnamed_job_id(record.message_id)
            if given_job_id is not None:
                ids["given_job_id"] = shown(given_job_id)
        logger.append_keys(function=function_name, message_id=record.message_id, **ids)
        job_id = ids.get("job_id")
        remaining_millis = getattr(context, "get_remaining_time_in_millis", None)
        receive_count = int(record.attributes.approximate_receive_count or 1)
        if receive_count > 1 and isinstance(job_id, str) and can_record_job(job_id):
            _record_silent_receive(services, function_name, record, ids, receive_count, failure_job_id)
        try:
            step(services, record, Invocation(record.message_id, remaining_millis))
        except StaleMessageError as error:
            logger.info("dropped stale message", extra={"reason": str(error)})
        except InvalidMessageError as error:
            logger.error("dropped invalid message", extra={"error": str(error), "body": record.body[:512]})
        except JobConflictError as error:
            # The job id belongs to another job, which must not be touched: the rejected
            # message is recorded under the id derived from its message id.
            rejected_id = derive_job_id(record.message_id)
            logger.error("job rejected", extra={"error": str(error), "error_type": type(error).__name__,
                                                "rejected_job_id": rejected_id})
            services.state.fail_job(rejected_id, str(error))
        except PermanentError as error:
            logger.error("job failed", extra={"error": str(error), "error_type": type(error).__name__})
            if job_id is not None:
                # A repairable error leaves the job its repair, which `baton resume` makes.
                repair = error.repair if isinstance(error, RepairableDataError) else None
                services.state.fail_job(job_id, str(error), repair=repair)
        except Exception as error:
            missing = missing_stack_resource(error, services.settings)
            if missing is not None:
                # Without the table no job can record the error, so the log line and the
                # raised error are where it shows.
                logger.error("stack resource not found; the message will be retried", extra={"error": missing})
                raise BatonError(missing) from error
            logger.exception("record failed; it will be retried", extra={"receive_count": receive_count})
            if job_id is not None:
                job_id = _job_of_failure(services, record, job_id, failure_job_id)
                ids["job_id"] = job_id
            if job_id is not None and receive_count >= services.settings.max_receive_count:
                services.state.fail_job(
                    job_id, f"{function_name} failed {receive_count} times on message {record.message_id}: "
                            f"{type(error).__name__}: {error}; the message is now in the dead-letter queue")
            elif job_id is not None:
                _record_last_error(services, function_name, record, ids, receive_count, type(error).__name__,
                                   str(error))
            raise
        finally:
            logger.remove_keys(["function", "message_id", "job_id", "round", "worker", "reduce"])

    def handler(event: dict, context: Any) -> PartialItemFailureResponse:
        processor = BatchProcessor(event_type=EventType.SQS)
        return process_partial_response(event=event, record_handler=lambda record: run_record(record, context),
                                        processor=processor, context=context)

    handler.__name__ = f"{function_name}_handler"
    return handler
