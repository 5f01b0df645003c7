"""Settings from the environment: one parser for every variable, and errors that name the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError

from shared import faults
from shared.config import (DEFAULT_MAX_RECEIVE_COUNT, Settings, efs_fsync_enabled, faults_enabled,
                           stack_resource_name)
from shared.errors import BatonError
from tests.conftest import PROJECT_ROOT


@pytest.mark.parametrize("raw, expected", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True),
    ("false", False), ("False", False), ("0", False), ("no", False),
])
def test_switches_parse_same_words(raw, expected):
    assert faults_enabled({"BATON_FAULTS_ENABLED": raw}) is expected
    assert efs_fsync_enabled({"BATON_EFS_FSYNC": raw}) is expected


def test_switches_unset_or_empty_take_default():
    assert faults_enabled({}) is False
    assert faults_enabled({"BATON_FAULTS_ENABLED": ""}) is False
    assert efs_fsync_enabled({}) is True
    assert efs_fsync_enabled({"BATON_EFS_FSYNC": " "}) is True


def test_empty_settings_take_default():
    environment = {"KEEP_CHECKPOINTS": "", "STALL_SECONDS": " ", "STATE_TABLE_NAME": "", "ALLOWED_DATA_ROOTS": ""}

    settings = Settings.from_env(environment)

    assert settings.keep_checkpoints == Settings().keep_checkpoints
    assert settings.stall_seconds == Settings().stall_seconds
    assert settings.state_table_name == Settings().state_table_name
    assert settings.allowed_data_roots == ""


def test_invalid_switch_names_variable_and_fix():
    with pytest.raises(BatonError) as raised:
        efs_fsync_enabled({"BATON_EFS_FSYNC": "off"})

    message = str(raised.value)
    assert message.startswith("invalid BATON_EFS_FSYNC 'off': expected true or false")
    assert "set it to true or false" in message
    assert "unset it to use the default, true" in message


def test_fault_injector_uses_config_parser():
    assert faults.enabled({"BATON_FAULTS_ENABLED": "yes"}) is True
    with pytest.raises(BatonError, match="invalid BATON_FAULTS_ENABLED 'on': expected true or false"):
        faults.enabled({"BATON_FAULTS_ENABLED": "on"})


def test_invalid_fsync_leaves_import_working():
    environment = {"BATON_EFS_FSYNC": "sometimes", "PATH": ""}
    result = subprocess.run([sys.executable, "-c", "import shared.efs; print(shared.efs.FSYNC)"], cwd=PROJECT_ROOT,
                            env=environment, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


@pytest.mark.parametrize("variable", ["BATON_EFS_FSYNC", "BATON_FAULTS_ENABLED"])
def test_settings_reject_invalid_switch(variable):
    with pytest.raises(BatonError, match=f"invalid {variable} 'sometimes': expected true or false"):
        Settings.from_env(environ={variable: "sometimes"})


def test_run_rejects_invalid_switch_before_start(tmp_path):
    from click.testing import CliRunner

    from shared.cli import main

    spec = tmp_path / "spec.json"
    spec.write_text('{"job_id": "never", "model": {"name": "logistic_regression"}, '
                    '"data": {"path": "datasets/missing.csv", "format": "csv"}}')

    result = CliRunner().invoke(main, ["run", str(spec), "--local-dir", str(tmp_path / "local")],
                                env={"BATON_FAULTS_ENABLED": "on"})

    assert result.exit_code == 1
    assert "invalid BATON_FAULTS_ENABLED 'on': expected true or false" in result.output
    assert not (tmp_path / "local" / "efs").exists()


def test_handler_logs_invalid_setting(monkeypatch):
    from shared import handlers

    logged = []
    monkeypatch.setenv("KEEP_CHECKPOINTS", "zero")
    monkeypatch.setattr(handlers, "_services", None)
    monkeypatch.setattr(handlers.logger, "error", lambda message, extra=None: logged.append((message, extra)))
    handler = handlers.sqs_handler("worker", lambda services, record, invocation: None)
    event = {"Records": [{"messageId": "m-1", "receiptHandle": "r", "body": '{"job_id": "j1", "round": 0, "worker": 1}',
                          "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {},
                          "md5OfBody": "", "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:0:q",
                          "awsRegion": "us-east-1"}]}

    # Every record of the batch failed, so Powertools raises instead of returning them.
    with pytest.raises(BatchProcessingError):
        handler(event, None)

    messages = [message for message, _ in logged]
    assert "invalid function configuration; the message will be retried" in messages
    extra = logged[messages.index("invalid function configuration; the message will be retried")][1]
    assert extra["job_id"] == "j1"
    assert extra["error"].startswith("invalid KEEP_CHECKPOINTS 'zero'")


@pytest.mark.parametrize("variable, raw, expected", [
    ("KEEP_CHECKPOINTS", "three", "invalid KEEP_CHECKPOINTS 'three': expected an integer; set it to a whole number "
                                  "such as 3, or unset it to use the default"),
    ("MAX_RECEIVE_COUNT", "5.0", "invalid MAX_RECEIVE_COUNT '5.0': expected an integer; set it to a whole number "
                                 "such as 5, or unset it to use the default"),
    ("STALL_SECONDS", "15m", "invalid STALL_SECONDS '15m': expected a number; set it to a number such as 900.0, or "
                             "unset it to use the default"),
])
def test_invalid_number_names_variable_and_fix(variable, raw, expected):
    with pytest.raises(BatonError) as raised:
        Settings.from_env(environ={variable: raw})

    assert str(raised.value) == expected


def test_max_receive_count_read_from_environment():
    assert Settings.from_env(environ={}).max_receive_count == DEFAULT_MAX_RECEIVE_COUNT
    assert Settings.from_env(environ={"MAX_RECEIVE_COUNT": "7"}).max_receive_count == 7


@pytest.mark.parametrize("raw", ["0", "-2"])
def test_max_receive_count_below_one_rejected(raw):
    with pytest.raises(BatonError) as raised:
        Settings.from_env(environ={"MAX_RECEIVE_COUNT": raw})

    message = str(raised.value)
    assert message.startswith(f"invalid MAX_RECEIVE_COUNT {raw}: SQS receives every message at least once")
    assert "set it to the stack's custom.maxReceiveCount in serverless.yml" in message


def test_stack_resource_name_joins_service_stage_resource():
    assert stack_resource_name("prod", "state") == "baton-prod-state"
    assert stack_resource_name("local", "jobs") == "baton-local-jobs"


def test_for_stage_ignores_environment(monkeypatch):
    monkeypatch.setenv("JOBS_QUEUE_NAME", "another-queue")

    settings = Settings.for_stage("prod")

    assert settings.jobs_queue_name == "baton-prod-jobs"
    assert settings.tasks_queue_name == "baton-prod-tasks"
    assert settings.aggregate_queue_name == "baton-prod-aggregate"
    assert settings.state_table_name == "baton-prod-state"


@pytest.mark.parametrize("variable, raw, words", [
    ("STALL_SECONDS", "0", "invalid STALL_SECONDS 0.0: the watchdog needs a positive number of seconds"),
    ("STALL_SECONDS", "nan", "invalid STALL_SECONDS nan"),
    ("CONTINUATION_MARGIN_SECONDS", "-30", "invalid CONTINUATION_MARGIN_SECONDS -30.0"),
    ("MAX_STEPS_PER_INVOCATION", "-4", "invalid MAX_STEPS_PER_INVOCATION -4: it must be 0 (no bound) or more"),
    ("WATCHDOG_MAX_ATTEMPTS", "-1", "invalid WATCHDOG_MAX_ATTEMPTS -1"),
    ("WORKER_MEMORY_MB", "64", "invalid WORKER_MEMORY_MB 64: Lambda memory is 128 to 10240 MB"),
    ("AGGREGATOR_MEMORY_MB", "20000", "invalid AGGREGATOR_MEMORY_MB 20000: Lambda memory is 128 to 10240 MB"),
])
def test_out_of_range_setting_rejected(variable, raw, words):
    with pytest.raises(BatonError) as raised:
        Settings.from_env(environ={variable: raw})

    assert str(raised.value).startswith(words)


def test_watchdog_logs_invalid_setting(monkeypatch):
    from types import SimpleNamespace

    from functions import watchdog
    from shared import handlers

    logged = []
    monkeypatch.setenv("STALL_SECONDS", "-1")
    monkeypatch.setattr(handlers, "_services", None)
    monkeypatch.setattr(handlers.logger, "error", lambda message, extra=None: logged.append((message, extra)))
    context = SimpleNamespace(function_name="baton-test-watchdog", memory_limit_in_mb=256, aws_request_id="r-1",
                              invoked_function_arn="arn:aws:lambda:us-east-1:000000000000:function:watchdog")

    with pytest.raises(BatonError):
        watchdog.handler({}, context)

    assert logged[0][0] == "invalid function configuration; the watchdog did not run"
    assert logged[0][1]["error"].startswith("invalid STALL_SECONDS -1.0")


def test_stack_settings_carry_function_memory():
    from shared.local.stack import load_serverless_config, load_stack_definition

    params = load_serverless_config()["params"]
    settings = load_stack_definition(stage="prod").settings("/tmp/efs")

    assert settings.worker_memory_mb == params["prod"]["workerMemory"]
    assert settings.aggregator_memory_mb == params["default"]["aggregatorMemory"]


@pytest.mark.parametrize("raw", ["worker=1769,gpu=4096", "worker", "worker=,aggregator=1769"])
def test_function_memory_entry_rejected(raw):
    with pytest.raises(BatonError) as raised:
        Settings.from_env(environ={"FUNCTION_MEMORY_MB": raw})

    assert "in FUNCTION_MEMORY_MB" in str(raised.value)
    assert "expected worker=MB or aggregator=MB" in str(raised.value)
