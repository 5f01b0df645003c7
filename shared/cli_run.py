"""The ``baton run`` flow: start a local stack, send the job, follow it, and end in order.

``baton run`` owns a local stack (:class:`shared.local.session.LocalStack`) while it runs,
and other baton commands may send more jobs to that stack. When its own job has ended it
waits for those jobs too, because the stack, and with it their queues and table, stops
when the command ends. On SIGINT, SIGTERM or SIGHUP, or when a reader closes its output
pipe, it stops the handlers, reads from the table where each job stopped, and prints that
in one line on stderr. If moto's server exits under it, the table is gone, so it reads
from the jobs' metrics files where each stopped instead.

Only one ``baton run`` at a time uses a local folder (:mod:`shared.local.folder_lock`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator

import click

from shared.config import Settings
from shared.earlier_runs import continuation_round, run_identity
from shared.efs import EfsStore
from shared.errors import (DATA_FILE_NOT_FOUND, DIVERGED_WORDS, BatonError, DamagedRoundStateError, DamagedShardError,
                           JobSpecError)
from shared.local.folder_lock import LOCK_FILE_NAME, LocalDirBusyError, LocalDirLock, LockHolder
from shared.local.session import ACTIVE_STATUSES, LocalStack, ServerExitedError
from shared.monitor import count_rounds, format_round, loss_text, read_metrics_files, regression_loss_note
from shared.spec import check_relative_path, parse_job_spec
from shared.state import PAUSED, PREPARING, SUCCEEDED, TERMINAL_STATUSES, JobRecord

# SIGHUP comes when the terminal that runs baton run closes, or its SSH session drops.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignal(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, received while ``baton run`` follows its jobs.

    A subclass of KeyboardInterrupt, so that code which catches ``Exception`` lets it
    through as it lets Ctrl-C through.
    """

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number

    @property
    def exit_code(self) -> int:
        """Exit status of a program that ends on this signal, as shells report it: 128 plus its number."""
        return 128 + self.signal_number


def _do_nothing(signal_number: int, frame) -> None:
    """Receive a stop signal while the stack stops, and let it pass."""


class StopSignalHandlers:
    """Handle SIGINT, SIGTERM and SIGHUP for ``baton run``; the previous handlers come back on exit.

    While the jobs are followed, each of these signals raises :class:`StopSignal`, so the command
    stops its stack in order and reports where the jobs stopped. From that signal on, or
    after :meth:`ignore`, further signals are ignored while the stack stops. One signal
    often comes twice: ``timeout`` sends it to the command and then to the command's
    process group, and an impatient user presses Ctrl-C again. The stop kills every
    container at once rather than waiting for its invocation, so it usually takes about
    a second.

    A signal that the process inherited as ignored (``nohup``, a background job of a
    non-interactive shell) stays ignored, and outside the main thread nothing changes,
    because Python runs signal handlers only there.
    """

    def __enter__(self) -> "StopSignalHandlers":
        # Handlers as signal.getsignal returns them: a function, or SIG_DFL or SIG_IGN.
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int] = {}
        if threading.current_thread() is not threading.main_thread():
            return self
        for number in STOP_SIGNALS:
            previous = signal.getsignal(number)
            if previous is signal.SIG_IGN:
                continue
            # None: a handler installed outside Python, which cannot be put back; the default is.
            self._previous[number] = signal.SIG_DFL if previous is None else previous
            signal.signal(number, self._raise_stop_signal)
        return self

    def _raise_stop_signal(self, signal_number: int, frame) -> None:
        # Ignored before the raise, so a second signal cannot interrupt the handling of the first.
        self.ignore()
        raise StopSignal(signal_number)

    def ignore(self) -> None:
        """Ignore further signals, for the time the stack takes to stop."""
        # A handler that does nothing, not SIG_IGN: setting SIG_IGN while that signal is
        # pending makes CPython raise "Signal ... ignored due to race condition".
        for number in self._previous:
            signal.signal(number, _do_nothing)

    def __exit__(self, *exc_info) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)


# The local folder's lock ------------------------------------------------------------------


