"""Follow, fetch and plot jobs from outside the stack, for the ``baton`` command line.

Most of it reads the job and round items in DynamoDB, which a laptop can reach both for
a deployed stack (the standard credential chain) and for the local stack (its moto
endpoint, while ``baton run`` runs). The aggregator stores every round's metrics and cost
estimate on the round item, so progress, curves and metrics need no access to EFS.

The aggregator also writes each round's metrics to ``jobs/<job_id>/metrics/<round>.json``
on EFS, and the final model to ``jobs/<job_id>/model/``. :func:`fetch_local_job` and
:func:`read_metrics_files` read a job from a local EFS folder alone, which still works
after ``baton run`` has stopped its moto server and the table with it.

Limitations
-----------
The final model is only on EFS. A deployed stack's file system is reachable only from its
VPC, so :func:`fetch_job` copies the model only when given a local EFS folder (the local
stack's, or a copy made with DataSync as docs/deployment.md describes). The job's status
and error are only in the table, so a fetch from the EFS folder alone does not save them.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO
from urllib.parse import urlsplit

from tqdm import tqdm

from shared.config import stack_resource_name
from shared.efs import EfsStore, json_preview
from shared.errors import DIVERGED_WORDS, BatonError, DamagedFileError
from shared.model_bucket import ModelBucketError, download_model
from shared.state import (CANCELLED, FAILED, ITEM_TYPE, PAUSED, RUNNING, SUCCEEDED, TERMINAL_STATUSES, JobRecord,
                          StateStore)

# Hosts of an endpoint on this machine, such as the local stack's moto server.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# Round-item keys shown as "the" validation metric, first match wins. A kmeans job has the
# inertia, while its loss is that inertia divided by the rows.
VALIDATION_METRICS = ("validation_accuracy", "validation_r2", "validation_inertia", "validation_loss")
# Job-item keys that describe the job itself; everything else is a progress field.
HIDDEN_JOB_KEYS = ("pk", "sk", ITEM_TYPE, "spec")


class JobNotFoundError(BatonError):
    """No job item with the requested id exists in the table."""


class ModelNotInBucketError(BatonError):
    """A job SUCCEEDED, but its stack copied its model to no models bucket, so the model is on EFS alone."""


def make_state_store(stage: str, endpoint_url: str | None = None, region: str | None = None) -> StateStore:
    """Return a state store for ``stage``, through the standard AWS credential chain.

    ``endpoint_url`` aims the client at another endpoint, such as the local stack's moto
    server; when None, boto3 also honours ``AWS_ENDPOINT_URL``.
    """
    client = aws_client("dynamodb", endpoint_url=endpoint_url, region=region)
    return StateStore(client, stack_resource_name(stage, "state"))


def aws_client(service: str, endpoint_url: str | None = None, region: str | None = None):
    """Return a boto3 client; for an endpoint on this machine, with the local stack's settings.

    The local stack's moto server accepts any credentials in its fixed region, so a
    command aimed at it with ``--endpoint-url`` needs no AWS configuration. Region and
    credentials set in the environment still win.
    """
    import boto3

    options: dict[str, Any] = {"endpoint_url": endpoint_url, "region_name": region}
    if endpoint_url and urlsplit(endpoint_url).hostname in LOOPBACK_HOSTS:
        from shared.local.session import DUMMY_AWS_ENVIRONMENT

        if not (region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
            options["region_name"] = DUMMY_AWS_ENVIRONMENT["AWS_DEFAULT_REGION"]
        if not os.environ.get("AWS_ACCESS_KEY_ID"):
            options["aws_access_key_id"] = DUMMY_AWS_ENVIRONMENT["AWS_ACCESS_KEY_ID"]
            options["aws_secret_access_key"] = DUMMY_AWS_ENVIRONMENT["AWS_SECRET_ACCESS_KEY"]
    return boto3.client(service, **options)


def require_job(store: StateStore, job_id: str) -> JobRecord:
    """Return the job's record, or raise :class:`JobNotFoundError` naming the table."""
    record = store.get_job(job_id)
    if record is None:
        raise JobNotFoundError(f"no job '{job_id}' in table {store.table_name}; check the job id, --stage and "
                               "--endpoint-url, or for a job sent moments ago wait a few seconds, until the starter "
                               "has recorded it")
    return record


def validation_metric(entry: dict[str, Any]) -> tuple[str, float] | None:
    """Return the name and value of the round's headline validation metric, if any."""
    for name in VALIDATION_METRICS:
        if isinstance(entry.get(name), (int, float)):
            return name, float(entry[name])
    return None


