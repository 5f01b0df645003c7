"""Helpers for tests that run whole jobs through the in-process stack."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from shared.handlers import set_services
from shared.models import MODELS
from shared.services import Services
from tests.inprocess import HANDLERS, FakeContext, InProcessStack, sqs_event
from tests.test_models import DATASETS_DIR

CALIFORNIA_HOUSING = DATASETS_DIR / "california_housing" / "537_houses.tsv.gz"
DIABETES = DATASETS_DIR / "diabetes"


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


def run_to_round(stack: InProcessStack, job_id: str, round_index: int) -> None:
    """Deliver messages until the job's item reaches ``round_index``, whose tasks are then queued."""
    while True:
        record = stack.services.state.get_job(job_id)
        if record is not None and record.round >= round_index:
            return
        if not any(stack.step(queue) for queue in ("JobsQueue", "TasksQueue", "AggregateQueue")):
            raise AssertionError(f"job {job_id} ended before round {round_index}")


def use_services(stack: InProcessStack, services: Services) -> Services:
    """Let the handlers run with ``services``, as the Lambda containers holding them would."""
    stack.services = services
    set_services(services)
    return services


def cold_start(stack: InProcessStack) -> Services:
    """Give the handlers new services with nothing cached, as new Lambda containers have."""
    return use_services(stack, Services(stack.settings, dynamodb=stack.dynamodb, sqs=stack.sqs))


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


def california_housing(target_factor: float = 1.0) -> tuple[list[str], np.ndarray]:
    """Return california_housing's column names and rows, the "target" column times ``target_factor``.

    The target is the median house value in dollars (about 2e5, standard deviation 1.15e5).
    """
    if not CALIFORNIA_HOUSING.is_file():
        pytest.skip(f"california_housing data set not found at {CALIFORNIA_HOUSING}; set BATON_DATASETS_DIR")
    with gzip.open(CALIFORNIA_HOUSING, "rt") as handle:
        names = handle.readline().rstrip("\n").split("\t")
        table = np.loadtxt(handle, delimiter="\t")
    table[:, names.index("target")] *= target_factor
    return names, table


def write_csv(efs_root: Path, relative_path: str, names: list[str], table: np.ndarray) -> str:
    """Write ``table`` with a header line of ``names`` under ``efs_root``, every float exactly; return the path."""
    path = efs_root / relative_path
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, table, delimiter=",", header=",".join(names), comments="", fmt="%.17g")
    return relative_path


def california_spec(job_id: str, path: str, model: dict, optimizer: dict | None = None, data: dict | None = None,
                    training: dict | None = None) -> dict:
    """Return a job on a CSV written by :func:`write_csv` from :func:`california_housing`, for one epoch."""
    return {
        "job_id": job_id,
        "model": model,
        "optimizer": optimizer or {"name": "momentum"},
        "data": {"path": path, "format": "csv", "header": True, "label_column": "target", "validation_fraction": 0.2,
                 "standardize": True, **(data or {})},
        "training": {"n_workers": 4, "batch_size": 128, "max_epochs": 1, "seed": 7, **(training or {})},
    }


def write_diabetes(efs_root: Path, target: float | None = None) -> str:
    """Write the diabetes data set as datasets/diabetes.npz under ``efs_root``; return its path.

    The target is the disease progression after a year (25 to 346, mean 152, standard
    deviation 77). A ``target`` value replaces every row's target with that constant.
    """
    if not DIABETES.is_dir():
        pytest.skip(f"diabetes data set not found in {DIABETES}; set BATON_DATASETS_DIR")
    X = np.loadtxt(DIABETES / "diabetes_data_raw.csv.gz")
    y = np.loadtxt(DIABETES / "diabetes_target.csv.gz")
    if target is not None:
        y = np.full_like(y, target)
    (efs_root / "datasets").mkdir(parents=True, exist_ok=True)
    np.savez(efs_root / "datasets" / "diabetes.npz", X=X, y=y)
    return "datasets/diabetes.npz"
