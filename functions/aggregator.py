"""Lambda handler for the aggregate queue: reduce a slice of a round, or combine a round and start the next."""

from shared.handlers import sqs_handler
from shared.queues import parse_aggregate
from shared.aggregation import handle_aggregate_message

handler = sqs_handler(
    "aggregator",
    lambda services, record, invocation: handle_aggregate_message(
        services, parse_aggregate(record.body), invocation.message_id, invocation.remaining_millis))