def bucket_not_allowed_remedy(error: str, job_id: str, local_stack: bool) -> str:
    """Return how to allow the S3 bucket of a job whose preparation rejected it, as a sentence to append to its error.

    The handlers' message names ``BATON_ALLOWED_S3_BUCKETS``, the functions' variable.
    Only here is it known where the job ran: a deployed stack sets the variable from its
    ``dataBucket`` stage parameter, which also grants the starter ``s3:GetObject`` on the
    bucket, and the local stack's S3 is an empty moto server. Returns an empty text for
    another error.
    """
    # Imported here: the preparation imports numpy and the data formats, which most commands do not need.
    from shared.preparation import ALLOWED_S3_BUCKETS_VARIABLE

    if f"which is not allowed; add it to {ALLOWED_S3_BUCKETS_VARIABLE}" not in error:
        return ""
    if local_stack:
        return (". The local stack of baton run allows no bucket, and its S3 is an empty moto server, so a local "
                "job reads its data from the EFS folder: `baton run SPEC --import FILE:datasets/NAME --data "
                "datasets/NAME` copies the file FILE there")
    return (f". On a deployed stack, {ALLOWED_S3_BUCKETS_VARIABLE} is the dataBucket stage parameter, which also "
            "lets the starter read the bucket: deploy again with --param \"dataBucket=<bucket>\" (or set "
            f"params.dataBucket in serverless.yml), then `baton resume {job_id}` prepares the job again")


def job_summary(record: JobRecord) -> dict[str, Any]:
    """Return the job item without its key and spec, for display."""
    return {key: value for key, value in record.attributes.items() if key not in HIDDEN_JOB_KEYS}


# Watch -------------------------------------------------------------------------------------


@dataclass
class RoundFollower:
    """Reads the rounds of one job that are new since the previous poll.

    Attributes
    ----------
    rounds : list of dict
        Every round read so far, in round order.
    """

    store: StateStore
    job_id: str
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def poll(self) -> tuple[JobRecord | None, list[dict[str, Any]]]:
        """Return the job's record and the rounds aggregated since the last poll."""
        record = self.store.get_job(self.job_id)
        # Round number n (from 1) is stored under index n - 1, so the next index is n.
        first_round = self.rounds[-1]["round"] if self.rounds else 0
        new_rounds = self.store.list_round_metrics(self.job_id, first_round=first_round)
        self.rounds.extend(new_rounds)
        return record, new_rounds


def progress_postfix(record: JobRecord, rounds: list[dict[str, Any]], recent: int = 10) -> dict[str, str]:
    """Return the fields a progress bar shows after the bar, from the job and its rounds.

    ``s/round`` is the mean ``round_seconds`` of the last ``recent`` rounds, and ``eta``
    that mean times the rounds left, for a RUNNING job only. A round's time starts when the
    job last moved on, resume included, so a pause does not stretch the estimate. ``cost``
    is the total through the last of ``rounds``, so a line for an earlier round shows
    that round's total.
    """
    postfix: dict[str, str] = {"status": record.status}
    if rounds:
        last = rounds[-1]
        postfix["round"] = str(last["round"])
        postfix["epoch"] = f"{last.get('epoch', 0.0):.2f}"
        # Not "loss", which in the metrics files is the validation loss when there is one.
        postfix["train_loss"] = f"{last.get('train_loss', float('nan')):.4g}"
        metric = validation_metric(last)
        if metric is not None:
            postfix[metric[0].removeprefix("validation_")] = f"{metric[1]:.4g}"
        durations = [entry["round_seconds"] for entry in rounds[-recent:] if "round_seconds" in entry]
        if durations:
            postfix["s/round"] = f"{sum(durations) / len(durations):.2f}"
    if record.total_rounds:
        left = max(0, record.total_rounds - len(rounds))
        postfix["left"] = str(left)
        if "s/round" in postfix and record.status == RUNNING:
            postfix["eta"] = format_duration(float(postfix["s/round"]) * left)
    cost_usd = rounds[-1]["total_cost_usd"] if rounds and "total_cost_usd" in rounds[-1] else \
        record.attributes.get("cost_usd", 0.0)
    postfix["cost"] = f"${format_cost(float(cost_usd))}"
    return postfix


def count_rounds(count: int) -> str:
    """Return a number of rounds for a line of output: "1 round" or "12 rounds"."""
    return f"{count} round" if count == 1 else f"{count} rounds"


def format_cost(usd: float) -> str:
    """Return a cost in US dollars with six decimals, as ``baton list``, ``status`` and ``watch`` show it.

    Six decimals show the cost of a short job, which can be a few millionths of a dollar.
    """
    return f"{usd:.6f}"


def format_duration(seconds: float) -> str:
    """Return ``seconds`` as H:MM:SS, or M:SS under an hour."""
    minutes, second = divmod(int(round(seconds)), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours}:{minute:02d}:{second:02d}" if hours else f"{minute}:{second:02d}"


def loss_text(value: float, decimals: int) -> str:
    """Return a loss with ``decimals`` decimals, or in scientific notation once it is too large to read so."""
    # Compared after rounding, so that 999999.99996 does not print as a seven-digit number.
    return f"{value:.{decimals}f}" if abs(round(value, decimals)) < 1e6 else f"{value:.{decimals - 1}e}"


def regression_loss_note(record: JobRecord) -> str:
    """Return what a regression job's losses are, to print after them, or an empty text for other models."""
    from shared.models import get_model_class

    try:
        task = get_model_class(json.loads(record.spec_json)["model"]["name"]).task
    except (ValueError, KeyError, TypeError):
        return ""
    return " (half the mean squared error)" if task == "regression" else ""


