"""Helpers for tests that run whole jobs through the in-process stack."""

from __future__ import annotations

import json

import numpy as np

from shared.models import MODELS
from tests.inprocess import HANDLERS, FakeContext, InProcessStack, sqs_event


def breast_cancer_spec(job_id: str, model: dict | None = None, optimizer: dict | None = None,
                       data: dict | None = None, training: dict | None = None) -> dict:
    """Return a small job on tests/data/breast_cancer.csv (a numeric header line, labels last).

    The penalty alpha 1e-3 is set for every model that reads it.
    """
    model = {"name": "logistic_regression", **(model or {})}
    if "alpha" in MODELS[model["name"]].spec_fields():
        model = {"alpha": 1e-3, **model}
    return {
        "job_id": job_id,
        "model": model,
        "optimizer": {"name": "sgd", "learning_rate": 0.5, **(optimizer or {})},
        "data": {"path": "datasets/breast_cancer.csv", "format": "csv", "skip_rows": 1, "standardize": True,
                 **(data or {})},
        "training": {"n_workers": 3, "batch_size": 32, "max_rounds": 6, "seed": 11, **(training or {})},
    }


def run_job(stack: InProcessStack, spec: dict):
    """Submit ``spec``, deliver messages until the queues are empty, and return the job record."""
    stack.submit(spec)
    stack.run()
    return stack.services.state.get_job(spec["job_id"])


def forget_job(stack: InProcessStack, job_id: str) -> None:
    """Delete a job's items from the state table, as a new local stack starts without them."""
    state = stack.services.state
    items = state.client.query(TableName=state.table_name, KeyConditionExpression="pk = :pk",
                               ExpressionAttributeValues={":pk": {"S": f"JOB#{job_id}"}})["Items"]
    for item in items:
        state.client.delete_item(TableName=state.table_name, Key={"pk": item["pk"], "sk": item["sk"]})


def run_job_with_shuffled_tasks(stack: InProcessStack, spec: dict, seed: int):
    """Run ``spec`` delivering each round's task messages in a random order; return the job record."""
    rng = np.random.default_rng(seed)
    stack.submit(spec)
    tasks_url = stack.queue_urls["TasksQueue"]
    while True:
        progressed = False
        while stack.step("JobsQueue") is not None:
            progressed = True
        messages = []
        while True:
            received = stack.sqs.receive_message(QueueUrl=tasks_url, MaxNumberOfMessages=10,
                                                 AttributeNames=["All"]).get("Messages", [])
            if not received:
                break
            messages.extend(received)
        for index in rng.permutation(len(messages)):
            message = messages[index]
            response = HANDLERS["TasksQueue"](sqs_event([message], "tasks"), FakeContext())
            assert not response["batchItemFailures"], json.loads(message["Body"])
            stack.sqs.delete_message(QueueUrl=tasks_url, ReceiptHandle=message["ReceiptHandle"])
            progressed = True
        while stack.step("AggregateQueue") is not None:
            progressed = True
        if not progressed:
            return stack.services.state.get_job(spec["job_id"])


def final_params(efs_root, job_id: str) -> np.ndarray:
    return np.load(efs_root / "jobs" / job_id / "model" / "params.npy")
