"""Pause, resume and cancel from the CLI, dead letters, and resume after a fixed failure.

One local stack serves every test; each job equals a fault-free job of the same spec.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from click.testing import CliRunner

from shared.cli import main
from shared.local.session import LocalStack
from tests.reliability_support import FAST_RETRY_SECONDS, a9a_spec, params_digest, wait_all, write_a9a_subset

SPEC = {"n_workers": 2, "batch_size": 256, "max_rounds": 30, "max_epochs": 30, "seed": 2}
# The rule fires on every allowed receive of one task (maxReceiveCount is 5), so the task
# is dead-lettered; after that the rule is used up, which stands for fixing the cause.
FAILING_RULE = {"step": "worker.before_read", "kind": "raise", "job_id": "fails-then-resumes", "round": 2,
                "worker": 0, "times": 5}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("control")
    efs_root = work_dir / "efs"
    environment = {"BATON_FAULTS_ENABLED": "true", "BATON_FAULTS": json.dumps([FAILING_RULE]),
                   "BATON_FAULTS_DIR": str(work_dir / "faults")}
    with LocalStack(efs_root, extra_environment=environment, retry_delay_seconds=FAST_RETRY_SECONDS,
                    schedule_seconds={"watchdog": 2}) as stack:
        stack.data_path = write_a9a_subset(efs_root, 3000)
        stack.submit(a9a_spec("reference", stack.data_path, **SPEC))
        wait_all(stack, ["reference"], timeout_seconds=120)
        yield stack


def cli(stack, *args: str):
    return CliRunner().invoke(main, [*args, "--stage", "local", "--endpoint-url", stack.endpoint_url])


def wait_for_round(stack, job_id: str, round_index: int, timeout_seconds: float = 60) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        record = stack.state.get_job(job_id)
        if record is not None and record.round >= round_index:
            return
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not reach round {round_index}")


def test_pause_holds_and_resume_finishes(stack):
    stack.submit(a9a_spec("paused", stack.data_path, **SPEC))
    wait_for_round(stack, "paused", 3)

    paused = cli(stack, "pause", "paused")
    assert paused.exit_code == 0, paused.output
    time.sleep(1.5)
    held_round = stack.state.get_job("paused").round
    time.sleep(1.5)
    assert stack.state.get_job("paused").status == "PAUSED"
    assert stack.state.get_job("paused").round == held_round
    # The job item's round index equals the rounds done, which is what the CLI prints.
    assert f"is now PAUSED, {held_round} of {SPEC['max_rounds']} rounds done" in paused.output

    resumed = cli(stack, "resume", "paused")
    assert resumed.exit_code == 0, resumed.output
    record = wait_all(stack, ["paused"], timeout_seconds=120)["paused"]
    assert record.status == "SUCCEEDED", record.error
    assert params_digest(stack.efs_root, "paused") == params_digest(stack.efs_root, "reference")


def test_wait_reports_pause_and_resume(stack):
    stack.submit(a9a_spec("followed", stack.data_path, **SPEC))
    changes = []
    waiter = threading.Thread(target=lambda: stack.wait(
        "followed", timeout_seconds=150, on_status=lambda record, previous: changes.append((previous, record.status))))
    waiter.start()
    wait_for_round(stack, "followed", 3)

    assert cli(stack, "pause", "followed").exit_code == 0
    # The waiter polls every 0.1 s, but a loaded machine may slow its polls down.
    deadline = time.monotonic() + 60
    while ("RUNNING", "PAUSED") not in changes and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cli(stack, "resume", "followed").exit_code == 0
    waiter.join(timeout=160)

    assert not waiter.is_alive()
    # A first poll during preparation also reports PREPARING to RUNNING.
    assert [change for change in changes if "PAUSED" in change] == [("RUNNING", "PAUSED"), ("PAUSED", "RUNNING")]


def test_cancel_stops_job(stack):
    stack.submit(a9a_spec("cancelled", stack.data_path, **SPEC))
    wait_for_round(stack, "cancelled", 2)

    result = cli(stack, "cancel", "cancelled")

    assert result.exit_code == 0, result.output
    time.sleep(1.5)
    record = stack.state.get_job("cancelled")
    assert record.status == "CANCELLED"
    assert record.round < SPEC["max_rounds"]
    assert cli(stack, "resume", "cancelled").exit_code != 0


def test_pause_of_finished_job_is_rejected(stack):
    result = cli(stack, "pause", "reference")
    assert result.exit_code != 0
    assert "only a RUNNING job can be paused" in result.output


def test_dead_letter_fails_job_then_resume_finishes(stack):
    stack.submit(a9a_spec("fails-then-resumes", stack.data_path, **SPEC))
    record = wait_all(stack, ["fails-then-resumes"], timeout_seconds=120)["fails-then-resumes"]
    assert record.status == "FAILED"
    assert "dead-letter queue" in record.error
    assert record.round == 2

    resumed = cli(stack, "resume", "fails-then-resumes")
    assert resumed.exit_code == 0, resumed.output
    record = wait_all(stack, ["fails-then-resumes"], timeout_seconds=120)["fails-then-resumes"]
    assert record.status == "SUCCEEDED", record.error
    assert params_digest(stack.efs_root, "fails-then-resumes") == params_digest(stack.efs_root, "reference")


def test_watchdog_drains_dead_letter_queue(stack):
    deadline = time.monotonic() + 30
    url = stack.queue_urls["TasksDeadLetterQueue"]
    while time.monotonic() < deadline:
        attributes = stack.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
        if attributes["Attributes"]["ApproximateNumberOfMessages"] == "0":
            break
        time.sleep(0.5)
    assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "0"
    assert any(invocation.outcome == "ok" for invocation in stack.runtime.lanes["watchdog"].invocations)


def test_resume_after_missing_data_is_fixed(stack):
    spec = a9a_spec("data-later", "datasets/arrives-later", **SPEC)
    stack.submit(spec)
    record = wait_all(stack, ["data-later"], timeout_seconds=60)["data-later"]
    assert record.status == "FAILED"
    assert "arrives-later" in record.error

    write_a9a_subset(stack.efs_root, 3000, "arrives-later")
    resumed = cli(stack, "resume", "data-later")
    assert resumed.exit_code == 0, resumed.output
    record = wait_all(stack, ["data-later"], timeout_seconds=120)["data-later"]
    assert record.status == "SUCCEEDED", record.error
    assert params_digest(stack.efs_root, "data-later") == params_digest(stack.efs_root, "reference")


def test_resume_restarts_failed_preparation(stack):
    # Parts of 64 KiB make a preparation of several steps, each in its own invocation, and
    # the malformed line falls in a later part than the first.
    good = stack.efs_root / stack.data_path
    lines = good.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2500] = "+1 3:1 oops:1\n"
    broken = good.with_name("broken-later-part")
    broken.write_text("".join(lines), encoding="utf-8")
    spec = a9a_spec("prepare-again", f"datasets/{broken.name}", **SPEC)
    spec["data"]["part_bytes"] = 65536
    stack.submit(spec)
    record = wait_all(stack, ["prepare-again"], timeout_seconds=60)["prepare-again"]
    assert record.status == "FAILED"
    assert "malformed libsvm line 2501" in record.error

    unfixed = cli(stack, "resume", "prepare-again")
    assert unfixed.exit_code == 0, unfixed.output
    record = wait_all(stack, ["prepare-again"], timeout_seconds=60)["prepare-again"]
    assert record.status == "FAILED"
    assert "malformed libsvm line 2501" in record.error

    broken.write_bytes(good.read_bytes())
    fixed = cli(stack, "resume", "prepare-again")
    assert fixed.exit_code == 0, fixed.output
    record = wait_all(stack, ["prepare-again"], timeout_seconds=120)["prepare-again"]
    assert record.status == "SUCCEEDED", record.error
    assert params_digest(stack.efs_root, "prepare-again") == params_digest(stack.efs_root, "reference")


def test_resume_goes_back_past_damaged_state(stack):
    stack.submit(a9a_spec("state-damaged", stack.data_path, **SPEC))
    wait_for_round(stack, "state-damaged", 3)
    assert cli(stack, "pause", "state-damaged").exit_code == 0
    # A round being aggregated when the pause landed ends without advancing.
    time.sleep(1.5)
    held_round = stack.state.get_job("state-damaged").round
    state_file = stack.efs_root / "jobs" / "state-damaged" / "rounds" / str(held_round) / "state.npz"
    state_file.write_bytes(state_file.read_bytes()[:100])

    assert cli(stack, "resume", "state-damaged").exit_code == 0
    record = wait_all(stack, ["state-damaged"], timeout_seconds=60)["state-damaged"]
    assert record.status == "FAILED"
    assert f"round state file 'jobs/state-damaged/rounds/{held_round}/state.npz' is damaged" in record.error
    assert "run `baton resume state-damaged`" in record.error

    repaired = cli(stack, "resume", "state-damaged")
    assert repaired.exit_code == 0, repaired.output
    assert "is now PREPARING, going back to the latest intact round state" in repaired.output
    record = wait_all(stack, ["state-damaged"], timeout_seconds=120)["state-damaged"]
    assert record.status == "SUCCEEDED", record.error
    assert record.attributes["rounds_rerun"] == 1
    assert params_digest(stack.efs_root, "state-damaged") == params_digest(stack.efs_root, "reference")
