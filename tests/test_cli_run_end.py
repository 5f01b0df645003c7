"""How `baton run` ends: it waits for other jobs sent to its stack, stops quietly on a signal
or a closed output pipe, ends in one line when its moto server exits, and rejects a second
run on its local folder.

Each test runs `baton run` in its own process and session, reads its output line by line,
and drives the stack with the other baton commands through the endpoint it prints. A
signal goes to the whole process group, as a Ctrl-C in a terminal or `timeout` sends it.
Jobs that must outlast a step of a test have tens of thousands of rounds, so only the test ends them.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from shared.cli import main
from shared.cli_run import last_round_on_efs, own_job_timeout_line
from shared.local.folder_lock import LocalDirLock
from shared.monitor import make_state_store
from shared.state import RUNNING, JobRecord
from tests.conftest import BREAST_CANCER_CSV, PROJECT_ROOT

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")

ENDLESS_ROUNDS = 100_000
# Generous, because the machine may be loaded; the tests never assert a duration.
WAIT_SECONDS = 300
# Printed by the runtime or by Python when a stop is not quiet.
NOISE = ("Traceback", "during an invocation", "failed to deliver", "failed to receive", "Aborted!")


def write_spec(tmp_path: Path, job_id: str, max_rounds: int) -> Path:
    spec = {"job_id": job_id, "model": {"name": "logistic_regression"},
            "data": {"path": "datasets/breast_cancer.csv", "format": "csv", "skip_rows": 1},
            "training": {"n_workers": 2, "batch_size": 32, "max_rounds": max_rounds, "max_epochs": 10_000}}
    path = tmp_path / f"{job_id}.json"
    path.write_text(json.dumps(spec))
    return path


def run_command(spec_file: Path, local_dir: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "shared.cli", "run", str(spec_file), "--local-dir", str(local_dir),
            "--import", f"{BREAST_CANCER_CSV}:datasets/breast_cancer.csv", *options]


class BatonRun:
    """A `baton run` process in its own session, with its output (stdout and stderr) read line by line."""

    def __init__(self, tmp_path: Path, spec_file: Path, *options: str):
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(run_command(spec_file, tmp_path / "baton", *options), cwd=PROJECT_ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.endpoint_url = self.read_until("--endpoint-url").rsplit(" ", 1)[1]
        self.children = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True,
                                       text=True).stdout.split()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def read_until(self, text: str) -> str:
        """Return the first line from here on that contains ``text``."""
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            assert line is not None, f"baton run ended before printing {text!r}:\n" + "\n".join(self.lines)
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"baton run printed no {text!r} within {WAIT_SECONDS} s:\n" + "\n".join(self.lines))

    def finish(self) -> tuple[int, str]:
        """Wait for the process to end; return its exit status and its whole output."""
        self.process.wait(timeout=WAIT_SECONDS)
        while (line := self._queue.get(timeout=WAIT_SECONDS)) is not None:
            self.lines.append(line)
        return self.process.returncode, "\n".join(self.lines)

    def signal_group(self, signal_number: int) -> None:
        os.killpg(self.process.pid, signal_number)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def moto_server_pid(self) -> int:
        """Return the pid of the child process that runs moto's server."""
        for pid in self.children:
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"shared.local.moto_server" in command_line:
                return int(pid)
        raise AssertionError(f"no child of baton run (pids {self.children}) runs shared.local.moto_server")

    def cli(self, *arguments: str):
        result = CliRunner().invoke(main, [*arguments, "--stage", "local", "--endpoint-url", self.endpoint_url])
        assert result.exit_code == 0, result.output
        return result

    def wait_until_running(self, job_id: str) -> None:
        store = make_state_store("local", endpoint_url=self.endpoint_url)
        deadline = time.monotonic() + WAIT_SECONDS
        while (record := store.get_job(job_id)) is None or record.status != RUNNING:
            assert time.monotonic() < deadline, f"job {job_id} is {record and record.status}, not RUNNING"
            time.sleep(0.2)


