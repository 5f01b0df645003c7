"""Tests of the planner's arithmetic, its recommendation and the `baton plan` command."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from shared import planner
from shared.cli import main

DOCS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "planner.md"

# No fixed cost per gradient call, so compute is exactly proportional to rows.
LINEAR_PROFILE = planner.ComputeProfile(seconds_per_dense_value=1e-9, seconds_per_sparse_value=5e-9,
                                        seconds_per_row=1e-8, seconds_per_shuffled_row=0.0,
                                        seconds_per_parameter=1e-9, seconds_per_call=0.0)
DENSE = planner.Workload(rows=1_000_000, features=100, batch_size=1024, epochs=1.0)


def simple_platform(**changes) -> planner.Platform:
    """Return a platform with round numbers, for hand-worked cases."""
    values = dict(queue_request_seconds=0.01, database_request_seconds=0.005, dispatch_seconds=0.1,
                  invocation_overhead_seconds=0.0, read_op_seconds=0.001, write_op_seconds=0.002,
                  metadata_op_seconds=0.0, client_read_bytes_per_second=100 * planner.MIB,
                  client_write_bytes_per_second=100 * planner.MIB, total_read_bytes_per_second=math.inf,
                  total_write_bytes_per_second=math.inf, worker_speed=1.0, aggregator_speed=1.0,
                  cpu_slots=math.inf, max_concurrency=1000, straggler_cv=0.0)
    values.update(changes)
    return planner.Platform(**values)


def test_compute_halves_at_fixed_global_batch():
    eight = planner.plan_job(replace(DENSE, batch_size=1024), planner.Deployment(workers=8), LINEAR_PROFILE)
    sixteen = planner.plan_job(replace(DENSE, batch_size=512), planner.Deployment(workers=16), LINEAR_PROFILE)

    assert sixteen.round.phases["worker: compute"] == pytest.approx(eight.round.phases["worker: compute"] / 2)
    assert sixteen.rounds == eight.rounds


def test_rounds_halve_at_fixed_worker_batch():
    four = planner.plan_job(DENSE, planner.Deployment(workers=4), LINEAR_PROFILE)
    eight = planner.plan_job(DENSE, planner.Deployment(workers=8), LINEAR_PROFILE)

    assert four.rounds == math.ceil(250_000 / 1024)
    assert eight.rounds == math.ceil(125_000 / 1024)


def test_round_phases_hand_worked():
    workload = planner.Workload(rows=12_000, features=1023, batch_size=100, rounds=10, epochs=None, optimizer_slots=1)
    estimate = planner.estimate_round(workload, 12, simple_platform(), LINEAR_PROFILE)

    # Two SendMessageBatch calls for 12 tasks, then the dispatch.
    assert estimate.phases["send tasks and dispatch"] == pytest.approx(2 * 0.01 + 0.1)
    # One batched read of the job item and done set, and the conditional update.
    assert estimate.phases["worker: DynamoDB"] == pytest.approx(2 * 0.005)
    # 1,024 parameters, float64, parameters and one momentum array: 16 KiB at 100 MiB/s.
    assert estimate.phases["worker: read weights"] == pytest.approx(0.001 + 16384 / (100 * planner.MIB))
    # 100 rows x (1e-8 + 1023 x 1e-9) seconds.
    assert estimate.phases["worker: compute"] == pytest.approx(100 * (1e-8 + 1023e-9))
    assert estimate.phases["worker: queueing for shared server and cores"] == 0.0
    # One batched read of the job item and round item, and the advance; the metrics write
    # follows the send of the next tasks.
    assert estimate.phases["aggregator: DynamoDB"] == pytest.approx(2 * 0.005)
    assert estimate.seconds == pytest.approx(sum(estimate.phases.values()))


def test_waves_when_workers_exceed_concurrency():
    workload = planner.Workload(rows=12_000, features=10, batch_size=10, rounds=1, epochs=None)
    one_wave = planner.estimate_round(workload, 10, simple_platform(max_concurrency=10), LINEAR_PROFILE)
    two_waves = planner.estimate_round(workload, 20, simple_platform(max_concurrency=10), LINEAR_PROFILE)

    assert two_waves.phases["worker: DynamoDB"] == pytest.approx(2 * one_wave.phases["worker: DynamoDB"])


def test_shared_request_server_queues_workers():
    workload = planner.Workload(rows=12_000, features=10, batch_size=10, rounds=1, epochs=None)
    platform = simple_platform(request_slots=1, request_service_seconds=0.004, poller_requests_per_invocation=2)
    estimate = planner.estimate_round(workload, 8, platform, LINEAR_PROFILE)
    path = sum(seconds for name, seconds in estimate.phases.items()
               if name.startswith("worker:") and not name.startswith("worker: queueing"))

    # Eight workers, four requests each (two DynamoDB calls, the lane's receive and
    # delete), and the aggregator's metrics write of the previous round, one at a time.
    assert path + estimate.phases["worker: queueing for shared server and cores"] == pytest.approx((8 * 4 + 1) * 0.004)


def test_lambda_speed_follows_memory():
    sparse = replace(DENSE, density=0.1)

    assert planner.lambda_speed(1769, DENSE) == pytest.approx(1.0)
    assert planner.lambda_speed(1769 / 2, DENSE) == pytest.approx(0.5)
    # Sparse gradients use one thread, so a second vCPU does not help.
    assert planner.lambda_speed(2 * 1769, sparse) == pytest.approx(1.0)
    # Dense: half the work threads over two vCPUs, 1 / (0.5 + 0.25).
    assert planner.lambda_speed(2 * 1769, DENSE) == pytest.approx(4 / 3)


def test_bursting_rates_hand_worked():
    # 512 GiB of data is stored twice (the import and the shards): 1 TiB.
    workload = replace(DENSE, rows=1, data_bytes=512 * planner.GIB)
    burst, baseline = planner.bursting_rates(workload, workers=1)

    assert burst == pytest.approx(100 * planner.MIB, rel=1e-3)
    assert baseline == pytest.approx(1024 * 50 * 1024, rel=1e-3)


def test_exhausted_burst_credits_slow_later_rounds():
    workload = planner.Workload(rows=2_000_000, features=2000, batch_size=2048, epochs=2.0)
    deployment = planner.Deployment(workers=64, throughput_mode="bursting")
    no_credits = replace(planner.AWS, efs_bursting_initial_credit_bytes=1.0)
    plenty = replace(planner.AWS, efs_bursting_initial_credit_bytes=1e18)

    starved = planner.plan_job(workload, deployment, LINEAR_PROFILE, no_credits)
    bursting = planner.plan_job(workload, deployment, LINEAR_PROFILE, plenty)

    assert bursting.burst.rounds_at_baseline == 0
    assert starved.burst.rounds_at_baseline > 0
    assert starved.baseline_round.seconds > bursting.round.seconds
    assert starved.total_seconds > bursting.total_seconds
    assert any("burst credits run out" in warning for warning in starved.warnings)


def test_elastic_mode_has_no_burst_summary():
    plan = planner.plan_job(DENSE, planner.Deployment(workers=8), LINEAR_PROFILE)

    assert plan.burst is None
    assert plan.cost_usd["total_usd"] == pytest.approx(
        plan.cost_usd["lambda_usd"] + plan.cost_usd["sqs_usd"] + plan.cost_usd["dynamodb_usd"] + plan.cost_usd["efs_usd"])


def test_recommend_picks_cheapest_meeting_deadline():
    workload = replace(DENSE, epochs=0.2)
    deployment = planner.Deployment(workers=8)
    workers_grid, memory_grid = (4, 8, 16, 32), (1024, 1769, 3008)
    everything = planner.recommend(workload, deployment, 1e9, LINEAR_PROFILE,
                                   workers_grid=workers_grid, memory_grid=memory_grid)
    slowest_needed = sorted(plan.total_seconds for plan in _all_plans(workload, deployment, workers_grid, memory_grid))
    deadline = slowest_needed[len(slowest_needed) // 2]

    recommendation = planner.recommend(workload, deployment, deadline, LINEAR_PROFILE,
                                       workers_grid=workers_grid, memory_grid=memory_grid)
    meeting = [plan for plan in _all_plans(workload, deployment, workers_grid, memory_grid)
               if plan.total_seconds <= deadline]

    assert everything.met
    assert recommendation.met
    assert recommendation.best.total_seconds <= deadline
    assert recommendation.best.cost_usd["total_usd"] == pytest.approx(min(p.cost_usd["total_usd"] for p in meeting))
    assert recommendation.best.workload.batch_size * recommendation.best.deployment.workers == 8 * 1024


def _all_plans(workload, deployment, workers_grid, memory_grid):
    for workers in workers_grid:
        for memory in memory_grid:
            candidate = replace(workload, batch_size=round(8 * 1024 / workers))
            yield planner.plan_job(candidate, replace(deployment, workers=workers, memory_mb=memory,
                                                      max_concurrency=max(100, workers)), LINEAR_PROFILE)


def test_recommend_per_worker_keeps_batch():
    workload = replace(DENSE, epochs=0.2)
    workers_grid, memory_grid = (4, 8, 16, 32), (1024, 1769, 3008)
    plans = [planner.plan_job(workload, planner.Deployment(workers=workers, memory_mb=memory,
                                                           max_concurrency=max(100, workers)), LINEAR_PROFILE)
             for workers in workers_grid for memory in memory_grid]
    deadline = sorted(plan.total_seconds for plan in plans)[len(plans) // 2]

    recommendation = planner.recommend(workload, planner.Deployment(workers=1), deadline, LINEAR_PROFILE,
                                       workers_grid=workers_grid, memory_grid=memory_grid, fixed_batch="per-worker")
    meeting = [plan for plan in plans if plan.total_seconds <= deadline]

    assert recommendation.met
    assert recommendation.fixed_batch == "per-worker"
    assert recommendation.global_batch is None
    assert recommendation.batch_size == 1024
    assert recommendation.candidates == len(plans)
    assert recommendation.best.workload.batch_size == 1024
    assert recommendation.best.cost_usd["total_usd"] == pytest.approx(min(p.cost_usd["total_usd"] for p in meeting))
    assert "every candidate keeps 1,024 rows per worker" in planner.format_recommendation(recommendation)


def test_recommend_rejects_unknown_fixed_batch():
    with pytest.raises(ValueError, match="unknown fixed_batch 'both'"):
        planner.recommend(DENSE, planner.Deployment(workers=8), 3600, LINEAR_PROFILE, fixed_batch="both")


def test_recommend_reports_unmet_deadline():
    recommendation = planner.recommend(DENSE, planner.Deployment(workers=8), 0.001, LINEAR_PROFILE)

    assert not recommendation.met
    assert recommendation.best is None
    assert recommendation.fastest is not None
    assert "none meets the deadline" in planner.format_recommendation(recommendation)


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("45m", 2700), ("2h", 7200), ("1.5d", 129600)])
def test_parse_duration_units(text, seconds):
    assert planner.parse_duration(text) == seconds


@pytest.mark.parametrize("text, words", [
    ("1e400h", "'1e400h' is not a finite duration"),
    ("nan", "'nan' is not a finite duration"),
    ("inf", "'inf' is not a finite duration"),
    ("0m", "must be greater than 0, got '0m'"),
    ("-2h", "must be greater than 0, got '-2h'"),
])
def test_parse_duration_rejects_value(text, words):
    with pytest.raises(planner.PlanError) as raised:
        planner.parse_duration(text)

    assert words in str(raised.value)


def test_scaling_table_matches_docs():
    page = DOCS_PAGE.read_text(encoding="utf-8")

    assert planner.scaling_table_markdown() in page


def test_scaling_efficiency_starts_at_one():
    rows = planner.scaling_rows("global")

    assert [row["workers"] for row in rows] == list(planner.SCALING_WORKERS)
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert [row["batch_per_worker"] * row["workers"] for row in rows] == [planner.SCALING_GLOBAL_BATCH] * 3


# The command line ----------------------------------------------------------------------------

BASE_ARGS = ["plan", "--workers", "4", "--rows", "32561", "--features", "123", "--density", "0.113",
             "--batch-size", "256", "--epochs", "3", "--validation-rows", "16281"]


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_cli_plan_prints_breakdown_and_vm():
    result = run_cli(*BASE_ARGS)

    assert result.exit_code == 0, result.output
    assert "time per round" in result.output
    assert "worker: compute" in result.output
    assert "time to finish" in result.output
    assert "cost: $" in result.output
    assert "c5.4xlarge" in result.output
    assert "rounds: 96 (32 per epoch)" in result.output


def test_cli_plan_json():
    result = run_cli(*BASE_ARGS, "--json", "--deadline", "2h")
    document = json.loads(result.output)

    assert result.exit_code == 0, result.output
    assert document["rounds"] == 96
    assert document["round_seconds"] == pytest.approx(sum(document["round_phases_seconds"].values()))
    assert document["vm"]["name"] == "c5.4xlarge"
    assert document["recommendation"]["met"] is True
    assert document["recommendation"]["best"]["workers"] >= 1


def test_cli_plan_deadline_recommendation():
    result = run_cli(*BASE_ARGS, "--deadline", "30m")

    assert result.exit_code == 0, result.output
    assert "Cheapest configuration that finishes within 30.0 min" in result.output


def test_cli_plan_needs_workers_or_deadline():
    args = [arg for arg in BASE_ARGS if arg not in ("--workers", "4")]
    result = run_cli(*args)

    assert result.exit_code == 2
    assert "Missing option '--workers'" in result.output
    assert "or --deadline DURATION to have baton plan recommend workers and memory" in result.output


def test_cli_plan_deadline_picks_workers():
    args = [arg for arg in BASE_ARGS if arg not in ("--workers", "4")]
    result = run_cli(*args, "--deadline", "30m")

    assert result.exit_code == 0, result.output
    assert result.output.startswith("Cheapest configuration that finishes within 30.0 min")
    assert "every candidate keeps 256 rows per worker, so the global batch grows with the workers" in result.output
    assert "Plan of the recommended configuration:" in result.output
    assert "batch 256 rows per worker" in result.output
    assert "time to finish" in result.output


def test_cli_plan_deadline_picks_workers_json():
    args = [arg for arg in BASE_ARGS if arg not in ("--workers", "4")]
    result = run_cli(*args, "--deadline", "30m", "--json")
    document = json.loads(result.output)
    recommendation = document["recommendation"]

    assert result.exit_code == 0, result.output
    assert recommendation["met"] is True
    assert recommendation["fixed_batch"] == "per-worker"
    assert recommendation["batch_size"] == 256
    assert recommendation["global_batch"] is None
    assert recommendation["best"]["batch_size"] == 256
    assert document["deployment"]["workers"] == recommendation["best"]["workers"]
    assert document["deployment"]["memory_mb"] == recommendation["best"]["memory_mb"]
    assert document["total_seconds"] == pytest.approx(recommendation["best"]["total_seconds"])


def test_cli_plan_workers_deadline_keeps_global_batch():
    result = run_cli(*BASE_ARGS, "--deadline", "30m", "--json")
    recommendation = json.loads(result.output)["recommendation"]

    assert result.exit_code == 0, result.output
    assert recommendation["fixed_batch"] == "global"
    assert recommendation["global_batch"] == 4 * 256
    assert recommendation["best"]["global_batch"] == pytest.approx(4 * 256, rel=0.01)


def test_cli_plan_unmet_deadline():
    result = run_cli(*BASE_ARGS, "--deadline", "1s")

    assert result.exit_code == 3, result.output
    assert "none meets the deadline" in result.output


def test_cli_plan_unmet_deadline_json():
    args = [arg for arg in BASE_ARGS if arg not in ("--workers", "4")]
    result = run_cli(*args, "--deadline", "1s", "--json")

    assert result.exit_code == 3, result.output
    assert json.loads(result.output)["recommendation"]["met"] is False


def test_cli_plan_help_names_exit_status():
    result = run_cli("plan", "--help")

    assert result.exit_code == 0, result.output
    assert "Exits with status 3 when no configuration meets --deadline" in " ".join(result.output.split())


@pytest.mark.parametrize("option, value, expected", [
    ("--workers", "0", "must be at least 1"),
    ("--rows", "-5", "must be at least 1"),
    ("--features", "0", "pass the number of features per row"),
    ("--batch-size", "-1", "pass rows per worker per round"),
    ("--memory", "100", "use 128 to 10240 MB"),
    ("--memory", "20000", "use 128 to 10240 MB"),
    ("--aggregator-memory", "64", "use 128 to 10240 MB"),
    ("--data-bytes", "-10", "must be greater than 0"),
    ("--density", "1.5", "use 1 for dense data"),
    ("--epochs", "-1", "must be greater than 0"),
    ("--deadline", "soon", "use seconds or a unit, such as 90m or 2h"),
    ("--deadline", "-5m", "must be greater than 0"),
    ("--max-concurrency", "1", "must be 2 to 1000"),
    ("--batch-size", "1000001", "must be from 1 to 1,000,000 (training.batch_size)"),
    ("--optimizer-slots", "3", "must be from 0 to 2"),
    ("--optimizer-slots", "-1", "must be from 0 to 2"),
    ("--data-bytes", str(planner.MAX_EFS_FILE_BYTES + 1), "more than one EFS file can hold (47.9 TiB)"),
    ("--rows", "999999999999999", "more than one EFS file can hold (47.9 TiB)"),
    ("--validation-rows", "999999999999999", "of validation data, more than one EFS file can hold"),
    ("--params", "1000000000", "more than the 10,240 MB a Lambda function can have"),
])
def test_cli_plan_rejects_bad_input(option, value, expected):
    args = [arg for arg in BASE_ARGS]
    if option in args:
        index = args.index(option)
        args[index + 1] = value
    else:
        args += [option, value]
    result = run_cli(*args)

    assert result.exit_code == 2
    assert option in result.output
    assert expected in result.output


def test_cli_plan_rejects_epochs_and_rounds():
    result = run_cli(*BASE_ARGS, "--rounds", "10")

    assert result.exit_code == 2
    assert "give --epochs or --rounds, not both" in result.output


@pytest.mark.parametrize("option, value", [("--epochs", "nan"), ("--epochs", "inf"), ("--epochs", "20000"),
                                           ("--rounds", "99999999999")])
def test_plan_rejects_epochs_and_rounds_out_of_range(option, value):
    result = CliRunner().invoke(main, ["plan", "--workers", "4", "--rows", "1000", "--features", "10",
                                       "--batch-size", "32", option, value])
    assert result.exit_code == 2
    assert f"Invalid value for {option}" in result.output
    assert "Traceback" not in result.output


def test_plan_limits_match_job_spec():
    import dataclasses

    from shared.spec import TrainingSection

    fields = {field.name: field.metadata for field in dataclasses.fields(TrainingSection)}
    assert planner.MAX_EPOCHS == fields["max_epochs"]["maximum"]
    assert planner.MAX_ROUNDS == fields["max_rounds"]["maximum"]
    assert planner.MAX_BATCH_SIZE == fields["batch_size"]["maximum"]
    assert planner.MAX_WORKERS == fields["n_workers"]["maximum"]


def test_plan_of_impossible_data_size_rejected():
    result = run_cli("plan", "--workers", "4", "--rows", "999999999999999", "--features", "99999999",
                     "--batch-size", "256")

    assert result.exit_code == 2
    assert "Invalid value for --rows: 999,999,999,999,999 rows of 99,999,999 features at density 1" in result.output
    assert "EiB of data, more than one EFS file can hold (47.9 TiB)" in result.output
    assert "check --rows, --features and --density" in result.output
    assert "cost:" not in result.output


def test_state_over_lambda_memory_names_features():
    workload = planner.Workload(rows=1000, features=800_000_000, batch_size=10)

    with pytest.raises(planner.PlanError, match="more than the 10,240 MB") as raised:
        planner.check_workload(workload)
    assert raised.value.option == "--features"


def test_huge_feature_count_blames_features():
    workload = planner.Workload(rows=32561, features=999_999_999_999, batch_size=256, epochs=1.0)

    with pytest.raises(planner.PlanError, match="a round state of 1,000,000,000,000 parameters") as raised:
        planner.check_workload(workload)
    assert raised.value.option == "--features"


def test_plan_over_a_year_warns():
    workload = planner.Workload(rows=999_999_999_999, features=1, batch_size=1, epochs=2.0)
    plan = planner.plan_job(workload, planner.Deployment(workers=1), LINEAR_PROFILE)
    text = planner.format_plan(plan)

    assert plan.total_seconds > planner.PRACTICAL_SECONDS
    assert any("longer than a year: no such job is practical" in warning for warning in plan.warnings)
    assert "years" in text.split("time to finish: ")[1].splitlines()[0]
    assert "e+" not in text


def test_plan_within_a_year_has_no_size_warning():
    plan = planner.plan_job(DENSE, planner.Deployment(workers=8), LINEAR_PROFILE)

    assert not any("longer than a year" in warning for warning in plan.warnings)


def test_plan_warns_of_shard_below_batch():
    small = planner.Workload(rows=1000, features=10, batch_size=512, epochs=1.0)
    plan = planner.plan_job(small, planner.Deployment(workers=8), LINEAR_PROFILE)
    large = planner.plan_job(replace(small, rows=100_000), planner.Deployment(workers=8), LINEAR_PROFILE)

    assert any("shard has about 125 rows, fewer than the 512 of --batch-size" in warning for warning in plan.warnings)
    assert not any("--batch-size" in warning for warning in large.warnings)


def test_plan_warns_of_slow_validation():
    workload = planner.Workload(rows=100_000, features=10, batch_size=64, epochs=1.0, validation_rows=100_000_000)
    plan = planner.plan_job(workload, planner.Deployment(workers=8), LINEAR_PROFILE)
    small = planner.plan_job(replace(workload, validation_rows=1000), planner.Deployment(workers=8), LINEAR_PROFILE)

    assert any(warning.startswith("evaluating 100,000,000 validation rows takes") for warning in plan.warnings)
    assert "warning: evaluating 100,000,000 validation rows" in planner.format_plan(plan)
    assert not any("validation rows" in warning for warning in small.warnings)


@pytest.mark.parametrize("seconds, text", [(0.25, "250 ms"), (90, "90.0 s"), (3600, "60.0 min"), (36000, "10.0 h"),
                                           (3 * 86400, "3.0 days"), (1234 * 365 * 86400, "1,234.0 years")])
def test_format_seconds_units(seconds, text):
    assert planner.format_seconds(seconds) == text


@pytest.mark.parametrize("amount, text", [(0.0123, "$0.0123"), (999.5, "$999.5000"), (1234567.891, "$1,234,567.89")])
def test_format_usd(amount, text):
    assert planner.format_usd(amount) == text


@pytest.mark.parametrize("count, text", [(2048, "2.0 KiB"), (3 * planner.GIB, "3.0 GiB"), (5 * 2**60, "5.0 EiB"),
                                         (3000 * 2**60, "3,000.0 EiB")])
def test_format_bytes(count, text):
    assert planner.format_bytes(count) == text


def test_recommend_without_fitting_candidate_says_why():
    # A million dense rows of 1,000 features per worker need about 11 GiB, over Lambda's maximum.
    workload = planner.Workload(rows=2_000_000_000, features=1000, batch_size=1_000_000, epochs=0.01)
    recommendation = planner.recommend(workload, planner.Deployment(workers=1), 3600, LINEAR_PROFILE,
                                       fixed_batch="per-worker")

    assert recommendation.candidates == 0
    assert recommendation.best is None
    assert recommendation.fastest is None
    assert "no configuration fits" in planner.format_recommendation(recommendation)


def test_cli_plan_without_fitting_candidate_prints_no_plan():
    result = run_cli("plan", "--rows", "2000000000", "--features", "1000", "--batch-size", "1000000",
                     "--epochs", "0.01", "--deadline", "1h")

    assert result.exit_code == 3, result.output
    assert "no configuration fits" in result.output
    assert "Plan of the" not in result.output
