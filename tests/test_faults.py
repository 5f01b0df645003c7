"""The fault matrix: every step of every function, failed in every way, still trains to the same bytes.

All cells run at once on one local stack, each as its own job: the fault rules in the
containers' environment name a cell's job id, so a rule fires only in its own cell. One
fault-free job gives the reference weights. Under pytest-xdist the matrix runs in one
worker process and the others read its results.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from shared.faults import STEP_KINDS
from shared.local.runtime import LocalRuntime
from shared.local.session import LocalStack
from shared.local.stack import load_stack_definition
from tests.reliability_support import (
    FAST_RETRY_SECONDS, a9a_spec, params_digest, run_once_per_session, wait_all, write_a9a_subset)

# The round and worker a worker or aggregator fault hits: the third round (a full batch,
# so a worker needs two steps), the second worker.
FAULT_ROUND = 2
FAULT_WORKER = 1
# Reducer cells train with this many reducers; their faults hit the second slice.
REDUCERS = 3
FAULT_SLICE = 1

STEP_CELLS = [(step, kind) for step in (
    "starter.validated", "starter.prepared", "starter.started",
    "worker.before_read", "worker.after_progress", "worker.after_write", "worker.after_record",
    "aggregator.before_read", "aggregator.after_write", "aggregator.after_progress", "aggregator.after_metrics",
    "aggregator.before_finish", "aggregator.after_advance",
    "reducer.before_read", "reducer.after_write", "reducer.after_record",
) for kind in STEP_KINDS]

DELIVERY_CELLS = [
    ("starter", "duplicate", 0), ("starter", "duplicate", 2),
    ("worker", "duplicate", 0), ("worker", "duplicate", 3), ("worker", "delay", 2), ("worker", "reorder", 0),
    ("aggregator", "duplicate", 0), ("aggregator", "duplicate", 3), ("aggregator", "delay", 2),
    # Reduce messages ride the aggregate queue, so the aggregator's lanes deliver them.
    ("reducer", "duplicate", 0), ("reducer", "duplicate", 3), ("reducer", "delay", 2), ("reducer", "reorder", 0),
]

# Timeouts short enough that a hung invocation is killed quickly, long enough for a step
# of these small jobs on a loaded machine.
TIMEOUTS = {"starter": 8, "worker": 5, "aggregator": 5}


def step_cell_id(step: str, kind: str) -> str:
    return f"{step.replace('.', '-').replace('_', '-')}-{kind}"


def delivery_cell_id(function: str, kind: str, delay_seconds: int) -> str:
    return f"{function}-{kind}" + (f"-late{delay_seconds}" if delay_seconds else "")


def build_rules() -> tuple[list[dict], dict[str, int]]:
    """Return the fault rules of every cell and the index of each cell's rule."""
    rules, index_of = [], {}
    for step, kind in STEP_CELLS:
        rule = {"step": step, "kind": kind, "job_id": step_cell_id(step, kind), "times": 1}
        if step == "aggregator.before_finish":
            pass
        elif not step.startswith("starter."):
            rule["round"] = FAULT_ROUND
        if step.startswith("worker."):
            rule["worker"] = FAULT_WORKER
        if step.startswith("reducer."):
            rule["reduce"] = FAULT_SLICE
        index_of[rule["job_id"]] = len(rules)
        rules.append(rule)
    for function, kind, delay_seconds in DELIVERY_CELLS:
        job_id = delivery_cell_id(function, kind, delay_seconds)
        rule = {"function": function, "kind": kind, "job_id": job_id, "times": 1, "delay_seconds": delay_seconds}
        if function != "starter":
            rule["round"] = FAULT_ROUND
        if function == "reducer":
            rule["function"] = "aggregator"
            # A reorder rule fires on the first message of a received group, whichever slice it is.
            if kind != "reorder":
                rule["reduce"] = FAULT_SLICE
        index_of[job_id] = len(rules)
        rules.append(rule)
    return rules, index_of


