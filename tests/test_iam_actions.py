"""Every AWS call a handler makes is allowed by its IAM role in serverless.yml.

The in-process driver runs a whole job and the watchdog. The job uses scatter-reduce, so
every aggregator path runs. A botocore hook records each call with the function that
made it. moto does not enforce IAM, so without this check a new API call would pass every
local test and fail with AccessDenied on AWS.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

import tests.inprocess as inprocess
from shared.local.stack import load_serverless_config
from tests.baton_jobs import forget_job, run_to_round
from tests.test_cost import breast_cancer_spec

ROLE_OF_QUEUE = {"JobsQueue": "StarterRole", "TasksQueue": "WorkerRole", "AggregateQueue": "AggregatorRole"}
# A permission that covers more than one API call of the same name.
# S3 authorises a multipart upload's calls, which boto3 makes for large files, by s3:PutObject.
ACTION_OF_OPERATION = {"sqs:SendMessageBatch": "sqs:SendMessage", "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
                       "s3:CreateMultipartUpload": "s3:PutObject", "s3:UploadPart": "s3:PutObject",
                       "s3:CompleteMultipartUpload": "s3:PutObject", "s3:AbortMultipartUpload": "s3:PutObject"}
MODELS_BUCKET = "baton-iam-models"


def role_actions(role: str) -> set[str]:
    resources = load_serverless_config()["resources"]["Resources"]
    actions = set()
    for policy in resources[role]["Properties"]["Policies"]:
        for statement in policy["PolicyDocument"]["Statement"]:
            if "Fn::If" in statement:
                # A statement that only some stacks have (an S3 data or models bucket): take it.
                statement = statement["Fn::If"][1]
            listed = statement["Action"]
            actions.update([listed] if isinstance(listed, str) else listed)
    return actions


@pytest.fixture
def recorded_calls(inprocess_stack, monkeypatch):
    """Record (role, action) for every SQS, DynamoDB and S3 call the handlers make, with a models bucket."""
    import boto3

    from shared.handlers import set_services
    from shared.services import Services

    calls: set[tuple[str, str]] = set()
    current = {"role": None}

    def record(event_name, **kwargs):
        if current["role"] is None:
            return
        service, operation = event_name.split(".")[1:3]
        action = f"{service}:{operation}"
        calls.add((current["role"], ACTION_OF_OPERATION.get(action, action)))

    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket=MODELS_BUCKET)
    inprocess_stack.settings = replace(inprocess_stack.settings, models_bucket=MODELS_BUCKET)
    inprocess_stack.services = Services(inprocess_stack.settings, dynamodb=inprocess_stack.dynamodb,
                                        sqs=inprocess_stack.sqs, s3=s3)
    set_services(inprocess_stack.services)
    for client in (inprocess_stack.dynamodb, inprocess_stack.sqs, s3):
        client.meta.events.register("before-call.*.*", record)

    def with_role(role, handler):
        def run(event, context):
            current["role"] = role
            try:
                return handler(event, context)
            finally:
                current["role"] = None
        return run

    for queue, role in ROLE_OF_QUEUE.items():
        monkeypatch.setitem(inprocess.HANDLERS, queue, with_role(role, inprocess.HANDLERS[queue]))
    return calls, current


def test_handler_calls_allowed_by_roles(inprocess_stack, recorded_calls):
    from shared.control import run_watchdog

    calls, current = recorded_calls
    inprocess_stack.submit(breast_cancer_spec("iam-checked", reducers=3))
    inprocess_stack.run()
    assert inprocess_stack.services.state.get_job("iam-checked").status == "SUCCEEDED"

    current["role"] = "WatchdogRole"
    run_watchdog(inprocess_stack.services)
    current["role"] = None

    # The same spec again after the table was lost: the starter records the job finished
    # from its model on EFS and copies that model to the bucket.
    forget_job(inprocess_stack, "iam-checked")
    inprocess_stack.submit(breast_cancer_spec("iam-checked", reducers=3))
    inprocess_stack.run()
    assert inprocess_stack.services.state.get_job("iam-checked").first_round > 0

    assert ("AggregatorRole", "s3:PutObject") in calls
    assert ("StarterRole", "s3:PutObject") in calls
    roles_seen = {role for role, _ in calls}
    assert roles_seen == {"StarterRole", "WorkerRole", "AggregatorRole", "WatchdogRole"}
    for role, action in sorted(calls):
        assert action in role_actions(role), f"{role} calls {action}, which serverless.yml does not allow"


@pytest.mark.parametrize("function", ["starter", "worker", "aggregator", "watchdog"])
def test_deploy_rehearsal_expects_roles_actions(function):
    import importlib.util

    from tests.test_stack import REPO_ROOT

    # scripts/ is not a package: load the rehearsal's checker from its file.
    loader = importlib.util.spec_from_file_location("verify_deployment", REPO_ROOT / "scripts" / "verify_deployment.py")
    verify_deployment = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(verify_deployment)

    granted = {action for action in role_actions(f"{function.capitalize()}Role") if action.startswith("dynamodb:")}
    assert verify_deployment.DYNAMODB_ACTIONS[function] == granted


def test_repair_calls_allowed_by_roles(inprocess_stack, efs_root, recorded_calls):
    from shared.control import resume_job
    from shared.handlers import set_services
    from shared.services import Services

    calls, _ = recorded_calls
    services = inprocess_stack.services

    def fail_then_resume(job_id: str, damage) -> None:
        inprocess_stack.submit(breast_cancer_spec(job_id, reducers=3))
        run_to_round(inprocess_stack, job_id, 2)
        damage(efs_root / "jobs" / job_id)
        # New containers, which load the shards again; the recording clients stay.
        inprocess_stack.services = Services(services.settings, dynamodb=inprocess_stack.dynamodb,
                                            sqs=inprocess_stack.sqs, s3=services.s3)
        set_services(inprocess_stack.services)
        inprocess_stack.run()
        assert inprocess_stack.services.state.get_job(job_id).status == "FAILED"
        resume_job(inprocess_stack.services.state, inprocess_stack.services.queues, job_id)
        inprocess_stack.run()
        assert inprocess_stack.services.state.get_job(job_id).status == "SUCCEEDED"

    # The validation rows fail the aggregation of a round whose workers and reducers are all
    # recorded, so the starter ends the shards repair with the round's aggregate message.
    fail_then_resume("iam-shards", lambda job_dir: shutil.rmtree(job_dir / "data" / "validation"))
    fail_then_resume("iam-rewind", lambda job_dir: (job_dir / "rounds" / "2" / "state.npz").write_bytes(b"PK"))

    assert ("StarterRole", "dynamodb:BatchWriteItem") in calls
    for role, action in sorted(calls):
        assert action in role_actions(role), f"{role} calls {action}, which serverless.yml does not allow"