def running_processes(pids: list[str]) -> list[str]:
    """Return the pids that still belong to a process other than a zombie."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            running.append(pid)
    return running


@pytest.fixture
def start_run(tmp_path):
    runs = []

    def start(spec_file: Path, *options: str) -> BatonRun:
        runs.append(BatonRun(tmp_path, spec_file, *options))
        return runs[-1]

    yield start
    for run in runs:
        # Ends what a failing test left running.
        run.kill()


def test_run_waits_for_other_jobs(tmp_path, start_run):
    host = start_run(write_spec(tmp_path, "host", ENDLESS_ROUNDS))
    host.cli("submit", str(write_spec(tmp_path, "other", ENDLESS_ROUNDS)))
    host.cli("submit", str(write_spec(tmp_path, "paused", ENDLESS_ROUNDS)))
    host.wait_until_running("other")
    host.wait_until_running("paused")
    host.cli("pause", "paused")

    host.cli("cancel", "host")
    announced = host.read_until("baton run waits for them")
    # A job sent while baton run waits is waited for too.
    host.cli("submit", str(write_spec(tmp_path, "late", 3)))
    host.read_until("job late SUCCEEDED after 3 rounds (stop reason max_rounds)")
    host.cli("cancel", "other")
    exit_status, output = host.finish()

    assert exit_status == 1, output
    assert "Error: job host was cancelled after" in output
    assert announced.startswith("other jobs on this stack have not ended: other (")
    assert "paused (" not in announced
    assert "Ctrl-C stops them" in announced
    assert re.search(r"^job other CANCELLED after \d+ of \d+ rounds$", output, re.MULTILINE), output
    assert re.search(r"^not waited for: job paused \(PAUSED, \d+ of \d+ rounds done\) stops with the stack; "
                     r"its files remain in .*/efs/jobs/paused, and `baton run .*/efs/jobs/paused/spec.json "
                     r"--local-dir .*` goes on with it from its last completed round$", output, re.MULTILINE), output
    for noise in NOISE:
        assert noise not in output


@pytest.mark.parametrize("signal_numbers, expected_status", [
    ([signal.SIGINT], 130),
    ([signal.SIGTERM], 143),
    # A closed terminal, or a dropped SSH session.
    ([signal.SIGHUP], 129),
    # Both pending at once; Python runs the handler of the lower signal number first.
    ([signal.SIGINT, signal.SIGTERM], 130),
], ids=["sigint", "sigterm", "sighup", "both-at-once"])
def test_signal_stops_run_quietly(tmp_path, start_run, signal_numbers, expected_status):
    host = start_run(write_spec(tmp_path, "host", ENDLESS_ROUNDS))
    host.read_until("round     1")

    for signal_number in signal_numbers:
        host.signal_group(signal_number)
    exit_status, output = host.finish()

    assert exit_status == expected_status, output
    stopped = re.search(r"^interrupted: job host stopped after (\d+) of \d+ rounds; its files remain in "
                        r"(.*)\. Running the same command again goes on from its last completed round", output, re.MULTILINE)
    assert stopped, output
    last_printed = max(int(line.split()[1]) for line in host.lines if line.startswith("round "))
    assert int(stopped.group(1)) >= last_printed
    assert Path(stopped.group(2)) == tmp_path / "baton" / "efs" / "jobs" / "host"
    for noise in NOISE:
        assert noise not in output
    assert host.children, "baton run started no child processes"
    assert running_processes(host.children) == []


def test_rerun_goes_on_after_ctrl_c(tmp_path, start_run):
    spec_file = write_spec(tmp_path, "host", 40)
    first = start_run(spec_file)
    first.read_until("round     5")
    first.signal_group(signal.SIGINT)
    assert first.finish()[0] == 130

    second = start_run(spec_file)
    exit_status, output = second.finish()

    assert exit_status == 0, output
    continued = re.search(r"^job host continues from round (\d+), where an earlier run of its spec stopped; the "
                          r"metrics of its rounds 1 to (\d+) are in (.*)$", output, re.MULTILINE)
    assert continued, output
    first_round = int(continued.group(1))
    assert first_round >= 5
    assert int(continued.group(2)) == first_round - 1
    printed = [int(line.split()[1]) for line in second.lines if line.startswith("round ")]
    assert printed == list(range(first_round, 41))
    assert "job host SUCCEEDED after 40 rounds" in output


def test_rerun_of_finished_job_reuses_model(tmp_path, start_run):
    spec_file = write_spec(tmp_path, "host", 3)
    assert start_run(spec_file).finish()[0] == 0

    exit_status, output = start_run(spec_file).finish()

    assert exit_status == 0, output
    assert "job host had finished in an earlier run of its spec on the same data, so it is not trained again" in output
    assert "job host SUCCEEDED after 3 rounds" in output
    assert not [line for line in output.splitlines() if line.startswith("round ")]


def test_closed_output_pipe_reported(tmp_path):
    # As `baton run ... | head -4` runs it: the reader closes stdout after a few lines.
    command = run_command(write_spec(tmp_path, "host", ENDLESS_ROUNDS), tmp_path / "baton")
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        for line in process.stdout:
            if line.startswith("round "):
                break
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        process.stdout.close()
        errors = process.stderr.read()
        exit_status = process.wait(timeout=WAIT_SECONDS)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

    assert exit_status == 1, errors
    lines = errors.splitlines()
    assert len(lines) == 1, errors
    stopped = re.fullmatch(r"output pipe closed: job host stopped after \d+ of \d+ rounds; its files remain in "
                           r"(.*)\. Running the same command again goes on from its last completed round.*", lines[0])
    assert stopped, errors
    assert Path(stopped.group(1)) == tmp_path / "baton" / "efs" / "jobs" / "host"
    assert children, "baton run started no child processes"
    assert running_processes(children) == []


def test_ctrl_c_stops_other_jobs(tmp_path, start_run):
    host = start_run(write_spec(tmp_path, "host", ENDLESS_ROUNDS))
    host.cli("submit", str(write_spec(tmp_path, "other", ENDLESS_ROUNDS)))
    host.wait_until_running("other")
    host.cli("cancel", "host")
    host.read_until("baton run waits for them")

    host.signal_group(signal.SIGINT)
    exit_status, output = host.finish()

    assert exit_status == 130, output
    assert "interrupted: job host" not in output
    rerun = re.search(r"^interrupted: job other \(RUNNING, \d+ of \d+ rounds done\) stops with the stack; "
                      r"its files remain in .*/efs/jobs/other, and `baton run (.*) --local-dir (.*)` goes on "
                      r"with it from its last completed round$", output, re.MULTILINE)
    assert rerun, output
    assert Path(rerun.group(1)) == tmp_path / "baton" / "efs" / "jobs" / "other" / "spec.json"
    assert Path(rerun.group(2)) == tmp_path / "baton"
    assert json.loads(Path(rerun.group(1)).read_text())["job_id"] == "other"
    for noise in NOISE:
        assert noise not in output
    assert running_processes(host.children) == []


def test_timeout_names_paused_job(tmp_path, start_run):
    # Long enough for the job to start and be paused on a loaded machine. The test waits it out.
    host = start_run(write_spec(tmp_path, "host", ENDLESS_ROUNDS), "--timeout", "30")
    host.wait_until_running("host")
    host.cli("pause", "host")

    exit_status, output = host.finish()

    assert exit_status == 1, output
    ended = re.search(r"^Error: --timeout of 30 s reached: job host \(PAUSED, \d+ of \d+ rounds done\) stops with "
                      r"the stack; its files remain in (.*), and `baton run (.*) --local-dir (.*)` goes on with it "
                      r"from its last completed round; logs are in (.*)\. baton run waits for its PAUSED job until --timeout, so "
                      r"resume the job sooner with `baton resume host --stage local --endpoint-url (.*)`, or raise "
                      r"--timeout$", output, re.MULTILINE)
    assert ended, output
    local_dir = tmp_path / "baton"
    assert Path(ended.group(1)) == local_dir / "efs" / "jobs" / "host"
    assert Path(ended.group(2)) == local_dir / "efs" / "jobs" / "host" / "spec.json"
    assert Path(ended.group(3)) == local_dir
    assert Path(ended.group(4)) == local_dir / "logs"
    assert ended.group(5) == host.endpoint_url
    assert re.search(r"^job host is PAUSED after \d+ of \d+ rounds; `baton resume host --stage local "
                     rf"--endpoint-url {re.escape(host.endpoint_url)}` continues it, and baton run waits for it up to "
                     r"--timeout$", output, re.MULTILINE), output
    for noise in NOISE:
        assert noise not in output
    assert running_processes(host.children) == []


def make_record(status: str, round_index: int, total_rounds: int) -> JobRecord:
    return JobRecord(job_id="host", status=status, round=round_index, n_workers=2, total_rounds=total_rounds,
                     fingerprint="f", spec_json="{}", error=None, attributes={})


def test_timeout_line_running_or_unrecorded(tmp_path):
    endpoint_url = "http://127.0.0.1:5000"

    running = own_job_timeout_line(make_record(RUNNING, 7, 40), "host", 25.0, tmp_path, endpoint_url)
    unrecorded = own_job_timeout_line(None, "host", 25.0, tmp_path, endpoint_url)

    assert running.startswith("--timeout of 25 s reached: job host (RUNNING, 7 of 40 rounds done) stops with the "
                              f"stack; its files remain in {tmp_path / 'efs' / 'jobs' / 'host'}, and `baton run "
                              f"{tmp_path / 'efs' / 'jobs' / 'host' / 'spec.json'} --local-dir {tmp_path}` goes on "
                              "with it from its last completed round")
    assert running.endswith(f"; logs are in {tmp_path / 'logs'}. Raise --timeout to wait longer")
    assert "baton resume" not in running
    assert unrecorded == (f"--timeout of 25 s reached before the starter recorded job host, so it did not start; "
                          f"logs are in {tmp_path / 'logs'}. Running the same command again sends it; raise "
                          "--timeout to wait longer")


def test_second_run_on_folder_rejected(tmp_path, start_run):
    spec_file = write_spec(tmp_path, "host", ENDLESS_ROUNDS)
    host = start_run(spec_file)
    host.read_until("round     2")
    job_dir = tmp_path / "baton" / "efs" / "jobs" / "host"
    spec_inode = (job_dir / "spec.json").stat().st_ino

    # The short --timeout ends a second run that the lock failed to reject.
    second = subprocess.run(run_command(spec_file, tmp_path / "baton", "--fresh", "--timeout", "5"),
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=WAIT_SECONDS)

    assert second.returncode == 1, second.stdout + second.stderr
    assert second.stdout == ""
    lines = second.stderr.splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(f"Error: the local folder {tmp_path / 'baton'} is in use by another baton run "
                               f"(pid {host.process.pid}), with its stack on {host.endpoint_url}.")
    assert (f"`baton submit {spec_file} --stage local --endpoint-url {host.endpoint_url}`") in lines[0]
    assert "or pass another --local-dir" in lines[0]
    # --fresh deleted nothing, and the first run's job goes on.
    assert (job_dir / "spec.json").stat().st_ino == spec_inode
    assert (job_dir / "metrics" / "1.json").is_file()
    host.read_until("round     4")

    host.signal_group(signal.SIGINT)
    exit_status, output = host.finish()
    assert exit_status == 130, output
    for noise in NOISE:
        assert noise not in output
    # The lock ends with the run and its stack.
    with LocalDirLock(tmp_path / "baton"):
        pass


def test_moto_exit_ends_run_in_one_line(tmp_path, start_run):
    host = start_run(write_spec(tmp_path, "host", ENDLESS_ROUNDS))
    server_pid = host.moto_server_pid()
    host.read_until("round     3")

    os.kill(server_pid, signal.SIGKILL)
    exit_status, output = host.finish()

    assert exit_status == 1, output
    after_rounds = [line for line in host.lines if not line.startswith("round ")][3:]
    assert len(after_rounds) == 1, output
    ended = re.fullmatch(rf"Error: moto's server \(pid {server_pid}\) exited with code -9 \(killed by SIGKILL\); "
                         r"see its log (.*)\. The stack's queues and table are gone with it: job host stopped after "
                         r"round (\d+), the last in (.*), and running the same command again goes on from its last "
                         r"completed round, reusing the data it prepared", after_rounds[0])
    assert ended, output
    assert Path(ended.group(1)) == tmp_path / "baton" / "logs" / "moto.log"
    metrics_dir = tmp_path / "baton" / "efs" / "jobs" / "host" / "metrics"
    assert Path(ended.group(3)) == metrics_dir
    last_round = int(ended.group(2))
    last_printed = max(int(line.split()[1]) for line in host.lines if line.startswith("round "))
    assert last_round >= last_printed
    assert (metrics_dir / f"{last_round}.json").is_file()
    assert not (metrics_dir / f"{last_round + 1}.json").exists()
    for noise in NOISE:
        assert noise not in output
    assert running_processes(host.children) == []


def test_last_round_skips_earlier_run(tmp_path):
    efs_root = tmp_path / "efs"
    metrics_dir = efs_root / "jobs" / "rerun" / "metrics"
    metrics_dir.mkdir(parents=True)
    # The earlier run finished, and this run is preparing other data, so its metrics do not count.
    (efs_root / "jobs" / "rerun" / "model").mkdir()
    (efs_root / "jobs" / "rerun" / "model" / "model.json").write_text("{}")
    spec_path = efs_root / "jobs" / "rerun" / "spec.json"
    spec_path.write_text("{}")
    for round_number in range(1, 6):
        (metrics_dir / f"{round_number}.json").write_text("{}")
    started = time.time()
    # Rounds 3 to 5 and the spec are from an earlier run, an hour before this one.
    for name in ("3.json", "4.json", "5.json"):
        os.utime(metrics_dir / name, (started - 3600, started - 3600))
    os.utime(spec_path, (started - 10, started - 10))

    assert last_round_on_efs(efs_root, "rerun", since=started - 20) == 2
    assert last_round_on_efs(efs_root, "rerun", since=started) is None
    assert last_round_on_efs(efs_root, "missing", since=started - 20) is None
    os.utime(spec_path, (started + 10, started + 10))
    assert last_round_on_efs(efs_root, "rerun", since=started - 20) == 0


def test_last_round_counts_continued_run(tmp_path):
    efs_root = tmp_path / "efs"
    metrics_dir = efs_root / "jobs" / "continued" / "metrics"
    metrics_dir.mkdir(parents=True)
    spec_path = efs_root / "jobs" / "continued" / "spec.json"
    spec_path.write_text("{}")
    started = time.time()
    # Rounds 1 to 4 are from an unfinished earlier run, which this run goes on from.
    for round_number in range(1, 6):
        (metrics_dir / f"{round_number}.json").write_text("{}")
        if round_number < 5:
            os.utime(metrics_dir / f"{round_number}.json", (started - 3600, started - 3600))

    assert last_round_on_efs(efs_root, "continued", since=started - 20) == 5


def test_status_change_lines(capsys):
    from types import SimpleNamespace

    from shared.cli_run import _echo_status_change

    paused = SimpleNamespace(job_id="p1", status="PAUSED", round=4, total_rounds=10)
    running = SimpleNamespace(job_id="p1", status="RUNNING", round=7, total_rounds=10)

    _echo_status_change(paused, "RUNNING", "http://127.0.0.1:5000")
    _echo_status_change(running, "PAUSED", "http://127.0.0.1:5000")

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("job p1 is PAUSED after 4 of 10 rounds")
    assert "`baton resume p1 --stage local --endpoint-url http://127.0.0.1:5000`" in lines[0]
    assert lines[1] == "job p1 resumed"


@pytest.mark.parametrize("r2, hinted", [(-282354.0, True), (0.54, False)])
def test_negative_r2_summary_hints_scaling(tmp_path, capsys, r2, hinted):
    from shared.cli_run import _report_local_job

    spec = {"model": {"name": "linear_regression"}}
    record = JobRecord(job_id="unscaled", status="SUCCEEDED", round=40, n_workers=2, total_rounds=40,
                       fingerprint="", spec_json=json.dumps(spec), error=None,
                       attributes={"stop_reason": "max_rounds", "train_loss": 1.0e9, "validation_loss": 1.2e9,
                                   "validation_r2": r2})

    assert _report_local_job(record, tmp_path, elapsed=3.0) is None

    output = capsys.readouterr().out
    assert ("validation_r2 is below 0" in output) is hinted
    assert ("data.standardize true and data.standardize_target true" in output) is hinted


def test_one_round_named_singular(tmp_path, capsys):
    from shared.cli_run import _report_local_job, job_outcome_line

    record = JobRecord(job_id="short", status="SUCCEEDED", round=1, n_workers=2, total_rounds=1, fingerprint="",
                       spec_json="{}", error=None, attributes={"stop_reason": "max_rounds"})

    assert job_outcome_line(record) == "job short SUCCEEDED after 1 round (stop reason max_rounds)"
    assert _report_local_job(record, tmp_path, elapsed=3.0) is None
    assert "job short SUCCEEDED after 1 round in 3.0 s" in capsys.readouterr().out


def failed_on_missing_file(field: str, path: str) -> JobRecord:
    spec = {"data": {"path": "datasets/train.csv", field: path}}
    error = (f"data file not found: '{path}'; check data.{field} and that the file was copied onto EFS")
    return JobRecord(job_id="missing", status="FAILED", round=0, n_workers=2, total_rounds=0, fingerprint="",
                     spec_json=json.dumps(spec), error=error, attributes={})


@pytest.mark.parametrize("field", ["path", "validation_path"])
def test_missing_data_names_local_file(tmp_path, field):
    from shared.cli_run import _report_local_job

    efs_root = tmp_path / "efs"

    failure = _report_local_job(failed_on_missing_file(field, "datasets/casp/CASP.csv"), efs_root, elapsed=1.0)

    message = failure.format_message()
    assert message.startswith("job missing FAILED: data file not found: 'datasets/casp/CASP.csv'")
    assert f"data.{field} names {efs_root / 'datasets' / 'casp' / 'CASP.csv'}" in message
    assert "add --import SOURCE:datasets/casp/CASP.csv to the baton run command" in message


def test_missing_data_hint_skips_present_file(tmp_path):
    from shared.cli_run import _report_local_job

    efs_root = tmp_path / "efs"
    # A link to a missing file: the path exists on the local EFS, so copying onto it is not the fix.
    (efs_root / "datasets").mkdir(parents=True)
    (efs_root / "datasets" / "link.csv").symlink_to(tmp_path / "gone.csv")

    failure = _report_local_job(failed_on_missing_file("path", "datasets/link.csv"), efs_root, elapsed=1.0)

    assert "--import" not in failure.format_message()


@pytest.mark.parametrize("option, field", [("--data", "path"), ("--validation-data", "validation_path")])
def test_run_rejects_s3_data_before_stack(tmp_path, option, field):
    spec_file = write_spec(tmp_path, "from-s3", max_rounds=2)

    result = CliRunner().invoke(main, ["run", str(spec_file), "--local-dir", str(tmp_path / "baton"),
                                       option, "s3://mybucket/a9a/a9a"])

    assert result.exit_code == 1, result.output
    assert f"data.{field} s3://mybucket/a9a/a9a is an S3 object" in result.output
    assert f"reads data only from its EFS folder {tmp_path / 'baton' / 'efs'}" in result.output
    assert f"`aws s3 cp s3://mybucket/a9a/a9a a9a`, then pass --import a9a:datasets/a9a {option} datasets/a9a" \
        in result.output
    assert "BATON_ALLOWED_S3_BUCKETS" not in result.output
    assert not (tmp_path / "baton").exists(), "the check comes before the local folder is used"


def write_earlier_spec(efs_root: Path, spec_file: Path) -> None:
    """Write the spec in ``spec_file`` where the starter keeps the spec of the job it names."""
    spec = json.loads(spec_file.read_text())
    job_dir = efs_root / "jobs" / spec["job_id"]
    job_dir.mkdir(parents=True)
    (job_dir / "spec.json").write_text(json.dumps(spec))


def test_run_rejects_changed_spec_before_stack(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec_file = write_spec(tmp_path, "changed", max_rounds=2)
    write_earlier_spec(tmp_path / ".baton" / "efs", spec_file)

    result = CliRunner().invoke(main, ["run", str(spec_file), "--n-workers", "8"])

    assert result.exit_code == 1, result.output
    assert ("EFS already contains files of an earlier job 'changed' with a different spec in "
            "'.baton/efs/jobs/changed'; choose a new job_id with --job-id") in result.output
    assert "`baton run --fresh`" in result.output
    assert "local stack on" not in result.output, "the stack started before the check"


def test_job_folder_check_passes_same_spec(tmp_path):
    from shared.cli_run import check_local_job_folder

    spec_file = write_spec(tmp_path, "unchanged", max_rounds=2)
    spec = json.loads(spec_file.read_text())

    check_local_job_folder(tmp_path / "efs", spec)
    write_earlier_spec(tmp_path / "efs", spec_file)
    check_local_job_folder(tmp_path / "efs", spec)


def write_metrics_files(efs_root: Path, job_id: str, rounds: list[dict]) -> None:
    """Write a job's spec and one metrics file per round, as the starter and the aggregator write them."""
    metrics_dir = efs_root / "jobs" / job_id / "metrics"
    metrics_dir.mkdir(parents=True)
    (efs_root / "jobs" / job_id / "spec.json").write_text("{}")
    for entry in rounds:
        (metrics_dir / f"{entry['round']}.json").write_text(json.dumps(entry))


