"""The core pipeline: a job through the real handlers equals the one-process reference,
and at-least-once delivery (duplicates, stale rounds) cannot change the result."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pytest

from shared.handlers import set_services
from shared.reference import train_reference
from shared.services import Services
from shared.spec import parse_job_spec
from shared.state import CANCELLED, FAILED, PREPARING, RUNNING, SUCCEEDED, _from_attribute
from tests.baton_jobs import california_housing, california_spec, run_job, write_csv


def a9a_spec(job_id: str = "a9a-small", **training) -> dict:
    return {
        "job_id": job_id,
        "model": {"name": "logistic_regression", "alpha": 1e-4},
        "optimizer": {"name": "momentum", "learning_rate": 0.5, "momentum": 0.9},
        "data": {"path": "datasets/a9a/a9a", "format": "libsvm", "n_features": 123,
                 "validation_path": "datasets/a9a/a9a.t"},
        "training": {"n_workers": 4, "batch_size": 64, "max_rounds": 12, "seed": 3, **training},
    }


def final_params(efs_root, job_id: str) -> np.ndarray:
    return np.load(efs_root / "jobs" / job_id / "model" / "params.npy")


def test_inprocess_run_matches_reference(inprocess_stack, efs_root):
    spec = a9a_spec()
    inprocess_stack.submit(spec)
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("a9a-small")
    assert record.status == SUCCEEDED, record.error
    assert record.round == 12
    assert record.attributes["stop_reason"] == "max_rounds"

    expected, _ = train_reference(parse_job_spec(spec), efs_root)
    # Equal to the bit, as docs/architecture.md describes.
    np.testing.assert_array_equal(final_params(efs_root, "a9a-small"), expected)


def test_chunked_batch_equals_reference_bitwise(inprocess_stack, efs_root):
    # Batches of 5,000 rows span two of a worker's 4,096-row chunks. The reference adds the
    # same chunks in the same order, so the weights are the same bits.
    spec = a9a_spec(n_workers=2, batch_size=5000, max_rounds=4)
    inprocess_stack.submit(spec)
    inprocess_stack.run()

    expected, _ = train_reference(parse_job_spec(spec), efs_root)
    np.testing.assert_array_equal(final_params(efs_root, "a9a-small"), expected)


@pytest.mark.parametrize("model, training", [
    ({"name": "linear_regression", "alpha": 0.5, "penalty": "elasticnet", "l1_ratio": 0.5}, {}),
    ({"name": "linear_regression", "alpha": 0.05, "penalty": "l1", "l1_method": "proximal"}, {}),
    ({"name": "mlp_regressor", "hidden_layer_sizes": [8], "alpha": 1e-3}, {"reducers": 3}),
], ids=["elasticnet", "lasso-proximal", "mlp-scatter-reduce"])
def test_standardize_target_matches_reference(inprocess_stack, efs_root, model, training):
    # House values in millions of dollars, standardised for training: the final model is
    # mapped back to those units, and the training losses are reported in them.
    names, table = california_housing(target_factor=1e-6)
    path = write_csv(efs_root, "datasets/california.csv", names, table)
    spec = california_spec("scaled-targets", path, model, optimizer={"name": "adam", "learning_rate": 0.01},
                           data={"standardize_target": True}, training={"max_rounds": 10, **training})
    record = run_job(inprocess_stack, spec)
    assert record.status == SUCCEEDED, record.error

    expected, expected_losses = train_reference(parse_job_spec(spec), efs_root)
    rounds = inprocess_stack.services.state.list_round_metrics("scaled-targets")
    np.testing.assert_array_equal(final_params(efs_root, "scaled-targets"), expected)
    np.testing.assert_allclose([entry["train_loss"] for entry in rounds], expected_losses, rtol=1e-12)
    # The last round's state contains the scaled problem's parameters, not the final model.
    final_state = np.load(efs_root / "jobs" / "scaled-targets" / "rounds" / "10" / "state.npz")["params"]
    assert not np.array_equal(final_state, expected)


def test_epoch_limit_names_max_epochs(inprocess_stack):
    # About 8,140 rows per shard at batch 64: 128 rounds make an epoch, so 0.05 epochs stop
    # the job after 7 rounds, well before max_rounds.
    inprocess_stack.submit(a9a_spec(max_rounds=50, max_epochs=0.05))
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("a9a-small")
    assert record.status == SUCCEEDED, record.error
    assert record.round == 7
    assert record.attributes["stop_reason"] == "max_epochs"


def test_round_metrics_recorded(inprocess_stack, efs_root):
    inprocess_stack.submit(a9a_spec(max_rounds=5))
    inprocess_stack.run()

    metrics = inprocess_stack.services.state.list_round_metrics("a9a-small")
    assert [entry["round"] for entry in metrics] == [1, 2, 3, 4, 5]
    for entry in metrics:
        assert 0.0 < entry["train_loss"] < 1.0
        assert 0.0 <= entry["validation_accuracy"] <= 1.0
    on_efs = json.loads((efs_root / "jobs" / "a9a-small" / "metrics" / "5.json").read_text())
    assert on_efs["validation_loss"] == pytest.approx(metrics[-1]["validation_loss"])
    # The round item keeps the metrics in one map, apart from the workers' usage totals.
    state = inprocess_stack.services.state
    item = state.client.get_item(TableName=state.table_name,
                                 Key={"pk": {"S": "JOB#a9a-small"}, "sk": {"S": "ROUND#00000004"}})["Item"]
    assert set(item["metrics"]["M"]) == set(on_efs)
    assert "loss" not in item


def test_round_metrics_legacy_layout(inprocess_stack):
    # Round items stored by an earlier release hold each metric as its own attribute.
    state = inprocess_stack.services.state
    state.client.put_item(TableName=state.table_name, Item={
        "pk": {"S": "JOB#legacy"}, "sk": {"S": "ROUND#00000000"}, "done": {"NS": ["0", "1"]},
        "worker_seconds": {"N": "0.25"}, "round": {"N": "1"}, "loss": {"N": "0.5"}, "train_loss": {"N": "0.625"}})
    state.client.put_item(TableName=state.table_name, Item={
        "pk": {"S": "JOB#legacy"}, "sk": {"S": "ROUND#00000001"}, "done": {"NS": ["0"]}})
    state.put_round_metrics("legacy", 1, {"round": 2, "loss": 0.25, "train_loss": 0.375})

    assert state.list_round_metrics("legacy") == [
        {"worker_seconds": 0.25, "round": 1, "loss": 0.5, "train_loss": 0.625},
        {"round": 2, "loss": 0.25, "train_loss": 0.375},
    ]
    assert state.get_job_and_round("legacy", 0)[1].has_metrics
    assert state.get_job_and_round("legacy", 1)[1].has_metrics


def test_round_metrics_not_finite(inprocess_stack):
    state = inprocess_stack.services.state
    state.put_round_metrics("overflowed", 0, {"round": 1, "validation_loss": float("inf"), "train_loss": 0.5})

    item = state.client.get_item(TableName=state.table_name,
                                 Key={"pk": {"S": "JOB#overflowed"}, "sk": {"S": "ROUND#00000000"}})["Item"]

    # DynamoDB numbers have no infinity, so the value is stored as absent.
    assert item["metrics"]["M"]["validation_loss"] == {"NULL": True}
    assert state.list_round_metrics("overflowed") == [{"round": 1, "validation_loss": None, "train_loss": 0.5}]
    assert _from_attribute({"N": "Infinity"}) == float("inf")


def round_folders(efs_root, job_id: str) -> list[int]:
    return sorted(int(path.name) for path in (efs_root / "jobs" / job_id / "rounds").iterdir())


@pytest.mark.parametrize("keep", [None, 2], ids=["default", "two"])
def test_round_folders_kept_running_and_finished(inprocess_stack, efs_root, keep):
    if keep is not None:
        inprocess_stack.services = Services(replace(inprocess_stack.settings, keep_checkpoints=keep),
                                            dynamodb=inprocess_stack.dynamodb, sqs=inprocess_stack.sqs)
        set_services(inprocess_stack.services)
    expected_kept = 3 if keep is None else keep
    seen: dict[int, list[int]] = {}

    def list_folders(stack):
        record = stack.services.state.get_job("a9a-small")
        if record is not None and record.status == RUNNING:
            seen[record.round] = round_folders(efs_root, "a9a-small")

    inprocess_stack.submit(a9a_spec())
    inprocess_stack.run(before_step=list_folders)

    record = inprocess_stack.services.state.get_job("a9a-small")
    assert record.status == SUCCEEDED, record.error
    assert sorted(seen) == list(range(12))
    for current, folders in seen.items():
        assert folders == list(range(max(0, current - expected_kept + 1), current + 1)), f"at round {current}"
    # Round 12's folder contains the state after the last round, which is the final model.
    assert round_folders(efs_root, "a9a-small") == list(range(13 - expected_kept, 13))
    final_state = np.load(efs_root / "jobs" / "a9a-small" / "rounds" / "12" / "state.npz")["params"]
    np.testing.assert_array_equal(final_state, final_params(efs_root, "a9a-small"))


def test_duplicate_task_leaves_weights_unchanged(inprocess_stack, efs_root):

    def duplicate_round_three_tasks(stack):
        # Every task of round 3 is delivered twice: once now, once normally.
        if not getattr(stack, "duplicated", False):
            record = stack.services.state.get_job("a9a-small")
            if record is not None and record.round == 3:
                for worker in range(4):
                    stack.send("TasksQueue", {"job_id": "a9a-small", "round": 3, "worker": worker})
                stack.duplicated = True

    inprocess_stack.submit(a9a_spec())
    inprocess_stack.run(before_step=duplicate_round_three_tasks)

    assert inprocess_stack.duplicated
    assert inprocess_stack.services.state.get_job("a9a-small").status == SUCCEEDED
    reference, _ = train_reference(parse_job_spec(a9a_spec()), efs_root)
    np.testing.assert_array_equal(final_params(efs_root, "a9a-small"), reference)


def test_duplicate_aggregate_leaves_weights_unchanged(inprocess_stack, efs_root):
    sent = []

    def duplicate_aggregates(stack):
        # Replay the aggregate message of every finished round once, after the fact.
        record = stack.services.state.get_job("a9a-small")
        if record is not None and record.round > 0 and record.round - 1 not in sent:
            stack.send("AggregateQueue", {"job_id": "a9a-small", "round": record.round - 1})
            sent.append(record.round - 1)

    inprocess_stack.submit(a9a_spec())
    inprocess_stack.run(before_step=duplicate_aggregates)

    assert len(sent) >= 10
    assert inprocess_stack.services.state.get_job("a9a-small").status == SUCCEEDED
    reference, _ = train_reference(parse_job_spec(a9a_spec()), efs_root)
    np.testing.assert_array_equal(final_params(efs_root, "a9a-small"), reference)


@pytest.mark.parametrize("training, body", [
    ({}, {"job_id": "a9a-small", "round": 3}),
    ({"reducers": 2}, {"job_id": "a9a-small", "round": 3, "reduce": 1}),
], ids=["aggregate", "reduce"])
def test_early_round_message_dropped(inprocess_stack, efs_root, training, body):

    def send_before_results(stack):
        # Sent as round 3 starts, before any of its workers has recorded a result.
        record = stack.services.state.get_job("a9a-small")
        if not getattr(stack, "sent_early", False) and record is not None and record.round == 3:
            stack.send("AggregateQueue", body)
            stack.sent_early = True

    inprocess_stack.submit(a9a_spec(**training))
    inprocess_stack.run(before_step=send_before_results)

    assert inprocess_stack.sent_early
    record = inprocess_stack.services.state.get_job("a9a-small")
    assert record.status == SUCCEEDED, record.error
    assert "last_error" not in record.attributes, "an early message is dropped, not retried"
    assert not any(delivery.failed for delivery in inprocess_stack.deliveries)
    reference, _ = train_reference(parse_job_spec(a9a_spec(**training)), efs_root)
    np.testing.assert_array_equal(final_params(efs_root, "a9a-small"), reference)


def test_stale_task_leaves_weights_unchanged(inprocess_stack, efs_root):

    def replay_round_zero(stack):
        # A task of round 0 arriving while the job is several rounds further on.
        if not getattr(stack, "replayed", False):
            record = stack.services.state.get_job("a9a-small")
            if record is not None and record.round == 6:
                stack.send("TasksQueue", {"job_id": "a9a-small", "round": 0, "worker": 2})
                stack.replayed = True

    inprocess_stack.submit(a9a_spec())
    inprocess_stack.run(before_step=replay_round_zero)

    assert inprocess_stack.replayed
    assert inprocess_stack.services.state.get_job("a9a-small").status == SUCCEEDED
    reference, _ = train_reference(parse_job_spec(a9a_spec()), efs_root)
    np.testing.assert_array_equal(final_params(efs_root, "a9a-small"), reference)


def test_duplicate_job_message_starts_job_once(inprocess_stack, efs_root):
    spec = a9a_spec(max_rounds=3)
    inprocess_stack.submit(spec)
    inprocess_stack.submit(spec)
    inprocess_stack.run()

    assert inprocess_stack.services.state.get_job("a9a-small").status == SUCCEEDED
    task_deliveries = [d for d in inprocess_stack.deliveries if d.queue == "TasksQueue"]
    # A second start would send a second set of round 0 tasks, at most 4 more.
    assert len(task_deliveries) <= 3 * 4 + 4


@pytest.mark.parametrize("change, field, words", [
    (lambda spec: spec["data"].pop("path"), "data.path", "missing required field"),
    (lambda spec: spec["optimizer"].update(learning_rate=-0.1), "optimizer.learning_rate", "greater than 0"),
    (lambda spec: spec["training"].update(n_workers=0), "training.n_workers", "at least 1"),
    (lambda spec: spec["training"].update(batch_size="big"), "training.batch_size", "expected an integer"),
    (lambda spec: spec["model"].update(name="forest"), "model.name", "expected one of"),
    (lambda spec: spec.update(job_id="../escape"), "job_id", "letters, digits"),
])
def test_malformed_spec_fails_job_once(inprocess_stack, change, field, words):
    spec = a9a_spec(job_id="bad-job")
    change(spec)
    inprocess_stack.submit(spec)
    inprocess_stack.run()

    jobs = inprocess_stack.services.state.list_jobs()
    assert len(jobs) == 1
    record = jobs[0]
    assert record.status == FAILED
    assert field in record.error
    assert words in record.error

    # Handled once, not returned to the queue, and no work started.
    assert [d.queue for d in inprocess_stack.deliveries] == ["JobsQueue"]
    assert not inprocess_stack.deliveries[0].failed
    assert inprocess_stack.queue_depth("JobsQueue") == 0


def test_missing_data_file_fails_job(inprocess_stack):
    spec = a9a_spec(job_id="no-data")
    spec["data"]["path"] = "datasets/nowhere/train.svm"
    inprocess_stack.submit(spec)
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("no-data")
    assert record.status == FAILED
    assert "datasets/nowhere/train.svm" in record.error
    assert "not found" in record.error


def test_stray_messages_leave_job_running(inprocess_stack, efs_root):
    strays = [
        ("TasksQueue", {"job_id": "a9a-small", "round": 2}),
        ("TasksQueue", {"job_id": "a9a-small", "round": 40, "worker": 1}),
        ("TasksQueue", {"job_id": "a9a-small", "round": "2", "worker": 0}),
        ("AggregateQueue", {"job_id": "a9a-small", "round": 40}),
        ("AggregateQueue", {"job_id": "a9a-small"}),
    ]

    def send_strays(stack):
        # Malformed and future-round messages while the job is at round 2.
        if not getattr(stack, "strays_sent", False):
            record = stack.services.state.get_job("a9a-small")
            if record is not None and record.round == 2:
                for queue, body in strays:
                    stack.send(queue, body)
                stack.strays_sent = True

    inprocess_stack.submit(a9a_spec())
    inprocess_stack.run(before_step=send_strays)

    assert inprocess_stack.strays_sent
    record = inprocess_stack.services.state.get_job("a9a-small")
    assert record.status == SUCCEEDED, record.error
    assert not any(delivery.failed for delivery in inprocess_stack.deliveries)
    reference, _ = train_reference(parse_job_spec(a9a_spec()), efs_root)
    np.testing.assert_array_equal(final_params(efs_root, "a9a-small"), reference)


def test_task_for_unknown_worker_dropped(inprocess_stack, efs_root):
    # One batch contains round 0's tasks and a task for a worker the job does not have, so
    # the round is still current when the stray task runs.
    inprocess_stack.submit(a9a_spec())
    inprocess_stack.step("JobsQueue")
    inprocess_stack.send("TasksQueue", {"job_id": "a9a-small", "round": 0, "worker": 9})
    inprocess_stack.step("TasksQueue", batch_size=10)
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("a9a-small")
    assert record.status == SUCCEEDED, record.error
    assert [body.get("worker") for body in inprocess_stack.batches[1]] == [0, 1, 2, 3, 9]
    reference, _ = train_reference(parse_job_spec(a9a_spec()), efs_root)
    np.testing.assert_array_equal(final_params(efs_root, "a9a-small"), reference)


def test_target_accuracy_stops_job(inprocess_stack):
    inprocess_stack.submit(a9a_spec(max_rounds=200, target_validation_accuracy=0.8))
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("a9a-small")
    assert record.status == SUCCEEDED, record.error
    assert record.attributes["stop_reason"] == "target_accuracy"
    assert record.round < 200
    metrics = inprocess_stack.services.state.list_round_metrics("a9a-small")
    assert metrics[-1]["validation_accuracy"] >= 0.8
    assert all(entry["validation_accuracy"] < 0.8 for entry in metrics[:-1])


def test_early_stopping_after_patience(inprocess_stack):
    inprocess_stack.submit(a9a_spec(max_rounds=200, early_stopping_patience=2))
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("a9a-small")
    assert record.status == SUCCEEDED, record.error
    assert record.attributes["stop_reason"] == "early_stopping"
    losses = [entry["validation_loss"] for entry in inprocess_stack.services.state.list_round_metrics("a9a-small")]
    best_round = int(np.argmin(losses))
    assert len(losses) == best_round + 3
    assert min(losses[best_round + 1:]) >= losses[best_round]


def test_leftover_files_of_other_spec_fail_job(inprocess_stack, efs_root):
    # Files left on EFS by an earlier job with the same id, from a state table since replaced.
    old_spec = a9a_spec(max_rounds=2)
    (efs_root / "jobs" / "a9a-small").mkdir(parents=True)
    (efs_root / "jobs" / "a9a-small" / "spec.json").write_text(json.dumps(parse_job_spec(old_spec).to_dict()))

    inprocess_stack.submit(a9a_spec(max_rounds=3))
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("a9a-small")
    assert record.status == FAILED
    assert "different spec" in record.error
    assert "new job_id" in record.error
    assert "`baton run --fresh`" in record.error
    assert (efs_root / "jobs" / "a9a-small" / "spec.json").is_file()


def test_job_message_resent_while_running_resends_round_zero(inprocess_stack, efs_root):
    spec = a9a_spec(max_rounds=3)
    inprocess_stack.submit(spec)
    inprocess_stack.step("JobsQueue")
    # Lose the round 0 tasks, as a starter crash before sending them would.
    inprocess_stack.sqs.purge_queue(QueueUrl=inprocess_stack.queue_urls["TasksQueue"])

    inprocess_stack.submit(spec)
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("a9a-small")
    assert record.status == SUCCEEDED, record.error
    reference, _ = train_reference(parse_job_spec(spec), efs_root)
    np.testing.assert_array_equal(final_params(efs_root, "a9a-small"), reference)


def test_late_cancel_sends_no_round_zero_tasks(inprocess_stack, monkeypatch):
    state = inprocess_stack.services.state
    start_job = state.start_job

    def cancel_then_start(job_id, total_rounds, **options):
        # The user's cancel lands after the starter's last status check.
        assert state.set_status(job_id, CANCELLED, (PREPARING,))
        return start_job(job_id, total_rounds, **options)

    monkeypatch.setattr(state, "start_job", cancel_then_start)
    inprocess_stack.submit(a9a_spec(max_rounds=3))
    delivery = inprocess_stack.step("JobsQueue")

    assert not delivery.failed
    assert state.get_job("a9a-small").status == CANCELLED
    assert inprocess_stack.queue_depth("TasksQueue") == 0


def test_batches_mixing_jobs_and_rounds(inprocess_stack, efs_root):
    specs = [a9a_spec(job_id="mixed-a", max_rounds=6), a9a_spec(job_id="mixed-b", max_rounds=4, seed=5)]
    for spec in specs:
        inprocess_stack.submit(spec)

    def replay_old_round(stack):
        # Stale tasks of an earlier round land in the same batches as current ones.
        record = stack.services.state.get_job("mixed-a")
        if record is not None and record.round >= 2 and not getattr(stack, "replayed", False):
            stack.send("TasksQueue", {"job_id": "mixed-a", "round": 0, "worker": 1})
            stack.send("TasksQueue", {"job_id": "mixed-a", "round": 1, "worker": 3})
            stack.replayed = True

    inprocess_stack.run(before_step=replay_old_round, batch_size=10)

    for spec in specs:
        record = inprocess_stack.services.state.get_job(spec["job_id"])
        assert record.status == SUCCEEDED, record.error
        reference, _ = train_reference(parse_job_spec(spec), efs_root)
        np.testing.assert_array_equal(final_params(efs_root, spec["job_id"]), reference)
    mixed_jobs = [batch for batch in inprocess_stack.batches if len({body.get("job_id") for body in batch}) > 1]
    mixed_rounds = [batch for batch in inprocess_stack.batches
                    if len({(body.get("job_id"), body.get("round")) for body in batch}) > 2]
    assert mixed_jobs, "no batch held tasks of both jobs"
    assert mixed_rounds, "no batch held several rounds"


def test_watchdog_failure_counts_rounds_from_one(inprocess_stack):
    from shared.control import run_watchdog

    inprocess_stack.submit(a9a_spec(max_rounds=5))
    state = inprocess_stack.services.state
    while state.get_job("a9a-small") is None or state.get_job("a9a-small").round < 2:
        assert any(inprocess_stack.step(queue) is not None for queue in ("JobsQueue", "TasksQueue", "AggregateQueue"))
    # Lose the third round's tasks, so it stalls.
    for queue in ("TasksQueue", "AggregateQueue"):
        inprocess_stack.sqs.purge_queue(QueueUrl=inprocess_stack.queue_urls[queue])

    settings = inprocess_stack.services.settings
    later = time.time() + settings.stall_seconds + 60
    # The tasks each run re-sends stay in the queue, undelivered.
    for _ in range(settings.watchdog_max_attempts + 1):
        run_watchdog(inprocess_stack.services, now=later)

    record = state.get_job("a9a-small")
    assert record.status == FAILED
    assert record.round == 2
    assert [entry["round"] for entry in state.list_round_metrics("a9a-small")] == [1, 2]
    assert record.error.startswith("round 3 made no progress"), record.error


def fail_once_after_advance(monkeypatch, faults_dir, round_index: int) -> None:
    """Make the aggregator of ``round_index`` raise once, after the advance and before its sends."""
    rule = {"step": "aggregator.after_advance", "kind": "raise", "round": round_index, "times": 1}
    monkeypatch.setenv("BATON_FAULTS_ENABLED", "true")
    monkeypatch.setenv("BATON_FAULTS", json.dumps([rule]))
    monkeypatch.setenv("BATON_FAULTS_DIR", str(faults_dir))


def test_retry_after_advance_stores_metrics(inprocess_stack, efs_root, monkeypatch, tmp_path):
    fail_once_after_advance(monkeypatch, tmp_path / "faults", round_index=1)
    spec = a9a_spec(max_rounds=4)
    inprocess_stack.submit(spec)
    inprocess_stack.run()

    assert (tmp_path / "faults" / "rule-0-0").exists()
    record = inprocess_stack.services.state.get_job("a9a-small")
    assert record.status == SUCCEEDED, record.error
    metrics = inprocess_stack.services.state.list_round_metrics("a9a-small")
    assert [entry["round"] for entry in metrics] == [1, 2, 3, 4]
    on_efs = json.loads((efs_root / "jobs" / "a9a-small" / "metrics" / "2.json").read_text())
    assert metrics[1]["train_loss"] == on_efs["train_loss"]
    assert metrics[1]["total_cost_usd"] == on_efs["total_cost_usd"]
    reference, _ = train_reference(parse_job_spec(spec), efs_root)
    np.testing.assert_array_equal(final_params(efs_root, "a9a-small"), reference)


def test_paused_retry_after_advance_stores_metrics(inprocess_stack, efs_root, monkeypatch, tmp_path):
    from shared.control import pause_job

    fail_once_after_advance(monkeypatch, tmp_path / "faults", round_index=1)
    inprocess_stack.submit(a9a_spec(max_rounds=4))
    state = inprocess_stack.services.state
    while not (tmp_path / "faults" / "rule-0-0").exists():
        assert any(inprocess_stack.step(queue) is not None for queue in ("JobsQueue", "TasksQueue", "AggregateQueue"))
    # The job is paused before the failed aggregation's retry arrives.
    pause_job(state, "a9a-small")
    inprocess_stack.run()

    record = state.get_job("a9a-small")
    assert record.status == "PAUSED"
    assert record.round == 2
    assert [entry["round"] for entry in state.list_round_metrics("a9a-small")] == [1, 2]


def test_duplicate_job_message_does_not_multiply_messages(inprocess_stack, efs_root):
    # A second copy of the job message re-sends round 0's tasks. Each queue is drained in
    # turn, so the copies find their round complete and send aggregate messages, which
    # arrive after the round advanced. The copies must die out as stale, not grow by a
    # factor of n_workers every round.
    spec = a9a_spec(n_workers=3, max_rounds=8)
    inprocess_stack.submit(spec)
    inprocess_stack.submit(spec)
    deliveries = 0
    while True:
        drained = 0
        for queue in ("JobsQueue", "TasksQueue", "AggregateQueue"):
            while inprocess_stack.step(queue) is not None:
                drained += 1
        deliveries += drained
        if drained == 0 or deliveries > 500:
            break

    assert inprocess_stack.services.state.get_job("a9a-small").status == SUCCEEDED
    reference, _ = train_reference(parse_job_spec(spec), efs_root)
    np.testing.assert_array_equal(final_params(efs_root, "a9a-small"), reference)
    tasks = sum(delivery.queue == "TasksQueue" for delivery in inprocess_stack.deliveries)
    aggregates = sum(delivery.queue == "AggregateQueue" for delivery in inprocess_stack.deliveries)
    # 8 rounds of 3 tasks and one aggregate each, plus at most two rounds' worth of copies.
    assert tasks <= 8 * 3 + 2 * 3, f"{tasks} task deliveries"
    assert aggregates <= 8 + 2 * 3, f"{aggregates} aggregate deliveries"


def run_until_round(stack, job_id: str, round_index: int) -> None:
    """Deliver messages until ``job_id`` is RUNNING at ``round_index`` with its tasks not yet run."""
    state = stack.services.state
    while state.get_job(job_id) is None or state.get_job(job_id).round < round_index:
        assert any(stack.step(queue) is not None for queue in ("JobsQueue", "AggregateQueue", "TasksQueue"))


def test_deleted_stopping_state_fails_job(inprocess_stack, efs_root):
    # Read as no history, the missing file would restart early stopping's count and change the result.
    inprocess_stack.submit(a9a_spec(max_rounds=12, early_stopping_patience=6))
    run_until_round(inprocess_stack, "a9a-small", 3)
    (efs_root / "jobs" / "a9a-small" / "rounds" / "3" / "stopping.json").unlink()

    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("a9a-small")
    assert record.status == FAILED
    assert "file 'jobs/a9a-small/rounds/3/stopping.json' is missing" in record.error
    assert record.round == 3


def test_non_finite_state_reported_damaged(inprocess_stack, efs_root):
    from shared.efs import EfsStore
    from shared.errors import DIVERGED_WORDS
    from shared.round_files import read_round_state, write_round_state

    inprocess_stack.submit(a9a_spec(max_rounds=6))
    run_until_round(inprocess_stack, "a9a-small", 2)
    store = EfsStore(efs_root)
    params, optimizer_state = read_round_state(store, "a9a-small", 2)
    params[5] = np.nan
    write_round_state(store, "a9a-small", 2, params, optimizer_state)

    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("a9a-small")
    assert record.status == FAILED
    assert "round state file 'jobs/a9a-small/rounds/2/state.npz' is damaged" in record.error
    assert "1 of the 124 values of its array 'params' is NaN or infinite" in record.error
    assert DIVERGED_WORDS not in record.error
