"""LocalStack in a user's script with no `if __name__ == "__main__":` guard.

Each test runs a script in its own interpreter. The script builds a LocalStack at module
level and writes the ids of the processes the stack started (``started_pids``) to a JSON
file. The test then checks that none of those processes is still running, after a normal
exit without ``stop()``, after a failed ``start()``, and after the script is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import BREAST_CANCER_CSV

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")

# Written at the top of every script: helpers that record each process with its start
# time, so that a later process reusing the id is not mistaken for it. A process already
# gone when recorded gets no start time.
PRELUDE = textwrap.dedent("""
    import json
    import os
    import sys
    from pathlib import Path

    from shared.local.session import LocalStack

    def start_ticks(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except FileNotFoundError:
            return None

    def record(stack, **extra):
        processes = [[pid, start_ticks(pid)] for pid in stack.started_pids]
        Path(sys.argv[1]).write_text(json.dumps({"processes": processes, **extra}))

    print("script body ran in", os.getpid(), flush=True)
""")

SMALL_JOB = {"job_id": "unguarded", "model": {"name": "logistic_regression"},
             "data": {"path": "datasets/breast_cancer.csv", "format": "csv", "skip_rows": 1},
             "training": {"n_workers": 2, "batch_size": 32, "max_rounds": 2}}

# Runs a small job on a stack built at module level and records the stack's processes.
RUN_JOB = f"""
stack = LocalStack(sys.argv[2], concurrency={{"worker": 2}})
stack.start()
stack.import_data({str(BREAST_CANCER_CSV)!r}, "datasets/breast_cancer.csv")
stack.submit({SMALL_JOB!r})
finished = stack.wait("unguarded", timeout_seconds=120)
record(stack, status=finished.status, error=finished.error)
"""

RUN_JOB_WITHOUT_STOP = RUN_JOB + """
# No stop(): the stack must be stopped when the interpreter exits.
"""

FAIL_TO_START = """
# A regular file where the EFS folder should be: moto's server starts, then creating
# the EFS folder fails.
Path(sys.argv[2]).parent.mkdir(parents=True, exist_ok=True)
Path(sys.argv[2]).write_text("not a folder")
stack = LocalStack(sys.argv[2])
try:
    stack.start()
except FileExistsError as error:
    still_running = [pid for pid in stack.started_pids if Path(f"/proc/{pid}").exists()
                     and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    record(stack, error=str(error), running_after_failure=still_running)
"""

RUN_JOB_THEN_WAIT = RUN_JOB + """
# Keep the stack and its warm containers until the test kills this process.
import time
while True:
    time.sleep(1)
"""


def write_script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "unguarded.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    return script


def script_environment() -> dict[str, str]:
    return {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def still_running(processes: list[list]) -> list[int]:
    """Return the recorded pids whose process (same start time if recorded, not a zombie) still exists."""
    running = []
    for pid, ticks in processes:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if ticks in (None, fields[19]) and fields[0] != "Z":
            running.append(pid)
    return running


def wait_until_gone(processes: list[list], timeout_seconds: float) -> list[int]:
    """Return the recorded processes still running once all are gone or ``timeout_seconds`` passed."""
    deadline = time.monotonic() + timeout_seconds
    running = still_running(processes)
    while running and time.monotonic() < deadline:
        time.sleep(0.2)
        running = still_running(processes)
    return running


def run_script(tmp_path: Path, body: str, timeout_seconds: float) -> tuple[subprocess.CompletedProcess, dict]:
    """Run a script to its end; return the finished process and the report it wrote."""
    script = write_script(tmp_path, body)
    report = tmp_path / "report.json"
    completed = subprocess.run([sys.executable, str(script), str(report), str(tmp_path / "efs")],
                               env=script_environment(), capture_output=True, text=True, timeout=timeout_seconds)
    assert completed.returncode == 0, completed.stderr
    return completed, json.loads(report.read_text())


def test_unguarded_script_leaves_no_process(tmp_path):
    completed, result = run_script(tmp_path, RUN_JOB_WITHOUT_STOP, timeout_seconds=300)

    # The containers do not import the script, so its body ran once, in one process.
    assert completed.stdout.count("script body ran in") == 1, completed.stdout
    assert result["status"] == "SUCCEEDED", result["error"]
    assert len(result["processes"]) >= 3, "expected moto's server and at least two containers"
    assert still_running(result["processes"]) == []


def test_failed_start_stops_server(tmp_path):
    _, result = run_script(tmp_path, FAIL_TO_START, timeout_seconds=120)

    assert "efs" in result["error"]
    assert len(result["processes"]) == 1, "expected moto's server, started before the failure"
    assert result["running_after_failure"] == []
    assert still_running(result["processes"]) == []


def test_killed_script_leaves_no_process(tmp_path):
    script = write_script(tmp_path, RUN_JOB_THEN_WAIT)
    report = tmp_path / "report.json"
    with open(tmp_path / "script.log", "wb") as log:
        process = subprocess.Popen([sys.executable, str(script), str(report), str(tmp_path / "efs")],
                                   env=script_environment(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not report.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert report.exists(), f"the script wrote no report; exit code {process.poll()}"
        result = json.loads(report.read_text())
        assert result["status"] == "SUCCEEDED", result["error"]
        assert len(result["processes"]) >= 3
        assert still_running(result["processes"]) == result_pids(result)
    finally:
        # SIGKILL: no atexit handler and no `finally` runs in the script.
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    # Each helper notices within about half a second that its parent is gone; the wait
    # allows for a loaded machine.
    assert wait_until_gone(result["processes"], timeout_seconds=60) == []


def result_pids(result: dict) -> list[int]:
    return [pid for pid, _ in result["processes"]]


def test_local_watchdog_interval_short(tmp_path):
    from shared.local.session import LOCAL_WATCHDOG_SECONDS, LocalStack

    # A failed record is received again after a second here, so a dead-lettered job must
    # not wait for the deployed 5-minute rate before the watchdog's drain marks it FAILED.
    assert LocalStack(tmp_path / "efs").schedule_seconds == {"watchdog": LOCAL_WATCHDOG_SECONDS}
    assert LOCAL_WATCHDOG_SECONDS <= 10
    assert LocalStack(tmp_path / "efs", schedule_seconds={"watchdog": 2}).schedule_seconds == {"watchdog": 2}


@contextlib.contextmanager
def mocked_local_stack(efs_root: Path):
    """Yield a LocalStack whose queues and table live in moto's in-process mock, with no containers."""
    import boto3
    from moto import mock_aws

    from shared.local.session import LocalStack
    from shared.local.stack import create_stack
    from shared.state import StateStore

    stack = LocalStack(efs_root)
    with mock_aws():
        dynamodb = boto3.client("dynamodb", region_name="us-east-1")
        create_stack(stack.definition, boto3.client("sqs", region_name="us-east-1"), dynamodb)
        stack.state = StateStore(dynamodb, stack.definition.table_name())
        yield stack


def test_follow_announces_first_seen_pause(tmp_path):
    from shared.state import PAUSED, PREPARING

    announced = []
    with mocked_local_stack(tmp_path / "efs") as stack:
        # Paused before baton run's first poll of it, as a quick `baton pause` on a loaded machine does.
        stack.state.create_job("quick", "fingerprint", "{}", n_workers=1)
        assert stack.state.set_status("quick", PAUSED, (PREPARING,))

        with pytest.raises(TimeoutError):
            list(stack.follow("quick", poll_seconds=0.05, timeout_seconds=0.2,
                              on_status=lambda record, previous: announced.append((record.status, previous))))

    assert announced == [(PAUSED, None)]


def test_follow_yields_rounds_before_pause(tmp_path):
    from shared.efs import EfsStore
    from shared.state import PAUSED, RUNNING

    files = EfsStore(tmp_path / "efs")
    events = []
    with mocked_local_stack(tmp_path / "efs") as stack:
        stack.state.create_job("paused-after-3", "fingerprint", "{}", n_workers=1)
        stack.state.start_job("paused-after-3", 5)
        for index in range(3):
            files.metrics_path("paused-after-3", index).parent.mkdir(parents=True, exist_ok=True)
            files.metrics_path("paused-after-3", index).write_text(json.dumps({"round": index + 1}))
            assert stack.state.advance_round("paused-after-3", index, {"train_loss": 0.5})
        # Paused after round 3, before baton run's first poll, so one poll finds both.
        assert stack.state.set_status("paused-after-3", PAUSED, (RUNNING,))

        with pytest.raises(TimeoutError):
            for metrics in stack.follow("paused-after-3", poll_seconds=0.05, timeout_seconds=0.2,
                                        on_status=lambda record, previous: events.append(record.status)):
                events.append(metrics["round"])

    assert events == [1, 2, 3, PAUSED], "the pause line comes before the lines of the rounds it counts"