@contextlib.contextmanager
def hold_local_dir(local_dir: Path, spec_file: Path | None, has_spec_options: bool) -> Iterator[LocalDirLock]:
    """Hold the lock on ``local_dir`` for the block, or raise a one-line error naming the run that holds it.

    ``spec_file`` and ``has_spec_options`` only shape the ``baton submit`` command that
    the error suggests.
    """
    for name in ("efs", "logs"):
        folder = local_dir / name
        if folder.exists() and not folder.is_dir():
            raise click.ClickException(f"{folder} is a file, but baton run keeps the local stack's {name} folder "
                                       f"there; move the file away, or pass another --local-dir")
    lock = LocalDirLock(local_dir)
    try:
        lock.acquire()
    except LocalDirBusyError as error:
        raise click.ClickException(local_dir_busy_message(local_dir, error.holder, spec_file,
                                                          has_spec_options)) from None
    except OSError as error:
        raise click.ClickException(f"cannot lock the local folder {local_dir}: {error}; check that it is a "
                                   "folder you can write to, or pass another --local-dir") from None
    try:
        yield lock
    finally:
        lock.release()


def local_dir_busy_message(local_dir: Path, holder: LockHolder, spec_file: Path | None,
                           has_spec_options: bool) -> str:
    """Return the line that rejects a second ``baton run`` on ``local_dir``: who holds it and what to do instead."""
    holder_pid = "pid unknown" if holder.pid is None else f"pid {holder.pid}"
    if not holder.is_running():
        return (f"the local folder {local_dir} is still locked: its baton run ({holder_pid}) has ended, but the "
                "processes of its stack have not exited yet; try again in a few seconds. Nothing was changed")

    endpoint = holder.endpoint_url or "URL"
    if spec_file is None:
        submit = f"`baton submit --stage local --endpoint-url {endpoint}` with the same spec options"
    else:
        submit = f"`baton submit {spec_file} --stage local --endpoint-url {endpoint}`"
        if has_spec_options:
            submit += " with the same spec options"
    if holder.endpoint_url is not None:
        where = f"with its stack on {holder.endpoint_url}"
    elif holder.pid is not None:
        where = "whose stack is still starting and prints its endpoint URL once it has started"
    else:
        where = f"whose lock file {local_dir / LOCK_FILE_NAME} could not be read"
    return (f"the local folder {local_dir} is in use by another baton run ({holder_pid}), {where}. Wait for it to "
            f"end, send this job to its stack with {submit}, or pass another --local-dir. Nothing was changed")


# Running the job on a local stack ----------------------------------------------------------


def check_local_settings() -> None:
    """Reject an ALLOWED_DATA_ROOTS in the environment that every handler of the local stack would reject."""
    try:
        Settings.from_env().data_roots()
    except BatonError as error:
        raise click.ClickException(str(error)) from None


# The spec option that sets each data path field, for the command a message suggests.
DATA_PATH_OPTIONS = {"path": "--data", "validation_path": "--validation-data"}


def check_local_data_paths(spec: dict, efs_root: Path) -> None:
    """Reject an ``s3://`` data path before the local stack starts, because its functions cannot read one.

    The local stack's S3 is moto's, which starts empty with each ``baton run`` and stops
    with it, and serverless.yml's empty ``dataBucket`` gives its functions no allowed
    bucket. So a local job reads its data from the EFS folder, where ``--import`` copies it.
    """
    data = spec.get("data")
    if not isinstance(data, dict):
        return
    for field, option in DATA_PATH_OPTIONS.items():
        uri = data.get(field)
        if not (isinstance(uri, str) and uri.startswith("s3://")):
            continue
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        raise click.ClickException(
            f"data.{field} {uri} is an S3 object, but the local stack of baton run reads data only from its EFS "
            f"folder {efs_root}, because its S3 is an empty moto server. Copy the object to this machine, for example "
            f"with `aws s3 cp {uri} {name}`, then pass --import {name}:datasets/{name} {option} datasets/{name}. "
            "Nothing was started")