def format_round(metrics: dict) -> str:
    """Return one round's metrics item as the line that ``baton run`` prints for it."""
    parts = [f"round {metrics['round']:>5}", f"epoch {metrics['epoch']:7.3f}",
             f"train loss {loss_text(metrics['train_loss'], 5)}"]
    if "validation_loss" in metrics:
        parts.append(f"val loss {loss_text(metrics['validation_loss'], 5)}")
    if "validation_accuracy" in metrics:
        parts.append(f"val acc {metrics['validation_accuracy']:.4f}")
    if "validation_r2" in metrics:
        # A diverging regression reaches r2 values far below zero.
        parts.append(f"val r2 {loss_text(metrics['validation_r2'], 4)}")
    if "validation_inertia" in metrics:
        # A kmeans job's metric: the sum of squared distances, which grows with the rows.
        parts.append(f"val inertia {loss_text(metrics['validation_inertia'], 5)}")
    return "  ".join(parts)


def watch_job(store: StateStore, job_id: str, interval_seconds: float = 2.0, timeout_seconds: float | None = None,
              stream: TextIO | None = None, wait_for_job_seconds: float = 60.0,
              sleep: Callable[[float], None] = time.sleep, stack_arguments: str = "") -> JobRecord:
    """Show the progress of a job until it reaches a terminal status.

    Polls the job item and the new round items every ``interval_seconds``. On a terminal
    of known width the progress is a live tqdm bar (:func:`progress_bar_line`). On another
    stream, such as a file or a pipe, or a terminal that reports 0 columns, it is one line
    per round, the fields as ``name=value``, so that a log stays readable.
    ``stack_arguments`` are the options that aim a baton command at the job's stack,
    each after a space, for the command that the note on a paused job names. Returns the
    final record.

    Raises
    ------
    JobNotFoundError
        If the job item does not appear within ``wait_for_job_seconds``.
    TimeoutError
        If the job is still running after ``timeout_seconds``.
    """
    output = stream or sys.stderr
    follower = RoundFollower(store, job_id)
    started = time.monotonic()
    if timeout_seconds is not None:
        # --timeout bounds the whole watch, the wait for the job to appear included.
        wait_for_job_seconds = min(wait_for_job_seconds, timeout_seconds)
    record, _ = follower.poll()
    if record is None:
        # A job just sent has no item until the starter runs, so watch waits for it.
        print(f"waiting up to {wait_for_job_seconds:.0f} s for job '{job_id}' to appear in table {store.table_name}",
              file=output, flush=True)
    while record is None:
        if time.monotonic() - started > wait_for_job_seconds:
            raise JobNotFoundError(f"no job '{job_id}' in table {store.table_name} after {wait_for_job_seconds:.0f} s; "
                                   "check the job id, --stage and --endpoint-url")
        sleep(interval_seconds)
        record, _ = follower.poll()

    # A terminal of unknown width, such as a pseudo-terminal that reports 0 columns, gets the lines.
    columns = terminal_columns(output) if _is_terminal(output) else 0
    progress = _ProgressBar(job_id, output, columns) if columns > 0 else _ProgressLines(job_id, output)
    paused_noted = False
    try:
        while True:
            if record.status == PAUSED and not paused_noted:
                progress.note(f"job '{job_id}' is PAUSED: watch goes on until it ends; `baton resume "
                              f"{job_id}{stack_arguments}` continues it, Ctrl-C stops watching")
            paused_noted = record.status == PAUSED
            progress.show(record, follower.rounds)
            if record.status in TERMINAL_STATUSES:
                return record
            if timeout_seconds is not None and time.monotonic() - started > timeout_seconds:
                raise TimeoutError(f"job '{job_id}' is still {record.status} after {timeout_seconds:.0f} s")
            sleep(interval_seconds)
            polled, _ = follower.poll()
            record = polled or record
    finally:
        progress.close()


