"""Settings from the environment: one parser for every variable, and errors that name the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

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

    with pytest.raises(Exception):
        handler(event, None)

    messages = [message for message, _ in logged]
    assert "invalid function configuration; the message will be retried" in messages
    extra = logged[messages.index("invalid function configuration; the message will be retried")][1]
    assert extra["job_id"] == "j1"
    assert extra["error"].startswith("invalid KEEP_CHECKPOINTS 'zero'")