def check_local_job_folder(efs_root: Path, spec: dict) -> None:
    """Reject a spec whose job id's local folder contains the files of a job with another spec.

    The starter rejects such a job too, but only once the stack has started, and it names
    the folder by its absolute path. A spec file there that is not JSON is left to the
    starter, whose message explains how to repair it.
    """
    job_id = spec["job_id"]
    store = EfsStore(efs_root)
    try:
        earlier = json.loads(store.spec_path(job_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    try:
        same = parse_job_spec(earlier).fingerprint() == parse_job_spec(spec).fingerprint()
    except BatonError:
        same = False
    if not same:
        raise click.ClickException(
            f"EFS already contains files of an earlier job '{job_id}' with a different spec in "
            f"'{store.job_dir(job_id)}'; choose a new job_id with --job-id, or delete that folder if it is no longer "
            "needed, which `baton run --fresh` does. Nothing was started")


def delete_local_job(efs_root: Path, job_id: str) -> None:
    """Delete the job's folder under the local EFS root, for ``baton run --fresh``.

    Refuses when a symbolic link on the way leads outside the EFS root, so that --fresh
    never deletes files elsewhere on the machine.
    """
    store = EfsStore(efs_root)
    job_dir = store.job_dir(job_id)
    if job_dir.is_symlink() or not store.is_under_root(job_dir):
        raise click.ClickException(f"--fresh did not delete {job_dir}: it is a symbolic link or leads outside the "
                                   f"EFS folder {efs_root} through one; remove the link, then run again")
    shutil.rmtree(job_dir, ignore_errors=True)


def run_on_local_stack(spec: dict, local_dir: Path, imports: tuple[str, ...], worker_lanes: int | None,
                       timeout_seconds: float, lock: LocalDirLock) -> int:
    """Start a local stack, send ``spec`` to it and follow the jobs on it; return the exit status.

    ``lock`` is the local folder's :class:`shared.local.folder_lock.LocalDirLock`. The
    stack's processes inherit it, and it records the stack's endpoint URL.
    """
    job_id = spec["job_id"]
    efs_root = local_dir / "efs"
    training = spec.get("training")
    n_workers = training.get("n_workers", 4) if isinstance(training, dict) else 4
    lanes = worker_lanes or min(int(n_workers), 16)
    assert lock.fd is not None  # the caller holds the lock
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
        if not Path(source).exists() and not Path(source).is_symlink():
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


def _echo_status_change(record, previous: str | None, endpoint_url: str) -> None:
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
                   f"trained again: its model and the metrics of its {count_rounds(first_round)} are in "
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
    started = time.monotonic()
    try:
        record = stack.wait(job_id, timeout_seconds=timeout_seconds, on_round=lambda m: click.echo(format_round(m)),
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
        return click.ClickException(f"job {job_id} {record.status}: {record.error}{_after_failure(record, efs_root)}"
                                    f"{_missing_data_hint(record, efs_root)}")
    summary = dict(record.attributes)
    click.echo(f"job {job_id} SUCCEEDED after {count_rounds(record.round)} in {elapsed:.1f} s "
               f"(stop reason {summary.get('stop_reason', 'unknown')})")
    try:
        rounds = read_metrics_files(efs_root, job_id)
    except BatonError:
        rounds = []
    train_label = "train_loss (last round)"
    epoch_loss = last_epoch_train_loss(rounds)
    if epoch_loss is not None:
        train_label, summary["train_loss"] = epoch_loss
    # The job item leaves out a kmeans job's inertia, so it comes from the last round's metrics.
    if rounds and "validation_inertia" in rounds[-1]:
        summary["validation_inertia"] = rounds[-1]["validation_inertia"]
    # Validation uses every held-out row, at the end of the last round.
    labels = {"train_loss": train_label, "validation_loss": "validation_loss",
              "validation_accuracy": "validation_accuracy", "validation_r2": "validation_r2",
              "validation_inertia": "validation_inertia"}
    for name, label in labels.items():
        if name in summary:
            value = summary[name]
            text = f"{value:.5f}" if name == "validation_accuracy" else loss_text(value, 5)
            click.echo(f"  {label:<24} {text}{regression_loss_note(record) if name.endswith('loss') else ''}")
    click.echo(f"  {'model':<24} {efs_root / 'jobs' / job_id / 'model'}")
    if summary.get("validation_r2", 0.0) < 0.0:
        click.echo(NEGATIVE_R2_HINT)
    return None


def last_epoch_train_loss(rounds: list[dict]) -> tuple[str, float] | None:
    """Return a label and the training loss over the last epoch of a job's ``rounds``, for its summary.

    ``rounds`` are the job's metrics, in round order. The loss is the mean of the last
    epoch's round losses, each weighted by the rows its round trained on. The last round
    of an epoch trains on the rows that the epoch's full batches left, which can be a
    handful, so its loss alone is noisy. A job shorter than one epoch gets the mean over
    all its rounds. Returns None when ``rounds`` is empty or lacks a round's epoch or rows.
    """
    if not rounds or any("epoch" not in entry or not entry.get("n_samples") for entry in rounds):
        return None
    last_epoch = rounds[-1]["epoch"]
    # Epoch counts at the end of an epoch are whole numbers exactly, so that round is left out.
    window = [entry for entry in rounds if entry["epoch"] > last_epoch - 1 + 1e-9]
    rows = sum(entry["n_samples"] for entry in window)
    loss = sum(entry["train_loss"] * entry["n_samples"] for entry in window) / rows
    return ("train_loss (last epoch)" if last_epoch >= 1 else "train_loss (all rounds)"), loss


# Printed under a finished regression job whose model predicts the held-out targets worse
# than their mean does, which unscaled features or targets usually cause.
NEGATIVE_R2_HINT = ("note: validation_r2 is below 0, so the model predicts the held-out targets worse than their "
                    "mean would; features or targets of very different scales are the usual cause, so try "
                    "data.standardize true and data.standardize_target true, or a smaller learning rate")


def _missing_data_hint(record, efs_root: Path) -> str:
    """Return where the missing data file of ``baton run``'s own job belongs, as a sentence to append to its error.

    The handlers' message names the file as the spec does, because it also reaches users of
    a deployed stack. Only here is it known that EFS is the local folder ``efs_root``, and
    that ``baton run --import`` copies a file into it.
    """
    if record.status != "FAILED" or not (record.error or "").startswith(DATA_FILE_NOT_FOUND):
        return ""
    try:
        data = json.loads(record.spec_json or "{}").get("data")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(data, dict):
        return ""
    for field in ("path", "validation_path"):
        path = data.get(field)
        if (isinstance(path, str) and not path.startswith("s3://") and f"'{path}'" in record.error
                and not os.path.lexists(efs_root / path)):
            return (f". This local stack's EFS is the folder {efs_root}, so data.{field} names {efs_root / path}: "
                    f"copy the file there, or add --import SOURCE:{path} to the baton run command, which copies "
                    "the file SOURCE there before the job starts")
    return ""


def _after_failure(record, efs_root: Path) -> str:
    """Return what to do after ``baton run``'s own job failed, as a sentence to append to its error.

    A job whose rounds a rerun would go on from gets one. So does a job whose error advises
    to run ``baton resume``, such as a dead-lettered message in round 1, because the stack
    that command needs stops with ``baton run``. The error of a job that failed in
    preparation, or whose data changed, already names its fix, and so does the error of a
    diverged job, which a rerun would only repeat.
    """
    if record.status != "FAILED" or DIVERGED_WORDS in (record.error or ""):
        return ""
    names_resume = "`baton resume" in (record.error or "")
    store = EfsStore(efs_root)
    first_round = 0
    if record.total_rounds > 0:
        try:
            identity = run_identity(store, parse_job_spec(json.loads(record.spec_json)))
            first_round = continuation_round(store, record.job_id, record.total_rounds, identity)
        except (BatonError, OSError, ValueError):
            first_round = 0
    instead = "This stack stops with baton run, so instead of `baton resume`, run the same command again"
    if first_round == 0:
        return f". {instead} once the cause is fixed" if names_resume else ""
    if record.repair is not None:
        # The error names `baton resume`, which needs the stack that stops with this command.
        return (f". {instead}: it makes the same repair from the files in {store.job_dir(record.job_id)} and goes "
                f"on from round {first_round + 1}")
    if names_resume:
        return (f". {instead} once the cause is fixed: it goes on from round {first_round + 1} with the files in "
                f"{store.job_dir(record.job_id)}")
    return (f". Its files remain in {store.job_dir(record.job_id)}; once the cause is fixed, running the same "
            f"command again goes on from round {first_round + 1}")


# Lines about jobs --------------------------------------------------------------------------


def rounds_done_text(record: JobRecord) -> str:
    """Return how far a job is, such as "12 of 96 rounds done", for a line about it."""
    if record.status == PREPARING and record.repair == DamagedShardError.repair:
        return f"preparing its shards again, {record.round} of {record.total_rounds} rounds done"
    if record.status == PREPARING and record.repair == DamagedRoundStateError.repair:
        return (f"going back to the latest intact round state, {record.round} of {record.total_rounds} rounds "
                "done so far")
    if record.status == PREPARING:
        return "preparing its data"
    if record.total_rounds == 0:
        # The starter sets total_rounds when it ends the preparation, so the job ended before that.
        return "no rounds done"
    return f"{record.round} of {record.total_rounds} rounds done"


def _stopped_at(record: JobRecord) -> str:
    if record.status == PREPARING:
        return "while preparing its data"
    if record.total_rounds == 0:
        return "before its first round"
    return f"after {record.round} of {record.total_rounds} rounds"


def job_outcome_line(record: JobRecord) -> str:
    """Return one line on a job that has left PREPARING and RUNNING: status, rounds, stop reason or error."""
    if record.status == SUCCEEDED:
        return (f"job {record.job_id} SUCCEEDED after {count_rounds(record.round)} "
                f"(stop reason {record.attributes.get('stop_reason', 'unknown')})")
    line = f"job {record.job_id} {record.status} {_stopped_at(record)}"
    if record.error:
        line += f": {record.error}"
    return line


def stops_with_stack_line(records: list[JobRecord], jobs_dir: Path) -> str:
    """Return one line naming jobs that stop with the stack: status, rounds, where their files are, how to rerun one.

    A stopped stack takes its queues and table along, so a job cannot be resumed, only
    run again on its saved spec, which goes on from its last completed round with the prepared data.
    """
    names = ", ".join(f"{record.job_id} ({record.status}, {rounds_done_text(record)})" for record in records)
    local_dir = jobs_dir.parent.parent
    if len(records) == 1:
        job_dir = jobs_dir / records[0].job_id
        return (f"job {names} stops with the stack; its files remain in {job_dir}, and "
                f"`baton run {job_dir / 'spec.json'} --local-dir {local_dir}` goes on with it from its last completed round")
    return (f"jobs {names} stop with the stack; their files remain in {jobs_dir}, and "
            f"`baton run {jobs_dir}/<job_id>/spec.json --local-dir {local_dir}` goes on with one from its last completed round")


def own_job_timeout_line(record: JobRecord | None, job_id: str, timeout_seconds: float, local_dir: Path,
                         endpoint_url: str) -> str:
    """Return the line that ``baton run`` ends with when its own job has not ended within ``--timeout``.

    ``record`` is the job as the table had it when the timeout ran out, or None when the
    starter had not recorded it yet. The line gives its status and rounds, and the
    command that trains it again, because the job stops with the stack.
    """
    reached = f"--timeout of {timeout_seconds:g} s reached"
    logs = f"logs are in {local_dir / 'logs'}"
    if record is None:
        return (f"{reached} before the starter recorded job {job_id}, so it did not start; {logs}. Running the "
                "same command again sends it; raise --timeout to wait longer")
    line = f"{reached}: {stops_with_stack_line([record], local_dir / 'efs' / 'jobs')}; {logs}"
    if record.status == PAUSED:
        return (f"{line}. baton run waits for its PAUSED job until --timeout, so resume the job sooner with "
                f"`baton resume {job_id} --stage local --endpoint-url {endpoint_url}`, or raise --timeout")
    return f"{line}. Raise --timeout to wait longer"


# Waiting for the other jobs ----------------------------------------------------------------


def wait_for_other_jobs(stack: LocalStack, job_id: str, efs_root: Path, timeout_seconds: float,
                        unfinished: list[str]) -> None:
    """Wait until no job but ``job_id`` is PREPARING or RUNNING on the stack, printing a line as each ends.

    A job sent while this waits is waited for too. PAUSED jobs are not waited for; one
    line names them and the jobs still running at the timeout, which stop with the stack.
    ``unfinished`` is kept up to date with the ids of the jobs that have not ended or are
    PAUSED, for :func:`server_exit_line`.
    """
    jobs_dir = efs_root / "jobs"
    announced = False
    try:
        for update in stack.follow_jobs(exclude=(job_id,), timeout_seconds=max(timeout_seconds, 0)):
            unfinished.extend(record.job_id for record in update.started if record.job_id not in unfinished)
            for record in update.ended:
                if record.status != PAUSED and record.job_id in unfinished:
                    unfinished.remove(record.job_id)
            if update.started:
                names = ", ".join(f"{record.job_id} ({rounds_done_text(record)})" for record in update.started)
                if announced:
                    click.echo(f"waiting for these jobs too: {names}")
                else:
                    click.echo(f"other jobs on this stack have not ended: {names}; baton run waits for them "
                               f"(Ctrl-C stops them, and their files stay in {jobs_dir})")
                    announced = True
            for record in update.ended:
                click.echo(job_outcome_line(record))
    except TimeoutError:
        if (not report_jobs_left(stack, job_id, efs_root, "--timeout reached", ACTIVE_STATUSES)
                and stack.pending_job_messages() > 0):
            click.echo("--timeout reached while the starter had not yet handled every job message sent to the "
                       "stack; those jobs did not start", err=True)
    report_jobs_left(stack, job_id, efs_root, "not waited for", (PAUSED,), err=False)


def report_jobs_left(stack: LocalStack, job_id: str, efs_root: Path, prefix: str,
                     statuses: tuple[str, ...] = ACTIVE_STATUSES + (PAUSED,), err: bool = True) -> bool:
    """Print one line, starting with ``prefix``, on the jobs but ``job_id`` in ``statuses``; return whether there were any."""
    records = stack.list_jobs(statuses, exclude=(job_id,))
    if records:
        click.echo(f"{prefix}: {stops_with_stack_line(records, efs_root / 'jobs')}", err=err)
    return bool(records)


def report_interrupt(stack: LocalStack, job_id: str, sent: bool, efs_root: Path, reason: str = "interrupted",
                     outcome_shown: bool = True) -> None:
    """Print where ``job_id`` and the stack's other unfinished jobs stopped, after the handlers have stopped.

    Call it after :meth:`LocalStack.stop_handlers` and before :meth:`LocalStack.stop`, so
    the table is still there and no handler moves a job on meanwhile. Each line starts
    with ``reason``. ``outcome_shown`` False means the user may not have seen the line on
    how ``job_id`` ended, so that line is printed again, with its folder.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    if not sent:
        click.echo(f"{reason} before job {job_id} was sent; nothing ran", err=True)
        return
    job_dir = efs_root / "jobs" / job_id
    try:
        record = stack.state.get_job(job_id)
        others = stack.list_jobs(ACTIVE_STATUSES + (PAUSED,), exclude=(job_id,))
    except (BotoCoreError, ClientError, ServerExitedError):
        # Such as moto's server gone too, when a signal reached every process of the stack.
        click.echo(f"{reason}: job {job_id} stopped; its files, if any, remain in {job_dir}", err=True)
        return

    if record is None:
        click.echo(f"{reason}: job {job_id} had not started; run the same command again to start it", err=True)
    elif record.status == PREPARING:
        click.echo(f"{reason}: job {job_id} stopped while preparing its data; its files remain in {job_dir}. "
                   "Running the same command again carries the preparation on from its last finished step; "
                   "add --fresh to delete the files and start over", err=True)
    elif record.status not in TERMINAL_STATUSES:
        click.echo(f"{reason}: job {job_id} stopped {_stopped_at(record)}; its files remain in {job_dir}. "
                   "Running the same command again goes on from its last completed round, reusing the data it prepared; "
                   "add --fresh to delete the files and prepare the data again", err=True)
    elif not outcome_shown:
        click.echo(f"{reason}: {job_outcome_line(record)}; its files are in {job_dir}", err=True)
    if others:
        click.echo(f"{reason}: {stops_with_stack_line(others, efs_root / 'jobs')}", err=True)


def redirect_stdout_if_closed() -> bool:
    """Send standard output to ``os.devnull`` if its reader has closed it; return whether it had.

    On Linux, ``poll`` reports POLLERR on the write end of a pipe whose reader has closed
    it, and POLLHUP counts as closed too. Sending standard output elsewhere then keeps
    Python's flush at exit from printing a traceback of its own.
    """
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        # No file behind it, as under click's CliRunner.
        return False
    poller = select.poll()
    poller.register(descriptor, select.POLLOUT)
    if not any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)
    return True


# moto's server exited ----------------------------------------------------------------------


def last_round_on_efs(efs_root: Path, job_id: str, since: float) -> int | None:
    """Return the last round that ``job_id`` finished since ``since``, from its metrics files on EFS.

    ``since`` is a ``time.time()`` before the stack started. Returns None when the job has
    not started since then, and 0 when it has finished no round since then.

    The starter writes the job's spec.json each time it starts the job, so a spec older
    than ``since`` means that no starter of this stack has started the job. A run that
    goes on from an unfinished earlier run keeps that run's metrics files, so they count.
    When an earlier run finished (its ``model/model.json`` exists), its metrics files count
    only if written since the spec. On the same spec and data the job reuses that model
    and stops no round short, while on other data those files move aside when round 0
    starts, and until then they are not this run's.

    NOTE: when that model is damaged, the job goes on from the earlier run's rounds, and
    their metrics files, older than the spec, are still left out here.
    """
    store = EfsStore(efs_root)
    try:
        started = store.spec_path(job_id).stat().st_mtime
    except OSError:
        return None
    if started < since:
        return None
    earlier_run_finished = (store.model_dir(job_id) / "model.json").exists()
    last_round = 0
    try:
        entries = list(os.scandir(store.job_dir(job_id) / "metrics"))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name.removesuffix(".json")
        if not (entry.name.endswith(".json") and name.isdigit()):
            continue
        try:
            written = entry.stat().st_mtime
        except OSError:
            continue
        if written >= started or not earlier_run_finished:
            last_round = max(last_round, int(name))
    return last_round


def _where_job_stopped(efs_root: Path, job_id: str, since: float) -> str:
    metrics_dir = efs_root / "jobs" / job_id / "metrics"
    last_round = last_round_on_efs(efs_root, job_id, since)
    if last_round is None:
        return f"job {job_id} had not started"
    if last_round == 0:
        return f"job {job_id} stopped before it finished a round (no metrics file of this run in {metrics_dir})"
    return f"job {job_id} stopped after round {last_round}, the last in {metrics_dir}"


def server_exit_line(error: ServerExitedError, job_id: str, sent: bool, unfinished: list[str], local_dir: Path,
                     since: float) -> str:
    """Return the one line that ``baton run`` ends with when its moto server has exited.

    It names the server's exit and log, then for this run's job and each other job in
    ``unfinished`` where it stopped and how to train it again. The table is gone with the
    server, so where a job stopped comes from its metrics files (:func:`last_round_on_efs`).
    """
    efs_root = local_dir / "efs"
    parts = []
    if not sent:
        parts.append(f"job {job_id} was not sent, and running the same command again sends it")
    elif job_id in unfinished:
        parts.append(f"{_where_job_stopped(efs_root, job_id, since)}, and running the same command again goes on "
                     "from its last completed round, reusing the data it prepared")
    for other in unfinished:
        if other != job_id:
            spec_path = efs_root / "jobs" / other / "spec.json"
            parts.append(f"{_where_job_stopped(efs_root, other, since)}, and `baton run {spec_path} --local-dir "
                         f"{local_dir}` goes on with it from its last completed round")
    if not parts:
        return f"{error}. The stack's queues and table are gone with it; the files of its jobs remain in {efs_root / 'jobs'}"
    return f"{error}. The stack's queues and table are gone with it: " + "; ".join(parts)
