"""The local moto server's shortcuts return what moto itself returns, and reject what it rejects.

The server (``shared/local/moto_server.py``) runs in its own process with its changes to
moto applied. moto's in-process mock in this process runs moto unchanged, so the same
requests sent to both must give the same responses.
"""

from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from shared.local.session import start_moto_server
from shared.local.processes import stop_process

TABLE = "moto-server-check"
KEY = {"pk": {"S": "JOB#a"}, "sk": {"S": "ROUND#00000001"}}

# One attribute of every AttributeValue type, nested maps and lists, empty containers,
# and binary values, which the server leaves to moto's own serializer.
ITEM = {
    **KEY,
    "text": {"S": "a spec with \"quotes\", unicode \u00e9 and a newline\n"},
    "empty_text": {"S": ""},
    "integer": {"N": "42"},
    "decimal": {"N": "0.30000000000000004"},
    "numbers": {"NS": ["1", "2", "3"]},
    "strings": {"SS": ["x", "y"]},
    "yes": {"BOOL": True},
    "no": {"BOOL": False},
    "nothing": {"NULL": True},
    "nested": {"M": {"inner": {"L": [{"S": "a"}, {"N": "1"}, {"M": {"deep": {"BOOL": False}}}]},
                     "empty_map": {"M": {}}, "empty_list": {"L": []}}},
    "blob": {"B": b"\x00\x01binary"},
    "blobs": {"BS": [b"one", b"two"]},
    "blob_in_map": {"M": {"data": {"B": b"\xff"}}},
}


def create_table(client) -> None:
    client.create_table(TableName=TABLE, BillingMode="PAY_PER_REQUEST",
                        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                              {"AttributeName": "sk", "AttributeType": "S"}],
                        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                                   {"AttributeName": "sk", "KeyType": "RANGE"}])


def run_requests(client) -> dict:
    """Send the item requests Baton makes and return the responses without their metadata."""
    create_table(client)
    client.put_item(TableName=TABLE, Item=ITEM)
    responses = {
        "get": client.get_item(TableName=TABLE, Key=KEY, ConsistentRead=True),
        "batch_get": client.batch_get_item(RequestItems={TABLE: {"Keys": [KEY], "ConsistentRead": True}}),
        "update": client.update_item(
            TableName=TABLE, Key=KEY, UpdateExpression="ADD #set :member SET #note = :note",
            ExpressionAttributeNames={"#set": "numbers", "#note": "note"},
            ExpressionAttributeValues={":member": {"NS": ["4"]}, ":note": {"S": "added"}},
            ReturnValues="ALL_NEW"),
        "query": client.query(TableName=TABLE, KeyConditionExpression="pk = :pk",
                              ExpressionAttributeValues={":pk": KEY["pk"]}, ConsistentRead=True),
    }
    try:
        client.update_item(TableName=TABLE, Key=KEY, UpdateExpression="ADD #set :member",
                           ConditionExpression="NOT contains(#set, :number)",
                           ExpressionAttributeNames={"#set": "numbers"},
                           ExpressionAttributeValues={":member": {"NS": ["4"]}, ":number": {"N": "4"}},
                           ReturnValuesOnConditionCheckFailure="ALL_OLD")
    except ClientError as error:
        responses["condition_failure"] = {"code": error.response["Error"]["Code"], "item": error.response.get("Item")}
    for response in responses.values():
        response.pop("ResponseMetadata", None)
    return responses


@pytest.fixture
def server_client(tmp_path):
    server, endpoint = start_moto_server(tmp_path / "moto.log")
    try:
        yield boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1")
    finally:
        stop_process(server)


def test_item_responses_match_moto(server_client):
    from_server = run_requests(server_client)
    with mock_aws():
        from_moto = run_requests(boto3.client("dynamodb", region_name="us-east-1"))

    assert from_server["condition_failure"]["code"] == "ConditionalCheckFailedException"
    assert sorted(from_server["condition_failure"]["item"]["numbers"]["NS"]) == ["1", "2", "3", "4"]
    for name in from_moto:
        assert from_server[name] == from_moto[name], name


def update_note(client, names: dict, expression: str = "SET #a = :value") -> None:
    client.update_item(TableName=TABLE, Key=KEY, UpdateExpression=expression,
                       ExpressionAttributeNames=names, ExpressionAttributeValues={":value": {"S": "v"}})


def validation_message(client, names: dict, expression: str) -> str:
    with pytest.raises(ClientError) as raised:
        update_note(client, names, expression)
    assert raised.value.response["Error"]["Code"] == "ValidationException"
    return raised.value.response["Error"]["Message"]


def test_key_update_rejected_after_valid_one(server_client):
    create_table(server_client)
    update_note(server_client, {"#a": "note"})
    update_note(server_client, {"#a": "note"})

    # The same expression text, now naming the sort key: the structural checks run again.
    message = validation_message(server_client, {"#a": "sk"}, "SET #a = :value")
    assert "sk" in message


def test_invalid_expression_rejected_every_time(server_client):
    create_table(server_client)
    twice = "SET #a = :value, #a = :value"
    first = validation_message(server_client, {"#a": "note"}, twice)
    second = validation_message(server_client, {"#a": "note"}, twice)
    assert first == second

    clauses = "SET #a = :value SET #a = :value"
    assert validation_message(server_client, {"#a": "note"}, clauses) == validation_message(
        server_client, {"#a": "note"}, clauses)


def test_concurrent_receives_never_share_message(monkeypatch):
    import threading
    import time

    import moto.sqs.models

    from shared.local.moto_server import serialized_receive

    mark_received = moto.sqs.models.Message.mark_received

    def slow_mark_received(self, *args, **kwargs):
        # Widen the gap between moto's visibility check and the mark, where two receives race.
        time.sleep(0.005)
        return mark_received(self, *args, **kwargs)

    monkeypatch.setattr(moto.sqs.models.Message, "mark_received", slow_mark_received)
    monkeypatch.setattr(moto.sqs.models.SQSBackend, "receive_message",
                        serialized_receive(moto.sqs.models.SQSBackend.receive_message))
    received: list[str] = []
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = sqs.create_queue(QueueName="race", Attributes={"VisibilityTimeout": "600"})["QueueUrl"]
        for index in range(40):
            sqs.send_message(QueueUrl=url, MessageBody=str(index))

        def receive_until_empty():
            while True:
                messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1).get("Messages", [])
                if not messages:
                    return
                received.append(messages[0]["MessageId"])

        threads = [threading.Thread(target=receive_until_empty) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert len(received) == 40
    assert len(set(received)) == 40
