"""The options that aim a ``baton`` command at a stack, and the messages of its AWS errors.

Every command that reads or changes a stack takes --stage, --endpoint-url and --region
(:func:`stack_options`). The callbacks here check them, and the command's context
records them, so that :class:`shared.cli.BatonGroup` can add them to the baton commands
that an error message names, and can name the missing table or queue of an AWS error
(:func:`aws_error_message`).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import click
from click.core import ParameterSource

from shared.config import stack_resource_name

# Keys in click.Context.meta, which the group's context and the command's share.
STAGE_META_KEY = "baton.stage"
QUEUE_URL_META_KEY = "baton.queue_url"
# The stack options of the command, as format_stack_arguments returns them.
STACK_ARGUMENTS_META_KEY = "baton.stack_arguments"
# Whether the command line gave --stage, --endpoint-url or --region, and the command's JOB_ID.
STACK_OPTION_GIVEN_META_KEY = "baton.stack_option_given"
JOB_ID_META_KEY = "baton.job_id"
# The folder of `baton run` by default (its --local-dir), with the local stack's EFS root in efs/.
DEFAULT_LOCAL_DIR = Path(".baton")
# Serverless Framework stage names: letters, digits and hyphens.
STAGE_PATTERN = re.compile(r"[A-Za-z0-9-]{1,32}")
# AWS region names such as us-east-1, eu-central-2 or us-gov-west-1.
REGION_PATTERN = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")


# Options that select a stack ---------------------------------------------------------------


def _check_stage(context: click.Context, parameter: click.Parameter, stage: str) -> str:
    if not STAGE_PATTERN.fullmatch(stage):
        raise click.BadParameter(f"{stage!r} is not a stage name: use up to 32 letters, digits and hyphens, as "
                                 "given to `serverless deploy --stage` (`baton run` uses local)", context, parameter)
    context.meta[STAGE_META_KEY] = stage
    return stage


def check_url(context: click.Context, parameter: click.Parameter, url: str | None, example: str) -> str | None:
    """Return ``url`` if it is an http:// or https:// URL with a host and a valid port; else raise naming ``example``."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        # Reading the port checks it: a port that is not a number from 0 to 65535 raises.
        port = parts.port
    except ValueError as error:
        raise click.BadParameter(f"{url!r} is not a valid URL ({error}); give {example}", context, parameter) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"{url!r} is not an http:// or https:// URL; give {example}", context, parameter)
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        raise click.BadParameter(f"{url!r} is not a valid URL (its port is {'0' if port == 0 else 'empty'}, and "
                                 f"a server listens on 1 to 65535); give {example}", context, parameter)
    return url


LOCAL_STAGE = "local"


def check_local_endpoint(stage: str, endpoint_url: str | None) -> None:
    """Raise unless a command aimed at the local stack's stage has that stack's endpoint.

    Without one, boto3 would send the request to AWS itself, where no such stack runs.
    An ``AWS_ENDPOINT_URL`` in the environment counts as the endpoint, as boto3 reads it.
    """
    if stage == LOCAL_STAGE and endpoint_url is None and not os.environ.get("AWS_ENDPOINT_URL"):
        raise click.UsageError("--stage local names the stack that `baton run` serves on this machine, so give "
                               "its --endpoint-url, which `baton run` prints (http://127.0.0.1:PORT). Once `baton "
                               "run` has ended, `baton fetch` and `baton plot` read the job with --efs-root alone, "
                               "and `baton export` with --local-dir or --efs-root alone")


def _check_endpoint_url(context: click.Context, parameter: click.Parameter, url: str | None) -> str | None:
    return check_url(context, parameter, url, "the endpoint that `baton run` prints, such as http://127.0.0.1:PORT")


def _check_region(context: click.Context, parameter: click.Parameter, region: str | None) -> str | None:
    if region is not None and not REGION_PATTERN.fullmatch(region):
        raise click.BadParameter(f"{region!r} is not an AWS region name such as us-east-1", context, parameter)
    return region


