"""Check a deployed Baton stack against serverless.yml, then disable its event source mappings.

Run by scripts/check-stack.sh after `serverless deploy` into a moto server:

    AWS_ENDPOINT_URL=http://127.0.0.1:PORT python scripts/verify_deployment.py --stage dev

It compares what the AWS APIs report (queues, table, functions, event source mappings,
roles, schedule, dashboard, EFS file system, mount targets and access point) with the
settings that serverless.yml declares for the stage, and the models bucket when
--models-bucket names one. It prints one line per failed check
and exits 1 if any failed. With --remove-mappings it then disables and deletes the
stack's event source mappings, because moto would otherwise try to run the functions in
Docker.

Only the endpoint in AWS_ENDPOINT_URL is contacted, and only on 127.0.0.1: the script
refuses any other endpoint, so it cannot touch a real account.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import boto3

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from shared.local.stack import load_serverless_config  # noqa: E402
from shared.state import ITEM_TYPE, JOBS_INDEX  # noqa: E402

FUNCTIONS = ("starter", "worker", "aggregator", "watchdog")
# The queue that triggers each function; the watchdog runs on a schedule instead.
QUEUE_OF_FUNCTION = {"starter": "jobs", "worker": "tasks", "aggregator": "aggregate", "watchdog": None}
# The queues each function's role may send to (continuations included).
SEND_TARGETS = {"starter": {"tasks", "jobs", "aggregate"}, "worker": {"aggregate", "tasks"}, "aggregator": {"tasks", "aggregate"},
                "watchdog": {"tasks", "aggregate"}}
# DynamoDB actions on the table and its jobs index together: only the watchdog queries the index.
DYNAMODB_ACTIONS = {
    "starter": {"dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:BatchWriteItem"},
    "worker": {"dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem"},
    "aggregator": {"dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem"},
    "watchdog": {"dynamodb:Query", "dynamodb:GetItem", "dynamodb:UpdateItem"},
}


class Checker:
    """Collects failed checks instead of stopping at the first."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed = 0

    def equal(self, what: str, actual, expected) -> None:
        if actual == expected:
            self.passed += 1
        else:
            self.failures.append(f"{what}: got {actual!r}, expected {expected!r}")

    def true(self, what: str, condition: bool, detail: str = "") -> None:
        if condition:
            self.passed += 1
        else:
            self.failures.append(f"{what}{': ' + detail if detail else ''}")


def stage_params(config: dict, stage: str) -> dict:
    """Return the params serverless.yml gives ``stage``: its own block over the defaults."""
    params = config.get("params", {})
    return {**params.get("default", {}), **params.get(stage, {})}


def require_local_endpoint() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    host = urlparse(endpoint).hostname
    if host != "127.0.0.1":
        raise SystemExit(f"AWS_ENDPOINT_URL must point at a server on 127.0.0.1, got {endpoint!r}")
    return endpoint


def check_queues(check: Checker, sqs, service: str, stage: str, params: dict, max_receive_count: int) -> dict:
    """Check the three queues and their dead-letter queues; return queue ARNs by short name."""
    arns = {}
    visibility = {"jobs": params["jobsVisibilityTimeout"], "tasks": params["tasksVisibilityTimeout"],
                  "aggregate": params["aggregateVisibilityTimeout"]}
    for short_name, visibility_seconds in visibility.items():
        name = f"{service}-{stage}-{short_name}"
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        arns[short_name] = attributes["QueueArn"]
        check.equal(f"{name} VisibilityTimeout", int(attributes["VisibilityTimeout"]), visibility_seconds)
        check.equal(f"{name} SqsManagedSseEnabled", attributes.get("SqsManagedSseEnabled"), "true")
        redrive = json.loads(attributes.get("RedrivePolicy", "{}"))
        check.equal(f"{name} dead-letter target", redrive.get("deadLetterTargetArn", "").rsplit(":", 1)[-1], f"{name}-dlq")
        check.equal(f"{name} maxReceiveCount", int(redrive.get("maxReceiveCount", 0)), max_receive_count)

        dead_letter_url = sqs.get_queue_url(QueueName=f"{name}-dlq")["QueueUrl"]
        dead_letter = sqs.get_queue_attributes(QueueUrl=dead_letter_url, AttributeNames=["All"])["Attributes"]
        check.equal(f"{name}-dlq MessageRetentionPeriod", int(dead_letter["MessageRetentionPeriod"]), 14 * 24 * 3600)
    return arns


