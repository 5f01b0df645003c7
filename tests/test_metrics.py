"""Round metrics leave the aggregator as CloudWatch embedded metric format (EMF) lines."""

from __future__ import annotations

import json

from shared.metrics import ROUND_METRICS, publish_round_metrics


def emf_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{") and "_aws" in line]


def single_value(value):
    # EMF allows a list of values per metric, and aws-lambda-powertools 3.37 writes a
    # single value as a one-element list.
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def test_round_metrics_written_as_emf(capsys, monkeypatch):
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "BatonTest")
    monkeypatch.delenv("POWERTOOLS_METRICS_DISABLED", raising=False)
    metrics = {"round": 3, "round_seconds": 2.5, "worker_seconds": 7.0, "aggregate_seconds": 0.4,
               "train_loss": 0.31, "validation_loss": 0.35, "validation_accuracy": 0.87,
               "efs_bytes_read": 1_000_000, "efs_bytes_written": 20_000, "cost_usd": 0.00012}

    publish_round_metrics("emf-job", 3, metrics)

    lines = emf_lines(capsys.readouterr().out)
    assert len(lines) == 1
    line = lines[0]
    directive = line["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "BatonTest"
    units = {entry["Name"]: entry["Unit"] for entry in directive["Metrics"]}
    assert units["RoundDuration"] == "Seconds"
    assert units["EfsBytesRead"] == "Bytes"
    assert single_value(line["RoundDuration"]) == 2.5
    assert single_value(line["ValidationAccuracy"]) == 0.87
    assert single_value(line["RoundCostUSD"]) == 0.00012
    # Job and round are metadata, never dimensions: a dimension per job would bill a metric per job.
    assert line["job_id"] == "emf-job"
    assert line["round"] == 3
    assert all("job_id" not in dimensions for dimensions in directive["Dimensions"])


def test_missing_and_invalid_values_left_out(capsys, monkeypatch):
    monkeypatch.delenv("POWERTOOLS_METRICS_DISABLED", raising=False)
    publish_round_metrics("emf-job", 0, {"train_loss": float("nan"), "round_seconds": 1.0, "validation_r2": None})

    line = emf_lines(capsys.readouterr().out)[0]
    names = {entry["Name"] for entry in line["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert names == {"RoundDuration"}


def test_every_round_metric_has_a_unit():
    for key, (name, unit) in ROUND_METRICS.items():
        assert name[0].isupper(), key
        assert unit is not None, key
