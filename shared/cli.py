"""The ``baton`` command line: run a job locally, or send one to a deployed stack.

This module contains the click group and its commands. The work behind them is in
:mod:`shared.cli_run` (the ``baton run`` flow), :mod:`shared.cli_stack` (the options
that select a stack, and AWS error messages), :mod:`shared.cli_spec` (the spec options)
and :mod:`shared.monitor` (following, fetching and plotting jobs). None of those
imports this module.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit
from typing import Callable, TypeGuard

import click
from click.core import ParameterSource

from shared.cli_spec import (FiniteFloatRange, build_spec, check_job_id_argument, checked_output_path, writing_output,
                              spec_options)
from shared.cli_stack import (DEFAULT_LOCAL_DIR, JOB_ID_META_KEY, LOCAL_STAGE, QUEUE_URL_META_KEY,
                              STACK_ARGUMENTS_META_KEY, STACK_OPTION_GIVEN_META_KEY, STAGE_META_KEY, aws_error_message,
                              check_local_endpoint, check_url, format_stack_arguments, options_given,
                              require_job, s3_client, stack_option_given, stack_options, state_store,
                              with_stack_options)
from shared.config import Settings, stack_resource_name
from shared.spec import encode_job_message
from shared.state import JOB_STATUSES, TERMINAL_STATUSES, JobRecord, describe_last_error


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
            # Changed in place, so the exception keeps its class and exit code. click's stubs mark it Final.
            error.message = with_stack_options(  # type: ignore[misc]
                error.message, ctx.meta.get(STACK_ARGUMENTS_META_KEY, ""))
            raise
        except Exception as error:
            # Context.meta is shared by the group's context and the command's.
            message = aws_error_message(error, ctx.meta.get(STAGE_META_KEY), ctx.meta.get(QUEUE_URL_META_KEY),
                                        ctx.invoked_subcommand, ctx.meta.get(JOB_ID_META_KEY),
                                        ctx.meta.get(STACK_OPTION_GIVEN_META_KEY, True))
            if message is None:
                raise
            raise click.ClickException(message) from None


@click.group(cls=BatonGroup)
@click.version_option(package_name="baton")
def main() -> None:
    """Baton: data-parallel training on AWS Lambda, chained through SQS and EFS."""


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
    from shared.cli_run import (check_local_data_paths, check_local_job_folder, check_local_settings,
                                delete_local_job, hold_local_dir, run_on_local_stack)

    spec = build_spec(spec_file, overrides)
    check_local_settings()
    check_local_data_paths(spec, local_dir / "efs")
    with hold_local_dir(local_dir, spec_file, bool(overrides)) as lock:
        if fresh:
            delete_local_job(local_dir / "efs", spec["job_id"])
        check_local_job_folder(local_dir / "efs", spec)
        exit_status = run_on_local_stack(spec, local_dir, imports, worker_lanes, timeout_seconds, lock)
    if exit_status != 0:
        sys.exit(exit_status)


@main.command()
@click.argument("spec_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@stack_options
@click.option("--queue-url", default=None, callback=lambda context, parameter, url: check_url(
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
        check_local_endpoint(stage, endpoint_url)
    table_stage: str | None = stage
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
        existing = state_store(stage, endpoint_url, region).get_job(job_id)
    except (BotoCoreError, ClientError) as error:
        click.echo(f"note: could not check whether job id '{job_id}' is taken ({error}); sending anyway", err=True)
        return
    # An item without a fingerprint only records a rejected spec, which a valid one replaces.
    if existing is None or not existing.fingerprint:
        return
    resumable = existing.status in ("PAUSED", "FAILED")
    stack = format_stack_arguments(stage, endpoint_url, region)
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


@main.command("list")
@stack_options
@click.option("--status", "status_filter", default=None, type=click.Choice(JOB_STATUSES, case_sensitive=False),
              help="Show only jobs in this status.")
def list_jobs(stage: str, endpoint_url: str | None, region: str | None, status_filter: str | None) -> None:
    """List the jobs in a stack's state table, oldest first."""
    from datetime import datetime, timezone

    from shared.monitor import format_cost, loss_text

    jobs = state_store(stage, endpoint_url, region).list_jobs()
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
                   f"{'-' if validation_loss is None else loss_text(validation_loss, 4):>9}  "
                   f"{created:%Y-%m-%d %H:%M:%S}")