def succeeded(job_id: str, model: str, attributes: dict) -> JobRecord:
    return JobRecord(job_id=job_id, status="SUCCEEDED", round=24, n_workers=2, total_rounds=24, fingerprint="",
                     spec_json=json.dumps({"model": {"name": model}}), error=None,
                     attributes={"stop_reason": "max_epochs", **attributes})


def test_summary_train_loss_over_last_epoch(tmp_path, capsys):
    from shared.cli_run import _report_local_job

    # 12 rounds an epoch, of 32 rows but the last of each epoch, which trains on the 2 rows left.
    rounds = [{"round": number, "epoch": number / 12, "n_samples": 2 if number % 12 == 0 else 32,
               "train_loss": 5000.0 if number % 12 == 0 else 1000.0 + number} for number in range(1, 25)]
    write_metrics_files(tmp_path / "efs", "diabetes", rounds)
    last_epoch = rounds[12:]
    expected = sum(entry["train_loss"] * entry["n_samples"] for entry in last_epoch) / sum(
        entry["n_samples"] for entry in last_epoch)

    _report_local_job(succeeded("diabetes", "mlp_regressor", {"train_loss": 5000.0, "validation_r2": 0.5}),
                      tmp_path / "efs", elapsed=2.0)

    output = capsys.readouterr().out
    assert f"  train_loss (last epoch)  {expected:.5f} (half the mean squared error)" in output
    assert "5000.00000" not in output, "the summary shows the loss of the epoch's 2 leftover rows"


