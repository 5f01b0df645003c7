"""Read the stack's definitions from serverless.yml and create them on a local endpoint.

The local runtime creates its queues and table from the very ``resources.Resources`` block
that CloudFormation deploys, and maps queues to functions from the very ``functions``
block, so the local stack cannot drift from the deployed one. The reader resolves the
subset of Serverless variables the file uses: ``${self:path.to.value}``, ``${sls:stage}``
and ``${opt:stage}``; and the CloudFormation tags ``!GetAtt``, ``!Ref``, ``!Sub`` and
``!Join``, which are kept as ``Fn::`` mappings.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shared.config import Settings
from shared.errors import BatonError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SERVERLESS_FILE = PROJECT_ROOT / "serverless.yml"

_VARIABLE = re.compile(r"\$\{([^${}]+)\}")


class _CloudFormationLoader(yaml.SafeLoader):
    """A YAML loader that turns CloudFormation short tags into ``Fn::`` mappings."""


def _construct_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        # PyYAML has three node kinds: scalar, sequence and mapping.
        assert isinstance(node, yaml.MappingNode)
        value = loader.construct_mapping(node, deep=True)
    key = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    return {key: value}


_CloudFormationLoader.add_multi_constructor("!", _construct_tag)


def load_serverless_config(path: Path = SERVERLESS_FILE) -> dict:
    """Parse ``serverless.yml`` without resolving its variables."""
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=_CloudFormationLoader)


def _lookup(config: dict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise BatonError(f"serverless.yml refers to ${{self:{dotted}}}, which is not defined")
        value = value[part]
    return value


def _resolve_variable(config: dict, expression: str, stage: str) -> Any:
    source, _, fallback = expression.partition(",")
    source = source.strip()
    if source.startswith("self:"):
        return _lookup(config, source[len("self:"):])
    if source in ("sls:stage", "opt:stage"):
        return stage
    if source.startswith("param:"):
        name = source[len("param:"):]
        params = config.get("params", {})
        for scope in (stage, "default"):
            if name in params.get(scope, {}):
                return params[scope][name]
    if fallback:
        return fallback.strip().strip("'\"")
    raise BatonError(f"the local runtime cannot resolve ${{{expression}}} in serverless.yml")


def _resolve(value: Any, config: dict, stage: str, depth: int) -> Any:
    if depth > 20:
        raise BatonError("serverless.yml variables nest more than 20 levels; is there a cycle?")
    if isinstance(value, dict):
        return {key: _resolve(item, config, stage, depth) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, config, stage, depth) for item in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    whole = _VARIABLE.fullmatch(value)
    if whole:
        return _resolve(_resolve_variable(config, whole.group(1), stage), config, stage, depth + 1)
    substituted = _VARIABLE.sub(lambda match: str(_resolve_variable(config, match.group(1), stage)), value)
    return _resolve(substituted, config, stage, depth + 1)


@dataclass(frozen=True)
class FunctionDefinition:
    """A function as the local runtime runs it: handler, timeout, memory and queue."""

    name: str
    handler: str
    timeout_seconds: int
    memory_mb: int
    # The queue an sqs event reads, or None for a scheduled function.
    queue_logical_id: str | None
    batch_size: int
    max_concurrency: int | None
    # Interval of a schedule event, for a function without an sqs event.
    schedule_seconds: float | None = None


_RATE = re.compile(r"^rate\((\d+) (minute|minutes|hour|hours|day|days)\)$")
_RATE_UNIT_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}


def parse_rate(expression: str) -> float:
    """Return the interval in seconds of a ``rate(...)`` schedule expression."""
    match = _RATE.match(expression.strip())
    if match is None:
        raise BatonError(f"the local runtime supports only rate(N minutes|hours|days) schedules, got {expression!r}")
    return int(match.group(1)) * _RATE_UNIT_SECONDS[match.group(2).rstrip("s")]


def _schedule_rate(event: object) -> str | None:
    if isinstance(event, str):
        return event
    if isinstance(event, dict):
        rate = event.get("rate")
        return rate[0] if isinstance(rate, list) else rate
    return None


@dataclass(frozen=True)
class StackDefinition:
    """Queues, table and functions as serverless.yml declares them."""

    stage: str
    resources: dict[str, dict]
    functions: dict[str, FunctionDefinition]
    environment: dict[str, str]
    max_receive_count: int

    def queue_name(self, logical_id: str) -> str:
        return self.resources[logical_id]["Properties"]["QueueName"]

    def table_name(self) -> str:
        return self.resources["StateTable"]["Properties"]["TableName"]

    def settings(self, efs_root: str) -> Settings:
        """Return handler settings for this stack with EFS at ``efs_root``.

        They come from the functions' environment in serverless.yml, as the local
        runtime's handlers read them, and never from this process's environment.
        """
        return Settings.from_env(
            environ=self.environment,
            efs_root=efs_root,
            jobs_queue_name=self.queue_name("JobsQueue"),
            tasks_queue_name=self.queue_name("TasksQueue"),
            aggregate_queue_name=self.queue_name("AggregateQueue"),
            state_table_name=self.table_name(),
        )


def load_stack_definition(path: Path = SERVERLESS_FILE, stage: str | None = None) -> StackDefinition:
    """Read queues, table and functions from ``serverless.yml``."""
    config = load_serverless_config(path)
    stage = stage or config.get("provider", {}).get("stage", "dev")

    def resolve(value: Any) -> Any:
        # Only the parts read here are resolved, so variables the local runtime has no
        # use for (account ids, regions of other resources) never need a value.
        return _resolve(value, config, stage, depth=0)

    provider = config.get("provider", {})
    resources = {
        logical_id: resolve(resource)
        for logical_id, resource in config["resources"]["Resources"].items()
        if resource.get("Type") in ("AWS::SQS::Queue", "AWS::DynamoDB::Table")
    }

    functions = {}
    for name, function in config["functions"].items():
        function = resolve({key: function[key] for key in ("handler", "timeout", "memorySize", "events")
                            if key in function})
        sqs_events = [event["sqs"] for event in function.get("events", []) if "sqs" in event]
        schedules = [_schedule_rate(event["schedule"]) for event in function.get("events", []) if "schedule" in event]
        if not sqs_events and len(schedules) == 1 and schedules[0] is not None:
            functions[name] = FunctionDefinition(
                name=name,
                handler=function["handler"],
                timeout_seconds=int(function.get("timeout", resolve(provider.get("timeout", 6)))),
                memory_mb=int(function.get("memorySize", resolve(provider.get("memorySize", 1024)))),
                queue_logical_id=None, batch_size=1, max_concurrency=1,
                schedule_seconds=parse_rate(schedules[0]),
            )
            continue
        if len(sqs_events) != 1:
            raise BatonError(f"function '{name}' in serverless.yml must have exactly one sqs event "
                             "or exactly one schedule event")
        event = sqs_events[0]
        arn = event["arn"]
        if not (isinstance(arn, dict) and "Fn::GetAtt" in arn):
            raise BatonError(f"function '{name}': the sqs event arn must be !GetAtt <Queue>.Arn, got {arn!r}")
        functions[name] = FunctionDefinition(
            name=name,
            handler=function["handler"],
            timeout_seconds=int(function.get("timeout", resolve(provider.get("timeout", 6)))),
            memory_mb=int(function.get("memorySize", resolve(provider.get("memorySize", 1024)))),
            queue_logical_id=arn["Fn::GetAtt"][0],
            batch_size=int(event.get("batchSize", 10)),
            max_concurrency=event.get("maximumConcurrency"),
        )

    check_visibility_timeouts(resources, functions)
    return StackDefinition(
        stage=stage,
        resources=resources,
        functions=functions,
        environment={key: str(value) for key, value in resolve(provider.get("environment", {})).items()},
        max_receive_count=int(resolve(config.get("custom", {}).get("maxReceiveCount", 5))),
    )


def check_visibility_timeouts(resources: dict[str, dict], functions: dict[str, FunctionDefinition]) -> None:
    """Reject a queue whose visibility timeout is shorter than its function's timeout.

    Such a queue makes a message visible again while its first invocation still runs, so
    a second invocation works on it at the same time.
    """
    for function in functions.values():
        if function.queue_logical_id is None:
            continue
        properties = resources[function.queue_logical_id]["Properties"]
        visibility_seconds = int(properties.get("VisibilityTimeout", 30))
        if visibility_seconds < function.timeout_seconds:
            raise BatonError(
                f"queue {function.queue_logical_id} has VisibilityTimeout {visibility_seconds} s, below the "
                f"{function.timeout_seconds} s timeout of function '{function.name}'; a message would be delivered "
                f"again while its first invocation still runs. Set VisibilityTimeout to at least "
                f"{6 * function.timeout_seconds} s (six times the timeout, as AWS advises)")


def _queue_attributes(properties: dict, arns: dict[str, str]) -> dict[str, str]:
    attributes = {}
    for name in ("VisibilityTimeout", "MessageRetentionPeriod", "DelaySeconds", "ReceiveMessageWaitTimeSeconds"):
        if name in properties:
            attributes[name] = str(properties[name])
    redrive = properties.get("RedrivePolicy")
    if redrive:
        target = redrive["deadLetterTargetArn"]
        if isinstance(target, dict):
            target = arns[target["Fn::GetAtt"][0]]
        attributes["RedrivePolicy"] = json.dumps(
            {"deadLetterTargetArn": target, "maxReceiveCount": str(redrive["maxReceiveCount"])})
    return attributes


def create_stack(definition: StackDefinition, sqs, dynamodb) -> dict[str, str]:
    """Create the stack's queues and table; existing ones are left as they are.

    Returns the queue URL of each queue resource, by logical id.
    """
    queues = {key: value for key, value in definition.resources.items() if value["Type"] == "AWS::SQS::Queue"}
    # Dead-letter queues first: the others name their ARN.
    ordered = sorted(queues, key=lambda logical_id: "RedrivePolicy" in queues[logical_id]["Properties"])

    urls: dict[str, str] = {}
    arns: dict[str, str] = {}
    for logical_id in ordered:
        properties = queues[logical_id]["Properties"]
        url = sqs.create_queue(QueueName=properties["QueueName"],
                               Attributes=_queue_attributes(properties, arns))["QueueUrl"]
        urls[logical_id] = url
        arns[logical_id] = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]

    for resource in definition.resources.values():
        if resource["Type"] != "AWS::DynamoDB::Table":
            continue
        properties = resource["Properties"]
        try:
            indexes = properties.get("GlobalSecondaryIndexes")
            dynamodb.create_table(
                TableName=properties["TableName"],
                AttributeDefinitions=properties["AttributeDefinitions"],
                KeySchema=properties["KeySchema"],
                BillingMode=properties.get("BillingMode", "PAY_PER_REQUEST"),
                **({"GlobalSecondaryIndexes": indexes} if indexes else {}),
            )
        except dynamodb.exceptions.ResourceInUseException:
            pass
        time_to_live = properties.get("TimeToLiveSpecification")
        if time_to_live:
            dynamodb.update_time_to_live(TableName=properties["TableName"], TimeToLiveSpecification=time_to_live)
    return urls
