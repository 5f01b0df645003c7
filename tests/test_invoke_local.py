"""Each function through `serverless invoke local` on its sample event in events/.

GIVEN a moto server on 127.0.0.1 with the dev stage's queues and table, and a folder for
EFS that contains tests/data/breast_cancer.csv under datasets/.
WHEN the framework runs the starter, both workers, the aggregator and the watchdog on the
sample events, in the order a job would see them.
THEN each reports no failed records, and the job moves to round index 1 with the metrics
of its first round (round number 1) on EFS and in DynamoDB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from shared.local.stack import create_stack, load_stack_definition
from shared.state import RUNNING, StateStore

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EVENTS_DIR = PROJECT_ROOT / "events"
SERVERLESS_BIN = PROJECT_ROOT / "node_modules" / ".bin" / "serverless"
BREAST_CANCER_CSV = PROJECT_ROOT / "tests" / "data" / "breast_cancer.csv"
# The job that events/starter.json starts.
JOB_ID = "invoke-local-demo"

pytestmark = pytest.mark.skipif(
    not SERVERLESS_BIN.exists(), reason="node_modules is absent; run `npm ci` to test `serverless invoke local`")


@pytest.fixture
def dev_stack(moto_endpoint):
    """The dev stage's queues and table on the moto server; returns the state store."""
    definition = load_stack_definition(stage="dev")
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                    region_name="us-east-1")
    sqs = session.client("sqs", endpoint_url=moto_endpoint)
    dynamodb = session.client("dynamodb", endpoint_url=moto_endpoint)
    create_stack(definition, sqs, dynamodb)
    return StateStore(dynamodb, definition.table_name())


@pytest.fixture
def local_efs(tmp_path: Path) -> Path:
    root = tmp_path / "efs"
    (root / "datasets").mkdir(parents=True)
    shutil.copyfile(BREAST_CANCER_CSV, root / "datasets" / "breast_cancer.csv")
    return root


def invoke_local(function: str, event_path: Path, endpoint: str, efs_root: Path) -> dict:
    """Run `serverless invoke local` and return the handler's JSON result."""
    return invoke_local_with_logs(function, event_path, endpoint, efs_root)[0]


def invoke_local_with_logs(function: str, event_path: Path, endpoint: str, efs_root: Path) -> tuple[dict, str]:
    """Run `serverless invoke local`; return the handler's JSON result and the output before it, its log lines."""
    venv_bin = Path(sys.executable).parent
    environment = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "SLS_TELEMETRY_DISABLED": "1",
        "AWS_ENDPOINT_URL": endpoint,
        # The framework runs the handler on the python it finds through these two.
        "VIRTUAL_ENV": str(venv_bin.parent),
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    environment.pop("AWS_SESSION_TOKEN", None)
    environment.pop("AWS_PROFILE", None)
    completed = subprocess.run(
        [str(SERVERLESS_BIN), "invoke", "local", "--function", function, "--path", str(event_path),
         "--env", f"EFS_ROOT={efs_root}"],
        cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, f"invoke local {function} failed:\n{completed.stdout}\n{completed.stderr}"

    # Each log line is one JSON object. The result is the indented block at the end.
    lines = completed.stdout.splitlines()
    starts = [index for index, line in enumerate(lines) if line == "{"]
    assert starts, f"no JSON result in the output of {function}:\n{completed.stdout}"
    return json.loads("\n".join(lines[starts[-1]:])), "\n".join(lines[:starts[-1]])


def worker_event(tmp_path: Path, worker: int) -> Path:
    """Return events/worker.json rewritten for ``worker``."""
    event = json.loads((EVENTS_DIR / "worker.json").read_text())
    body = json.loads(event["Records"][0]["body"])
    body["worker"] = worker
    event["Records"][0]["body"] = json.dumps(body)
    event["Records"][0]["messageId"] = f"{event['Records'][0]['messageId'][:-2]}{worker:02d}"
    path = tmp_path / f"worker-{worker}.json"
    path.write_text(json.dumps(event))
    return path


def test_sample_events_name_the_demo_job():
    starter = json.loads(json.loads((EVENTS_DIR / "starter.json").read_text())["Records"][0]["body"])
    assert starter["job_id"] == JOB_ID
    assert starter["training"]["n_workers"] == 2
    for name in ("worker", "aggregator"):
        body = json.loads(json.loads((EVENTS_DIR / f"{name}.json").read_text())["Records"][0]["body"])
        assert body["job_id"] == JOB_ID, name
        assert body["round"] == 0, name
    scheduled = json.loads((EVENTS_DIR / "watchdog.json").read_text())
    assert scheduled["detail-type"] == "Scheduled Event"


def test_every_function_runs_its_sample_event(dev_stack, moto_endpoint, local_efs, tmp_path):
    result = invoke_local("starter", EVENTS_DIR / "starter.json", moto_endpoint, local_efs)
    assert result == {"batchItemFailures": []}
    record = dev_stack.get_job(JOB_ID)
    assert record is not None, "the starter created no job item"
    assert record.status == RUNNING
    assert record.round == 0
    assert (local_efs / "jobs" / JOB_ID / "data").is_dir()

    for worker, event_path in enumerate((EVENTS_DIR / "worker.json", worker_event(tmp_path, 1))):
        result = invoke_local("worker", event_path, moto_endpoint, local_efs)
        assert result == {"batchItemFailures": []}, f"worker {worker}"
    assert dev_stack.get_done_workers(JOB_ID, 0) == [0, 1]

    result = invoke_local("aggregator", EVENTS_DIR / "aggregator.json", moto_endpoint, local_efs)
    assert result == {"batchItemFailures": []}
    record = dev_stack.get_job(JOB_ID)
    assert record.status == RUNNING
    assert record.round == 1
    assert (local_efs / "jobs" / JOB_ID / "metrics" / "1.json").is_file()
    assert [entry["round"] for entry in dev_stack.list_round_metrics(JOB_ID)] == [1]

    result = invoke_local("watchdog", EVENTS_DIR / "watchdog.json", moto_endpoint, local_efs)
    assert isinstance(result, dict)
    assert dev_stack.get_job(JOB_ID).status == RUNNING, "the watchdog must leave a healthy job alone"


def test_early_aggregator_drops_message(dev_stack, moto_endpoint, local_efs):
    # moto keeps its tables per process, so the job of the test above may still be there.
    items = dev_stack.client.query(TableName=dev_stack.table_name, KeyConditionExpression="pk = :pk",
                                   ExpressionAttributeValues={":pk": {"S": f"JOB#{JOB_ID}"}})["Items"]
    for item in items:
        dev_stack.client.delete_item(TableName=dev_stack.table_name, Key={"pk": item["pk"], "sk": item["sk"]})
    # Only worker 0 of round 0 runs, so the round is not ready to aggregate.
    assert invoke_local("starter", EVENTS_DIR / "starter.json", moto_endpoint, local_efs) == {"batchItemFailures": []}
    assert invoke_local("worker", EVENTS_DIR / "worker.json", moto_endpoint, local_efs) == {"batchItemFailures": []}

    result, logs = invoke_local_with_logs("aggregator", EVENTS_DIR / "aggregator.json", moto_endpoint, local_efs)

    assert result == {"batchItemFailures": []}, "the early message must be deleted, not retried"
    assert "dropped stale message" in logs
    assert "which has 1 of 2 results" in logs
    assert "Traceback" not in logs
    assert dev_stack.get_job(JOB_ID).round == 0