def test_summary_of_short_job_covers_all_rounds(tmp_path, capsys):
    from shared.cli_run import _report_local_job

    rounds = [{"round": number, "epoch": number / 32, "n_samples": 64, "train_loss": float(number)}
              for number in range(1, 5)]
    write_metrics_files(tmp_path / "efs", "short", rounds)

    _report_local_job(succeeded("short", "logistic_regression", {"train_loss": 4.0}), tmp_path / "efs", elapsed=1.0)

    assert "  train_loss (all rounds)  2.50000\n" in capsys.readouterr().out


def test_kmeans_output_shows_validation_inertia(tmp_path, capsys):
    from shared.cli_run import _report_local_job
    from shared.monitor import format_round

    rounds = [{"round": number, "epoch": float(number), "n_samples": 1347, "train_loss": 40.0 - number,
               "validation_loss": 41.0 - number, "validation_inertia": 450 * (41.0 - number)}
              for number in range(1, 4)]
    write_metrics_files(tmp_path / "efs", "clusters", rounds)

    _report_local_job(succeeded("clusters", "kmeans", {"train_loss": 37.0, "validation_loss": 38.0}),
                      tmp_path / "efs", elapsed=1.0)

    assert format_round(rounds[-1]).endswith("val loss 38.00000  val inertia 17100.00000")
    assert "  validation_inertia       17100.00000\n" in capsys.readouterr().out
