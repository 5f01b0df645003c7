"""A job sent again after its state table was lost goes on from the files its earlier run left on EFS.

The in-process stack stands for both runs. Losing the table is simulated by deleting the
job's items and purging the queues, as a stopped local stack or a redeployed table
leaves them, while the EFS folder stays.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from shared import control
from shared.earlier_runs import continuation_round, run_identity
from shared.handlers import set_services
from shared.monitor import model_predates_spec
from shared.services import Services
from shared.spec import parse_job_spec
from shared.state import FAILED, SUCCEEDED
from tests.baton_jobs import breast_cancer_spec, cold_start, final_params, forget_job, run_job

N_ROUNDS = 12


def lose_table(stack, job_id: str) -> None:
    """Delete the job's items and every queued message, keeping the EFS folder."""
    forget_job(stack, job_id)
    for url in stack.queue_urls.values():
        stack.sqs.purge_queue(QueueUrl=url)


def finish_then_lose_table(stack, spec: dict) -> None:
    """Run ``spec`` to success, then lose the job's table items and queued messages."""
    assert run_job(stack, spec).status == SUCCEEDED
    lose_table(stack, spec["job_id"])


def run_until_round(stack, job_id: str, round_index: int) -> None:
    """Deliver messages until the job's item reaches ``round_index``, then one worker task more."""
    while True:
        record = stack.services.state.get_job(job_id)
        if record is not None and record.round >= round_index:
            # Leave the round half done: one worker has recorded its result.
            stack.step("TasksQueue")
            return
        if not any(stack.step(queue) for queue in ("JobsQueue", "TasksQueue", "AggregateQueue")):
            raise AssertionError(f"job {job_id} ended before round {round_index}")


def run_reference_then_interrupt(stack, reference_id: str, job_id: str, round_index: int) -> dict:
    """Run an uninterrupted reference job, then the same spec as ``job_id`` until ``round_index``, and lose the table.

    Returns the interrupted job's spec, to send again.
    """
    assert run_job(stack, breast_cancer_spec(reference_id, training={"max_rounds": N_ROUNDS})).status == SUCCEEDED
    spec = breast_cancer_spec(job_id, training={"max_rounds": N_ROUNDS})
    stack.submit(spec)
    run_until_round(stack, job_id, round_index)
    lose_table(stack, job_id)
    return spec


def resume_after_data_change(stack, spec: dict, edit) -> None:
    """Lose the table, change the data with ``edit(lines)``, see the rerun fail, and resume the job."""
    job_id = spec["job_id"]
    lose_table(stack, job_id)
    path = stack.services.store.root / "datasets" / "breast_cancer.csv"
    path.write_text("".join(edit(path.read_text().splitlines(keepends=True))))
    assert run_job(stack, spec).status == FAILED

    control.resume_job(stack.services.state, stack.services.queues, job_id)
    stack.run()


def test_interrupted_job_goes_on_to_same_weights(inprocess_stack, efs_root):
    spec = run_reference_then_interrupt(inprocess_stack, "uninterrupted", "interrupted", 7)

    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    # Rounds 0 to 6 were committed; the job went on from round 6, the last committed one but one.
    assert record.first_round == 6
    assert record.round == N_ROUNDS
    np.testing.assert_array_equal(final_params(efs_root, "interrupted"), final_params(efs_root, "uninterrupted"))
    assert not (efs_root / "jobs" / "interrupted" / "earlier-runs").exists()
    rounds = inprocess_stack.services.state.list_round_metrics("interrupted")
    assert [entry["round"] for entry in rounds] == list(range(1, N_ROUNDS + 1))
    assert [entry["train_loss"] for entry in rounds] == [
        entry["train_loss"] for entry in inprocess_stack.services.state.list_round_metrics("uninterrupted")]


def test_deleted_shard_prepared_again_then_goes_on(inprocess_stack, efs_root):
    # The data source is unchanged, so the shards are prepared again to the same bytes and
    # the job still goes on from its rounds.
    spec = run_reference_then_interrupt(inprocess_stack, "shard-kept", "shard-deleted", 7)
    shutil.rmtree(efs_root / "jobs" / "shard-deleted" / "data" / "shard-2")
    # The new stack's workers map the shards that the rerun prepares.
    cold_start(inprocess_stack)

    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    assert record.first_round == 6
    np.testing.assert_array_equal(final_params(efs_root, "shard-deleted"), final_params(efs_root, "shard-kept"))


