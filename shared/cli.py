"""The ``baton`` command line: run a job locally, or send one to a deployed stack."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit
from typing import TYPE_CHECKING, Callable

import click
from click.core import ParameterSource

from shared.cli_spec import (FiniteFloatRange, build_spec, check_job_id_argument, checked_output_path, writing_output,
                              spec_options)
from shared.config import Settings, stack_resource_name
from shared.errors import JobSpecError
from shared.spec import check_relative_path, encode_job_message
from shared.state import JOB_STATUSES, TERMINAL_STATUSES, describe_last_error

if TYPE_CHECKING:
    from shared.local.folder_lock import LocalDirLock

DEFAULT_LOCAL_DIR = Path(".baton")


def _delete_local_job(efs_root: Path, job_id: str) -> None:
    """Delete the job's folder under the local EFS root, for ``baton run --fresh``.

    Refuses when a symbolic link on the way leads outside the EFS root, so that --fresh
    never deletes files elsewhere on the machine.
    """
    import shutil

    from shared.efs import EfsStore

    store = EfsStore(efs_root)
    job_dir = store.job_dir(job_id)
    if job_dir.is_symlink() or not store.is_under_root(job_dir):
        raise click.ClickException(f"--fresh did not delete {job_dir}: it is a symbolic link or leads outside the "
                                   f"EFS folder {efs_root} through one; remove the link, then run again")
    shutil.rmtree(job_dir, ignore_errors=True)


def _loss_text(value: float, decimals: int) -> str:
    """Return a loss with ``decimals`` decimals, or in scientific notation once it is too large to read so."""
    # Compared after rounding, so that 999999.99996 does not print as a seven-digit number.
    return f"{value:.{decimals}f}" if abs(round(value, decimals)) < 1e6 else f"{value:.{decimals - 1}e}"


def _format_round(metrics: dict) -> str:
    parts = [f"round {metrics['round']:>5}", f"epoch {metrics['epoch']:7.3f}",
             f"train loss {_loss_text(metrics['train_loss'], 5)}"]
    if "validation_loss" in metrics:
        parts.append(f"val loss {_loss_text(metrics['validation_loss'], 5)}")
    if "validation_accuracy" in metrics:
        parts.append(f"val acc {metrics['validation_accuracy']:.4f}")
    if "validation_r2" in metrics:
        # A diverging regression reaches r2 values far below zero.
        parts.append(f"val r2 {_loss_text(metrics['validation_r2'], 4)}")
    return "  ".join(parts)


def _aws_error_message(error: Exception, stage: str | None = None, queue_url: str | None = None) -> str | None:
    """Return a one-line explanation of a common AWS client error, or None for other errors.

    ``stage`` is the command's --stage and ``queue_url`` its --queue-url, so that a missing
    table or queue is named.
    """
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, NoRegionError

    if isinstance(error, NoRegionError):
        return "no AWS region is configured; pass --region or set AWS_DEFAULT_REGION"
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
    without options, because only the command line tells which stack the user reached.
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


class BatonGroup(click.Group):
    """A command group that turns common AWS client errors into one-line messages.

    An error of a command given stack options gets those options in each baton command
    that it names (:func:`with_stack_options`).
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError:
            raise
        except click.ClickException as error:
            error.message = with_stack_options(error.message, ctx.meta.get(STACK_ARGUMENTS_META_KEY, ""))
            raise
        except Exception as error:
            # Context.meta is shared by the group's context and the command's.
            message = _aws_error_message(error, ctx.meta.get(STAGE_META_KEY), ctx.meta.get(QUEUE_URL_META_KEY))
            if message is None:
                raise
            raise click.ClickException(message) from None


@click.group(cls=BatonGroup)
@click.version_option(package_name="baton")
def main() -> None:
    """Baton: data-parallel training on AWS Lambda, chained through SQS and EFS."""


STAGE_META_KEY = "baton.stage"
QUEUE_URL_META_KEY = "baton.queue_url"
# The stack options of the command, as _stack_arguments returns them.
STACK_ARGUMENTS_META_KEY = "baton.stack_arguments"
# Serverless Framework stage names: letters, digits and hyphens.
STAGE_PATTERN = re.compile(r"[A-Za-z0-9-]{1,32}")
# AWS region names such as us-east-1, eu-central-2 or us-gov-west-1.
REGION_PATTERN = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")


def _check_stage(context: click.Context, parameter: click.Parameter, stage: str) -> str:
    if not STAGE_PATTERN.fullmatch(stage):
        raise click.BadParameter(f"{stage!r} is not a stage name: use up to 32 letters, digits and hyphens, as "
                                 "given to `serverless deploy --stage` (`baton run` uses local)", context, parameter)
    context.meta[STAGE_META_KEY] = stage
    return stage


def _check_url(context: click.Context, parameter: click.Parameter, url: str | None, example: str) -> str | None:
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


def _check_local_endpoint(stage: str, endpoint_url: str | None) -> None:
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
    return _check_url(context, parameter, url, "the endpoint that `baton run` prints, such as http://127.0.0.1:PORT")


def _check_region(context: click.Context, parameter: click.Parameter, region: str | None) -> str | None:
    if region is not None and not REGION_PATTERN.fullmatch(region):
        raise click.BadParameter(f"{region!r} is not an AWS region name such as us-east-1", context, parameter)
    return region


def _stack_options(command: Callable) -> Callable:
    """Add the options that select a stack: --stage, --endpoint-url and --region.

    The command's context records them for :class:`BatonGroup`, as
    :func:`_stack_arguments` writes them.
    """

    run_command = command

    @functools.wraps(run_command)
    def recording_stack(*args, **kwargs):
        stack_arguments = _stack_arguments(kwargs["stage"], kwargs["endpoint_url"], kwargs["region"])
        click.get_current_context().meta[STACK_ARGUMENTS_META_KEY] = stack_arguments
        return run_command(*args, **kwargs)

    command = click.option("--region", default=None, callback=_check_region,
                           help="AWS region of the stack; defaults to the standard AWS configuration.")(recording_stack)
    command = click.option("--endpoint-url", default=None, metavar="URL", callback=_check_endpoint_url,
                           help="Send AWS requests to this endpoint instead, such as the local stack's moto "
                                "server (printed by `baton run`).")(command)
    command = click.option("--stage", default="dev", show_default=True, callback=_check_stage,
                           help="Stage the stack was deployed with; `baton run` uses 'local'.")(command)
    return command


