"""A whole Baton stack on one machine: moto's server, the queues and table, the handlers.

Used by ``baton run`` and by the end-to-end tests::

    with LocalStack(efs_root) as stack:
        job_id = stack.submit(spec)
        record = stack.wait(job_id)

The stack's processes (moto's server and the handler containers) are plain subprocesses,
so a script may build a ``LocalStack`` at module level without an
``if __name__ == "__main__":`` guard. None of them outlives the stack: ``stop()`` (or
leaving the ``with`` block) ends them, a ``start()`` that fails ends what it started, a
stack never stopped is stopped when the interpreter exits, and each process also exits
within about half a second after the process that started it is gone (killed).

Each of those processes leads its own process group. A Ctrl-C in a terminal, or the signal
that ``timeout`` sends to its process group, then reaches only the process that owns the
stack. That process stops the handlers first and moto's server last, so no handler is cut
off from the server while it still runs.

If moto's server exits while the stack runs, the queues and the table are gone with it.
The stack's methods that read or send through the server then raise
:class:`ServerExitedError`, and the handlers' lanes stop reporting the failed requests
that follow, so the owner can report the exit in one line.
"""

from __future__ import annotations

import atexit
import contextlib
import filecmp
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import boto3
from botocore.exceptions import BotoCoreError

from shared.config import Settings
from shared.efs import JOBS_FOLDER, EfsStore
from shared.local.processes import python_module_command, stop_process
from shared.local.runtime import LocalRuntime
from shared.local.stack import StackDefinition, create_stack, load_stack_definition
from shared.spec import encode_job_message
from shared.state import PAUSED, PREPARING, RUNNING, TERMINAL_STATUSES, JobRecord, StateStore
from shared.tracing import TRACE_DIR_VARIABLE

logger = logging.getLogger(__name__)

DUMMY_AWS_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}

# Settings a caller may pass through to the containers: the folders data paths may name,
# and fault injection for tests.
PASSTHROUGH_VARIABLES = ("ALLOWED_DATA_ROOTS", "BATON_FAULTS_ENABLED", "BATON_FAULTS", "BATON_FAULTS_DIR")

# Statuses of a job that the handlers still move forward.
ACTIVE_STATUSES = (PREPARING, RUNNING)

# The jobs queue's message counts; a job message in any of them has not been handled yet.
_JOBS_QUEUE_COUNTS = ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                      "ApproximateNumberOfMessagesDelayed")


@dataclass(frozen=True)
class JobsUpdate:
    """Changes among a stack's jobs between two reads of its table.

    Attributes
    ----------
    started : list of JobRecord
        Jobs now PREPARING or RUNNING that were not at the previous read (new, or resumed).
    ended : list of JobRecord
        Jobs that left PREPARING and RUNNING since the previous read (SUCCEEDED, FAILED,
        CANCELLED or PAUSED), or appeared in one of those statuses.
    """

    started: list[JobRecord]
    ended: list[JobRecord]


# Seconds to wait for moto's server to exit after a request to it failed. The server's
# sockets close a moment before the kernel reports the process as exited.
SERVER_EXIT_WAIT_SECONDS = 2.0

# The watchdog's interval in the local runtime. A failed record comes back after
# retry_delay_seconds here, not after the deployed queues' visibility timeout, so a message
# reaches its dead-letter queue within seconds. At the deployed rate of 5 minutes, its job
# would show RUNNING that long before the watchdog's drain marks it FAILED.
LOCAL_WATCHDOG_SECONDS = 10.0


