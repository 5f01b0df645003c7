"""Static checks of serverless.yml: the contracts between the stack and the code.

These tests read the file with PyYAML and resolve the few Serverless variables the file
uses, so they need neither npm nor the network. scripts/check-stack.sh runs the real
framework and cfn-lint on the generated template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVERLESS_YML = REPO_ROOT / "serverless.yml"
REQUIREMENTS_LAMBDA = REPO_ROOT / "requirements-lambda.txt"

# AWS advises a queue visibility timeout of at least six times the timeout of the
# function that the queue triggers.
MIN_VISIBILITY_TO_TIMEOUT_RATIO = 6

# The names each handler reads from its environment (see shared/config.py).
REQUIRED_ENVIRONMENT = {
    "EFS_ROOT",
    "JOBS_QUEUE_NAME",
    "TASKS_QUEUE_NAME",
    "AGGREGATE_QUEUE_NAME",
    "STATE_TABLE_NAME",
    "POWERTOOLS_SERVICE_NAME",
}

# A Serverless variable has a source prefix (self:, sls:, param:, env:, ...). Placeholders
# without one, such as ${AWS::Region} or ${RoleArn} in !Sub strings, are CloudFormation's.
# The queue each function reads, None for a function without an SQS trigger.
QUEUE_OF_FUNCTION = {"starter": "JobsQueue", "worker": "TasksQueue", "aggregator": "AggregateQueue", "watchdog": None}
EFS_FUNCTIONS = {"starter", "worker", "aggregator"}

VARIABLE_PATTERN = re.compile(r"\$\{([a-z]+:[^${}]*)\}")

# The stages whose params serverless.yml declares, each checked in full.
STAGES = ("dev", "prod")

LAMBDA_ARCHITECTURES = {"x86_64": "x86_64", "arm64": "aarch64"}


class CloudFormationLoader(yaml.SafeLoader):
    """SafeLoader that turns CloudFormation short tags into their long form.

    ``!GetAtt A.B`` becomes ``{"Fn::GetAtt": ["A", "B"]}``, ``!Ref X`` becomes
    ``{"Ref": "X"}`` and any other ``!Name value`` becomes ``{"Fn::Name": value}``.
    """


def _construct_cloudformation_tag(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)

    if tag_suffix == "Ref":
        return {"Ref": value}
    if tag_suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{tag_suffix}": value}


CloudFormationLoader.add_multi_constructor("!", _construct_cloudformation_tag)


def resolve_variables(value, config: dict, stage: str):
    """Resolve the Serverless variables this file uses, innermost first.

    Supported sources are ``self:``, ``sls:stage``, ``param:`` (the stage's params, then
    the defaults) and
    ``env:NAME, 'fallback'`` (always the fallback, so the result does not depend on the
    shell). Any other source raises ``ValueError`` so that a new kind of variable is
    noticed here instead of being compared as raw text.
    """
    if isinstance(value, dict):
        return {key: resolve_variables(item, config, stage) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve_variables(item, config, stage) for item in value]
    if not isinstance(value, str):
        return value

    while True:
        match = VARIABLE_PATTERN.search(value)
        if match is None:
            return value
        replacement = _lookup_variable(match.group(1).strip(), config, stage)
        if match.span() == (0, len(value)):
            # A variable that is the whole value keeps the type of what it points to.
            value = replacement
            if not isinstance(value, str):
                return resolve_variables(value, config, stage)
        else:
            value = value[: match.start()] + str(replacement) + value[match.end():]


def _lookup_variable(expression: str, config: dict, stage: str):
    if expression == "sls:stage":
        return stage
    if expression.startswith("self:"):
        node = config
        for part in expression[len("self:"):].split("."):
            node = node[part]
        return node
    if expression.startswith("param:"):
        name = expression[len("param:"):]
        for scope in (stage, "default"):
            if name in config["params"].get(scope, {}):
                return config["params"][scope][name]
        raise ValueError(f"${{{expression}}} is defined neither for stage {stage!r} nor by default")
    if expression.startswith("env:"):
        _, _, fallback = expression.partition(",")
        if not fallback:
            raise ValueError(f"${{{expression}}} has no fallback value; give it one so packaging works offline")
        return yaml.safe_load(fallback.strip())
    raise ValueError(f"unsupported Serverless variable ${{{expression}}} in serverless.yml")


@pytest.fixture(scope="module")
def raw_config() -> dict:
    with SERVERLESS_YML.open(encoding="utf-8") as handle:
        return yaml.load(handle, Loader=CloudFormationLoader)


@pytest.fixture(scope="module", params=STAGES)
def config(request, raw_config) -> dict:
    resolved = resolve_variables(raw_config, raw_config, request.param)
    resolved["provider"]["stage"] = request.param
    return resolved


@pytest.fixture(scope="module")
def resources(config) -> dict:
    return config["resources"]["Resources"]


def _queues(resources: dict) -> dict:
    return {name: body for name, body in resources.items() if body["Type"] == "AWS::SQS::Queue"}


def _dead_letter_queue_names(resources: dict) -> set[str]:
    names = set()
    for body in _queues(resources).values():
        redrive = body["Properties"].get("RedrivePolicy")
        if redrive is not None:
            names.add(redrive["deadLetterTargetArn"]["Fn::GetAtt"][0])
    return names


def _sqs_events(function: dict) -> list[dict]:
    return [event["sqs"] for event in function.get("events", []) if "sqs" in event]


def _queue_of(sqs_event: dict) -> str:
    """Return the logical id of the queue an sqs event reads, from its ``!GetAtt Q.Arn``."""
    arn = sqs_event["arn"]
    assert isinstance(arn, dict) and "Fn::GetAtt" in arn, f"expected !GetAtt <Queue>.Arn, got {arn!r}"
    logical_id, attribute = arn["Fn::GetAtt"]
    assert attribute == "Arn", f"expected the Arn attribute of {logical_id}, got {attribute!r}"
    return logical_id


def _function_logical_id(function_name: str) -> str:
    # The framework names a function's resource <Name>LambdaFunction, first letter upper.
    return function_name[0].upper() + function_name[1:] + "LambdaFunction"


def test_service_and_resource_names(config, resources):
    names = config["custom"]["names"]
    stage = config["provider"]["stage"]
    assert config["service"] == "baton"
    assert names["jobsQueue"] == f"baton-{stage}-jobs"
    assert names["tasksQueue"] == f"baton-{stage}-tasks"
    assert names["aggregateQueue"] == f"baton-{stage}-aggregate"
    assert names["stateTable"] == f"baton-{stage}-state"
    assert resources["JobsQueue"]["Properties"]["QueueName"] == names["jobsQueue"]
    assert resources["TasksQueue"]["Properties"]["QueueName"] == names["tasksQueue"]
    assert resources["AggregateQueue"]["Properties"]["QueueName"] == names["aggregateQueue"]
    assert resources["StateTable"]["Properties"]["TableName"] == names["stateTable"]


def test_settings_for_stage_name_stack_resources(config):
    from shared.config import Settings

    names = config["custom"]["names"]
    settings = Settings.for_stage(config["provider"]["stage"])
    assert settings.jobs_queue_name == names["jobsQueue"]
    assert settings.tasks_queue_name == names["tasksQueue"]
    assert settings.aggregate_queue_name == names["aggregateQueue"]
    assert settings.state_table_name == names["stateTable"]


def test_every_queue_has_dead_letter_redrive(config, resources):
    dead_letter_queues = _dead_letter_queue_names(resources)
    source_queues = set(_queues(resources)) - dead_letter_queues

    assert source_queues == {"JobsQueue", "TasksQueue", "AggregateQueue"}
    for name in sorted(source_queues):
        redrive = resources[name]["Properties"].get("RedrivePolicy")
        assert redrive is not None, f"{name} has no RedrivePolicy"
        target = redrive["deadLetterTargetArn"]["Fn::GetAtt"][0]
        assert resources[target]["Type"] == "AWS::SQS::Queue", f"{name} redrives to {target}, not a queue"
        assert redrive["maxReceiveCount"] == config["custom"]["maxReceiveCount"], name


def test_dead_letter_queues_keep_messages_14_days(resources):
    for name in sorted(_dead_letter_queue_names(resources)):
        assert resources[name]["Properties"]["MessageRetentionPeriod"] == 14 * 24 * 3600, name
        assert "RedrivePolicy" not in resources[name]["Properties"], f"{name} must not redrive further"


def test_every_queue_is_encrypted(resources):
    for name, body in sorted(_queues(resources).items()):
        assert body["Properties"].get("SqsManagedSseEnabled") is True, name


def _stage_params(config: dict) -> dict:
    return {**config["params"].get("default", {}), **config["params"].get(config["provider"]["stage"], {})}


def test_visibility_timeout_covers_function_timeout(config, resources):
    checked_queues = set()
    for function_name, function in config["functions"].items():
        timeout_seconds = function.get("timeout", config["provider"].get("timeout", 6))
        for sqs_event in _sqs_events(function):
            queue = _queue_of(sqs_event)
            visibility_seconds = resources[queue]["Properties"]["VisibilityTimeout"]
            assert visibility_seconds >= MIN_VISIBILITY_TO_TIMEOUT_RATIO * timeout_seconds, (
                f"{queue} VisibilityTimeout {visibility_seconds} s is below "
                f"{MIN_VISIBILITY_TO_TIMEOUT_RATIO} x {function_name} timeout {timeout_seconds} s"
            )
            checked_queues.add(queue)
    assert checked_queues == {"JobsQueue", "TasksQueue", "AggregateQueue"}


def test_functions_handlers_and_timeouts(config):
    functions = config["functions"]
    params = _stage_params(config)
    assert set(functions) == set(QUEUE_OF_FUNCTION)
    for name, function in functions.items():
        assert function["handler"] == f"functions/{name}.handler"
        assert function["timeout"] == params[f"{name}Timeout"], name
        assert function["memorySize"] == params[f"{name}Memory"], name


def test_memory_and_timeout_in_lambda_range(config):
    for name, function in config["functions"].items():
        assert isinstance(function["memorySize"], int), name
        assert 128 <= function["memorySize"] <= 10240, f"{name} memory {function['memorySize']} MB"
        assert 1 <= function["timeout"] <= 900, f"{name} timeout {function['timeout']} s"


def test_function_queues(config):
    for name, function in config["functions"].items():
        queues = [_queue_of(sqs_event) for sqs_event in _sqs_events(function)]
        expected = [] if QUEUE_OF_FUNCTION[name] is None else [QUEUE_OF_FUNCTION[name]]
        assert queues == expected, name


def test_sqs_events_report_batch_item_failures(config):
    for name, function in config["functions"].items():
        for sqs_event in _sqs_events(function):
            assert sqs_event.get("functionResponseType") == "ReportBatchItemFailures", name


def test_sqs_events_cap_concurrency(config):
    for name, function in config["functions"].items():
        for sqs_event in _sqs_events(function):
            maximum_concurrency = sqs_event.get("maximumConcurrency")
            assert isinstance(maximum_concurrency, int), f"{name} sqs event has no maximumConcurrency"
            # AWS accepts 2 to 1000 for an SQS event source mapping.
            assert 2 <= maximum_concurrency <= 1000, name


def test_environment_values_are_plain_strings(raw_config, config):
    # `serverless invoke local` resolves !Ref/!GetAtt by querying CloudFormation, which
    # fails offline, so every value must be a string after variable resolution.
    scopes = {"provider": raw_config["provider"].get("environment", {})}
    for name, function in raw_config["functions"].items():
        scopes[name] = function.get("environment", {})

    for scope, environment in scopes.items():
        for key, raw_value in environment.items():
            assert isinstance(raw_value, str), f"{scope} {key} is {raw_value!r}, not a string"
            value = resolve_variables(raw_value, raw_config, config["provider"]["stage"])
            assert isinstance(value, str), f"{scope} {key} resolves to {value!r}, not a string"


def test_environment_names_match_resources(config, resources):
    environment = config["provider"]["environment"]
    assert REQUIRED_ENVIRONMENT <= set(environment)
    assert environment["EFS_ROOT"] == config["custom"]["efsMountPath"]
    assert environment["JOBS_QUEUE_NAME"] == resources["JobsQueue"]["Properties"]["QueueName"]
    assert environment["TASKS_QUEUE_NAME"] == resources["TasksQueue"]["Properties"]["QueueName"]
    assert environment["AGGREGATE_QUEUE_NAME"] == resources["AggregateQueue"]["Properties"]["QueueName"]
    assert environment["STATE_TABLE_NAME"] == resources["StateTable"]["Properties"]["TableName"]


def test_functions_mount_efs_after_mount_targets(config, resources):
    mount_targets = {name for name, body in resources.items() if body["Type"] == "AWS::EFS::MountTarget"}
    extensions = config["resources"]["extensions"]

    assert len(mount_targets) == 2
    for name, function in config["functions"].items():
        if name not in EFS_FUNCTIONS:
            assert "fileSystemConfig" not in function, f"{name} is not expected to mount EFS"
            continue
        file_system = function["fileSystemConfig"]
        assert file_system["localMountPath"] == config["provider"]["environment"]["EFS_ROOT"], name
        assert "Fn::Join" in file_system["arn"], f"{name} fileSystemConfig.arn must be built with Fn::Join"
        depends_on = set(extensions[_function_logical_id(name)]["DependsOn"])
        assert mount_targets <= depends_on, f"{name} does not depend on {sorted(mount_targets - depends_on)}"


def test_access_point_fixes_owner_and_root(resources):
    access_point = resources["EfsAccessPoint"]["Properties"]
    assert access_point["PosixUser"] == {"Uid": "1000", "Gid": "1000"}
    assert access_point["RootDirectory"]["Path"] == "/baton"
    assert access_point["RootDirectory"]["CreationInfo"] == {
        "OwnerUid": "1000",
        "OwnerGid": "1000",
        "Permissions": "0750",
    }


def test_file_system_is_encrypted(resources):
    assert resources["EfsFileSystem"]["Properties"]["Encrypted"] is True


def test_dead_letter_queues_have_alarms(resources):
    alarmed_queues = set()
    for body in resources.values():
        if body["Type"] != "AWS::CloudWatch::Alarm":
            continue
        properties = body["Properties"]
        assert properties["MetricName"] == "ApproximateNumberOfMessagesVisible"
        assert properties["ComparisonOperator"] == "GreaterThanThreshold"
        assert properties["Threshold"] == 0
        for dimension in properties["Dimensions"]:
            if dimension["Name"] == "QueueName":
                alarmed_queues.add(dimension["Value"]["Fn::GetAtt"][0])
    assert alarmed_queues == _dead_letter_queue_names(resources)


def test_state_table_is_recoverable(resources):
    properties = resources["StateTable"]["Properties"]
    assert properties["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert properties["SSESpecification"]["SSEEnabled"] is True


def test_state_table_expires_items(resources):
    from shared.state import EXPIRES_AT

    properties = resources["StateTable"]["Properties"]
    assert properties["TimeToLiveSpecification"] == {"AttributeName": EXPIRES_AT, "Enabled": True}


def test_package_excludes_local_only_code(config):
    patterns = config["package"]["patterns"]
    assert patterns[0] == "!**", "the package must start from nothing and add only what Lambda runs"
    for included in ("functions/**", "shared/**"):
        assert included in patterns
    for excluded in ("!shared/local/**", "!shared/cli*.py", "!shared/monitor.py", "!shared/planner.py",
                     "!shared/export.py"):
        assert excluded in patterns


def handler_source_files() -> set[str]:
    """Return the project files the handlers may import, import statements inside functions included."""
    import ast

    def module_file(name: str) -> Path | None:
        path = REPO_ROOT.joinpath(*name.split("."))
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    pending = list((REPO_ROOT / "functions").glob("*.py"))
    reached: set[Path] = set()
    while pending:
        path = pending.pop()
        if path in reached:
            continue
        reached.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from shared import cost" names a module; "from shared.x import y" a module and a name.
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                if name.split(".")[0] in ("shared", "functions"):
                    # Each package on the way is imported too, so its __init__.py must be there.
                    for depth in range(1, name.count(".") + 2):
                        found = module_file(".".join(name.split(".")[:depth]))
                        if found is not None:
                            pending.append(found)
    return {path.relative_to(REPO_ROOT).as_posix() for path in reached}


def test_package_keeps_what_handlers_import(config):
    from fnmatch import fnmatchcase

    excluded = [pattern[1:] for pattern in config["package"]["patterns"][1:] if pattern.startswith("!")]
    needed = handler_source_files()
    assert "shared/worker.py" in needed
    assert "shared/aggregation.py" in needed
    for path in sorted(needed):
        assert not any(fnmatchcase(path, pattern) for pattern in excluded), \
            f"{path} is imported by a handler but left out of the Lambda package"


def test_requirements_plugin_settings(config):
    settings = config["custom"]["pythonRequirements"]
    assert settings["fileName"] == REQUIREMENTS_LAMBDA.name
    assert settings["dockerizePip"] is False
    # strip: true corrupts numpy's bundled OpenBLAS, so numpy fails to import.
    assert settings["slim"] is True
    assert settings["strip"] is False
    # Unquoted in YAML, --only-binary=:all: parses as a mapping and the plugin crashes.
    assert "--only-binary=:all:" in settings["pipCmdExtraArgs"]
    architecture = config["provider"]["architecture"]
    assert architecture in LAMBDA_ARCHITECTURES
    wheel_architecture = LAMBDA_ARCHITECTURES[architecture]
    platforms = [argument for argument in settings["pipCmdExtraArgs"] if argument.startswith("--platform=")]
    assert platforms, "pip needs a --platform for the Lambda architecture"
    for platform in platforms:
        assert platform.endswith(f"_{wheel_architecture}"), f"{platform} does not match architecture {architecture}"


def test_architecture_is_a_stage_param(raw_config):
    assert raw_config["provider"]["architecture"] == "${param:architecture}"
    for name, function in raw_config["functions"].items():
        assert "architecture" not in function, f"{name} overrides the stage's architecture"


def test_one_role_per_function(config, resources):
    roles = {}
    for name, function in config["functions"].items():
        role = function.get("role")
        assert role is not None, f"{name} has no role of its own"
        substitution, variables = role["Fn::Sub"]
        assert substitution == "${RoleArn}", name
        logical_id, attribute = variables["RoleArn"]["Fn::GetAtt"]
        assert attribute == "Arn", name
        assert resources[logical_id]["Type"] == "AWS::IAM::Role", name
        roles[name] = logical_id
    assert len(set(roles.values())) == len(roles), f"functions share roles: {roles}"
    assert "iam" not in config["provider"], "provider.iam would add a shared role"


def _statements(resources: dict, role: str) -> list[dict]:
    statements = []
    for policy in resources[role]["Properties"]["Policies"]:
        statements.extend(policy["PolicyDocument"]["Statement"])
    return statements


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _queues_with_action(statements: list[dict], action: str) -> set[str]:
    queues = set()
    for statement in statements:
        if "Fn::If" in statement:
            continue
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        targets = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if action in actions:
            queues.update(target["Fn::GetAtt"][0] for target in targets
                          if isinstance(target, dict) and "Fn::GetAtt" in target and target["Fn::GetAtt"][0].endswith("Queue"))
    return queues


def test_roles_receive_only_from_own_queue(config, resources):
    for name, function in config["functions"].items():
        role = function["role"]["Fn::Sub"][1]["RoleArn"]["Fn::GetAtt"][0]
        received = _queues_with_action(_statements(resources, role), "sqs:ReceiveMessage")
        if QUEUE_OF_FUNCTION[name] is not None:
            assert received == {QUEUE_OF_FUNCTION[name]}, f"{name} may receive from {sorted(received)}"


def test_roles_allow_no_wildcard_except_network_interfaces(resources):
    for logical_id, body in resources.items():
        if body["Type"] != "AWS::IAM::Role":
            continue
        for statement in _statements(resources, logical_id):
            if "Fn::If" in statement:
                statement = statement["Fn::If"][1]
            if statement["Resource"] == "*":
                assert all(action.startswith("ec2:") for action in statement["Action"]), (
                    f"{logical_id} grants {statement['Action']} on every resource")


def test_network_is_created_only_without_vpc_id(raw_config, resources):
    assert raw_config["resources"]["Conditions"]["CreateNetwork"] == {
        "Fn::Equals": [{"Ref": "ExistingVpcId"}, ""]}
    for logical_id in ("Vpc", "PrivateSubnetA", "PrivateSubnetB", "PrivateRouteTable",
                       "DynamoDbGatewayEndpoint", "SqsInterfaceEndpoint"):
        assert resources[logical_id].get("Condition") == "CreateNetwork", logical_id
    parameters = {entry["ParameterKey"]: entry["ParameterValue"] for entry in raw_config["provider"]["stackParameters"]}
    assert parameters == {"ExistingVpcId": "${param:vpcId}", "ExistingSubnetAId": "${param:subnetAId}",
                          "ExistingSubnetBId": "${param:subnetBId}", "DataBucketName": "${param:dataBucket}",
                          "ModelsBucketName": "${param:modelsBucket}"}
    assert set(parameters) == set(raw_config["resources"]["Parameters"])


def test_buckets_reached_only_by_their_function(raw_config, resources):
    conditions = raw_config["resources"]["Conditions"]
    assert conditions["HasDataBucket"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "DataBucketName"}, ""]}]}
    assert conditions["HasModelsBucket"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "ModelsBucketName"}, ""]}]}
    environment = raw_config["provider"]["environment"]
    assert environment["BATON_ALLOWED_S3_BUCKETS"] == "${param:dataBucket}"
    assert environment["MODELS_BUCKET"] == "${param:modelsBucket}"
    s3_statements = {}
    for logical_id, body in resources.items():
        if body["Type"] != "AWS::IAM::Role":
            continue
        for statement in _statements(resources, logical_id):
            condition = None
            if "Fn::If" in statement:
                condition, statement, otherwise = statement["Fn::If"]
                assert otherwise == {"Ref": "AWS::NoValue"}, logical_id
            if any(str(action).startswith("s3:") for action in _as_list(statement["Action"])):
                index = sum(1 for role, _ in s3_statements if role == logical_id)
                s3_statements[(logical_id, index)] = (condition, _as_list(statement["Action"]), statement["Resource"])
    models = ("HasModelsBucket", ["s3:PutObject"], {"Fn::Sub": "arn:${AWS::Partition}:s3:::${ModelsBucketName}/jobs/*"})
    assert s3_statements == {
        ("StarterRole", 0): ("HasDataBucket", ["s3:GetObject"],
                             {"Fn::Sub": "arn:${AWS::Partition}:s3:::${DataBucketName}/*"}),
        ("StarterRole", 1): models,
        ("AggregatorRole", 0): models,
    }


def test_models_bucket_is_private_and_kept(resources):
    bucket = resources["ModelsBucket"]
    assert bucket["Condition"] == "HasModelsBucket"
    assert bucket["DeletionPolicy"] == "Retain"
    properties = bucket["Properties"]
    assert properties["BucketName"] == {"Ref": "ModelsBucketName"}
    assert all(properties["PublicAccessBlockConfiguration"].values())
    assert properties["VersioningConfiguration"] == {"Status": "Enabled"}
    assert properties["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "AES256"}


def test_max_receive_count_reaches_handlers(config):
    from shared.handlers import DEFAULT_MAX_RECEIVE_COUNT

    assert config["custom"]["maxReceiveCount"] == DEFAULT_MAX_RECEIVE_COUNT


def test_lambda_requirements_leave_out_scikit_learn():
    lines = REQUIREMENTS_LAMBDA.read_text(encoding="utf-8").splitlines()
    packages = {re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower() for line in lines}
    packages.discard("")
    packages = {name for name in packages if not name.startswith("#")}

    assert {"numpy", "scipy", "aws-lambda-powertools"} <= packages
    assert "scikit-learn" not in packages
    assert "boto3" not in packages, "boto3 is part of the Lambda runtime"


def test_dashboard_shows_published_metrics(resources):
    from shared.metrics import ROUND_METRICS

    body = resources["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    dashboard = json.loads(body.replace("${AWS::Region}", "us-east-1"))
    shown = set()
    for widget in dashboard["widgets"]:
        previous = None
        for metric in widget["properties"]["metrics"]:
            # "." repeats the entry above it, and "..." all of them up to the last one.
            if metric[0] == "...":
                metric = previous[:-1] + metric[1:]
            metric = [previous[index] if item == "." else item for index, item in enumerate(metric)]
            if metric[0] == "Baton":
                shown.add(metric[1])
            previous = metric
    published = {name for name, _ in ROUND_METRICS.values()}
    assert shown <= published, f"the dashboard shows metrics nothing publishes: {sorted(shown - published)}"
    assert {"RoundDuration", "TrainLoss", "ValidationLoss", "RoundCostUSD"} <= shown
