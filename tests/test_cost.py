"""Cost estimates against hand-computed figures, and the budget stop."""

from __future__ import annotations

import json
import time

import pytest

from shared import cost
from shared.state import SUCCEEDED


def breast_cancer_spec(job_id: str = "costed", **training) -> dict:
    return {
        "job_id": job_id,
        "model": {"name": "logistic_regression", "alpha": 1e-4},
        "optimizer": {"name": "momentum", "learning_rate": 0.1, "momentum": 0.9},
        "data": {"path": "datasets/breast_cancer.csv", "format": "csv", "skip_rows": 1, "validation_fraction": 0.2,
                 "standardize": True},
        "training": {"n_workers": 2, "batch_size": 16, "max_rounds": 6, "seed": 5, **training},
    }


def test_round_cost_matches_hand_computation():
    usage = cost.RoundUsage(
        architecture="x86_64", lambda_gb_seconds=100.0, lambda_requests=5, sqs_requests=20,
        dynamodb_read_units=10, dynamodb_write_units=8, efs_bytes_read=2**30, efs_bytes_written=2**29,
        efs_stored_bytes=2 * 2**30, round_seconds=730 * 3600)

    estimate = cost.estimate_round_cost(usage)

    # 100 GB-s x $0.0000166667 + 5 x $0.0000002
    assert estimate.lambda_usd == pytest.approx(0.00166667 + 0.000001, rel=1e-9)
    # 20 x $0.0000004
    assert estimate.sqs_usd == pytest.approx(0.000008, rel=1e-9)
    # 10 x $0.000000125 + 8 x $0.000000625
    assert estimate.dynamodb_usd == pytest.approx(0.00000625, rel=1e-9)
    # 2 GB for one month x $0.30 + 1 GB read x $0.03 + 0.5 GB written x $0.06
    assert estimate.efs_usd == pytest.approx(0.66, rel=1e-9)
    # 0.66 + 0.00166767 + 0.000008 + 0.00000625
    assert estimate.total_usd == pytest.approx(0.66168192, rel=1e-9)
    assert estimate.to_dict()["total_usd"] == estimate.total_usd


def test_arm64_compute_is_cheaper():
    usage = dict(lambda_gb_seconds=1000.0, lambda_requests=0, sqs_requests=0, dynamodb_read_units=0,
                 dynamodb_write_units=0, efs_bytes_read=0, efs_bytes_written=0, efs_stored_bytes=0, round_seconds=0)
    x86 = cost.estimate_round_cost(cost.RoundUsage(architecture="x86_64", **usage))
    arm = cost.estimate_round_cost(cost.RoundUsage(architecture="arm64", **usage))
    assert x86.total_usd == pytest.approx(0.0166667)
    assert arm.total_usd == pytest.approx(0.0133334)


def test_unknown_architecture_rejected():
    with pytest.raises(ValueError, match="unknown Lambda architecture 'sparc'"):
        cost.PRICES.lambda_gb_second("sparc")


@pytest.mark.parametrize("n_workers, job_item_bytes, expected", [
    # Workers: 2 SQS each + 1 aggregate send; reads 1 + 1 each; 1 write each.
    # Aggregator: 2 SQS + ceil(n / 10) batches; reads 1 + 1; writes 1 + ceil(job / 1 KB).
    (4, 3000, cost.RequestCounts(sqs_requests=9 + 3, dynamodb_read_units=8 + 2, dynamodb_write_units=4 + 4)),
    (25, 1000, cost.RequestCounts(sqs_requests=51 + 5, dynamodb_read_units=50 + 2, dynamodb_write_units=25 + 2)),
    (1, 5000, cost.RequestCounts(sqs_requests=3 + 3, dynamodb_read_units=3 + 3, dynamodb_write_units=1 + 6)),
])
def test_round_requests_counted(n_workers, job_item_bytes, expected):
    assert cost.count_round_requests(n_workers, job_item_bytes) == expected


def test_continuations_add_requests():
    plain = cost.count_round_requests(4, 3000)
    continued = cost.count_round_requests(4, 3000, continuations=5)

    # Each continuation: send, receive and delete its message (3 SQS), read the job item
    # (3,000 bytes: 1 unit) and the round item (1 unit), and stamp the round item (1 unit).
    assert continued.sqs_requests == plain.sqs_requests + 15
    assert continued.dynamodb_read_units == plain.dynamodb_read_units + 10
    assert continued.dynamodb_write_units == plain.dynamodb_write_units + 5


def test_round_requests_reject_zero_workers():
    with pytest.raises(ValueError, match="n_workers must be at least 1, got 0"):
        cost.count_round_requests(0, 1000)


def test_gb_seconds_use_lambda_memory(monkeypatch):
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "2048")
    assert cost.gb_seconds(3.0) == pytest.approx(6.0)
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
    assert cost.gb_seconds(1.0) == pytest.approx(cost.DEFAULT_MEMORY_MB / 1024)
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "lots")
    with pytest.raises(ValueError, match="invalid AWS_LAMBDA_FUNCTION_MEMORY_SIZE 'lots'"):
        cost.gb_seconds(1.0)