def _is_terminal(stream: TextIO) -> bool:
    """Return whether ``stream`` is a terminal, which a live bar can redraw in place."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        # A stream without isatty, or a closed one.
        return False


# The live bar of `baton watch` ---------------------------------------------------------------

# Labels of the headline validation metrics in the live bar, as `baton run`'s round lines write them.
BAR_METRIC_LABELS = {"validation_accuracy": "val acc", "validation_r2": "val r2",
                     "validation_inertia": "val inertia", "validation_loss": "val loss"}
# Parts of the live bar, in the order they are left out when the terminal is too narrow for
# all of them. The rounds done, and a status other than RUNNING, always stay.
BAR_DROP_ORDER = ("job_id", "bar", "s/round", "epoch", "cost", "eta", "metric", "train_loss")
# Minimum cells of the bar itself. A narrower terminal gets the fields without a bar.
MIN_BAR_CELLS = 8
# The start of tqdm's bar_format, with the job id as tqdm's description and then the bar,
# whose cells tqdm fits to the rest of the line. tqdm leaves out "{desc}: " when the
# description is empty. The format has no {elapsed}, {rate} or {remaining}, because tqdm
# counts them from the start of watch, so a pause would stretch its estimate. The eta field
# after the bar comes from the rounds' own times (progress_postfix).
BAR_PREFIX_FORMAT = "{desc}: |{bar}| "


def progress_bar_fields(record: JobRecord, rounds: list[dict[str, Any]], recent: int = 10) -> dict[str, str]:
    """Return the texts of the live bar's fields, by field name, in the order the bar shows them.

    The values are those of :func:`progress_postfix`, each with a short label: "train" for
    the training loss, and the validation metric's label of ``baton run``'s round lines.
    ``status`` is there only while the job is not RUNNING, and the rounds left are in
    ``rounds`` ("197/320") and ``eta``.
    """
    postfix = progress_postfix(record, rounds, recent)
    fields = {"rounds": f"{len(rounds)}/{record.total_rounds or '?'}"}
    if record.status != RUNNING:
        fields["status"] = record.status
    if rounds:
        fields["epoch"] = f"epoch {postfix['epoch']}"
        # "train", not "train loss", leaves room for every field at 80 columns.
        fields["train_loss"] = f"train {postfix['train_loss']}"
        metric = validation_metric(rounds[-1])
        if metric is not None:
            fields["metric"] = f"{BAR_METRIC_LABELS[metric[0]]} {metric[1]:.4g}"
    if "s/round" in postfix:
        fields["s/round"] = f"{postfix['s/round']} s/round"
    if "eta" in postfix:
        fields["eta"] = f"eta {postfix['eta']}"
    fields["cost"] = postfix["cost"]
    return fields


def progress_bar_format(job_id: str, record: JobRecord, rounds: list[dict[str, Any]], columns: int) -> tuple[str, str]:
    """Return tqdm's description and ``bar_format`` for the live bar on a terminal ``columns`` wide.

    The line is at most ``columns - 1`` characters, because a terminal may wrap a line
    that fills its last column. When not everything fits, the parts of
    :data:`BAR_DROP_ORDER` are left out in that order. The bar stays while it gets at least
    :data:`MIN_BAR_CELLS` cells, and tqdm fills the room that the fields leave with cells.
    A terminal too narrow even for the rounds done gets a format that tqdm cuts at the width.
    """
    width = _line_width(columns)
    fields = progress_bar_fields(record, rounds)
    shown_parts = {"job_id", "bar", *fields}
    for dropped in (None, *BAR_DROP_ORDER):
        shown_parts.discard(dropped)
        text = _fields_template(fields, shown_parts)
        if "bar" not in shown_parts:
            if len(text) <= width:
                break
            continue
        description = job_id if "job_id" in shown_parts else ""
        # The bar's two ends and the space after it, and ": " after a description.
        cells = width - len(text) - len("|| ") - (len(description) + 2 if description else 0)
        if cells >= MIN_BAR_CELLS:
            return description, BAR_PREFIX_FORMAT + text
    # Only the fields that always stay are left, which tqdm cuts at the width if need be.
    return "", _fields_template(fields, shown_parts)


def _fields_template(fields: dict[str, str], shown_parts: set[str]) -> str:
    """Return the ``shown_parts`` fields as a str.format template of the live bar, one space between each."""
    text = " ".join(text for name, text in fields.items() if name in shown_parts)
    return text.replace("{", "{{").replace("}", "}}")


def progress_bar_line(job_id: str, record: JobRecord, rounds: list[dict[str, Any]], columns: int,
                      ascii_cells: bool = False) -> str:
    """Return the line that the live bar draws on a terminal ``columns`` wide.

    tqdm formats it from :func:`progress_bar_format`, as the live bar's tqdm instance does.
    ``ascii_cells`` selects tqdm's ASCII bar cells, which the live bar uses on a stream whose
    encoding has no unicode block characters.
    """
    description, bar_format = progress_bar_format(job_id, record, rounds, columns)
    return tqdm.format_meter(len(rounds), record.total_rounds, 0.0, ncols=_line_width(columns),
                             prefix=description, bar_format=bar_format, ascii=ascii_cells)


def _line_width(columns: int) -> int:
    """Return the maximum length of a line of the live bar on a terminal ``columns`` wide."""
    return max(columns - 1, 1)


def terminal_columns(stream: TextIO) -> int:
    """Return the width of the terminal behind ``stream`` in columns, or 0 when it is not known.

    A positive ``COLUMNS`` in the environment wins, as in :func:`shutil.get_terminal_size`,
    so a terminal that reports 0 columns, such as a pseudo-terminal whose size was never
    set, can still get a bar.
    """
    with contextlib.suppress(ValueError):
        columns = int(os.environ.get("COLUMNS", ""))
        if columns > 0:
            return columns
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        # A stream without a file descriptor, a closed one, or one that is no terminal.
        return 0


class _ProgressBar:
    """The live bar of ``baton watch`` on a terminal: a tqdm bar, drawn again in place after each poll.

    Each poll reads the terminal's width again, chooses the fields that fit it
    (:func:`progress_bar_format`) and hands tqdm the width, so a resized terminal gets a
    line of its new width. tqdm draws the bar cells, redraws the line over the previous
    one, and picks unicode or ASCII cells from the stream's encoding. Its own
    ``dynamic_ncols`` is not used, because it reads the terminal alone and ignores ``COLUMNS``.
    """

    def __init__(self, job_id: str, stream: TextIO, columns: int):
        self.job_id = job_id
        self.stream = stream
        self.columns = columns
        # Made on the first poll, which gives the total rounds and the first format.
        self.bar: tqdm | None = None

    def note(self, text: str) -> None:
        # tqdm clears the bar's line, writes the note there, and draws the bar again below it.
        tqdm.write(text, file=self.stream)

    def show(self, record: JobRecord, rounds: list[dict[str, Any]]) -> None:
        # A terminal that reports 0 columns after a resize keeps the width it had.
        self.columns = terminal_columns(self.stream) or self.columns
        description, bar_format = progress_bar_format(self.job_id, record, rounds, self.columns)
        if self.bar is None:
            # Drawn at once, as a tqdm bar is when it is made.
            self.bar = tqdm(total=record.total_rounds, initial=len(rounds), desc=description, bar_format=bar_format,
                            ncols=_line_width(self.columns), file=self.stream, leave=True)
            return
        # The starter sets total_rounds when the job leaves PREPARING. tqdm draws no
        # filled cells while the total is 0.
        self.bar.total = record.total_rounds
        self.bar.n = len(rounds)
        self.bar.set_description_str(description, refresh=False)
        self.bar.bar_format = bar_format
        self.bar.ncols = _line_width(self.columns)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            # Draws the last line once more and ends it with a newline.
            self.bar.close()


class _ProgressLines:
    """The progress of ``baton watch`` on a stream that is not a terminal: one line per round.

    The first line shows the last round done when watch started. A line without a new
    round is written only when the job's status changes.
    """

    def __init__(self, job_id: str, stream: TextIO):
        self.job_id = job_id
        self.stream = stream
        self.rounds_shown: int | None = None
        self.status_shown: str | None = None

    def note(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def show(self, record: JobRecord, rounds: list[dict[str, Any]]) -> None:
        if self.rounds_shown is None:
            self._write(record, rounds)
            return
        # Each round that ended since the last poll gets a line with its own fields and cost.
        # The status is the job's latest, so only the line of the latest round shows it.
        for count in range(self.rounds_shown + 1, len(rounds)):
            self._write(record, rounds[:count], with_status=False)
        if len(rounds) > self.rounds_shown or record.status != self.status_shown:
            self._write(record, rounds)

    def _write(self, record: JobRecord, rounds: list[dict[str, Any]], with_status: bool = True) -> None:
        total = record.total_rounds or "?"
        postfix = progress_postfix(record, rounds)
        if not with_status:
            del postfix["status"]
        fields = ", ".join(f"{name}={value}" for name, value in postfix.items())
        print(f"{self.job_id}: {len(rounds)}/{total} rounds, {fields}", file=self.stream, flush=True)
        self.rounds_shown = len(rounds)
        if with_status:
            self.status_shown = record.status

    def close(self) -> None:
        pass


# Fetch -------------------------------------------------------------------------------------


def write_metrics_csv(rounds: list[dict[str, Any]], path: Path) -> None:
    """Write one row per round, with the union of the rounds' keys as columns."""
    columns = ["round"] + sorted({key for entry in rounds for key in entry} - {"round"})
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for entry in rounds:
            writer.writerow(entry)