@main.command()
@click.argument("spec_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--local-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_LOCAL_DIR,
              show_default=True, help="Folder for the local EFS root (efs/) and the handlers' logs (logs/).")
@click.option("--import", "imports", multiple=True, metavar="SOURCE:DEST",
              help="Copy a local file or folder to DEST under the EFS root before the job starts; the last ':' "
                   "separates SOURCE from DEST. Repeatable.")
@click.option("--workers", "worker_lanes", type=click.IntRange(1, 64), default=None,
              help="Worker containers run at once. Defaults to the job's n_workers, but at most 16.")
@click.option("--timeout", "timeout_seconds", type=FiniteFloatRange(min=1), default=3600, show_default=True,
              help="Give up waiting after this many seconds from sending the job. The wait for other jobs "
                   "sent to the stack counts towards it.")
@click.option("--fresh", is_flag=True, help="Delete this job's previous local files first.")
@spec_options
def run(spec_file: Path | None, local_dir: Path, imports: tuple[str, ...], worker_lanes: int | None,
        timeout_seconds: float, fresh: bool, overrides: list) -> None:
    """Run the job in SPEC_FILE on this machine, through the same handlers Lambda runs.

    The spec options (--set, --model, --data and the others) change fields of SPEC_FILE
    or, without a file, make up the whole spec. SQS and DynamoDB are served by moto on
    127.0.0.1 and EFS is a local folder.

    Other jobs sent to the stack while this runs are waited for once this job has ended,
    unless they are PAUSED. Ctrl-C (or SIGTERM, or SIGHUP) stops the stack and every job
    on it, prints where each stopped, and exits with status 130 (143, 129). So does a
    closed output pipe (``baton run ... | head``), with status 1.

    One baton run at a time uses a local folder: a second one on the same --local-dir
    is rejected before it changes any file.
    """
    from shared.cli_run import hold_local_dir

    spec = build_spec(spec_file, overrides)
    _check_local_settings()
    with hold_local_dir(local_dir, spec_file, bool(overrides)) as lock:
        if fresh:
            _delete_local_job(local_dir / "efs", spec["job_id"])
        exit_status = _run_on_local_stack(spec, local_dir, imports, worker_lanes, timeout_seconds, lock)
    if exit_status != 0:
        sys.exit(exit_status)


def _check_local_settings() -> None:
    """Reject an ALLOWED_DATA_ROOTS in the environment that every handler of the local stack would reject."""
    from shared.config import Settings
    from shared.errors import BatonError

    try:
        Settings.from_env().data_roots()
    except BatonError as error:
        raise click.ClickException(str(error)) from None


def _run_on_local_stack(spec: dict, local_dir: Path, imports: tuple[str, ...], worker_lanes: int | None,
                        timeout_seconds: float, lock: LocalDirLock) -> int:
    """Start a local stack, send ``spec`` to it and follow the jobs on it; return the exit status.

    ``lock`` is the local folder's :class:`shared.local.folder_lock.LocalDirLock`. The
    stack's processes inherit it, and it records the stack's endpoint URL.
    """
    from shared.cli_run import StopSignal, StopSignalHandlers, report_interrupt, server_exit_line, redirect_stdout_if_closed
    from shared.local.session import LocalStack, ServerExitedError

    job_id = spec["job_id"]
    efs_root = local_dir / "efs"
    training = spec.get("training")
    n_workers = training.get("n_workers", 4) if isinstance(training, dict) else 4
    lanes = worker_lanes or min(int(n_workers), 16)
    stack = LocalStack(efs_root, concurrency={"worker": lanes}, inherited_fds=(lock.fd,))
    sent = False
    # Ids of the jobs on the stack that have not ended, as far as this command has read.
    # The line printed when moto's server exits names them.
    unfinished: list[str] = []
    failure: click.ClickException | None = None
    interrupt: StopSignal | None = None
    output_closed = False
    started_at = time.time()
    # SIGTERM (from `timeout`, a CI runner or systemd) and SIGHUP (a closed terminal) stop
    # the stack as Ctrl-C does, so none leaves the moto server and containers behind.
    with StopSignalHandlers() as signals:
        try:
            stack.start()
            lock.record(stack.endpoint_url)
            _import_local_data(stack, imports)
            click.echo(f"local stack on {stack.endpoint_url}; EFS root {efs_root}; logs in {local_dir / 'logs'}")
            click.echo("while this runs, other baton commands reach it with: "
                       f"--stage local --endpoint-url {stack.endpoint_url}")
            stack.submit(spec)
            sent = True
            unfinished.append(job_id)
            click.echo(f"job {job_id} sent with {n_workers} workers")
            failure = _follow_local_jobs(stack, job_id, efs_root, timeout_seconds, unfinished)
        except StopSignal as signal_received:
            interrupt = signal_received
            signals.ignore()
            stack.stop_handlers()
            # After SIGHUP from a closed terminal, writing to stderr fails too (EIO).
            with contextlib.suppress(OSError):
                report_interrupt(stack, job_id, sent, efs_root)
        except BrokenPipeError:
            if not redirect_stdout_if_closed():
                raise
            # The reader of stdout has gone, as `head` does once it has its lines, so stop as on a signal.
            output_closed = True
            signals.ignore()
            stack.stop_handlers()
            with contextlib.suppress(OSError):
                report_interrupt(stack, job_id, sent, efs_root, reason="output pipe closed", outcome_shown=False)
        except ServerExitedError as error:
            signals.ignore()
            stack.stop_handlers()
            failure = click.ClickException(server_exit_line(error, job_id, sent, unfinished, local_dir, started_at))
            failure.show()
        finally:
            signals.ignore()
            stack.stop()

    if interrupt is not None:
        return interrupt.exit_code
    if output_closed:
        return 1
    if failure is not None:
        return failure.exit_code
    return 0


