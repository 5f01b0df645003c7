"""The lock that keeps a second `baton run` off a local folder, held by real processes.

Each holder is a Python process that takes the lock and waits. The tests end every
process they start by its pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shared.cli_run import local_dir_busy_message
from shared.local.folder_lock import LOCK_FILE_NAME, LocalDirBusyError, LocalDirLock, LockHolder
from tests.conftest import PROJECT_ROOT

ENDPOINT_URL = "http://127.0.0.1:4566"
WAIT_SECONDS = 60

# Takes the lock on argv[1], records ENDPOINT_URL, starts `sleep` with the lock's
# descriptor, prints the sleeper's pid and waits until its standard input closes.
HOLDER = textwrap.dedent(f"""
    import subprocess, sys
    from shared.local.folder_lock import LocalDirLock

    lock = LocalDirLock(sys.argv[1]).acquire()
    lock.record({ENDPOINT_URL!r})
    sleeper = subprocess.Popen(["sleep", "600"], pass_fds=(lock.fd,))
    print(sleeper.pid, flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def start_holder(tmp_path):
    started = []

    def start() -> tuple[subprocess.Popen, int]:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "baton")], cwd=PROJECT_ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        sleeper_pid = int(holder.stdout.readline())
        started.append((holder, sleeper_pid))
        return holder, sleeper_pid

    yield start
    for holder, sleeper_pid in started:
        holder.kill()
        holder.wait(timeout=WAIT_SECONDS)
        try:
            os.kill(sleeper_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until_gone(pid: int) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, f"process {pid} did not exit"
        time.sleep(0.05)


def test_lock_rejects_second_process(tmp_path, start_holder):
    holder, _ = start_holder()
    lock_path = tmp_path / "baton" / LOCK_FILE_NAME
    recorded = lock_path.read_bytes()

    with pytest.raises(LocalDirBusyError) as rejected:
        LocalDirLock(tmp_path / "baton").acquire()

    assert rejected.value.holder == LockHolder(holder.pid, ENDPOINT_URL)
    assert rejected.value.holder.is_running()
    assert lock_path.read_bytes() == recorded
    assert json.loads(recorded) == {"pid": holder.pid, "endpoint_url": ENDPOINT_URL}


def test_lock_lasts_until_child_exits(tmp_path, start_holder):
    holder, sleeper_pid = start_holder()

    holder.kill()
    holder.wait(timeout=WAIT_SECONDS)
    with pytest.raises(LocalDirBusyError) as rejected:
        LocalDirLock(tmp_path / "baton").acquire()
    assert rejected.value.holder.pid == holder.pid
    assert not rejected.value.holder.is_running()

    os.kill(sleeper_pid, signal.SIGKILL)
    wait_until_gone(sleeper_pid)
    with LocalDirLock(tmp_path / "baton") as lock:
        assert json.loads((tmp_path / "baton" / LOCK_FILE_NAME).read_text()) == {"pid": os.getpid(),
                                                                                 "endpoint_url": None}
        assert lock.fd is not None
    assert lock.fd is None


def test_lock_released_when_holder_ends(tmp_path, start_holder):
    holder, sleeper_pid = start_holder()
    os.kill(sleeper_pid, signal.SIGKILL)
    wait_until_gone(sleeper_pid)

    holder.stdin.close()
    holder.wait(timeout=WAIT_SECONDS)

    with LocalDirLock(tmp_path / "baton"):
        pass


def test_busy_message_while_stack_starts(tmp_path):
    message = local_dir_busy_message(tmp_path, LockHolder(os.getpid(), None), None, True)

    assert f"in use by another baton run (pid {os.getpid()}), whose stack is still starting" in message
    assert "`baton submit --stage local --endpoint-url URL` with the same spec options" in message
    assert "\n" not in message


def test_busy_message_after_holder_ended(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ended_pid = int(ended.stdout)

    message = local_dir_busy_message(tmp_path, LockHolder(ended_pid, ENDPOINT_URL), tmp_path / "job.json", False)

    assert f"its baton run (pid {ended_pid}) has ended" in message
    assert "try again in a few seconds" in message


def test_busy_message_without_record(tmp_path):
    message = local_dir_busy_message(tmp_path, LockHolder(None, None), tmp_path / "job.json", False)

    assert "another baton run (pid unknown)" in message
    assert f"whose lock file {tmp_path / LOCK_FILE_NAME} could not be read" in message
    assert "--endpoint-url URL" in message