class ServerExitedError(RuntimeError):
    """moto's server of a :class:`LocalStack` exited while the stack was running.

    Attributes
    ----------
    pid : int
    exit_code : int
        As :attr:`subprocess.Popen.returncode` gives it: negative for a signal.
    log_path : Path
        The server's output.
    """

    def __init__(self, pid: int, exit_code: int, log_path: Path):
        self.pid = pid
        self.exit_code = exit_code
        self.log_path = log_path
        exit_text = f"exited with code {exit_code}"
        if exit_code < 0:
            try:
                exit_text += f" (killed by {signal.Signals(-exit_code).name})"
            except ValueError:
                exit_text += f" (killed by signal {-exit_code})"
        super().__init__(f"moto's server (pid {pid}) {exit_text}; see its log {log_path}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_moto_server(log_path: Path, timeout_seconds: float = 30,
                      inherited_fds: tuple[int, ...] = ()) -> tuple[subprocess.Popen, str]:
    """Start moto's server in its own process on 127.0.0.1; return it and its endpoint URL.

    A separate process keeps each stack's state apart (moto's backends are global to a
    process) and keeps the server's work off the caller's interpreter lock. The server
    exits by itself once this process is gone. It inherits the descriptors in
    ``inherited_fds``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(python_module_command("shared.local.moto_server", str(port), str(os.getpid())),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **DUMMY_AWS_ENVIRONMENT, "MOTO_PORT": str(port)},
                                   pass_fds=inherited_fds,
                                   # Its own process group, so a Ctrl-C in the terminal reaches only the stack's owner.
                                   process_group=0)
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto's server exited with code {process.returncode}; see {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    stop_process(process)
    raise RuntimeError(f"moto's server did not listen on 127.0.0.1:{port} within {timeout_seconds} s; see {log_path}")


def _reject_links_to(real_target: Path) -> Callable[[str, list[str]], list[str]]:
    """Return a ``shutil.copytree`` ignore function that raises on a link leading to ``real_target`` or above it.

    copytree follows links, so such a link in the source would copy the copy into itself.
    """
    def check(folder: str, names: list[str]) -> list[str]:
        for name in names:
            path = os.path.join(folder, name)
            real = Path(os.path.realpath(path))
            if os.path.islink(path) and (real == real_target or real in real_target.parents):
                raise ValueError(f"import source contains '{path}', a link to {real}, which contains the "
                                 "destination, so the copy would copy itself over and over; remove the link or "
                                 "import another folder")
        return []

    return check


def _special_file_kind(path: str | os.PathLike) -> str:
    """Return what the existing path ``path`` is, when it is neither a regular file nor a folder."""
    mode = os.stat(path).st_mode
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def check_import_source(source: Path) -> None:
    """Raise ``ValueError`` if ``source`` contains anything an import cannot copy as data.

    That is a named pipe, socket or device, a symbolic link to a missing file, or a link
    that leads back to a folder it is in, which would make the copy endless. The whole
    source is checked before anything is copied, so a rejected import leaves no partial copy.
    """
    if source.is_symlink() and not source.exists():
        raise ValueError(f"import source '{source}' is a symbolic link to a missing file, or one of a loop of links; "
                         "point the link at the data or import the data itself")
    if source.is_file():
        return
    if not source.is_dir():
        raise ValueError(f"import source '{source}' is {_special_file_kind(source)}, not a file or folder (the "
                         "shell's <(...) gives a named pipe); write the data to a file first and import that file")
    # Each folder is visited with the real paths of the folders that lead to it, so that a
    # link back to one of them is found before the copy would follow it.
    pending: list[tuple[str, tuple[str, ...]]] = [(os.fspath(source), (os.path.realpath(source),))]
    while pending:
        folder, chain = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():
                    real = os.path.realpath(entry.path)
                    if real in chain:
                        raise ValueError(f"import source '{source}' contains a symbolic link loop at '{entry.path}', "
                                         f"which leads back to '{real}'; remove the link or import another folder")
                    pending.append((entry.path, chain + (real,)))
                elif entry.is_file():
                    continue
                elif entry.is_symlink() and not os.path.exists(entry.path):
                    raise ValueError(f"import source '{source}' contains '{entry.path}', a symbolic link to a "
                                     "missing file or one of a loop of links; remove or fix the link")
                else:
                    raise ValueError(f"import source '{source}' contains '{entry.path}', "
                                     f"{_special_file_kind(entry.path)}, which cannot be copied as data; remove "
                                     "it from the folder or import the files one by one")


def _copy_folder(source: Path, target: Path, real_target: Path) -> None:
    """Copy the folder ``source`` to ``target``, each file through :func:`_replace_file`.

    A new ``target`` is first copied to a temporary folder beside it, renamed to ``target``
    once complete, so a failed copy leaves nothing at ``target``. Into an existing folder
    the files are copied one at a time, and a failed copy leaves the files copied so far.
    """
    ignore = _reject_links_to(real_target)
    if target.exists():
        shutil.copytree(source, target, dirs_exist_ok=True, ignore=ignore, copy_function=_replace_file)
        return
    temporary = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name[:50]}.", suffix=".import"))
    try:
        shutil.copytree(source, temporary, dirs_exist_ok=True, ignore=ignore, copy_function=_replace_file)
        shutil.copystat(source, temporary)
        os.rename(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _first_copy_error(error: OSError | shutil.Error) -> str:
    """Return a one-line description of a failed copy; ``shutil.Error`` collects one per file."""
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        source, _, problem = error.args[0][0]
        count = len(error.args[0])
        return f"{source}: {problem}" + (f" (and {count - 1} more files)" if count > 1 else "")
    return str(error)


def _is_current_copy(source: str | os.PathLike, target: str | os.PathLike) -> bool:
    """Return whether the regular file ``target`` is ``source`` or has its size and bytes.

    The modification time does not count: a ``touch`` of the source must not replace an
    identical copy, whose new inode would make the job's prepared data look changed.
    """
    try:
        source_status, target_status = os.stat(source), os.stat(target, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(target_status.st_mode):
        return False
    if os.path.samestat(source_status, target_status):
        return True
    return source_status.st_size == target_status.st_size and filecmp.cmp(source, target, shallow=False)


def _replace_file(source: str | os.PathLike, target: str | os.PathLike) -> str | os.PathLike:
    """Copy the file ``source`` to ``target`` through a temporary file in the same folder, renamed over ``target``.

    The file already at ``target`` is never written to, because it may be a hard link to
    a file outside the EFS folder, even to ``source`` itself. A current copy
    (:func:`_is_current_copy`) is left as it is. Returns ``target``, as
    ``shutil.copytree`` expects of its copy function.
    """
    if _is_current_copy(source, target):
        return target
    descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(target),
                                             prefix=f".{os.path.basename(target)[:50]}.", suffix=".import")
    os.close(descriptor)
    try:
        shutil.copy2(source, temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return target


class LocalStack:
    """Start moto's server on 127.0.0.1, create the stack on it and run the handlers.

    Parameters
    ----------
    efs_root : str or Path
        Folder standing in for the EFS mount.
    concurrency : dict of str to int, optional
        Containers per function; the worker default is 4.
    timeout_seconds : dict of str to float, optional
        Per-function timeout overrides.
    extra_environment : dict, optional
        More variables for the containers (fault injection in tests).
    endpoint_url : str, optional
        Use an already running moto server instead of starting one.
    retry_delay_seconds : float, default=1.0
        Delay before a failed record is received again.
    schedule_seconds : dict of str to float, optional
        Interval overrides for scheduled functions, such as ``{"watchdog": 2}``. By
        default the watchdog runs every :data:`LOCAL_WATCHDOG_SECONDS`, and any other
        scheduled function at its serverless.yml rate.
    trace_dir : str or Path, optional
        Folder for the containers' phase timings (:mod:`shared.tracing`); tracing is off
        when None.
    inherited_fds : tuple of int, optional
        Open file descriptors that moto's server and every container inherit, such as the
        lock on ``baton run``'s local folder, which then stays held until the last process
        of the stack has exited.
    """

    def __init__(self, efs_root: str | os.PathLike, concurrency: dict[str, int] | None = None,
                 timeout_seconds: dict[str, float] | None = None, extra_environment: dict | None = None,
                 endpoint_url: str | None = None, retry_delay_seconds: float = 1.0, stage: str = "local",
                 schedule_seconds: dict[str, float] | None = None, trace_dir: str | os.PathLike | None = None,
                 inherited_fds: tuple[int, ...] = ()):
        self.efs_root = Path(efs_root).resolve()
        self.definition: StackDefinition = load_stack_definition(stage=stage)
        self.concurrency = {"worker": 4, "starter": 1, "aggregator": 1, **(concurrency or {})}
        self.timeout_seconds = timeout_seconds
        self.extra_environment = extra_environment or {}
        self.endpoint_url = endpoint_url
        self.retry_delay_seconds = retry_delay_seconds
        self.schedule_seconds = {"watchdog": LOCAL_WATCHDOG_SECONDS, **(schedule_seconds or {})}
        self.trace_dir = None if trace_dir is None else Path(trace_dir).resolve()
        self.inherited_fds = tuple(inherited_fds)
        self.server_log_path = self.efs_root.parent / "logs" / "moto.log"
        self._server: subprocess.Popen | None = None
        self.server_pid: int | None = None
        self.runtime: LocalRuntime | None = None

    # Lifecycle ---------------------------------------------------------------------------

    def start(self) -> "LocalStack":
        """Start moto's server (unless ``endpoint_url`` was given), create the stack and start the handlers.

        If any step fails, what was started is stopped before the error propagates.
        """
        # Registered before anything starts, so no process of the stack runs without a stop at exit.
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self.endpoint_url is None:
            self._server, self.endpoint_url = start_moto_server(self.server_log_path,
                                                                inherited_fds=self.inherited_fds)
            self.server_pid = self._server.pid

        self.efs_root.mkdir(parents=True, exist_ok=True)
        self.sqs = self.client("sqs")
        self.dynamodb = self.client("dynamodb")
        with self._server_requests():
            queue_urls = create_stack(self.definition, self.sqs, self.dynamodb)
        self.queue_urls = queue_urls
        self.settings: Settings = self.definition.settings(str(self.efs_root))
        self.state = StateStore(self.dynamodb, self.settings.state_table_name)

        environment = {
            **self.definition.environment,
            **DUMMY_AWS_ENVIRONMENT,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "EFS_ROOT": str(self.efs_root),
            "MAX_RECEIVE_COUNT": str(self.definition.max_receive_count),
            "POWERTOOLS_METRICS_NAMESPACE": "Baton",
            # A local folder needs no fsync, which costs milliseconds a write (see shared/efs.py).
            "BATON_EFS_FSYNC": "false",
            **{name: os.environ[name] for name in PASSTHROUGH_VARIABLES if name in os.environ},
            **self.extra_environment,
        }
        if self.trace_dir is not None:
            environment[TRACE_DIR_VARIABLE] = str(self.trace_dir)
        self.runtime = LocalRuntime(
            self.definition.functions, queue_urls, self.sqs, environment,
            log_dir=self.efs_root.parent / "logs", concurrency=self.concurrency,
            timeout_seconds=self.timeout_seconds, retry_delay_seconds=self.retry_delay_seconds,
            schedule_seconds=self.schedule_seconds, inherited_fds=self.inherited_fds,
            server_exited=lambda: self.server_exit_code() is not None,
        ).start()

    def stop(self) -> None:
        """Stop the handlers' lanes and containers, then moto's server; a second call does nothing."""
        atexit.unregister(self.stop)
        self.stop_handlers()
        if self._server is not None:
            stop_process(self._server)
            self._server = None

    def stop_handlers(self) -> None:
        """Stop the handlers' lanes and containers but keep moto's server, so the table can still be read.

        Once this returns no handler changes a job any more, so the table shows where each
        job stopped. ``stop()`` stops the server.
        """
        if self.runtime is not None:
            self.runtime.stop()

    def server_exit_code(self) -> int | None:
        """Return the exit code of the stack's moto server once it has exited, else None.

        None too for a stack on a given ``endpoint_url``, and after :meth:`stop`.
        """
        server = self._server
        return None if server is None else server.poll()

    def check_server(self, wait_seconds: float = 0) -> None:
        """Raise :class:`ServerExitedError` if the stack's moto server has exited within ``wait_seconds``."""
        server = self._server
        if server is None:
            return
        try:
            exit_code = server.wait(timeout=wait_seconds) if wait_seconds > 0 else server.poll()
        except subprocess.TimeoutExpired:
            return
        if exit_code is not None:
            raise ServerExitedError(server.pid, exit_code, self.server_log_path)

    @contextlib.contextmanager
    def _server_requests(self) -> Iterator[None]:
        """Raise :class:`ServerExitedError` in place of a failed request when moto's server has exited."""
        try:
            yield
        except BotoCoreError:
            self.check_server(wait_seconds=SERVER_EXIT_WAIT_SECONDS)
            raise

    @property
    def started_pids(self) -> list[int]:
        """Return the ids of every process this stack started: moto's server, then each container."""
        server = [] if self.server_pid is None else [self.server_pid]
        return server + ([] if self.runtime is None else list(self.runtime.started_pids))

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def client(self, service: str):
        """Return a boto3 client aimed at this stack's endpoint with dummy credentials."""
        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=DUMMY_AWS_ENVIRONMENT["AWS_DEFAULT_REGION"],
            aws_access_key_id=DUMMY_AWS_ENVIRONMENT["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_AWS_ENVIRONMENT["AWS_SECRET_ACCESS_KEY"],
        )

    # Jobs --------------------------------------------------------------------------------

    def import_data(self, source: str | os.PathLike, destination: str) -> Path:
        """Copy a file or folder into the EFS folder at ``destination`` (relative).

        The copies keep each file's modification time. A copy already at ``destination``
        that is the same file as the source, or has its size, modification time and bytes,
        is left as it is. So importing an unchanged file again keeps the identity that a
        job's prepared shards were recorded with (:mod:`shared.source_files`). Any other
        file there is replaced by a copy renamed over it, never written to, so a hard link
        at ``destination`` leaves the file it shares unchanged and a changed file gets a
        new identity.

        The copy contains the files' contents, with symbolic links in ``source`` followed,
        because the handlers reject a data path whose link leads outside the EFS root. A
        symbolic link already at ``destination`` is replaced, not written through.

        Raises
        ------
        ValueError
            If a folder on the way to ``destination`` is a symbolic link that leads
            outside the EFS folder, or if ``source`` is a folder that contains
            ``destination``, which the copy would then copy into itself, or if one of
            ``source`` and ``destination`` is a folder and the other a file.
        """
        source, target = Path(source), self.efs_root / destination
        check_import_source(source)
        # A link at the destination itself is replaced, not followed, so only its folder is resolved.
        real_source, real_target = Path(os.path.realpath(source)), Path(os.path.realpath(target.parent)) / target.name
        if source.is_dir() and (real_target == real_source or real_source in real_target.parents):
            raise ValueError(f"import source '{source}' contains the destination {target}, so the copy would copy "
                             "itself over and over; import a folder that does not contain the local folder, or "
                             "choose a --local-dir outside it")
        # Checked before any folder is made, so a link on the way can lead nowhere it should not.
        files = EfsStore(self.efs_root)
        if not files.is_under_root(target.parent):
            raise ValueError(f"import destination '{destination}' leads outside the EFS folder {self.efs_root} "
                             "through a symbolic link; remove the link or choose another destination")
        if (files.parts_under_root(target.parent) + (target.name,))[:1] == (JOBS_FOLDER,):
            raise ValueError(f"import destination '{destination}' is in jobs/, where Baton keeps the state of every "
                             "job; import data elsewhere, such as datasets/")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot make the folder of import destination '{destination}' ({error.strerror}); "
                             "a file or a link that leads nowhere is on the way, so remove it or choose another "
                             "destination") from None
        if target.is_symlink():
            target.unlink()
        if target.exists() and target.is_dir() != source.is_dir():
            kinds = ("folder", "file") if source.is_dir() else ("file", "folder")
            raise ValueError(f"import source '{source}' is a {kinds[0]}, but destination '{destination}' is a "
                             f"{kinds[1]}; remove {target} or choose another destination")
        try:
            if source.is_dir():
                _copy_folder(source, target, real_target)
            else:
                _replace_file(source, target)
        except (OSError, shutil.Error) as error:
            raise ValueError(f"cannot copy import source '{source}' to '{destination}': {_first_copy_error(error)}; "
                             "fix the source or choose another destination") from None
        return target

    def submit(self, spec: dict | str) -> str:
        """Send a job spec to the jobs queue; return its message id."""
        body = spec if isinstance(spec, str) else encode_job_message(spec)
        with self._server_requests():
            response = self.sqs.send_message(QueueUrl=self.queue_urls["JobsQueue"], MessageBody=body)
        return response["MessageId"]

    def follow(self, job_id: str, poll_seconds: float = 0.1, timeout_seconds: float = 3600,
               on_status: Callable[[JobRecord, str | None], None] | None = None,
               on_continued: Callable[[JobRecord], None] | None = None) -> Iterator[dict | JobRecord]:
        """Yield each round's metrics as the job records them, then the final job record.

        ``on_status(record, previous_status)`` is called each time the job's status
        changes to another status that is not final, such as from RUNNING to PAUSED, and
        with ``previous_status`` None when the first poll that finds the job finds it PAUSED.
        It is called after the metrics of the rounds that ``record`` counts are yielded.
        A job that goes on from an earlier run's files (``continued_from`` on its item)
        yields only the rounds from there, after one call of ``on_continued(record)``.

        Raises
        ------
        ServerExitedError
            If the stack's moto server exits meanwhile.
        TimeoutError
            If the job has not ended after ``timeout_seconds``.
        """
        deadline = time.monotonic() + timeout_seconds
        files = EfsStore(self.efs_root)
        next_round = 0
        status = None
        continued = False
        while True:
            self.check_server()
            with self._server_requests():
                record = self.state.get_job(job_id)
            if record is not None and record.first_round > 0 and not continued:
                continued = True
                next_round = max(next_round, record.first_round)
                if on_continued is not None:
                    on_continued(record)
            # The job item's round is the index of the round running, which is also the
            # number of rounds whose metrics are written.
            rounds_done = 0 if record is None else record.round
            while next_round < rounds_done:
                path = files.metrics_path(job_id, next_round)
                if not path.exists():
                    break
                yield json.loads(path.read_text())
                next_round += 1
            # After the rounds, so that a line on a pause follows the lines of the rounds it counts.
            if record is not None and record.status != status and record.status not in TERMINAL_STATUSES:
                # A job paused before the first poll that found it is announced too.
                if on_status is not None and (status is not None or record.status == PAUSED):
                    on_status(record, status)
                status = record.status
            if record is not None and record.status in TERMINAL_STATUSES:
                yield record
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not finish within {timeout_seconds} s; "
                                   f"logs are in {self.efs_root.parent / 'logs'}")
            time.sleep(poll_seconds)

    def get_job(self, job_id: str) -> JobRecord | None:
        """Return the job's record from the stack's table, or None before the starter has recorded the job."""
        with self._server_requests():
            return self.state.get_job(job_id)

    def list_jobs(self, statuses: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> list[JobRecord]:
        """Return the stack's jobs, oldest first, in ``statuses`` (all when None) and not in ``exclude``."""
        with self._server_requests():
            jobs = self.state.list_jobs()
        return [job for job in jobs if job.job_id not in exclude and (statuses is None or job.status in statuses)]

    def pending_job_messages(self) -> int:
        """Return the approximate number of job messages not yet handled: waiting, in flight or delayed."""
        with self._server_requests():
            attributes = self.sqs.get_queue_attributes(QueueUrl=self.queue_urls["JobsQueue"],
                                                       AttributeNames=list(_JOBS_QUEUE_COUNTS))["Attributes"]
        return sum(int(attributes.get(name, 0)) for name in _JOBS_QUEUE_COUNTS)

    def follow_jobs(self, exclude: tuple[str, ...] = (), poll_seconds: float = 0.5,
                    timeout_seconds: float = 3600) -> Iterator[JobsUpdate]:
        """Yield the changes among the stack's jobs until none is PREPARING or RUNNING.

        Jobs in ``exclude`` are left out. The first read reports the jobs PREPARING or
        RUNNING as started and nothing as ended. Later reads also report a job that was
        sent meanwhile. The generator also keeps reading while the jobs queue still
        contains a message, which is a job the starter has not recorded yet. A PAUSED job
        counts as ended, because only a ``baton resume`` moves it on.

        Raises
        ------
        ServerExitedError
            If the stack's moto server exits meanwhile.
        TimeoutError
            If a job is still PREPARING or RUNNING, or a job message is still queued,
            after ``timeout_seconds``.
        """
        deadline = time.monotonic() + timeout_seconds
        previous: dict[str, str] | None = None
        while True:
            self.check_server()
            # Counted before the table is read: a job message handled in between has then
            # created its job item before the read.
            pending_messages = self.pending_job_messages()
            jobs = self.list_jobs(exclude=exclude)
            started, ended = [], []
            for job in jobs:
                status_before = None if previous is None else previous.get(job.job_id)
                if job.status in ACTIVE_STATUSES:
                    if status_before not in ACTIVE_STATUSES:
                        started.append(job)
                elif previous is not None and status_before != job.status:
                    ended.append(job)
            previous = {job.job_id: job.status for job in jobs}
            if started or ended:
                yield JobsUpdate(started, ended)

            if pending_messages == 0 and not any(job.status in ACTIVE_STATUSES for job in jobs):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs on the stack did not end within {timeout_seconds:.0f} s")
            time.sleep(poll_seconds)

    def wait(self, job_id: str, timeout_seconds: float = 3600, on_round: Callable[[dict], None] | None = None,
             on_status: Callable[[JobRecord, str | None], None] | None = None,
             on_continued: Callable[[JobRecord], None] | None = None) -> JobRecord:
        """Block until the job succeeds or fails; return its final record.

        Raises :class:`ServerExitedError` or :class:`TimeoutError` as :meth:`follow` does.
        """
        for update in self.follow(job_id, timeout_seconds=timeout_seconds, on_status=on_status,
                                  on_continued=on_continued):
            if isinstance(update, JobRecord):
                return update
            if on_round is not None:
                on_round(update)
        raise AssertionError("follow() ended without a job record")