@dataclass
class FetchResult:
    """The files a fetch wrote, and one line for each thing it could not save, with the reason."""

    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def fetch_job(store: StateStore, job_id: str, output_dir: Path, efs_root: Path | None = None,
              s3_client=None) -> FetchResult:
    """Save a job's summary, spec and per-round metrics from DynamoDB, and its model when reachable.

    Writes ``job.json``, ``spec.json``, ``metrics.csv`` and ``metrics.jsonl``. With
    ``efs_root`` (a local EFS folder), also copies ``jobs/<job_id>/model/`` to ``model/``
    once the job has written it. Without it, a SUCCEEDED job whose item has a
    ``model_uri`` has its model downloaded from the stack's models bucket with
    ``s3_client``. A job that has not succeeded has no model yet, which is a note in the
    result and not an error.

    Raises
    ------
    JobNotFoundError
        If the job does not exist.
    FileNotFoundError
        If the job SUCCEEDED but ``efs_root`` contains no model for it, so ``efs_root``
        is not the job's EFS folder.
    ModelBucketError
        If the model cannot be downloaded from the models bucket. The summary, spec and
        metrics are written first.
    """
    record = require_job(store, job_id)
    uri = record.attributes.get("model_uri")
    if efs_root is not None or s3_client is None or record.status != SUCCEEDED or not uri:
        return _fetch_job(store, record, output_dir, efs_root)
    with tempfile.TemporaryDirectory(prefix="baton-model-") as temporary:
        try:
            download_model(s3_client, uri, job_id, Path(temporary))
        except ModelBucketError as error:
            _fetch_job(store, record, output_dir, None, missing_model_note="")
            raise ModelBucketError(f"{error}. The summary, spec and metrics were saved in {output_dir}") from None
        with bucket_copy_errors(Path(temporary), uri, job_id):
            return _fetch_job(store, record, output_dir, Path(temporary))


@contextlib.contextmanager
def bucket_copy_errors(efs_root: Path, uri: str, job_id: str) -> Iterator[None]:
    """Name the models bucket, not the temporary folder ``efs_root``, in a damaged-file error.

    The files were downloaded from ``uri`` into ``efs_root``, which is deleted once the
    command ends. A file that fails a check was changed in the bucket after the job wrote
    it, while the job's EFS folder still has the original.
    """
    try:
        yield
    except DamagedFileError as error:
        message = str(error).replace(f" in the EFS folder {efs_root}", f" of the copy in {uri}")
        problem = message.split("; ", 1)[0]
        raise ModelBucketError(f"{problem}; it was changed in the bucket after the job wrote it. The model is still "
                               f"on EFS under jobs/{job_id}/model/, and a finish of the job copies it again") from None