def check_table(check: Checker, dynamodb, table_name: str) -> str:
    table = dynamodb.describe_table(TableName=table_name)["Table"]
    check.equal(f"{table_name} billing mode", table.get("BillingModeSummary", {}).get("BillingMode"), "PAY_PER_REQUEST")
    check.equal(f"{table_name} key schema", sorted((key["AttributeName"], key["KeyType"]) for key in table["KeySchema"]),
                [("pk", "HASH"), ("sk", "RANGE")])
    indexes = {index["IndexName"]: index for index in table.get("GlobalSecondaryIndexes", [])}
    jobs_index = indexes.get(JOBS_INDEX, {})
    check.equal(f"{table_name} index {JOBS_INDEX} key schema",
                [(key["AttributeName"], key["KeyType"]) for key in jobs_index.get("KeySchema", [])],
                [(ITEM_TYPE, "HASH"), ("created_at", "RANGE")])
    check.equal(f"{table_name} index {JOBS_INDEX} projection",
                jobs_index.get("Projection", {}).get("ProjectionType"), "ALL")
    return table["TableArn"]


def _role_statements(iam, role_arn: str) -> list[dict]:
    role_name = role_arn.rsplit("/", 1)[-1]
    statements = []
    for policy_name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        document = iam.get_role_policy(RoleName=role_name, PolicyName=policy_name)["PolicyDocument"]
        if isinstance(document, str):
            # moto 5.2 returns the document of a CloudFormation-created inline policy as
            # the repr of a Python dict, where AWS returns URL-encoded JSON.
            document = json.loads(document) if document.startswith('{"') else ast.literal_eval(document)
        # moto 5.2 keeps an Fn::If that chose AWS::NoValue as an empty entry, where AWS
        # drops it from the list.
        statements.extend(statement for statement in document["Statement"] if isinstance(statement, dict))
    return statements


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _actions_on(statements: list[dict], resource: str) -> set[str]:
    actions: set[str] = set()
    for statement in statements:
        if statement.get("Effect") == "Allow" and resource in _as_list(statement["Resource"]):
            actions.update(_as_list(statement["Action"]))
    return actions