def test_crash_before_model_written_stops_again(inprocess_stack, efs_root):
    # An aggregation that decided to stop and crashed before it wrote the model: the
    # rerun aggregates that round again and stops there, with the same model.
    spec = breast_cancer_spec("stopped-early", training={"max_rounds": 40},
                              data={"validation_fraction": 0.2})
    spec["training"]["target_validation_accuracy"] = 0.99
    record = run_job(inprocess_stack, spec)
    assert record.status == SUCCEEDED, record.error
    assert record.attributes["stop_reason"] == "target_accuracy"
    stop_round = record.round
    model = final_params(efs_root, "stopped-early")
    shutil.rmtree(efs_root / "jobs" / "stopped-early" / "model")
    lose_table(inprocess_stack, "stopped-early")

    again = run_job(inprocess_stack, spec)

    assert again.status == SUCCEEDED, again.error
    assert again.first_round == stop_round - 1
    assert again.attributes["stop_reason"] == "target_accuracy"
    assert again.round == stop_round
    np.testing.assert_array_equal(final_params(efs_root, "stopped-early"), model)


def test_finished_run_is_reused(inprocess_stack, efs_root):
    spec = breast_cancer_spec("finished", training={"max_rounds": 4})
    finish_then_lose_table(inprocess_stack, spec)
    model = final_params(efs_root, "finished")
    deliveries_before = len(inprocess_stack.deliveries)

    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    assert record.round == 4
    assert record.first_round == 4
    assert record.attributes["stop_reason"] == "max_rounds"
    # No task was sent: the model of the earlier run is the job's model.
    rerun_queues = {delivery.queue for delivery in inprocess_stack.deliveries[deliveries_before:]}
    assert rerun_queues == {"JobsQueue"}
    np.testing.assert_array_equal(final_params(efs_root, "finished"), model)
    assert not (efs_root / "jobs" / "finished" / "earlier-runs").exists()
    rounds = inprocess_stack.services.state.list_round_metrics("finished")
    assert [entry["round"] for entry in rounds] == [1, 2, 3, 4]
    # The rerun rewrote spec.json; the reused model still counts as this run's for fetch.
    assert not model_predates_spec(inprocess_stack.services.store, "finished")


def test_continuation_round_needs_committed_rounds(inprocess_stack, efs_root):
    spec = breast_cancer_spec("partial", training={"max_rounds": N_ROUNDS})
    inprocess_stack.submit(spec)
    run_until_round(inprocess_stack, "partial", 5)
    store = inprocess_stack.services.store
    digest = run_identity(store, parse_job_spec(spec))
    assert continuation_round(store, "partial", N_ROUNDS, digest) == 4

    # Without round 5's stopping state, round 5 is not committed, so the job goes on from 3.
    stopping = store.round_dir("partial", 5) / "stopping.json"
    saved_stopping = stopping.read_bytes()
    stopping.unlink()
    assert continuation_round(store, "partial", N_ROUNDS, digest) == 3

    # Round 4 without the metrics of round index 3: the committed round before 5 is 3.
    stopping.write_bytes(saved_stopping)
    store.metrics_path("partial", 3).unlink()
    assert continuation_round(store, "partial", N_ROUNDS, digest) == 3

    # Round 1 alone committed: a fresh start.
    assert continuation_round(store, "partial", 1, digest) == 0

    # Rounds trained on other data: a fresh start.
    assert continuation_round(store, "partial", N_ROUNDS, {**digest, "data_sha256": "0" * 64}) == 0


def test_changed_data_starts_over(inprocess_stack, efs_root):
    # The data changes after the earlier run: the rerun fails on it, and the resume that
    # prepares the data again starts over instead of going on from weights of the old data.
    spec = breast_cancer_spec("changed-data", training={"max_rounds": N_ROUNDS})
    inprocess_stack.submit(spec)
    run_until_round(inprocess_stack, "changed-data", 7)

    resume_after_data_change(inprocess_stack, spec, lambda lines: lines[:-40])

    record = inprocess_stack.services.state.get_job("changed-data")
    assert record.status == SUCCEEDED, record.error
    assert record.first_round == 0
    assert (efs_root / "jobs" / "changed-data" / "earlier-runs" / "1" / "metrics" / "7.json").is_file()
    rounds = inprocess_stack.services.state.list_round_metrics("changed-data")
    assert [entry["round"] for entry in rounds] == list(range(1, N_ROUNDS + 1))