def _import_local_data(stack, imports: tuple[str, ...]) -> None:
    """Copy each ``--import SOURCE:DEST`` into the stack's EFS folder, rejecting a bad mapping."""
    for mapping in imports:
        # The last colon separates them, so a SOURCE may contain colons (DEST is a plain EFS path).
        source, separator, destination = mapping.rpartition(":")
        if not separator or not source or not destination:
            raise click.BadParameter(f"expected SOURCE:DEST with neither part empty, got {mapping!r}",
                                     param_hint="--import")
        if not Path(source).exists():
            raise click.BadParameter(f"source {source!r} does not exist (in {mapping!r}, the last ':' separates "
                                     "SOURCE from DEST)", param_hint="--import")
        try:
            destination = check_relative_path("--import DEST", destination)
        except JobSpecError as error:
            raise click.BadParameter(error.problem, param_hint="--import") from None
        try:
            stack.import_data(source, destination)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--import") from None


def _echo_status_change(record, previous: str, endpoint_url: str) -> None:
    """Print a line when ``baton run``'s own job is paused, or resumed after a pause."""
    if record.status == "PAUSED":
        click.echo(f"job {record.job_id} is PAUSED after {record.round} of {record.total_rounds} rounds; "
                   f"`baton resume {record.job_id} --stage local --endpoint-url {endpoint_url}` continues it, and "
                   "baton run waits for it up to --timeout")
    elif previous == "PAUSED":
        # No round number: the job may be rounds ahead of the round lines printed so far.
        click.echo(f"job {record.job_id} resumed")


def _echo_continued(record, efs_root: Path) -> None:
    """Print a line when ``baton run``'s own job goes on from an earlier run's files on EFS, or reuses its model."""
    first_round = record.first_round
    if record.status == "SUCCEEDED" and record.round == first_round:
        click.echo(f"job {record.job_id} had finished in an earlier run of its spec on the same data, so it is not "
                   f"trained again: its model and the metrics of its {first_round} rounds are in "
                   f"{efs_root / 'jobs' / record.job_id}. Add --fresh to train it again")
        return
    done = "round 1" if first_round == 1 else f"rounds 1 to {first_round}"
    click.echo(f"job {record.job_id} continues from round {first_round + 1}, where an earlier run of its spec "
               f"stopped; the metrics of its {done} are in {efs_root / 'jobs' / record.job_id / 'metrics'}")


def _follow_local_jobs(stack, job_id: str, efs_root: Path, timeout_seconds: float,
                       unfinished: list[str]) -> click.ClickException | None:
    """Print the rounds and the summary of ``job_id``, then wait for the stack's other jobs.

    Returns the error to exit with when ``job_id`` did not succeed, after it has been
    printed. The wait for ``job_id`` and the wait for the other jobs share
    ``timeout_seconds``. Each job that ends is removed from ``unfinished``, and each other
    job seen running is added.
    """
    from shared.cli_run import own_job_timeout_line, report_jobs_left, wait_for_other_jobs

    started = time.monotonic()
    try:
        record = stack.wait(job_id, timeout_seconds=timeout_seconds, on_round=lambda m: click.echo(_format_round(m)),
                            on_status=lambda changed, previous: _echo_status_change(changed, previous,
                                                                                    stack.endpoint_url),
                            on_continued=lambda continued: _echo_continued(continued, efs_root))
    except TimeoutError:
        record = stack.get_job(job_id)
        # A job that ended between the last poll and this read is reported as ended.
        if record is None or record.status not in TERMINAL_STATUSES:
            report_jobs_left(stack, job_id, efs_root, "other jobs")
            raise click.ClickException(own_job_timeout_line(record, job_id, timeout_seconds, efs_root.parent,
                                                            stack.endpoint_url)) from None
    unfinished.remove(job_id)
    failure = _report_local_job(record, efs_root, time.monotonic() - started)
    if failure is not None:
        failure.show()
    wait_for_other_jobs(stack, job_id, efs_root, timeout_seconds - (time.monotonic() - started), unfinished)
    return failure


def _report_local_job(record, efs_root: Path, elapsed: float) -> click.ClickException | None:
    """Print the summary of a local job that succeeded; return the error to report for one that did not."""
    job_id = record.job_id
    click.echo("")
    if record.status == "CANCELLED":
        return click.ClickException(f"job {job_id} was cancelled after {record.round} of {record.total_rounds} "
                                    f"rounds; its files remain in {efs_root / 'jobs' / job_id}")
    if record.status != "SUCCEEDED":
        return click.ClickException(f"job {job_id} {record.status}: {record.error}{_after_failure(record, efs_root)}")
    summary = record.attributes
    click.echo(f"job {job_id} SUCCEEDED after {record.round} rounds in {elapsed:.1f} s "
               f"(stop reason {summary.get('stop_reason', 'unknown')})")
    # The training loss is the mean over the last round's batches, while validation uses every held-out row.
    labels = {"train_loss": "train_loss (last round)", "validation_loss": "validation_loss",
              "validation_accuracy": "validation_accuracy", "validation_r2": "validation_r2"}
    for name, label in labels.items():
        if name in summary:
            value = summary[name]
            text = f"{value:.5f}" if name == "validation_accuracy" else _loss_text(value, 5)
            click.echo(f"  {label:<24} {text}{_loss_note(record) if name.endswith('loss') else ''}")
    click.echo(f"  {'model':<24} {efs_root / 'jobs' / job_id / 'model'}")
    return None


def _after_failure(record, efs_root: Path) -> str:
    """Return what to do after ``baton run``'s own job failed, as a sentence to append to its error.

    Only a job whose rounds a rerun would go on from gets one. The error of a job that
    failed in preparation, or whose data changed, already names its fix, and so does the
    error of a diverged job, which a rerun would only repeat.
    """
    from shared.efs import EfsStore
    from shared.errors import BatonError, DIVERGED_WORDS
    from shared.earlier_runs import continuation_round, run_identity
    from shared.spec import parse_job_spec

    if record.status != "FAILED" or record.total_rounds == 0 or DIVERGED_WORDS in (record.error or ""):
        return ""
    store = EfsStore(efs_root)
    try:
        identity = run_identity(store, parse_job_spec(json.loads(record.spec_json)))
    except (BatonError, OSError, ValueError):
        return ""
    first_round = continuation_round(store, record.job_id, record.total_rounds, identity)
    if first_round == 0:
        return ""
    return (f". Its files remain in {store.job_dir(record.job_id)}; once the cause is fixed, running the same "
            f"command again goes on from round {first_round + 1}")