def stack_options(command: Callable) -> Callable:
    """Add the options that select a stack: --stage, --endpoint-url and --region.

    The command's context records them for :class:`shared.cli.BatonGroup`, as
    :func:`format_stack_arguments` writes them.
    """

    run_command = command

    @functools.wraps(run_command)
    def recording_stack(*args, **kwargs):
        stack_arguments = format_stack_arguments(kwargs["stage"], kwargs["endpoint_url"], kwargs["region"])
        meta = click.get_current_context().meta
        meta[STACK_ARGUMENTS_META_KEY] = stack_arguments
        meta[STACK_OPTION_GIVEN_META_KEY] = stack_option_given()
        meta[JOB_ID_META_KEY] = kwargs.get("job_id")
        return run_command(*args, **kwargs)

    command = click.option("--region", default=None, callback=_check_region,
                           help="AWS region of the stack; defaults to the standard AWS configuration.")(recording_stack)
    command = click.option("--endpoint-url", default=None, metavar="URL", callback=_check_endpoint_url,
                           help="Send AWS requests to this endpoint instead, such as the local stack's moto "
                                "server (printed by `baton run`).")(command)
    command = click.option("--stage", default="dev", show_default=True, callback=_check_stage,
                           help="Stage the stack was deployed with; `baton run` uses 'local'.")(command)
    return command


def options_given(*names: str) -> bool:
    """Return whether the command line gave any of the options ``names`` (by parameter name)."""
    context = click.get_current_context()
    return any(context.get_parameter_source(name) not in (ParameterSource.DEFAULT, None) for name in names)


def stack_option_given() -> bool:
    """Return whether --stage, --endpoint-url or --region was given."""
    return options_given("stage", "endpoint_url", "region")


# Reaching the stack ------------------------------------------------------------------------


def format_stack_arguments(stage: str, endpoint_url: str | None, region: str | None) -> str:
    """Return the options that aim another baton command at the same stack, each after a space."""
    arguments = f" --stage {stage}" if stage != "dev" else ""
    if endpoint_url is not None:
        arguments += f" --endpoint-url {endpoint_url}"
    if region is not None:
        arguments += f" --region {region}"
    return arguments


def state_store(stage: str, endpoint_url: str | None, region: str | None):
    """Return the state table of the stack that the options select; reject --stage local without an endpoint."""
    from shared.monitor import make_state_store

    check_local_endpoint(stage, endpoint_url)
    return make_state_store(stage, endpoint_url=endpoint_url, region=region)


def s3_client(endpoint_url: str | None, region: str | None):
    from shared.monitor import aws_client

    return aws_client("s3", endpoint_url=endpoint_url, region=region)


def require_job(state, job_id: str):
    """Return the item of ``job_id``, or raise a ClickException when the table has none."""
    from shared import monitor

    try:
        return monitor.require_job(state, job_id)
    except monitor.JobNotFoundError as error:
        raise click.ClickException(str(error)) from None


# Error messages ----------------------------------------------------------------------------