def test_failure_line_names_next_round(inprocess_stack, efs_root):
    from shared.cli_run import _after_failure

    spec = breast_cancer_spec("failed-local", training={"max_rounds": N_ROUNDS})
    inprocess_stack.submit(spec)
    run_until_round(inprocess_stack, "failed-local", 7)
    record = inprocess_stack.services.state.get_job("failed-local")
    failed = replace(record, status="FAILED", error="aggregator failed 5 times on message m: OSError")
    diverged = replace(failed, error="training diverged in round 8: the loss is nan; lower the learning rate")

    line = _after_failure(failed, efs_root)

    assert line.endswith("once the cause is fixed, running the same command again goes on from round 7")
    assert str(efs_root / "jobs" / "failed-local") in line
    assert _after_failure(diverged, efs_root) == ""
    assert _after_failure(replace(failed, total_rounds=0), efs_root) == ""
    damaged = replace(failed, attributes={**failed.attributes, "repair": "round_state"})
    assert "instead of `baton resume`, run the same command again" in _after_failure(damaged, efs_root)
    assert _after_failure(damaged, efs_root).endswith("goes on from round 7")


def test_dead_letter_failure_names_rerun(inprocess_stack, efs_root):
    from shared.cli_run import _after_failure

    spec = breast_cancer_spec("dead-local", training={"max_rounds": N_ROUNDS})
    inprocess_stack.submit(spec)
    run_until_round(inprocess_stack, "dead-local", 7)
    record = inprocess_stack.services.state.get_job("dead-local")
    error = ("a baton-local-tasks message (m) reached the dead-letter queue after 5 receives; fix the cause, then "
             "run `baton resume dead-local`")
    in_first_round = replace(record, status="FAILED", error=error, round=0, total_rounds=0)
    later = replace(record, status="FAILED", error=error)

    assert _after_failure(in_first_round, efs_root) == (". This stack stops with baton run, so instead of "
                                                        "`baton resume`, run the same command again once the cause "
                                                        "is fixed")
    assert "instead of `baton resume`, run the same command again" in _after_failure(later, efs_root)
    assert "goes on from round 7" in _after_failure(later, efs_root)


def test_fresh_start_ignores_saved_progress(inprocess_stack, efs_root):
    # One step per invocation, so the aggregator of round 0 saves its progress on EFS. The
    # run is lost after round 0, and the fresh start must not adopt that progress.
    settings = replace(inprocess_stack.settings, max_steps_per_invocation=1)
    inprocess_stack.services = Services(settings, dynamodb=inprocess_stack.dynamodb, sqs=inprocess_stack.sqs)
    set_services(inprocess_stack.services)
    spec = breast_cancer_spec("progress-left", training={"max_rounds": 4})
    reference = breast_cancer_spec("progress-reference", training={"max_rounds": 4})
    assert run_job(inprocess_stack, reference).status == SUCCEEDED
    inprocess_stack.submit(spec)
    run_until_round(inprocess_stack, "progress-left", 1)
    assert (efs_root / "jobs" / "progress-left" / "rounds" / "0" / "aggregate-progress.json").is_file()
    lose_table(inprocess_stack, "progress-left")

    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    assert record.first_round == 0
    np.testing.assert_array_equal(final_params(efs_root, "progress-left"),
                                  final_params(efs_root, "progress-reference"))


def test_damaged_round_passed_over(inprocess_stack, efs_root):
    # Round 4 would be the round to go on from, but its stopping state is damaged, so the
    # job goes on from round 3 and still ends with the uninterrupted run's weights.
    spec = run_reference_then_interrupt(inprocess_stack, "undamaged", "damaged-stopping", 5)
    (inprocess_stack.services.store.round_dir("damaged-stopping", 4) / "stopping.json").write_text("{bad")

    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    assert record.first_round == 3
    np.testing.assert_array_equal(final_params(efs_root, "damaged-stopping"), final_params(efs_root, "undamaged"))


def test_damaged_earlier_spec_names_file(inprocess_stack, efs_root):
    spec = breast_cancer_spec("damaged-spec", training={"max_rounds": N_ROUNDS})
    inprocess_stack.submit(spec)
    run_until_round(inprocess_stack, "damaged-spec", 3)
    lose_table(inprocess_stack, "damaged-spec")
    spec_path = efs_root / "jobs" / "damaged-spec" / "spec.json"
    spec_path.write_text(spec_path.read_text()[:20])

    record = run_job(inprocess_stack, spec)

    assert record.status == FAILED
    assert "file 'jobs/damaged-spec/spec.json' of an earlier run of job 'damaged-spec' is not valid JSON" in record.error
    assert "Write this spec into it" in record.error