def run_matrix(work_dir: Path) -> dict:
    efs_root = work_dir / "efs"
    faults_dir = work_dir / "faults"
    data_path = write_a9a_subset(efs_root, 12000)
    rules, index_of = build_rules()
    environment = {
        "BATON_FAULTS_ENABLED": "true",
        "BATON_FAULTS": json.dumps(rules),
        "BATON_FAULTS_DIR": str(faults_dir),
        # Every worker round is two steps and every aggregation three, so the
        # after_progress steps are reached.
        "MAX_STEPS_PER_INVOCATION": "1",
        # A fault between the starter's RUNNING transition and its send of round 0 leaves
        # the job waiting for tasks that never come; the watchdog re-sends them. The
        # deadline leaves room for a round that a busy machine slows to several seconds,
        # since three stalls in a row fail the job.
        "STALL_SECONDS": "20",
    }
    job_ids = ["reference", *index_of]
    reducer_jobs = {job_id for job_id in index_of if job_id.startswith("reducer-")}
    with LocalStack(efs_root, extra_environment=environment, retry_delay_seconds=FAST_RETRY_SECONDS,
                    timeout_seconds=TIMEOUTS, concurrency={"starter": 4, "worker": 6, "aggregator": 4},
                    schedule_seconds={"watchdog": 2}) as stack:
        for job_id in job_ids:
            # Reducer cells must give the reference's bytes although the reference has one reducer.
            training = {"reducers": REDUCERS} if job_id in reducer_jobs else {}
            stack.submit(a9a_spec(job_id, data_path, **training))
        records = wait_all(stack, job_ids, timeout_seconds=400)
    fired = {job_id: (faults_dir / f"rule-{index}-0").exists() for job_id, index in index_of.items()}
    return {job_id: {"status": record.status, "error": record.error, "digest": params_digest(efs_root, job_id),
                     "fired": fired.get(job_id, True)}
            for job_id, record in records.items()}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, testrun_uid):
    shared_dir = tmp_path_factory.getbasetemp().parent / f"fault-matrix-{testrun_uid}"
    return run_once_per_session(shared_dir, "results", lambda: run_matrix(tmp_path_factory.mktemp("matrix")))


def check_cell(matrix: dict, job_id: str) -> None:
    cell, reference = matrix[job_id], matrix["reference"]
    assert reference["status"] == "SUCCEEDED", reference["error"]
    assert cell["fired"], f"the fault of {job_id} never fired"
    assert cell["status"] == "SUCCEEDED", cell["error"]
    assert cell["digest"] == reference["digest"]


@pytest.mark.parametrize("step,kind", STEP_CELLS, ids=[step_cell_id(*cell) for cell in STEP_CELLS])
def test_step_fault_keeps_weights(matrix, step, kind):
    check_cell(matrix, step_cell_id(step, kind))


@pytest.mark.parametrize("function,kind,delay_seconds", DELIVERY_CELLS,
                         ids=[delivery_cell_id(*cell) for cell in DELIVERY_CELLS])
def test_delivery_fault_keeps_weights(matrix, function, kind, delay_seconds):
    check_cell(matrix, delivery_cell_id(function, kind, delay_seconds))


def test_faults_off_without_environment(monkeypatch):
    monkeypatch.delenv("BATON_FAULTS_ENABLED", raising=False)
    monkeypatch.setenv("BATON_FAULTS", json.dumps([{"step": "worker.before_read", "kind": "raise"}]))
    from shared import faults

    faults.maybe_fail("worker.before_read", job_id="any", round=0, worker=0)
    assert faults.load_rules() == []


def test_reorder_lane_receives_whole_round(tmp_path):
    # Nine messages of other jobs come first, so a receive of ten ends after the round's
    # first reduce message. The lane must still get all three to run them back to front.
    rule = {"function": "aggregator", "kind": "reorder", "job_id": "target", "round": 2, "times": 1}
    environment = {"BATON_FAULTS_ENABLED": "true", "BATON_FAULTS": json.dumps([rule]),
                   "BATON_FAULTS_DIR": str(tmp_path / "faults")}
    definition = load_stack_definition(stage="test").functions["aggregator"]
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = sqs.create_queue(QueueName="aggregate")["QueueUrl"]
        for index in range(9):
            sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"job_id": f"other-{index}", "round": 2}))
        sqs.send_message_batch(QueueUrl=url, Entries=[
            {"Id": str(slice_index), "MessageBody": json.dumps({"job_id": "target", "round": 2, "reduce": slice_index})}
            for slice_index in range(3)])
        runtime = LocalRuntime({"aggregator": definition}, {definition.queue_logical_id: url}, sqs, environment,
                               tmp_path / "logs")

        messages = runtime._receive(runtime.lanes["aggregator"], reorder=True)

    bodies = [json.loads(message["Body"]) for message in messages]
    assert sorted(body["reduce"] for body in bodies if body["job_id"] == "target") == [0, 1, 2]
    assert len(bodies) == 12