def aws_error_message(error: Exception, stage: str | None = None, queue_url: str | None = None,
                      command: str | None = None, job_id: str | None = None,
                      has_stack_options: bool = True) -> str | None:
    """Return a one-line explanation of a common AWS client error, or None for other errors.

    ``stage`` is the command's --stage and ``queue_url`` its --queue-url, so that a missing
    table or queue is named. ``command``, ``job_id`` and ``has_stack_options`` describe the
    command line, for :func:`local_stack_hint`.
    """
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, NoRegionError

    if isinstance(error, NoRegionError):
        return (local_stack_hint(command, job_id, has_stack_options)
                or "no AWS region is configured; pass --region or set AWS_DEFAULT_REGION")
    if isinstance(error, NoCredentialsError):
        return ("no AWS credentials were found; configure them (aws configure, AWS_PROFILE), or for a local "
                "stack set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to any value")
    if isinstance(error, EndpointConnectionError):
        return (f"cannot reach {error.kwargs.get('endpoint_url', 'the endpoint')}; for a local stack, "
                "check that its `baton run` is still running. Once it has ended, `baton fetch` and `baton plot` "
                "read a job from its EFS folder with --efs-root alone, such as --efs-root .baton/efs")
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("ResourceNotFoundException", "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
            message = error.response["Error"].get("Message", code).rstrip(".")
            resource = "table" if code == "ResourceNotFoundException" else "queue"
            if resource == "queue" and queue_url is not None:
                message = f"{message} (queue {queue_url} given by --queue-url)"
                return f"{message}; check --queue-url and --region"
            if stage is not None:
                name = stack_resource_name(stage, "state" if resource == "table" else "jobs")
                message = f"{message} ({resource} {name} for --stage {stage!r})"
            return (f"{message}; check --stage (a local stack started by `baton run` uses --stage local) "
                    "and --region")
        return f"AWS request failed: {code}: {error.response.get('Error', {}).get('Message', '')}"
    return None


def local_stack_hint(command: str | None, job_id: str | None, has_stack_options: bool,
                     local_dir: Path = DEFAULT_LOCAL_DIR) -> str:
    """Return the message for a missing AWS region when the user likely meant `baton run`'s local stack, else "".

    Without stack options a command reads the stage 'dev' on AWS, so after only `baton
    run` (or `make demo`) the missing region is the first error. When the default local
    folder contains the job, or any job for `baton list`, the message names the options
    that reach it instead of pointing at AWS alone.
    """
    jobs_dir = local_dir / "efs" / "jobs"
    if has_stack_options or command not in STACK_COMMANDS:
        return ""
    if job_id is not None:
        if not (jobs_dir / job_id).is_dir():
            return ""
        found = f"job {job_id} has files in {local_dir / 'efs'}, the EFS folder of `baton run`"
    else:
        try:
            if not any(entry.is_dir() for entry in jobs_dir.iterdir()):
                return ""
        except OSError:
            return ""
        found = f"{local_dir / 'efs'}, the EFS folder of `baton run`, contains jobs"
    efs_option = f"--efs-root {local_dir / 'efs'}"
    if command in ("fetch", "plot"):
        after_run = f"pass {efs_option} alone"
    elif job_id is not None:
        after_run = (f"`baton fetch {job_id} {efs_option}` and `baton plot {job_id} {efs_option}` read the job's "
                     "files")
    else:
        after_run = f"`baton fetch JOB_ID {efs_option}` reads a job's files"
    return (f"no AWS region is configured, and without --stage or --endpoint-url `baton {command}` reads the stack "
            f"of stage 'dev' on AWS. But {found}: while that `baton run` runs, pass --stage local --endpoint-url "
            f"URL, with the URL it prints; once it has ended, {after_run}. For a stack on AWS, pass --region or set "
            "AWS_DEFAULT_REGION")


# baton commands that read or change a stack, and so need the stack options of the command
# whose message names them.
STACK_COMMANDS = ("status", "watch", "list", "fetch", "plot", "export", "pause", "resume", "cancel")
# A baton command with arguments in backticks, as messages name one: `baton status JOB`.
QUOTED_BATON_COMMAND = re.compile(r"`baton (?P<command>[a-z]+)(?P<arguments> [^`]+)`")
# Options that already aim a quoted command at a stack or at an EFS folder.
AIMING_OPTIONS = ("--stage", "--endpoint-url", "--region", "--efs-root", "--local-dir", "--queue-url")


def with_stack_options(text: str, stack_arguments: str) -> str:
    """Add ``stack_arguments`` to each baton command in backticks in ``text`` that reads or changes a stack.

    Messages from the modules below the CLI name commands such as `baton resume JOB`
    without options, because only the command line shows which stack the user reached.
    A command that already has a stack or EFS option is left as it is.
    """
    if not stack_arguments:
        return text

    def add_options(match: re.Match) -> str:
        arguments = match.group("arguments")
        if match.group("command") not in STACK_COMMANDS or any(option in arguments for option in AIMING_OPTIONS):
            return match.group(0)
        return f"`baton {match.group('command')}{arguments}{stack_arguments}`"

    return QUOTED_BATON_COMMAND.sub(add_options, text)
