"""Lambda handler for the aggregate queue: combine a round and start the next one."""

from shared.handlers import sqs_handler
from shared.queues import parse_aggregate
from shared.service import aggregate_round

handler = sqs_handler(
    "aggregator",
    lambda services, record, invocation: aggregate_round(
        services, parse_aggregate(record.body), invocation.message_id, invocation.remaining_millis))
