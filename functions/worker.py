"""Lambda handler for the tasks queue: compute one worker's gradient for one round."""

from shared.handlers import sqs_handler
from shared.queues import parse_task
from shared.worker import run_task

handler = sqs_handler(
    "worker",
    lambda services, record, invocation: run_task(
        services, parse_task(record.body), invocation.message_id, invocation.remaining_millis))