def test_worker_usage_counted_once(inprocess_stack):
    state = inprocess_stack.services.state
    usage = {"worker_seconds": 1.5, "worker_gb_seconds": 3.0}

    first, _ = state.record_worker_done("usage-job", 0, 1, usage)
    again, done = state.record_worker_done("usage-job", 0, 1, usage)
    state.record_worker_done("usage-job", 0, 2, {"worker_seconds": 0.5, "worker_gb_seconds": 1.0})

    assert first is True
    assert again is False
    assert done == [1]
    assert state.get_round_usage("usage-job", 0) == {"worker_seconds": 2.0, "worker_gb_seconds": 4.0}


def test_job_total_is_sum_of_rounds(inprocess_stack):
    inprocess_stack.submit(breast_cancer_spec())
    inprocess_stack.run()

    state = inprocess_stack.services.state
    record = state.get_job("costed")
    rounds = state.list_round_metrics("costed")
    assert record.status == SUCCEEDED, record.error
    assert len(rounds) == 6
    for entry in rounds:
        assert entry["cost_usd"] > 0
        assert entry["efs_bytes_read"] > 0
        assert entry["efs_bytes_written"] > 0
        assert entry["worker_seconds"] > 0
    assert record.attributes["cost_usd"] == pytest.approx(sum(entry["cost_usd"] for entry in rounds))
    assert rounds[-1]["total_cost_usd"] == pytest.approx(record.attributes["cost_usd"])


def test_budget_stops_job_with_model(inprocess_stack, efs_root):
    # Any round costs more than a billionth of a dollar, so round 0 reaches the budget.
    inprocess_stack.submit(breast_cancer_spec("budgeted", budget_usd=1e-9))
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("budgeted")
    assert record.status == SUCCEEDED, record.error
    assert record.attributes["stop_reason"] == "budget"
    assert record.round == 1
    assert record.attributes["cost_usd"] >= 1e-9
    model_dir = efs_root / "jobs" / "budgeted" / "model"
    assert (model_dir / "params.npy").is_file()
    assert json.loads((model_dir / "model.json").read_text())["rounds"] == 1


def test_budget_must_be_positive():
    from shared.errors import JobSpecError
    from shared.spec import parse_job_spec

    with pytest.raises(JobSpecError, match="training.budget_usd"):
        parse_job_spec(breast_cancer_spec(budget_usd=0))


def test_stored_bytes_track_folder_walk(inprocess_stack, efs_root):
    inprocess_stack.submit(breast_cancer_spec("stored"))
    inprocess_stack.run()

    store = inprocess_stack.services.store
    record = inprocess_stack.services.state.get_job("stored")
    assert record.status == SUCCEEDED, record.error
    walked = cost.folder_bytes(store.job_dir("stored")) - cost.folder_bytes(store.model_dir("stored"))
    last_round = record.round - 1
    round_folder = cost.folder_bytes(store.round_dir("stored", last_round))
    estimated = cost.stored_job_bytes(store, "stored", record.round, round_folder)

    # Metrics files and round folders differ by a few bytes each; the rest is exact.
    assert estimated == pytest.approx(walked, rel=0.05)
    assert estimated > cost.folder_bytes(store.data_dir("stored"))


# Each step of a worker's local training takes at least this long in the test below.
STEP_SECONDS = 0.05


def test_continued_steps_billed_in_full(inprocess_stack, monkeypatch):
    from dataclasses import replace

    from shared.handlers import set_services
    from shared.services import Services
    from shared.training import ModelAveraging

    original_advance = ModelAveraging.advance

    def advance_slowly(self, *args):
        time.sleep(STEP_SECONDS)
        return original_advance(self, *args)

    monkeypatch.setattr(ModelAveraging, "advance", advance_slowly)
    settings = replace(inprocess_stack.settings, max_steps_per_invocation=1)
    inprocess_stack.services = Services(settings, dynamodb=inprocess_stack.dynamodb, sqs=inprocess_stack.sqs)
    set_services(inprocess_stack.services)
    inprocess_stack.submit(breast_cancer_spec("continued", mode="model_average", local_steps=3, max_rounds=2))
    inprocess_stack.run()

    state = inprocess_stack.services.state
    assert state.get_job("continued").status == SUCCEEDED
    for round_index, metrics in enumerate(state.list_round_metrics("continued")):
        usage = state.get_round_usage("continued", round_index)
        # One step per invocation: each of the 2 workers takes 3 invocations.
        assert usage["worker_continuations"] == 2 * 2
        assert metrics["worker_seconds"] >= 2 * 3 * STEP_SECONDS
        # Combine, one validation chunk and the commit: the aggregator takes 3 invocations.
        assert metrics["lambda_invocations"] == 2 * 3 + 3