@main.command()
@click.argument("job_id", callback=check_job_id_argument)
@stack_options
@click.option("--json", "as_json", is_flag=True, help="Print the job item as JSON.")
def status(job_id: str, stage: str, endpoint_url: str | None, region: str | None, as_json: bool) -> None:
    """Show the state of JOB_ID: status, round, latest metrics and estimated cost.

    A regression model's losses are half the mean squared error, in the target's squared units.
    """
    from shared.cli_run import rounds_done_text
    from shared.monitor import bucket_not_allowed_remedy, job_summary, regression_loss_note

    record = require_job(state_store(stage, endpoint_url, region), job_id)
    summary = job_summary(record)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
        return
    click.echo(f"job {job_id}: {record.status}, {rounds_done_text(record)}, {record.n_workers} workers")
    loss_note = regression_loss_note(record)
    stack_arguments = format_stack_arguments(stage, endpoint_url, region)
    for key in STATUS_KEYS:
        if summary.get(key) is not None:
            value = _status_value(key, summary[key], loss_note)
            if key == "error":
                value += bucket_not_allowed_remedy(value, job_id, _is_local_stack(stage, endpoint_url))
            click.echo(f"  {key:<20} {with_stack_options(value, stack_arguments)}")
    # Before the job ends, last_error shows that messages are being retried, and why. A
    # FAILED job's error quotes it where it applies, and --json shows it in every status.
    last_error = summary.get("last_error")
    if isinstance(last_error, dict) and record.status not in TERMINAL_STATUSES:
        click.echo(f"  {'last_error':<20} {_last_error_line(last_error)}")


# The job item's fields that `baton status` prints, in this order.
STATUS_KEYS = ("stop_reason", "error", "epoch", "train_loss", "validation_loss", "validation_accuracy",
               "validation_r2", "cost_usd", "rounds_rerun")