def check_functions(check: Checker, lambda_client, iam, service: str, stage: str, params: dict,
                    environment: dict, queue_arns: dict, table_arn: str) -> list[str]:
    """Check functions, their roles and event source mappings; return the mapping UUIDs."""
    roles = {}
    for function in FUNCTIONS:
        name = f"{service}-{stage}-{function}"
        configuration = lambda_client.get_function(FunctionName=name)["Configuration"]
        check.equal(f"{name} runtime", configuration["Runtime"], "python3.12")
        check.equal(f"{name} handler", configuration["Handler"], f"functions/{function}.handler")
        check.equal(f"{name} memory", configuration["MemorySize"], params[f"{function}Memory"])
        check.equal(f"{name} timeout", configuration["Timeout"], params[f"{function}Timeout"])
        check.equal(f"{name} architecture", configuration.get("Architectures"), [params["architecture"]])
        check.equal(f"{name} subnets", len(configuration.get("VpcConfig", {}).get("SubnetIds", [])), 2)
        variables = configuration.get("Environment", {}).get("Variables", {})
        for key, value in environment.items():
            check.equal(f"{name} environment {key}", variables.get(key), str(value))
        roles[function] = configuration["Role"]

        statements = _role_statements(iam, configuration["Role"])
        if QUEUE_OF_FUNCTION[function] is not None:
            own_queue = queue_arns[QUEUE_OF_FUNCTION[function]]
            check.true(f"{name} role may receive from {own_queue}",
                       {"sqs:ReceiveMessage", "sqs:DeleteMessage"} <= _actions_on(statements, own_queue))
        for short_name, arn in queue_arns.items():
            may_send = "sqs:SendMessage" in _actions_on(statements, arn)
            check.equal(f"{name} role may send to {short_name}", may_send, short_name in SEND_TARGETS[function])
        index_actions = _actions_on(statements, f"{table_arn}/index/{JOBS_INDEX}")
        check.equal(f"{name} role DynamoDB actions", _actions_on(statements, table_arn) | index_actions,
                    DYNAMODB_ACTIONS[function])
        check.equal(f"{name} role may query the jobs index", "dynamodb:Query" in index_actions, function == "watchdog")
        s3_actions = {action for statement in statements for action in _as_list(statement["Action"])
                      if action.startswith("s3:")}
        may_read_data = function == "starter" and bool(params["dataBucket"])
        may_write_models = function in ("starter", "aggregator") and bool(params["modelsBucket"])
        expected_s3 = set()
        if may_read_data:
            expected_s3.add("s3:GetObject")
        if may_write_models:
            expected_s3.add("s3:PutObject")
        check.equal(f"{name} role S3 actions", s3_actions, expected_s3)

    check.equal("one role per function", len(set(roles.values())), len(FUNCTIONS))

    mapping_ids = []
    mappings = lambda_client.list_event_source_mappings()["EventSourceMappings"]
    for function in FUNCTIONS:
        name = f"{service}-{stage}-{function}"
        own = [mapping for mapping in mappings if mapping["FunctionArn"].endswith(f":function:{name}")]
        check.equal(f"{name} event source mappings", len(own), 0 if QUEUE_OF_FUNCTION[function] is None else 1)
        for mapping in own:
            mapping_ids.append(mapping["UUID"])
            check.equal(f"{name} mapping source", mapping["EventSourceArn"], queue_arns[QUEUE_OF_FUNCTION[function]])
            check.equal(f"{name} mapping batch size", mapping["BatchSize"], 1)
            check.equal(f"{name} mapping response types", mapping.get("FunctionResponseTypes"), ["ReportBatchItemFailures"])
    return mapping_ids


def check_schedule(check: Checker, events, service: str, stage: str) -> None:
    """Check that an EventBridge rule invokes the watchdog on a schedule."""
    name = f"{service}-{stage}-watchdog"
    scheduled = []
    for rule in events.list_rules()["Rules"]:
        targets = events.list_targets_by_rule(Rule=rule["Name"])["Targets"]
        if any(target["Arn"].endswith(f":function:{name}") for target in targets):
            scheduled.append(rule)
    check.equal(f"{name} schedule rules", len(scheduled), 1)
    for rule in scheduled:
        check.true(f"{name} rule is a rate schedule", rule.get("ScheduleExpression", "").startswith("rate("),
                   repr(rule.get("ScheduleExpression")))
        check.equal(f"{name} rule state", rule.get("State"), "ENABLED")


def check_dashboard(check: Checker, cloudwatch, service: str, stage: str) -> None:
    """Check that the stage's dashboard exists and graphs the round metrics."""
    name = f"{service}-{stage}"
    try:
        body = json.loads(cloudwatch.get_dashboard(DashboardName=name)["DashboardBody"])
    except cloudwatch.exceptions.ResourceNotFound:
        check.true(f"dashboard {name} exists", False)
        return
    namespaces = {widget["properties"]["metrics"][0][0] for widget in body["widgets"]}
    check.equal(f"dashboard {name} namespaces", namespaces, {"Baton", "AWS/SQS", "AWS/Lambda"})


def check_file_system(check: Checker, efs, service: str, stage: str) -> None:
    systems = [system for system in efs.describe_file_systems()["FileSystems"]
               if system.get("Name") == f"{service}-{stage}"]
    check.equal(f"EFS file systems named {service}-{stage}", len(systems), 1)
    if not systems:
        return
    system = systems[0]
    check.equal("EFS encrypted", system["Encrypted"], True)
    check.equal("EFS throughput mode", system["ThroughputMode"], "elastic")

    mount_targets = efs.describe_mount_targets(FileSystemId=system["FileSystemId"])["MountTargets"]
    check.equal("EFS mount targets", len(mount_targets), 2)
    check.equal("EFS mount targets in distinct subnets", len({target["SubnetId"] for target in mount_targets}), 2)

    access_points = efs.describe_access_points(FileSystemId=system["FileSystemId"])["AccessPoints"]
    check.equal("EFS access points", len(access_points), 1)
    for access_point in access_points:
        check.equal("access point POSIX user", access_point["PosixUser"], {"Uid": 1000, "Gid": 1000})
        check.equal("access point root", access_point["RootDirectory"]["Path"], "/baton")
        check.equal("access point root permissions", access_point["RootDirectory"]["CreationInfo"]["Permissions"], "0750")


