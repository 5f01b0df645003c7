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


def test_invalid_fsync_fails_efs_import():
    environment = {"BATON_EFS_FSYNC": "sometimes", "PATH": ""}
    result = subprocess.run([sys.executable, "-c", "import shared.efs"], cwd=PROJECT_ROOT, env=environment,
                            capture_output=True, text=True, timeout=120)

    assert result.returncode != 0
    assert "invalid BATON_EFS_FSYNC 'sometimes': expected true or false" in result.stderr


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