@main.command()
@click.argument("spec_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_stack_options
@click.option("--queue-url", default=None, callback=lambda context, parameter, url: _check_url(
    context, parameter, url, "a jobs queue URL such as https://sqs.us-east-1.amazonaws.com/123456789012/baton-dev-jobs"),
              help="Jobs queue URL; looked up from the stage when omitted.")
@click.option("--dry-run", is_flag=True, help="Validate the spec and print it as JSON without sending it.")
@spec_options
def submit(spec_file: Path | None, stage: str, endpoint_url: str | None, region: str | None, queue_url: str | None,
           dry_run: bool, overrides: list) -> None:
    """Validate a job spec and send it to a stack's jobs queue.

    The spec is SPEC_FILE with the spec options (--set, --model, --data and the others)
    applied on top, or without a file the spec options alone. An invalid spec is
    reported and not sent. Uses the standard AWS credential chain and region settings.
    """
    from shared.monitor import aws_client

    spec = build_spec(spec_file, overrides)
    if dry_run:
        click.echo(json.dumps(spec, indent=2))
        return

    if queue_url is None:
        _check_local_endpoint(stage, endpoint_url)
    table_stage = stage
    if queue_url is not None:
        click.get_current_context().meta[QUEUE_URL_META_KEY] = queue_url
        if queue_url.rstrip("/").endswith("-dlq"):
            raise click.ClickException(f"--queue-url {queue_url} is a dead-letter queue; send the job to the jobs "
                                       "queue, baton-<stage>-jobs. Nothing was sent.")
        # The queue's own stage names the table. For a queue of another name, an explicit --stage does.
        explicit_stage = click.get_current_context().get_parameter_source("stage") != ParameterSource.DEFAULT
        table_stage = _stage_of_queue(queue_url) or (stage if explicit_stage else None)
    _check_job_id_free(spec, table_stage, endpoint_url, region)
    sqs = aws_client("sqs", endpoint_url=endpoint_url, region=region)
    if queue_url is None:
        queue_url = sqs.get_queue_url(QueueName=stack_resource_name(stage, "jobs"))["QueueUrl"]
    message_id = sqs.send_message(QueueUrl=queue_url, MessageBody=encode_job_message(spec))["MessageId"]
    click.echo(f"job {spec['job_id']} sent to {queue_url} (message {message_id})")


def _stage_of_queue(queue_url: str) -> str | None:
    """Return the stage of a ``baton-<stage>-jobs`` queue URL, or None for another name."""
    match = re.fullmatch(r"baton-(.+)-jobs", queue_url.rstrip("/").rsplit("/", 1)[-1])
    return match.group(1) if match else None


def _check_job_id_free(spec: dict, stage: str | None, endpoint_url: str | None, region: str | None) -> None:
    """Raise before sending a spec whose job id belongs to a job in the stage's table.

    The starter would drop such a message, or record its rejection under another id, so
    the error is reported here instead. A table that cannot be read only gets a note.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from shared.spec import parse_job_spec

    job_id = spec["job_id"]
    if stage is None:
        click.echo(f"note: --queue-url names no baton-<stage>-jobs queue and --stage was not given, so whether "
                   f"job id '{job_id}' is taken was not checked", err=True)
        return
    try:
        existing = _state_store(stage, endpoint_url, region).get_job(job_id)
    except (BotoCoreError, ClientError) as error:
        click.echo(f"note: could not check whether job id '{job_id}' is taken ({error}); sending anyway", err=True)
        return
    # An item without a fingerprint only records a rejected spec, which a valid one replaces.
    if existing is None or not existing.fingerprint:
        return
    resumable = existing.status in ("PAUSED", "FAILED")
    stack = _stack_arguments(stage, endpoint_url, region)
    if existing.fingerprint == parse_job_spec(spec).fingerprint():
        resume = f", and `baton resume {job_id}{stack}` continues it" if resumable else ""
        raise click.ClickException(f"job {job_id} already exists with this spec (status {existing.status}), so the "
                                   f"starter would drop it; `baton status {job_id}{stack}` shows it{resume}. Nothing "
                                   "was sent.")
    resume = f"; `baton resume {job_id}{stack}` would continue that job with its own spec" if resumable else ""
    raise click.ClickException(f"job id '{job_id}' is already used by a job with a different spec (status "
                               f"{existing.status}); choose a new one with --job-id{resume}. Nothing was sent.")


# Following jobs: list, status, watch, fetch, plot ------------------------------------------
# These read DynamoDB only (shared/monitor.py), so they work against AWS and against the
# local stack alike.


def _stack_arguments(stage: str, endpoint_url: str | None, region: str | None) -> str:
    """Return the options that aim another baton command at the same stack, each after a space."""
    arguments = f" --stage {stage}" if stage != "dev" else ""
    if endpoint_url is not None:
        arguments += f" --endpoint-url {endpoint_url}"
    if region is not None:
        arguments += f" --region {region}"
    return arguments


def _state_store(stage: str, endpoint_url: str | None, region: str | None):
    from shared.monitor import make_state_store

    _check_local_endpoint(stage, endpoint_url)
    return make_state_store(stage, endpoint_url=endpoint_url, region=region)


def _s3_client(endpoint_url: str | None, region: str | None):
    from shared.monitor import aws_client

    return aws_client("s3", endpoint_url=endpoint_url, region=region)


def _require_job(state, job_id: str):
    from shared.monitor import JobNotFoundError, require_job

    try:
        return require_job(state, job_id)
    except JobNotFoundError as error:
        raise click.ClickException(str(error)) from None


@main.command("list")
@_stack_options
@click.option("--status", "status_filter", default=None, type=click.Choice(JOB_STATUSES, case_sensitive=False),
              help="Show only jobs in this status.")
def list_jobs(stage: str, endpoint_url: str | None, region: str | None, status_filter: str | None) -> None:
    """List the jobs in a stack's state table, oldest first."""
    from datetime import datetime, timezone

    from shared.monitor import format_cost

    jobs = _state_store(stage, endpoint_url, region).list_jobs()
    if status_filter is not None:
        jobs = [job for job in jobs if job.status == status_filter.upper()]
    if not jobs:
        click.echo("no jobs")
        return
    click.echo(f"{'JOB ID':<32} {'STATUS':<10} {'ROUNDS DONE':>13} {'COST USD':>12} {'VAL LOSS':>9}  CREATED (UTC)")
    for job in jobs:
        attributes = job.attributes
        created = datetime.fromtimestamp(float(attributes.get("created_at", 0)), tz=timezone.utc)
        validation_loss = attributes.get("validation_loss")
        click.echo(f"{job.job_id:<32} {job.status:<10} {f'{job.round}/{job.total_rounds}':>13} "
                   f"{format_cost(float(attributes.get('cost_usd', 0.0))):>12} "
                   f"{'-' if validation_loss is None else _loss_text(validation_loss, 4):>9}  "
                   f"{created:%Y-%m-%d %H:%M:%S}")


@main.command()
@click.argument("job_id", callback=check_job_id_argument)
@_stack_options
@click.option("--json", "as_json", is_flag=True, help="Print the job item as JSON.")
def status(job_id: str, stage: str, endpoint_url: str | None, region: str | None, as_json: bool) -> None:
    """Show the state of JOB_ID: status, round, latest metrics and estimated cost.

    A regression model's losses are half the mean squared error, in the target's squared units.
    """
    from shared.cli_run import rounds_done_text
    from shared.monitor import job_summary

    record = _require_job(_state_store(stage, endpoint_url, region), job_id)
    summary = job_summary(record)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
        return
    click.echo(f"job {job_id}: {record.status}, {rounds_done_text(record)}, {record.n_workers} workers")
    loss_note = _loss_note(record)
    stack_arguments = _stack_arguments(stage, endpoint_url, region)
    for key in STATUS_KEYS:
        if summary.get(key) is not None:
            value = _status_value(key, summary[key], loss_note)
            click.echo(f"  {key:<20} {with_stack_options(value, stack_arguments)}")
    # Before the job ends, last_error shows that messages are being retried, and why. A
    # FAILED job's error quotes it where it applies, and --json shows it in every status.
    last_error = summary.get("last_error")
    if isinstance(last_error, dict) and record.status not in TERMINAL_STATUSES:
        click.echo(f"  {'last_error':<20} {_last_error_line(last_error)}")


# The job item's fields that `baton status` prints, in this order.
STATUS_KEYS = ("stop_reason", "error", "epoch", "train_loss", "validation_loss", "validation_accuracy",
               "validation_r2", "cost_usd")


def _status_value(key: str, value: object, loss_note: str) -> str:
    """Return a field of the job item as `baton status` prints it, with large losses in scientific notation."""
    from shared.monitor import format_cost

    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    number = float(value)
    if key == "cost_usd":
        return format_cost(number)
    if key == "epoch":
        return f"{number:.3f}"
    if key == "validation_accuracy":
        return f"{number:.5f}"
    if key in ("train_loss", "validation_loss"):
        return _loss_text(number, 5) + loss_note
    return _loss_text(number, 5)


def _loss_note(record) -> str:
    """Return what a regression job's losses are, to print after them, or an empty text for other models."""
    from shared.models import get_model_class

    try:
        task = get_model_class(json.loads(record.spec_json)["model"]["name"]).task
    except (ValueError, KeyError, TypeError):
        return ""
    return " (half the mean squared error)" if task == "regression" else ""


def _last_error_line(last_error: dict) -> str:
    """Return ``last_error`` as the status line shows it: when, in which round, and what failed."""
    from datetime import datetime, timezone

    from shared.training import round_number

    prefix = []
    if isinstance(last_error.get("recorded_at"), (int, float)):
        recorded = datetime.fromtimestamp(float(last_error["recorded_at"]), tz=timezone.utc)
        prefix.append(f"{recorded:%Y-%m-%d %H:%M:%S} UTC")
    if isinstance(last_error.get("round"), int):
        prefix.append(f"round {round_number(last_error['round'])}")
    return ", ".join(prefix) + (": " if prefix else "") + describe_last_error(last_error)


@main.command()
@click.argument("job_id", callback=check_job_id_argument)
@_stack_options
@click.option("--interval", "interval_seconds", type=FiniteFloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between two reads of the table.")
@click.option("--timeout", "timeout_seconds", type=FiniteFloatRange(min=1), default=None,
              help="Stop watching after this many seconds; by default watch until the job ends.")
def watch(job_id: str, stage: str, endpoint_url: str | None, region: str | None, interval_seconds: float,
          timeout_seconds: float | None) -> None:
    """Show a live progress bar of JOB_ID until it succeeds, fails or is cancelled.

    The bar shows the round, epoch, training loss, validation metric, seconds per round,
    rounds left and the estimated cost so far. When stderr is not a terminal, such as
    with 2>FILE, watch writes those fields as one line per round instead. Exits with
    status 1 unless the job succeeds.
    """
    from shared.monitor import JobNotFoundError, watch_job

    try:
        record = watch_job(_state_store(stage, endpoint_url, region), job_id, interval_seconds=interval_seconds,
                           timeout_seconds=timeout_seconds,
                           stack_arguments=_stack_arguments(stage, endpoint_url, region))
    except (JobNotFoundError, TimeoutError) as error:
        raise click.ClickException(str(error)) from None
    from shared.monitor import format_cost

    cost_usd = float(record.attributes.get("cost_usd", 0.0))
    if record.status != "SUCCEEDED":
        raise click.ClickException(f"job {job_id} {record.status}: {record.error or 'no error recorded'}")
    click.echo(f"job {job_id} SUCCEEDED after {record.round} rounds "
               f"(stop reason {record.attributes.get('stop_reason', 'unknown')}, estimated cost "
               f"${format_cost(cost_usd)})")


def _given(*names: str) -> bool:
    """Return whether the command line gave any of the options ``names`` (by parameter name)."""
    context = click.get_current_context()
    return any(context.get_parameter_source(name) not in (ParameterSource.DEFAULT, None) for name in names)


def _stack_option_given() -> bool:
    """Return whether --stage, --endpoint-url or --region was given."""
    return _given("stage", "endpoint_url", "region")


def _reads_efs_alone(efs_root: Path | None) -> bool:
    """Return whether a command given ``--efs-root`` and no stack option reads the EFS folder alone."""
    return efs_root is not None and not _stack_option_given()


@main.command()
@click.argument("job_id", callback=check_job_id_argument)
@_stack_options
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Folder to write into; defaults to ./<JOB_ID>.")
@click.option("--efs-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Local EFS folder, such as .baton/efs for `baton run`, to copy the model from. Without "
                   "--stage, --endpoint-url and --region, the spec and metrics are read from it too, and the "
                   "table is not read.")
def fetch(job_id: str, stage: str, endpoint_url: str | None, region: str | None, output: str | None,
          efs_root: Path | None) -> None:
    """Save JOB_ID's summary, spec and per-round metrics, and its model when reachable.

    Metrics come from DynamoDB. The model is on EFS, which only the stack's VPC can reach.
    Once the job has succeeded, it is copied from --efs-root when given, or else
    downloaded from the stack's models bucket (params.modelsBucket in serverless.yml),
    where the aggregator copied it. docs/deployment.md shows how to copy it out of a
    stack without that bucket.

    With --efs-root alone, everything comes from that folder (the per-round metrics
    files and the model), so a local job can be fetched after `baton run` has ended.
    The job's status is only in the table, so job.json is not written then.
    """
    from shared.errors import BatonError
    from shared.monitor import fetch_job, fetch_local_job

    output_dir = checked_output_path(output, Path(job_id), "fetched/", folder=True)
    try:
        with writing_output(output_dir):
            if _reads_efs_alone(efs_root):
                result = fetch_local_job(efs_root, job_id, output_dir)
            else:
                result = fetch_job(_state_store(stage, endpoint_url, region), job_id, output_dir, efs_root=efs_root,
                                   s3_client=_s3_client(endpoint_url, region))
    except (BatonError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    for path in result.written:
        click.echo(str(path))
    for note in result.notes:
        click.echo(with_stack_options(note, _stack_arguments(stage, endpoint_url, region)), err=True)


@main.command()
@click.argument("job_id", callback=check_job_id_argument)
@_stack_options
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="PNG file to write; defaults to ./<JOB_ID>.png.")
@click.option("--width", "width_inches", type=FiniteFloatRange(min=2, max=40), default=12.0, show_default=True,
              help="Figure width in inches.")
@click.option("--height", "height_inches", type=FiniteFloatRange(min=2, max=40), default=8.0, show_default=True,
              help="Figure height in inches.")
@click.option("--dpi", type=click.IntRange(min=30, max=600), default=100, show_default=True,
              help="Pixels per inch; the image is width x dpi by height x dpi pixels.")
@click.option("--efs-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Local EFS folder, such as .baton/efs for `baton run`, to read the per-round metrics files "
                   "from instead of the table; works after `baton run` has ended.")
def plot(job_id: str, stage: str, endpoint_url: str | None, region: str | None, output: str | None,
         width_inches: float, height_inches: float, dpi: int, efs_root: Path | None) -> None:
    """Plot JOB_ID's loss and validation metric against round and training time into a PNG file.

    The training time is the sum of the rounds' times, so it leaves out the time the job
    was paused and the time between two runs of it. kmeans jobs show the validation
    inertia where classifiers show the accuracy and regression models the r2.
    """
    from shared.errors import DamagedFileError
    from shared.monitor import JobNotFoundError, plot_job, read_metrics_files

    # The output is checked first, so a typo in it costs no read of the table.
    output_path = checked_output_path(output, Path(f"{job_id}.png"), "curves.png")
    if output_path.suffix.lower() != ".png":
        raise click.ClickException(f"--output {output_path}: baton plot writes a PNG image; give the file a .png "
                                   "extension")

    if efs_root is not None:
        try:
            rounds = read_metrics_files(efs_root, job_id)
        except (JobNotFoundError, DamagedFileError) as error:
            raise click.ClickException(str(error)) from None
        title = f"{job_id} ({len(rounds)} rounds)"
    else:
        state = _state_store(stage, endpoint_url, region)
        record = _require_job(state, job_id)
        rounds = state.list_round_metrics(job_id)
        title = f"{job_id} ({record.status}, {len(rounds)} rounds)"
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        plot_job(rounds, output_path, title=title, width_inches=width_inches, height_inches=height_inches, dpi=dpi)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:
        raise click.ClickException(f"cannot write the plot to {output_path}: {error.strerror or error}; "
                                   "choose another --output") from None
    click.echo(str(output_path))


# Extensions of joblib and pickle files; export's --output must end in one of them.
EXPORT_SUFFIXES = (".joblib", ".pkl", ".pickle")


@main.command("export")
@click.argument("job_id", callback=check_job_id_argument)
@_stack_options
@click.option("--local-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_LOCAL_DIR,
              show_default=True, help="Folder of a local run; the job is read from its efs/ folder.")
@click.option("--efs-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="EFS root to read instead of LOCAL_DIR/efs, for example a copy of the deployed file system.")
@click.option("--output", type=click.Path(dir_okay=False), required=True,
              help="File to write the fitted scikit-learn estimator to, with joblib; it must end in .joblib, "
                   ".pkl or .pickle.")
def export_command(job_id: str, stage: str, endpoint_url: str | None, region: str | None, local_dir: Path,
                   efs_root: Path | None, output: str) -> None:
    """Save the final model of JOB_ID as a fitted scikit-learn estimator.

    Load it with joblib.load(OUTPUT); it predicts from raw features as Baton does.
    Without --stage, --endpoint-url and --region, the job is read from its files in an
    EFS folder alone (LOCAL_DIR/efs or --efs-root), so export works after `baton run` has
    ended. With any of them, the model is downloaded from the stack's models bucket
    (params.modelsBucket in serverless.yml), where the job's item points.
    """
    from shared.errors import BatonError
    from shared.export import export_estimator

    output_file = checked_output_path(output, Path(output), "model.joblib")
    # The extension guards files of other kinds, such as a plot, from being overwritten by mistake.
    if output_file.suffix.lower() not in EXPORT_SUFFIXES:
        raise click.ClickException(f"--output {output_file}: baton export writes a joblib file; give the file a "
                                   f"{', '.join(EXPORT_SUFFIXES[:-1])} or {EXPORT_SUFFIXES[-1]} extension. Nothing "
                                   "was written")
    from_stack = _stack_option_given()
    if from_stack and (efs_root is not None or _given("local_dir")):
        raise click.ClickException("give either --efs-root or --local-dir, to export from an EFS folder, or any "
                                   "of --stage, --endpoint-url and --region, to export from the stack's models "
                                   "bucket, not options of both kinds. Nothing was written")
    try:
        with writing_output(output_file):
            if from_stack:
                estimator, path = _export_from_stack(job_id, stage, endpoint_url, region, output_file)
            else:
                estimator, path = export_estimator(efs_root or local_dir / "efs", job_id, output_file)
    except BatonError as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps({"job_id": job_id, "estimator": type(estimator).__name__, "output": str(path)},
                          ensure_ascii=False))


def _export_from_stack(job_id: str, stage: str, endpoint_url: str | None, region: str | None, output_file: Path):
    """Download the job's model from its stack's models bucket into a temporary folder and export it."""
    import tempfile

    from shared.export import export_estimator
    from shared.monitor import ModelNotInBucketError, bucket_copy_errors, download_finished_model

    state = _state_store(stage, endpoint_url, region)
    with tempfile.TemporaryDirectory(prefix="baton-export-") as temporary:
        efs_root = Path(temporary)
        try:
            uri = download_finished_model(state, _s3_client(endpoint_url, region), job_id, efs_root)
        except ModelNotInBucketError:
            if not _is_local_stack(stage, endpoint_url):
                raise
            # The local stack's EFS is a folder on this machine, which export reads without the stack.
            raise ModelNotInBucketError(
                f"job '{job_id}' SUCCEEDED, but its stack copied its model to no S3 bucket, as the local stack "
                f"of `baton run` does. Export it from that run's EFS folder without --stage and --endpoint-url: "
                f"`baton export {job_id} --efs-root <local folder>/efs --output {output_file}`, where <local folder> "
                f"is the --local-dir of that `baton run` ({DEFAULT_LOCAL_DIR} by default)") from None
        with bucket_copy_errors(efs_root, uri, job_id):
            return export_estimator(efs_root, job_id, output_file)


def _is_local_stack(stage: str, endpoint_url: str | None) -> bool:
    """Return whether the options aim at the local stack of `baton run`: its stage, or an endpoint on this machine."""
    from shared.monitor import LOOPBACK_HOSTS

    return stage == LOCAL_STAGE or (endpoint_url is not None and urlsplit(endpoint_url).hostname in LOOPBACK_HOSTS)


# Controlling jobs: pause, resume, cancel ------------------------------------------------------
# Each is a conditional status change in DynamoDB (shared/control.py); resume also sends
# what the job's current round still needs to its queues.


def _control_clients(stage: str, endpoint_url: str | None, region: str | None):
    from shared.monitor import aws_client
    from shared.queues import QueueClient

    state = _state_store(stage, endpoint_url, region)
    settings = Settings.for_stage(stage)
    return state, QueueClient(aws_client("sqs", endpoint_url=endpoint_url, region=region), settings)


def _run_control(action: Callable[[], object]) -> None:
    from shared.cli_run import rounds_done_text
    from shared.control import JobControlError

    try:
        record = action()
    except JobControlError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"job {record.job_id} is now {record.status}, {rounds_done_text(record)}")


@main.command()
@click.argument("job_id", callback=check_job_id_argument)
@_stack_options
def pause(job_id: str, stage: str, endpoint_url: str | None, region: str | None) -> None:
    """Pause the RUNNING job JOB_ID; `baton resume` continues it from its current round."""
    from shared.control import pause_job

    state, _ = _control_clients(stage, endpoint_url, region)
    _run_control(lambda: pause_job(state, job_id))


@main.command()
@click.argument("job_id", callback=check_job_id_argument)
@_stack_options
def resume(job_id: str, stage: str, endpoint_url: str | None, region: str | None) -> None:
    """Resume the PAUSED or FAILED job JOB_ID from its current round.

    Fix the cause of a failure first. A job that failed before its first round is
    prepared again from its stored spec.
    """
    from shared.control import resume_job

    state, queues = _control_clients(stage, endpoint_url, region)
    _run_control(lambda: resume_job(state, queues, job_id))


@main.command()
@click.argument("job_id", callback=check_job_id_argument)
@_stack_options
def cancel(job_id: str, stage: str, endpoint_url: str | None, region: str | None) -> None:
    """Cancel JOB_ID. A cancelled job cannot be resumed, and its files stay on EFS.

    On a deployed stack the job id stays taken, so train the spec again under a new job
    id. On the local runtime, running the same spec again with `baton run` is a new
    submission, because each `baton run` starts a new table that has no record of the
    cancel: the job goes on from its files on EFS, and `baton run --fresh` trains it
    from round 0 instead.
    """
    from shared.control import cancel_job

    state, _ = _control_clients(stage, endpoint_url, region)
    _run_control(lambda: cancel_job(state, job_id))


# Exit status of `baton plan --deadline` when no configuration finishes in time. It differs
# from click's 1 (error) and 2 (usage error), so that a script can tell the cases apart.
PLAN_DEADLINE_MISSED_EXIT = 3


@main.command()
@click.option("--workers", type=int, default=None,
              help="Workers (training.n_workers). Required unless --deadline is given. With --deadline, every "
                   "candidate keeps this configuration's global batch (workers x --batch-size).")
@click.option("--memory", "memory_mb", type=int, default=1769, show_default=True, help="Worker memory in MB, 128 to 10240.")
@click.option("--aggregator-memory", "aggregator_memory_mb", type=int, default=1769, show_default=True,
              help="Aggregator memory in MB, 128 to 10240.")
@click.option("--rows", type=int, required=True,
              help="Training rows. The data they make must fit in one EFS file (47.9 TiB).")
@click.option("--features", type=int, required=True, help="Features per row.")
@click.option("--density", type=float, default=1.0, show_default=True,
              help="Share of nonzero features: 1 for dense data, less for sparse (CSR) data.")
@click.option("--data-bytes", type=int, default=None, help="Size of the training data in bytes, if known; "
              "otherwise derived from rows, features and density.")
@click.option("--batch-size", type=int, required=True,
              help="Rows per worker per round (training.batch_size), 1 to 1,000,000.")
@click.option("--epochs", type=float, default=None, help="Passes over the data; the default is 1 unless --rounds is set.")
@click.option("--rounds", type=int, default=None, help="Rounds to run, instead of --epochs.")
@click.option("--params", type=int, default=None, help="Model parameters; default features + 1 (a linear model).")
@click.option("--optimizer-slots", type=int, default=1, show_default=True,
              help="Optimizer arrays per parameter: 0 for sgd, 1 for momentum, nesterov or adagrad, 2 for adam.")
@click.option("--validation-rows", type=int, default=0, show_default=True, help="Rows evaluated every round.")
@click.option("--max-concurrency", type=int, default=100, show_default=True,
              help="The tasks queue's maximum concurrency (workerMaxConcurrency in serverless.yml).")
@click.option("--throughput-mode", type=click.Choice(["elastic", "bursting"]), default="elastic", show_default=True,
              help="EFS throughput mode.")
@click.option("--architecture", type=click.Choice(["x86_64", "arm64"]), default="x86_64", show_default=True,
              help="Lambda architecture, for the price.")
@click.option("--deadline", default=None, metavar="DURATION",
              help="Recommend the cheapest workers x memory that finishes within this time, e.g. 90m or 2h. "
                   "Without --workers, every candidate keeps --batch-size rows per worker. Exits with status "
                   f"{PLAN_DEADLINE_MISSED_EXIT} when no configuration meets it.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(workers: int | None, memory_mb: int, aggregator_memory_mb: int, rows: int, features: int, density: float,
         data_bytes: int | None, batch_size: int, epochs: float | None, rounds: int | None, params: int | None,
         optimizer_slots: int, validation_rows: int, max_concurrency: int, throughput_mode: str, architecture: str,
         deadline: str | None, as_json: bool) -> None:
    """Predict a job's time per round, time to finish and cost on AWS, against one VM.

    With --workers it plans that configuration. --deadline adds a recommendation: the
    cheapest workers x memory that finishes in time. With --workers every candidate
    keeps the global batch (workers x --batch-size). Without it every candidate keeps
    --batch-size rows per worker, and the plan printed is the recommended one. The
    model and every figure it assumes are described in docs/planner.md. Nothing is
    sent to AWS.

    Exits with status 3 when no configuration meets --deadline, after printing the
    plan and the fastest configuration, so that a script can tell. Errors in the
    options exit with status 2.
    """
    from shared import planner

    if workers is None and deadline is None:
        raise click.UsageError("Missing option '--workers'. Pass the workers to plan (training.n_workers), or "
                               "--deadline DURATION to have baton plan recommend workers and memory.")
    if epochs is not None and rounds is not None:
        raise click.BadParameter("give --epochs or --rounds, not both", param_hint="--rounds")
    workload = planner.Workload(
        rows=rows, features=features, batch_size=batch_size, density=density,
        epochs=epochs if epochs is not None or rounds is not None else 1.0, rounds=rounds, params=params,
        optimizer_slots=optimizer_slots, validation_rows=validation_rows, data_bytes=data_bytes)
    # Without --workers, the recommendation replaces the worker count of this template.
    deployment = planner.Deployment(workers=1 if workers is None else workers, memory_mb=memory_mb,
                                    aggregator_memory_mb=aggregator_memory_mb, max_concurrency=max_concurrency,
                                    throughput_mode=throughput_mode, architecture=architecture)
    try:
        recommendation = None
        if deadline is not None:
            recommendation = planner.recommend(workload, deployment, planner.parse_duration(deadline),
                                               fixed_batch="global" if workers is not None else "per-worker")
        if workers is not None:
            job_plan = planner.plan_job(workload, deployment)
        else:
            job_plan = recommendation.best or recommendation.fastest
    except planner.PlanError as error:
        raise click.BadParameter(error.problem, param_hint=error.option) from None
    _print_plan(job_plan, recommendation, as_json, recommended_plan=workers is None)
    if recommendation is not None and not recommendation.met:
        sys.exit(PLAN_DEADLINE_MISSED_EXIT)


def _print_plan(job_plan, recommendation, as_json: bool, recommended_plan: bool) -> None:
    """Print a plan and the recommendation, as text or as JSON.

    With ``recommended_plan`` the plan is the recommendation's own (None when no
    configuration fits), so the recommendation comes first.
    """
    from shared import planner

    if as_json:
        result = job_plan.to_dict() if job_plan is not None else {}
        if recommendation is not None:
            result["recommendation"] = recommendation.to_dict()
        click.echo(json.dumps(result, indent=2))
        return
    if recommended_plan:
        click.echo(planner.format_recommendation(recommendation).lstrip("\n"))
        if job_plan is not None:
            click.echo(f"\nPlan of the {'recommended' if recommendation.met else 'fastest'} configuration:")
            click.echo(planner.format_plan(job_plan))
        return
    click.echo(planner.format_plan(job_plan))
    if recommendation is not None:
        click.echo(planner.format_recommendation(recommendation))


if __name__ == "__main__":
    sys.exit(main())