def _fetch_job(store: StateStore, record: JobRecord, output_dir: Path, efs_root: Path | None,
               missing_model_note: str | None = None) -> FetchResult:
    """Write a job's files into ``output_dir``, with its model from ``efs_root`` when it has one.

    ``missing_model_note`` replaces the note on a SUCCEEDED job's model that ``efs_root``
    None leaves out; an empty text adds none.
    """
    job_id = record.job_id
    rounds = store.list_round_metrics(job_id)
    cancelled_with_model = record.status == CANCELLED and efs_root is not None and _model_of_last_round(
        EfsStore(efs_root), record)
    # The EFS folder the model is copied from, or None when no model is copied.
    model_root = efs_root if record.status == SUCCEEDED or cancelled_with_model else None
    if model_root is not None:
        model_dir = EfsStore(model_root).model_dir(job_id)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"job '{job_id}' SUCCEEDED but {model_dir} does not exist; check --efs-root, "
                                    "which is <local-dir>/efs (.baton/efs by default) for `baton run`")
        # Checked before anything is written, so a damaged model leaves no partial output.
        check_model_files(model_root, job_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = FetchResult()

    job_path = output_dir / "job.json"
    job_path.write_text(json.dumps(job_summary(record), indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    result.written.append(job_path)
    result.written += _write_spec_and_metrics(json.loads(record.spec_json), rounds, output_dir)

    if model_root is not None:
        result.written += _copy_model(model_root, job_id, output_dir)
        if cancelled_with_model:
            result.notes.append(f"job '{job_id}' was CANCELLED while its last round was aggregated, after it wrote "
                                "its model; that model, trained for every round, is copied")
    elif record.status != SUCCEEDED:
        result.notes.append(_no_model_note(job_id, record.status, record.error))
    elif missing_model_note is None:
        result.notes.append(f"model not copied: it is on EFS under jobs/{job_id}/model/, and the job's stack copies "
                            "no models to S3 (params.modelsBucket in serverless.yml is empty, or was when the job "
                            "finished); pass --efs-root for a local stack, or copy it out of AWS with DataSync "
                            "(docs/deployment.md)")
    elif missing_model_note:
        result.notes.append(missing_model_note)
    return result


def _model_of_last_round(store: EfsStore, record) -> bool:
    """Return whether a cancelled job's model folder contains the model its last aggregation wrote.

    A cancel that comes while the job's last round is aggregated can find the model
    written. A model of an earlier run of the job id, set aside only once the new run
    starts round 0, ends after another round or is older than the job's spec file.
    """
    path = store.model_dir(record.job_id) / "model.json"
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(description, dict) and description.get("rounds") == record.round + 1
            and not model_predates_spec(store, record.job_id))


def model_predates_spec(store: EfsStore, job_id: str) -> bool:
    """Return whether the job's model folder is older than its spec file, so it belongs to an earlier run.

    The starter writes ``spec.json`` whenever it starts the job, and a run writes its model
    at its end. Both times come from the file system's clock, so they compare even when
    the machines' clocks differ.
    """
    try:
        return (store.model_dir(job_id) / "model.json").stat().st_mtime < store.spec_path(job_id).stat().st_mtime
    except OSError:
        return False


def _no_model_note(job_id: str, status: str, error: str | None = None) -> str:
    """Return why a job of ``status`` other than SUCCEEDED has no model to copy, and what would give it one."""
    if status == FAILED and error is not None and DIVERGED_WORDS in error:
        return (f"no model: job '{job_id}' FAILED because training diverged, and a resume would take the same steps "
                "again; send the spec again under a new job id with the change its error suggests (`baton status "
                f"{job_id}`)")
    if status == FAILED:
        return (f"no model: job '{job_id}' FAILED, and a job writes its model only when it succeeds; fix the cause "
                f"in its error (`baton status {job_id}`), run `baton resume {job_id}`, and fetch again once it succeeds")
    if status == CANCELLED:
        return f"no model: job '{job_id}' was CANCELLED, and a job writes its model only when it succeeds"
    return f"model not copied yet: job '{job_id}' is {status}, and it writes its model when it succeeds; fetch again then"


def read_metrics_files(efs_root: Path, job_id: str) -> list[dict[str, Any]]:
    """Return the metrics of every aggregated round of ``job_id`` from its files in a local EFS folder.

    Raises
    ------
    JobNotFoundError
        If the folder contains no spec for the job.
    DamagedFileError
        If a metrics file is not a JSON object of numbers with the round's number and
        training loss.
    """
    store = EfsStore(efs_root)
    spec_path = store.spec_path(job_id)
    if spec_path.exists() and not spec_path.is_file():
        raise store.damaged_file_error(spec_path, "is not a file", damaged_spec_remedy(job_id))
    if not spec_path.is_file():
        raise JobNotFoundError(f"no job '{job_id}' in {efs_root}: {store.spec_path(job_id)} does not exist; check "
                               "the job id and --efs-root, which is <local-dir>/efs (.baton/efs by default) for "
                               "`baton run`")
    metrics_dir = store.job_dir(job_id) / "metrics"
    paths = [path for path in metrics_dir.glob("*.json") if path.stem.isdigit()] if metrics_dir.is_dir() else []
    rounds = []
    for path in sorted(paths, key=lambda path: int(path.stem)):
        remedy = (f"move it out of {metrics_dir.relative_to(efs_root)} to leave round {path.stem} out, then run "
                  "the command again")
        entry = store.read_json_object(path, remedy)
        problem = metrics_entry_problem(entry, int(path.stem))
        if problem is not None:
            raise store.damaged_file_error(path, problem, remedy)
        rounds.append(entry)
    return rounds


def _is_number(value: Any) -> bool:
    # Python's json module reads NaN and infinities, but the aggregator never writes them:
    # a job whose loss or validation metric is not finite stops as diverged instead.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metrics_entry_problem(entry: dict[str, Any], round_number: int) -> str | None:
    """Return what is wrong with the metrics file of round ``round_number``, or None.

    The returned text follows the file's name in a message. The aggregator writes only
    numbers, among them the round's number and training loss, which fetch and plot need.
    """
    if not isinstance(entry.get("round"), int) or isinstance(entry["round"], bool):
        return 'has no integer "round" field'
    if entry["round"] != round_number:
        return (f'contains "round": {entry["round"]}, but the metrics file of round {round_number} must contain '
                f'"round": {round_number}')
    if "train_loss" not in entry:
        return 'has no "train_loss" field'
    for name, value in entry.items():
        if not _is_number(value):
            return f'contains "{name}": {json_preview(value)}, which is not a finite number'
    return None


def damaged_spec_remedy(job_id: str) -> str:
    """Return what to do when a job's spec.json on EFS cannot be read."""
    return (f"replace it with the job's spec: while the job's stack runs, `baton fetch {job_id}` with the stack's "
            "--stage (and --endpoint-url for a local stack) saves it from the table, and `baton submit SPEC_FILE "
            "--dry-run` with the options the job was sent with prints it")


def download_finished_model(store: StateStore, s3_client, job_id: str, efs_root: Path) -> str:
    """Download a SUCCEEDED job's model bundle from its stack's models bucket into ``efs_root``.

    ``efs_root`` then reads like the stack's EFS for ``baton export``. Returns the
    bundle's ``s3://`` prefix, the job item's ``model_uri``.

    Raises
    ------
    JobNotFoundError
        If the job does not exist.
    BatonError
        If the job has not succeeded.
    ModelNotInBucketError
        If the job's item records no copy of the model in S3.
    ModelBucketError
        If the download fails.
    """
    record = require_job(store, job_id)
    if record.status != SUCCEEDED:
        raise BatonError(f"job '{job_id}' is {record.status}, and a job has a model to export only once it has "
                         f"SUCCEEDED; `baton status {job_id}` shows where it is")
    uri = record.attributes.get("model_uri")
    if not uri:
        raise ModelNotInBucketError(f"job '{job_id}' SUCCEEDED, but its stack copied its model to no S3 bucket "
                         "(params.modelsBucket in serverless.yml was empty when the job finished). Copy "
                         f"jobs/{job_id}/ out of EFS with DataSync and pass that copy's root as --efs-root "
                         "(docs/deployment.md), or set params.modelsBucket, deploy, and train the job again")
    download_model(s3_client, uri, job_id, efs_root)
    return uri


def fetch_local_job(efs_root: Path, job_id: str, output_dir: Path) -> FetchResult:
    """Save a job's spec, per-round metrics and model from a local EFS folder alone, without the table.

    Writes ``spec.json``, ``metrics.csv`` and ``metrics.jsonl``, and copies the model to
    ``model/`` if the job has written it. ``job.json`` is not written, because the job's
    status and error are stored only in the table.

    Raises
    ------
    JobNotFoundError
        If the folder contains no spec for the job.
    DamagedFileError
        If the spec or a metrics file is not a JSON object.
    """
    rounds = read_metrics_files(efs_root, job_id)
    store = EfsStore(efs_root)
    spec = store.read_json_object(store.spec_path(job_id), damaged_spec_remedy(job_id))
    model_dir = store.model_dir(job_id)
    if model_dir.is_dir():
        check_model_files(efs_root, job_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = FetchResult(written=_write_spec_and_metrics(spec, rounds, output_dir))
    result.notes.append("job.json not written: the job's status is stored only in the stack's table, which this "
                        "fetch did not read; pass --stage and --endpoint-url while the stack runs to save it")

    if model_dir.is_dir() and model_predates_spec(store, job_id):
        result.notes.append(f"model not copied: {model_dir} is older than the job's spec.json, so it and the "
                            f"metrics belong to an earlier run of job id '{job_id}', which the current run moves to "
                            f"jobs/{job_id}/earlier-runs/ when it starts round 0")
    elif model_dir.is_dir():
        result.written += _copy_model(efs_root, job_id, output_dir)
    else:
        result.notes.append(f"model not copied: {model_dir} does not exist, so job '{job_id}' has not succeeded "
                            "(it is still running, or it failed or was cancelled)")
    return result


def _write_spec_and_metrics(spec: dict[str, Any], rounds: list[dict[str, Any]], output_dir: Path) -> list[Path]:
    spec_path = output_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    csv_path = output_dir / "metrics.csv"
    write_metrics_csv(rounds, csv_path)
    jsonl_path = output_dir / "metrics.jsonl"
    jsonl_path.write_text("".join(json.dumps(entry, sort_keys=True) + "\n" for entry in rounds), encoding="utf-8")
    return [spec_path, csv_path, jsonl_path]


def check_model_files(efs_root: Path, job_id: str) -> None:
    """Raise a :class:`BatonError` naming the first damaged file of the job's model or what `baton export` reads."""
    # Imported here: shared.export imports this module.
    from shared.export import check_model_folder

    check_model_folder(efs_root, job_id)


def _copy_model(efs_root: Path, job_id: str, output_dir: Path) -> list[Path]:
    target = output_dir / "model"
    # A model folder left by an earlier fetch into DIR may have files this model lacks.
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    shutil.copytree(EfsStore(efs_root).model_dir(job_id), target, dirs_exist_ok=True)
    return sorted(path for path in target.rglob("*") if path.is_file())


# Plot --------------------------------------------------------------------------------------


# Round-item keys that the lower panels of a plot show, first match wins. The loss panels
# above already show validation_loss, so it is not among them.
PLOTTED_METRICS = ("validation_accuracy", "validation_r2", "validation_inertia")
# Label of the time axis. round_seconds starts when the job item last changed, so the sum
# leaves out the time a job was paused and the time between two runs of it.
TRAINING_TIME_LABEL = "training time (s), pauses left out"


def training_seconds(rounds: list[dict[str, Any]]) -> list[float]:
    """Return the training time at the end of each round: the running sum of ``round_seconds``.

    A round's time starts when the job item last changed, a resume included, so the sum
    leaves out pauses and the time between two runs of the job. It is not wall time.
    """
    elapsed, total = [], 0.0
    for entry in rounds:
        total += float(entry.get("round_seconds", 0.0))
        elapsed.append(total)
    return elapsed


def plot_job(rounds: list[dict[str, Any]], path: Path, title: str, width_inches: float = 12.0,
             height_inches: float = 8.0, dpi: int = 100) -> Path:
    """Draw loss and the validation metric against round and training time into a PNG file.

    The figure is ``width_inches * dpi`` by ``height_inches * dpi`` pixels, in the panels
    that :func:`job_figure` draws.

    Raises
    ------
    ValueError
        If ``rounds`` is empty: there is nothing to plot yet.
    """
    import matplotlib.pyplot as plt

    figure = job_figure(rounds, title, width_inches, height_inches, dpi)
    try:
        # Not bbox_inches="tight", which would change the pixel size.
        figure.savefig(path, format="png", dpi=dpi)
    finally:
        plt.close(figure)
    return path


def job_figure(rounds: list[dict[str, Any]], title: str, width_inches: float = 12.0, height_inches: float = 8.0,
               dpi: int = 100):
    """Return a matplotlib figure of four panels: loss, then the validation metric, against round and training time.

    The round panels are on the left and the training time panels
    (:func:`training_seconds`) on the right. The validation metric is the first of
    :data:`PLOTTED_METRICS` that the rounds contain. The caller closes the figure.

    Raises
    ------
    ValueError
        If ``rounds`` is empty: there is nothing to plot yet.
    """
    if not rounds:
        raise ValueError(f"{title}: no aggregated rounds yet, so there is nothing to plot")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    round_numbers = [entry["round"] for entry in rounds]
    elapsed = training_seconds(rounds)
    metric_name = next((name for name in PLOTTED_METRICS if any(name in entry for entry in rounds)), None)

    figure, axes = plt.subplots(2, 2, figsize=(width_inches, height_inches), dpi=dpi, sharey="row")
    try:
        for column, (x_values, x_label) in enumerate(((round_numbers, "round"), (elapsed, TRAINING_TIME_LABEL))):
            loss_axes, metric_axes = axes[0][column], axes[1][column]
            loss_axes.plot(x_values, [entry.get("train_loss") for entry in rounds], label="train loss")
            if any("validation_loss" in entry for entry in rounds):
                loss_axes.plot(x_values, [entry.get("validation_loss") for entry in rounds], label="validation loss")
            loss_axes.set_xlabel(x_label)
            loss_axes.set_ylabel("loss")
            loss_axes.legend()
            loss_axes.grid(True, alpha=0.3)

            if metric_name is not None:
                metric_axes.plot(x_values, [entry.get(metric_name) for entry in rounds], color="tab:green")
                metric_axes.set_ylabel(metric_name.replace("_", " "))
            else:
                metric_axes.text(0.5, 0.5, "no validation metric", ha="center", va="center",
                                 transform=metric_axes.transAxes)
            metric_axes.set_xlabel(x_label)
            metric_axes.grid(True, alpha=0.3)
            if column == 0:
                # Rounds are whole numbers, so the axis has no ticks such as 1.5 between them.
                for round_axes in (loss_axes, metric_axes):
                    round_axes.xaxis.set_major_locator(MaxNLocator(integer=True))

        figure.suptitle(title)
        figure.tight_layout()
    except Exception:
        plt.close(figure)
        raise
    return figure
