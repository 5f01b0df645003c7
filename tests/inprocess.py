"""Drive Baton's real handlers in the test process against moto's in-process mock.

The driver plays the part of Lambda's event source mappings one batch at a time (one message
by default), in a deterministic order, and lets a test duplicate, hold back or replay
messages between steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError

from functions import aggregator, starter, worker
from shared.config import Settings
from shared.handlers import set_services
from shared.local.stack import create_stack, load_stack_definition
from shared.services import Services

HANDLERS = {"JobsQueue": starter.handler, "TasksQueue": worker.handler, "AggregateQueue": aggregator.handler}


class FakeContext:
    """A Lambda context with plenty of time left."""

    function_name = "test"
    memory_limit_in_mb = 1024
    aws_request_id = "test-request"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:test"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


def sqs_event(messages: list[dict], queue_name: str) -> dict:
    """Build the event Lambda sends for ``messages`` received from ``queue_name``."""
    return {"Records": [{
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": {"ApproximateReceiveCount": message.get("Attributes", {}).get("ApproximateReceiveCount", "1"),
                       "SentTimestamp": "0", "SenderId": "test",
                       "ApproximateFirstReceiveTimestamp": message.get("Attributes", {}).get(
                           "ApproximateFirstReceiveTimestamp", "0")},
        "messageAttributes": {},
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:us-east-1:123456789012:{queue_name}",
        "awsRegion": "us-east-1",
    } for message in messages]}


@dataclass
class Delivery:
    """One handled message, as the driver saw it."""

    queue: str
    body: dict
    failed: bool


@dataclass
class InProcessStack:
    """The stack's queues and table on moto's mock, with the handlers called in-process.

    Create it inside ``moto.mock_aws``.
    """

    efs_root: Path
    deliveries: list[Delivery] = field(default_factory=list)
    batches: list[list[dict]] = field(default_factory=list)
    # Seconds a failed message stays invisible before its next receive. Lambda leaves it
    # for the queue's visibility timeout (1800 s for tasks); 0 retries it on the next step.
    retry_delay_seconds: int = 0

    def __post_init__(self):
        self.definition = load_stack_definition(stage="test")
        self.sqs = boto3.client("sqs", region_name="us-east-1")
        self.dynamodb = boto3.client("dynamodb", region_name="us-east-1")
        self.queue_urls = create_stack(self.definition, self.sqs, self.dynamodb)
        self.settings: Settings = self.definition.settings(str(self.efs_root))
        self.services = Services(self.settings, dynamodb=self.dynamodb, sqs=self.sqs)
        set_services(self.services)

    def close(self) -> None:
        set_services(None)

    def submit(self, spec: dict | str) -> None:
        body = spec if isinstance(spec, str) else json.dumps(spec)
        self.sqs.send_message(QueueUrl=self.queue_urls["JobsQueue"], MessageBody=body)

    def send(self, logical_id: str, body: dict) -> None:
        """Put a message on a queue by hand, for example a duplicate."""
        self.sqs.send_message(QueueUrl=self.queue_urls[logical_id], MessageBody=json.dumps(body))

    def step(self, logical_id: str, batch_size: int = 1) -> Delivery | None:
        """Receive up to ``batch_size`` messages from a queue and run its handler on them as one batch.

        Returns the last delivery, or None if the queue is empty.
        """
        url = self.queue_urls[logical_id]
        messages = self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=batch_size,
                                            AttributeNames=["All"]).get("Messages", [])
        if not messages:
            return None
        try:
            response = HANDLERS[logical_id](sqs_event(messages, url.rsplit("/", 1)[-1]), FakeContext())
            failed_ids = {failure["itemIdentifier"] for failure in response["batchItemFailures"]}
        except BatchProcessingError:
            # Powertools raises when every record failed, and Lambda then returns the whole batch.
            failed_ids = {message["MessageId"] for message in messages}

        delivery = None
        batch = []
        for message in messages:
            failed = message["MessageId"] in failed_ids
            if failed:
                self.sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"],
                                                   VisibilityTimeout=self.retry_delay_seconds)
            else:
                self.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            try:
                body = json.loads(message["Body"])
            except json.JSONDecodeError:
                body = {"raw": message["Body"]}
            delivery = Delivery(logical_id, body if isinstance(body, dict) else {"raw": body}, failed)
            self.deliveries.append(delivery)
            batch.append(delivery.body)
        self.batches.append(batch)
        return delivery

    def run(self, max_steps: int = 100_000, before_step=None, batch_size: int = 1) -> int:
        """Deliver messages until every queue is empty; return the number of deliveries.

        ``before_step(stack)`` runs before each delivery, so a test can inject messages.
        """
        steps = 0
        while steps < max_steps:
            if before_step is not None:
                before_step(self)
            progressed = False
            for logical_id in ("JobsQueue", "TasksQueue", "AggregateQueue"):
                if self.step(logical_id, batch_size) is not None:
                    progressed = True
                    steps += 1
            if not progressed:
                return steps
        raise AssertionError(f"queues still busy after {max_steps} deliveries")

    def queue_depth(self, logical_id: str) -> int:
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_urls[logical_id],
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])
