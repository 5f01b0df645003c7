"""A job's DynamoDB items get a time to live once it has ended, and lose it on resume."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from shared import control
from shared.config import Settings
from shared.errors import BatonError
from shared.handlers import set_services
from shared.services import Services
from shared.state import EXPIRES_AT, RUNNING, SUCCEEDED, _job_key, _round_key
from tests.baton_jobs import breast_cancer_spec, run_job

RETENTION_SECONDS = 90 * 86400


def item(stack, key: dict) -> dict:
    return stack.dynamodb.get_item(TableName=stack.settings.state_table_name, Key=key, ConsistentRead=True)["Item"]


def expires_at(stack, key: dict) -> int | None:
    value = item(stack, key).get(EXPIRES_AT)
    return None if value is None else int(value["N"])


def start_job(stack, job_id: str) -> None:
    """Submit a job and run the starter until it is RUNNING at round 0."""
    stack.submit(breast_cancer_spec(job_id))
    while stack.services.state.get_job(job_id) is None or stack.services.state.get_job(job_id).status != RUNNING:
        assert stack.step("JobsQueue") is not None


def test_round_items_expire_from_aggregation(inprocess_stack):
    before = time.time()
    assert run_job(inprocess_stack, breast_cancer_spec("aggregated")).status == SUCCEEDED

    for round_index in range(6):
        expiry = expires_at(inprocess_stack, _round_key("aggregated", round_index))
        assert before + RETENTION_SECONDS - 1 <= expiry <= time.time() + RETENTION_SECONDS


def test_watchdog_gives_ended_job_expiry(inprocess_stack):
    record = run_job(inprocess_stack, breast_cancer_spec("ended"))
    assert expires_at(inprocess_stack, _job_key("ended")) is None

    counts = control.run_watchdog(inprocess_stack.services)

    assert counts["expiring"] == 1
    ended_at = float(record.attributes["updated_at"])
    assert expires_at(inprocess_stack, _job_key("ended")) == int(ended_at + RETENTION_SECONDS)
    # A second run leaves the expiry as it is.
    assert control.run_watchdog(inprocess_stack.services)["expiring"] == 0
    assert expires_at(inprocess_stack, _job_key("ended")) == int(ended_at + RETENTION_SECONDS)


def test_failed_round_item_expires_with_job(inprocess_stack):
    start_job(inprocess_stack, "stopped")
    # Worker 0 records its result, so round 0 has an item but no metrics.
    assert inprocess_stack.step("TasksQueue") is not None
    assert inprocess_stack.services.state.fail_job("stopped", "failed by the test")
    ended_at = float(inprocess_stack.services.state.get_job("stopped").attributes["updated_at"])

    control.run_watchdog(inprocess_stack.services)

    assert expires_at(inprocess_stack, _round_key("stopped", 0)) == int(ended_at + RETENTION_SECONDS)


def test_running_job_never_expires(inprocess_stack):
    start_job(inprocess_stack, "live")

    counts = control.run_watchdog(inprocess_stack.services)

    assert counts["expiring"] == 0
    assert expires_at(inprocess_stack, _job_key("live")) is None


def test_resume_removes_expiry(inprocess_stack):
    start_job(inprocess_stack, "resumed")
    assert inprocess_stack.services.state.fail_job("resumed", "failed by the test")
    control.run_watchdog(inprocess_stack.services)
    assert expires_at(inprocess_stack, _job_key("resumed")) is not None

    control.resume_job(inprocess_stack.services.state, inprocess_stack.services.queues, "resumed")
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("resumed")
    assert record.status == SUCCEEDED, record.error
    assert expires_at(inprocess_stack, _job_key("resumed")) is None


def test_zero_retention_keeps_items(inprocess_stack):
    settings = replace(inprocess_stack.settings, job_retention_days=0)
    inprocess_stack.services = Services(settings, dynamodb=inprocess_stack.dynamodb, sqs=inprocess_stack.sqs)
    set_services(inprocess_stack.services)
    assert run_job(inprocess_stack, breast_cancer_spec("kept")).status == SUCCEEDED

    counts = control.run_watchdog(inprocess_stack.services)

    assert counts["expiring"] == 0
    assert expires_at(inprocess_stack, _job_key("kept")) is None
    assert expires_at(inprocess_stack, _round_key("kept", 0)) is None


def test_table_time_to_live_enabled(inprocess_stack):
    description = inprocess_stack.dynamodb.describe_time_to_live(TableName=inprocess_stack.settings.state_table_name)

    assert description["TimeToLiveDescription"]["TimeToLiveStatus"] == "ENABLED"
    assert description["TimeToLiveDescription"]["AttributeName"] == EXPIRES_AT


@pytest.mark.parametrize("raw, days", [("0", 0), ("30", 30)])
def test_retention_setting_read(raw, days):
    settings = Settings.from_env(environ={"JOB_RETENTION_DAYS": raw})

    assert settings.job_retention_days == days
    assert settings.job_retention_seconds == (days * 86400.0 if days else None)


def test_negative_retention_rejected():
    with pytest.raises(BatonError, match="invalid JOB_RETENTION_DAYS -1: it must be a number of days, or 0"):
        Settings.from_env(environ={"JOB_RETENTION_DAYS": "-1"})


def test_expiries_bounded_per_run(inprocess_stack, monkeypatch):
    for job_id in ("first", "second", "third"):
        assert run_job(inprocess_stack, breast_cancer_spec(job_id)).status == SUCCEEDED
    monkeypatch.setattr(control, "MAX_EXPIRIES_PER_RUN", 2)

    assert control.run_watchdog(inprocess_stack.services)["expiring"] == 2
    assert control.run_watchdog(inprocess_stack.services)["expiring"] == 1
    assert control.run_watchdog(inprocess_stack.services)["expiring"] == 0
    for job_id in ("first", "second", "third"):
        assert expires_at(inprocess_stack, _job_key(job_id)) is not None