def _status_value(key: str, value: object, loss_note: str) -> str:
    """Return a field of the job item as `baton status` prints it, with large losses in scientific notation."""
    from shared.monitor import format_cost, loss_text

    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    number = float(value)
    if key == "cost_usd":
        return format_cost(number)
    if key == "rounds_rerun":
        return f"{value} (trained again after a resume went back to an earlier round; cost_usd counts both runs)"
    if key == "epoch":
        return f"{number:.3f}"
    if key == "validation_accuracy":
        return f"{number:.5f}"
    if key in ("train_loss", "validation_loss"):
        return loss_text(number, 5) + loss_note
    return loss_text(number, 5)


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
@stack_options
@click.option("--interval", "interval_seconds", type=FiniteFloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between two reads of the table.")
@click.option("--timeout", "timeout_seconds", type=FiniteFloatRange(min=1), default=None,
              help="Stop watching after this many seconds; by default watch until the job ends.")
def watch(job_id: str, stage: str, endpoint_url: str | None, region: str | None, interval_seconds: float,
          timeout_seconds: float | None) -> None:
    """Show a live progress bar of JOB_ID until it succeeds, fails or is cancelled.

    The bar shows the rounds done of the total, epoch, training loss, validation metric,
    seconds per round, time left and the estimated cost so far, with fewer fields on a
    narrow terminal. When stderr is not a terminal, such as with 2>FILE, or reports 0
    columns, watch writes the fields as one line per round instead (COLUMNS=N in the
    environment sets the width). Exits with status 1 unless the job succeeds.
    """
    from shared.monitor import JobNotFoundError, watch_job

    try:
        record = watch_job(state_store(stage, endpoint_url, region), job_id, interval_seconds=interval_seconds,
                           timeout_seconds=timeout_seconds,
                           stack_arguments=format_stack_arguments(stage, endpoint_url, region))
    except (JobNotFoundError, TimeoutError) as error:
        raise click.ClickException(str(error)) from None
    from shared.monitor import bucket_not_allowed_remedy, count_rounds, format_cost

    cost_usd = float(record.attributes.get("cost_usd", 0.0))
    if record.status == "CANCELLED":
        raise click.ClickException(f"job {job_id} was cancelled after {count_rounds(record.round)}")
    if record.status != "SUCCEEDED":
        reason = record.error or "no error recorded"
        raise click.ClickException(f"job {job_id} {record.status}: {reason}"
                                   f"{bucket_not_allowed_remedy(reason, job_id, _is_local_stack(stage, endpoint_url))}")
    click.echo(f"job {job_id} SUCCEEDED after {count_rounds(record.round)} "
               f"(stop reason {record.attributes.get('stop_reason', 'unknown')}, estimated cost "
               f"${format_cost(cost_usd)})")


# The packages that only some commands import, by top-level module: the package to install
# and the extra of pyproject.toml that installs it.
OPTIONAL_PACKAGES = {"sklearn": ("scikit-learn", "export"), "joblib": ("joblib", "export"),
                     "matplotlib": ("matplotlib", "plot")}


def require_optional_packages(command: str, modules: tuple[str, ...]) -> None:
    """Import ``modules``, or raise a one-line error naming the package that ``command`` needs and its extra.

    Called before a command reads anything, so a missing package costs no read or download.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            # The missing module may be another optional one, such as joblib under sklearn.
            missing = (error.name or "").partition(".")[0]
            if missing not in OPTIONAL_PACKAGES:
                raise
            package, extra = OPTIONAL_PACKAGES[missing]
            raise click.ClickException(
                f"baton {command} needs {package}, which is not installed ({error}); install the '{extra}' extra "
                f"with `pip install -e '.[{extra}]'` in the Baton checkout, or run `pip install {package}`") from None


def _reads_efs_alone(efs_root: Path | None) -> TypeGuard[Path]:
    """Return whether a command given ``--efs-root`` and no stack option reads the EFS folder alone."""
    return efs_root is not None and not stack_option_given()


@main.command()
@click.argument("job_id", callback=check_job_id_argument)
@stack_options
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
                result = fetch_job(state_store(stage, endpoint_url, region), job_id, output_dir, efs_root=efs_root,
                                   s3_client=s3_client(endpoint_url, region))
    except (BatonError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    for path in result.written:
        click.echo(str(path))
    for note in result.notes:
        click.echo(with_stack_options(note, format_stack_arguments(stage, endpoint_url, region)), err=True)


@main.command()
@click.argument("job_id", callback=check_job_id_argument)
@stack_options
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
    from shared.monitor import JobNotFoundError, count_rounds, plot_job, read_metrics_files

    require_optional_packages("plot", ("matplotlib",))
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
        title = f"{job_id} ({count_rounds(len(rounds))})"
    else:
        state = state_store(stage, endpoint_url, region)
        record = require_job(state, job_id)
        rounds = state.list_round_metrics(job_id)
        title = f"{job_id} ({record.status}, {count_rounds(len(rounds))})"
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
@stack_options
@click.option("--local-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_LOCAL_DIR,
              show_default=True, help="Folder of a local run; the job is read from its efs/ folder.")
@click.option("--efs-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="EFS root to read instead of LOCAL_DIR/efs, for example a copy of the deployed file system.")
@click.option("--output", type=click.Path(dir_okay=False), required=True,
              help="File to write the fitted scikit-learn estimator to, with joblib; it must end in .joblib, "
                   ".pkl or .pickle.")
def export_command(job_id: str, stage: str, endpoint_url: str | None, region: str | None, local_dir: Path,
                   efs_root: Path | None, output: str) -> None:
    """Save the final model of JOB_ID as a fitted scikit-learn estimator, and print the file's path.

    Load it with joblib.load(OUTPUT); it predicts from raw features as Baton does.
    Without --stage, --endpoint-url and --region, the job is read from its files in an
    EFS folder alone (LOCAL_DIR/efs or --efs-root), so export works after `baton run` has
    ended. With any of them, the model is downloaded from the stack's models bucket
    (params.modelsBucket in serverless.yml), where the job's item points.
    """
    from shared.errors import BatonError

    require_optional_packages("export", ("sklearn", "joblib"))
    from shared.export import export_estimator

    output_file = checked_output_path(output, Path(output), "model.joblib")
    # The extension guards files of other kinds, such as a plot, from being overwritten by mistake.
    if output_file.suffix.lower() not in EXPORT_SUFFIXES:
        raise click.ClickException(f"--output {output_file}: baton export writes a joblib file; give the file a "
                                   f"{', '.join(EXPORT_SUFFIXES[:-1])} or {EXPORT_SUFFIXES[-1]} extension. Nothing "
                                   "was written")
    from_stack = stack_option_given()
    if from_stack and (efs_root is not None or options_given("local_dir")):
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
    # The path alone on stdout, as fetch and plot print what they wrote; what it contains goes to stderr.
    click.echo(str(path))
    click.echo(f"note: {path} contains a fitted {_describe_estimator(estimator)}; load it with joblib.load", err=True)


def _describe_estimator(estimator) -> str:
    """Return an estimator's class name, with its steps' class names for a scikit-learn Pipeline."""
    steps = getattr(estimator, "steps", None)
    if not steps:
        return type(estimator).__name__
    return f"{type(estimator).__name__}({', '.join(type(step).__name__ for _, step in steps)})"


def _export_from_stack(job_id: str, stage: str, endpoint_url: str | None, region: str | None, output_file: Path):
    """Download the job's model from its stack's models bucket into a temporary folder and export it."""
    import tempfile

    from shared.export import export_estimator
    from shared.monitor import ModelNotInBucketError, bucket_copy_errors, download_finished_model

    state = state_store(stage, endpoint_url, region)
    with tempfile.TemporaryDirectory(prefix="baton-export-") as temporary:
        efs_root = Path(temporary)
        try:
            uri = download_finished_model(state, s3_client(endpoint_url, region), job_id, efs_root)
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

    state = state_store(stage, endpoint_url, region)
    settings = Settings.for_stage(stage)
    return state, QueueClient(aws_client("sqs", endpoint_url=endpoint_url, region=region), settings)


def _run_control(action: Callable[[], JobRecord]) -> None:
    from shared.cli_run import rounds_done_text
    from shared.control import JobControlError

    try:
        record = action()
    except JobControlError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"job {record.job_id} is now {record.status}, {rounds_done_text(record)}")


@main.command()
@click.argument("job_id", callback=check_job_id_argument)
@stack_options
def pause(job_id: str, stage: str, endpoint_url: str | None, region: str | None) -> None:
    """Pause the RUNNING job JOB_ID; `baton resume` continues it from its current round."""
    from shared.control import pause_job

    state, _ = _control_clients(stage, endpoint_url, region)
    _run_control(lambda: pause_job(state, job_id))


@main.command()
@click.argument("job_id", callback=check_job_id_argument)
@stack_options
def resume(job_id: str, stage: str, endpoint_url: str | None, region: str | None) -> None:
    """Resume the PAUSED or FAILED job JOB_ID from its current round.

    Fix the cause of a failure first. A job that failed before its first round is
    prepared again from its stored spec. A job that failed on a deleted, damaged or
    replaced shard file has its shards prepared again from its unchanged data source. One
    that failed on a damaged round state goes back to the latest intact one. The job is
    PREPARING until the starter has made that repair.
    """
    from shared.control import resume_job

    state, queues = _control_clients(stage, endpoint_url, region)
    _run_control(lambda: resume_job(state, queues, job_id))


@main.command()
@click.argument("job_id", callback=check_job_id_argument)
@stack_options
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
        job_plan: planner.JobPlan | None
        if workers is not None:
            job_plan = planner.plan_job(workload, deployment)
        else:
            assert recommendation is not None  # without --workers, --deadline is required above
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
