"""Job listing reads the sparse jobs index, never the round items.

The watchdog and `baton list` both call :meth:`StateStore.list_jobs`. A table scan there
would read every round item of every job on each watchdog run, so these tests record the
DynamoDB operations and check that only the index is queried.
"""

from __future__ import annotations

import time

from shared.control import run_watchdog
from shared.local.stack import load_serverless_config
from shared.state import FAILED, ITEM_TYPE, JOB_ITEM_TYPE, JOBS_INDEX, RUNNING, SUCCEEDED, _job_key
from tests.baton_jobs import breast_cancer_spec, run_job


def record_operations(client) -> list[tuple[str, dict]]:
    """Return a list that fills with (operation, request) for every call ``client`` makes."""
    calls: list[tuple[str, dict]] = []

    def record(model, params, **kwargs):
        calls.append((model.name, params))

    client.meta.events.register("provide-client-params.dynamodb.*", record)
    return calls


def test_index_in_serverless_yml_matches_state_store():
    table = load_serverless_config()["resources"]["Resources"]["StateTable"]["Properties"]
    [index] = table["GlobalSecondaryIndexes"]
    assert index["IndexName"] == JOBS_INDEX
    assert [(key["AttributeName"], key["KeyType"]) for key in index["KeySchema"]] == [
        (ITEM_TYPE, "HASH"), ("created_at", "RANGE")]
    assert index["Projection"]["ProjectionType"] == "ALL"
    types = {definition["AttributeName"]: definition["AttributeType"] for definition in table["AttributeDefinitions"]}
    assert (types[ITEM_TYPE], types["created_at"]) == ("S", "N")


def test_list_jobs_reads_index_oldest_first(inprocess_stack):
    state = inprocess_stack.services.state
    assert run_job(inprocess_stack, breast_cancer_spec("first")).status == SUCCEEDED
    # A job whose spec was rejected has its item created by fail_job, not create_job.
    bad = breast_cancer_spec("rejected")
    bad["optimizer"]["learning_rate"] = -1
    assert run_job(inprocess_stack, bad).status == FAILED
    state.create_job("third", "fingerprint", "{}", n_workers=2)

    calls = record_operations(state.client)
    jobs = state.list_jobs()

    assert [job.job_id for job in jobs] == ["first", "rejected", "third"]
    assert [operation for operation, _ in calls] == ["Query"]
    assert calls[0][1]["IndexName"] == JOBS_INDEX
    item = state.client.get_item(TableName=state.table_name, Key=_job_key("rejected"))["Item"]
    assert item[ITEM_TYPE] == {"S": JOB_ITEM_TYPE}


def test_round_items_stay_out_of_index(inprocess_stack):
    state = inprocess_stack.services.state
    assert run_job(inprocess_stack, breast_cancer_spec("rounds")).status == SUCCEEDED

    indexed = state.client.query(TableName=state.table_name, IndexName=JOBS_INDEX,
                                 KeyConditionExpression="#type = :job", ExpressionAttributeNames={"#type": ITEM_TYPE},
                                 ExpressionAttributeValues={":job": {"S": JOB_ITEM_TYPE}})["Items"]
    everything = state.client.query(TableName=state.table_name, KeyConditionExpression="pk = :pk",
                                    ExpressionAttributeValues={":pk": {"S": "JOB#rounds"}})["Items"]

    assert [item["sk"]["S"] for item in indexed] == ["JOB"]
    assert len(everything) > 6, "the job should have left round items in the table"


def test_watchdog_resends_without_scanning(inprocess_stack):
    state = inprocess_stack.services.state
    inprocess_stack.submit(breast_cancer_spec("stalled"))
    while state.get_job("stalled") is None or state.get_job("stalled").status != RUNNING:
        assert inprocess_stack.step("JobsQueue") is not None
    inprocess_stack.sqs.purge_queue(QueueUrl=inprocess_stack.queue_urls["TasksQueue"])

    calls = record_operations(state.client)
    later = time.time() + inprocess_stack.services.settings.stall_seconds + 60
    counts = run_watchdog(inprocess_stack.services, now=later)

    assert counts["resent"] == 1
    operations = [operation for operation, _ in calls]
    assert "Scan" not in operations
    assert ("Query", JOBS_INDEX) in [(operation, request.get("IndexName")) for operation, request in calls]
    inprocess_stack.run()
    assert state.get_job("stalled").status == SUCCEEDED


def test_untyped_job_enters_index_at_advance(inprocess_stack):
    # A job item written before the index existed has no item_type until its next round.
    state = inprocess_stack.services.state
    inprocess_stack.submit(breast_cancer_spec("older"))
    while state.get_job("older") is None or state.get_job("older").status != RUNNING:
        assert inprocess_stack.step("JobsQueue") is not None
    state.client.update_item(TableName=state.table_name, Key=_job_key("older"), UpdateExpression=f"REMOVE {ITEM_TYPE}")
    assert state.list_jobs() == []

    while state.get_job("older").round == 0:
        assert any(inprocess_stack.step(queue) is not None for queue in ("TasksQueue", "AggregateQueue"))

    assert [job.job_id for job in state.list_jobs()] == ["older"]