def test_edited_data_not_reused(inprocess_stack, efs_root):
    spec = breast_cancer_spec("edited-data", training={"max_rounds": 4})
    assert run_job(inprocess_stack, spec).status == SUCCEEDED

    # Same rows and columns, one value changed: the manifest's counts stay the same.
    resume_after_data_change(inprocess_stack, spec, lambda lines: [lines[0], "97" + lines[1][2:], *lines[2:]])

    record = inprocess_stack.services.state.get_job("edited-data")
    assert record.status == SUCCEEDED, record.error
    assert record.first_round == 0
    assert (efs_root / "jobs" / "edited-data" / "earlier-runs" / "1" / "model" / "params.npy").is_file()


def test_other_spec_not_reused(inprocess_stack, efs_root):
    finish_then_lose_table(inprocess_stack, breast_cancer_spec("other-spec", training={"max_rounds": 4}))
    # Without spec.json nothing shows the earlier spec but run.json.
    (efs_root / "jobs" / "other-spec" / "spec.json").unlink()
    other = breast_cancer_spec("other-spec", optimizer={"learning_rate": 0.05}, training={"max_rounds": 4})

    record = run_job(inprocess_stack, other)

    assert record.status == SUCCEEDED, record.error
    assert record.first_round == 0
    assert (efs_root / "jobs" / "other-spec" / "earlier-runs" / "1" / "model" / "params.npy").is_file()


def test_damaged_model_trained_again(inprocess_stack, efs_root):
    # An emptied params.npy is not reused: the job goes on from its rounds and writes the
    # same model again.
    spec = breast_cancer_spec("emptied-model", training={"max_rounds": 6})
    finish_then_lose_table(inprocess_stack, spec)
    model = final_params(efs_root, "emptied-model")
    (efs_root / "jobs" / "emptied-model" / "model" / "params.npy").write_bytes(b"")

    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    assert 0 < record.first_round < 6
    np.testing.assert_array_equal(final_params(efs_root, "emptied-model"), model)


def test_model_info_round_mismatch_not_reused(inprocess_stack, efs_root):
    spec = breast_cancer_spec("edited-rounds", training={"max_rounds": 6})
    finish_then_lose_table(inprocess_stack, spec)
    model_info_path = efs_root / "jobs" / "edited-rounds" / "model" / "model.json"
    model_info_path.write_text(model_info_path.read_text().replace('"rounds": 6', '"rounds": 3'))

    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    assert record.round == 6
    assert record.first_round < 6


class HalfProcessingClient:
    """A DynamoDB client whose every other BatchWriteItem writes the first half of its items
    and returns the rest as unprocessed, as DynamoDB does under throttling."""

    def __init__(self, client):
        self.client = client
        self.batch_sizes: list[int] = []

    def batch_write_item(self, RequestItems):
        (table, requests), = RequestItems.items()
        self.batch_sizes.append(len(requests))
        written = len(requests) // 2 if len(self.batch_sizes) % 2 else len(requests)
        self.client.batch_write_item(RequestItems={table: requests[:written]})
        return {"UnprocessedItems": {table: requests[written:]} if written < len(requests) else {}}

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_long_run_metrics_written_in_batches(inprocess_stack, efs_root, monkeypatch):
    spec = breast_cancer_spec("many-rounds", training={"max_rounds": 60, "max_epochs": 100})
    finish_then_lose_table(inprocess_stack, spec)
    state = inprocess_stack.services.state
    throttled = HalfProcessingClient(state.client)
    monkeypatch.setattr(state, "client", throttled)
    monkeypatch.setattr("shared.state.BATCH_WRITE_BACKOFF_SECONDS", 0.0)

    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    rounds = state.list_round_metrics("many-rounds")
    assert [entry["round"] for entry in rounds] == list(range(1, 61))
    assert rounds == [inprocess_stack.services.store.read_json(
        inprocess_stack.services.store.metrics_path("many-rounds", index)) for index in range(60)]
    # Rounds 0-24, 25-49 and 50-59, each half written, then the rest sent again.
    assert throttled.batch_sizes == [25, 13, 25, 13, 10, 5]


def test_lasting_throttling_fails_the_rerun(inprocess_stack, efs_root, monkeypatch):
    spec = breast_cancer_spec("throttled", training={"max_rounds": 30})
    finish_then_lose_table(inprocess_stack, spec)
    state = inprocess_stack.services.state

    def leave_everything(RequestItems):
        return {"UnprocessedItems": RequestItems}

    monkeypatch.setattr(state.client, "batch_write_item", leave_everything)
    monkeypatch.setattr("shared.state.BATCH_WRITE_BACKOFF_SECONDS", 0.0)

    with pytest.raises(RuntimeError, match="left 25 round items of job throttled unprocessed after 5 attempts"):
        state.put_earlier_round_metrics("throttled", {index: {"round": index + 1} for index in range(30)})