def check_models_bucket(check: Checker, s3, bucket: str) -> None:
    """Check that the models bucket exists and is encrypted, or that none was asked for."""
    names = {entry["Name"] for entry in s3.list_buckets()["Buckets"]}
    if not bucket:
        check.true("no models bucket without params.modelsBucket", not any("models" in name for name in names),
                   f"buckets: {sorted(names)}")
        return
    check.true(f"models bucket {bucket} exists", bucket in names, f"buckets: {sorted(names)}")
    if bucket not in names:
        return
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    check.equal(f"models bucket {bucket} encryption",
                [rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] for rule in rules], ["AES256"])
    # moto's CloudFormation applies only a bucket's encryption and tags, so its versioning
    # and public access block are left to checkov's checks of the template.


def remove_mappings(lambda_client, mapping_ids: list[str]) -> None:
    """Disable, then delete, each event source mapping."""
    for mapping_id in mapping_ids:
        lambda_client.update_event_source_mapping(UUID=mapping_id, Enabled=False)
        lambda_client.delete_event_source_mapping(UUID=mapping_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="dev", help="stage that was deployed (default: dev)")
    parser.add_argument("--remove-mappings", action="store_true",
                        help="disable and delete the event source mappings after the checks")
    parser.add_argument("--models-bucket", default=None,
                        help="params.modelsBucket passed to the deploy with --param (default: serverless.yml's)")
    arguments = parser.parse_args()

    endpoint = require_local_endpoint()
    config = load_serverless_config()
    service, stage = config["service"], arguments.stage
    params = stage_params(config, stage)
    if arguments.models_bucket is not None:
        params["modelsBucket"] = arguments.models_bucket
    max_receive_count = int(config["custom"]["maxReceiveCount"])
    environment = {
        "EFS_ROOT": config["custom"]["efsMountPath"],
        "JOBS_QUEUE_NAME": f"{service}-{stage}-jobs",
        "TASKS_QUEUE_NAME": f"{service}-{stage}-tasks",
        "AGGREGATE_QUEUE_NAME": f"{service}-{stage}-aggregate",
        "STATE_TABLE_NAME": f"{service}-{stage}-state",
        "BATON_ALLOWED_S3_BUCKETS": params["dataBucket"],
        "MODELS_BUCKET": params["modelsBucket"],
        "FUNCTION_MEMORY_MB": f"worker={params['workerMemory']},aggregator={params['aggregatorMemory']}",
    }

    check = Checker()
    queue_arns = check_queues(check, boto3.client("sqs"), service, stage, params, max_receive_count)
    table_arn = check_table(check, boto3.client("dynamodb"), environment["STATE_TABLE_NAME"])
    lambda_client = boto3.client("lambda")
    mapping_ids = check_functions(check, lambda_client, boto3.client("iam"), service, stage, params, environment,
                                  queue_arns, table_arn)
    check_schedule(check, boto3.client("events"), service, stage)
    check_dashboard(check, boto3.client("cloudwatch"), service, stage)
    check_file_system(check, boto3.client("efs"), service, stage)
    check_models_bucket(check, boto3.client("s3"), params["modelsBucket"])

    if arguments.remove_mappings:
        remove_mappings(lambda_client, mapping_ids)
        remaining = lambda_client.list_event_source_mappings()["EventSourceMappings"]
        check.equal("event source mappings left after removal", len(remaining), 0)

    for failure in check.failures:
        print(f"verify-deployment: FAILED {failure}", file=sys.stderr)
    print(f"verify-deployment: {check.passed} checks passed, {len(check.failures)} failed against {endpoint}")
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
