"""A job sent again after its state table was lost goes on from the files its earlier run left on EFS.

The in-process stack stands for both runs. Losing the table is simulated by deleting the
job's items and purging the queues, as a stopped local stack or a redeployed table
leaves them, while the EFS folder stays.
"""

from __future__ import annotations

import json
import shutil

import numpy as np

from shared.service import continuation_round
from shared.state import SUCCEEDED
from tests.baton_jobs import breast_cancer_spec, final_params, forget_job, run_job

N_ROUNDS = 12


def lose_table(stack, job_id: str) -> None:
    """Delete the job's items and every queued message, keeping the EFS folder."""
    forget_job(stack, job_id)
    for url in stack.queue_urls.values():
        stack.sqs.purge_queue(QueueUrl=url)


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


def metrics_files(efs_root, job_id: str) -> dict[str, dict]:
    folder = efs_root / "jobs" / job_id / "metrics"
    return {path.name: json.loads(path.read_text()) for path in folder.iterdir()}


def test_interrupted_job_goes_on_to_same_weights(inprocess_stack, efs_root):
    uninterrupted = breast_cancer_spec("uninterrupted", training={"max_rounds": N_ROUNDS})
    assert run_job(inprocess_stack, uninterrupted).status == SUCCEEDED
    spec = breast_cancer_spec("interrupted", training={"max_rounds": N_ROUNDS})
    inprocess_stack.submit(spec)
    run_until_round(inprocess_stack, "interrupted", 7)
    lose_table(inprocess_stack, "interrupted")

    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    # Rounds 0 to 6 were committed; the job went on from round 6, the last committed one but one.
    assert record.attributes["continued_from"] == 6
    assert record.round == N_ROUNDS
    np.testing.assert_array_equal(final_params(efs_root, "interrupted"), final_params(efs_root, "uninterrupted"))
    assert not (efs_root / "jobs" / "interrupted" / "earlier-runs").exists()
    rounds = inprocess_stack.services.state.list_round_metrics("interrupted")
    assert [entry["round"] for entry in rounds] == list(range(1, N_ROUNDS + 1))
    assert [entry["train_loss"] for entry in rounds] == [
        entry["train_loss"] for entry in inprocess_stack.services.state.list_round_metrics("uninterrupted")]


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
    assert again.attributes["continued_from"] == stop_round - 1
    assert again.attributes["stop_reason"] == "target_accuracy"
    assert again.round == stop_round
    np.testing.assert_array_equal(final_params(efs_root, "stopped-early"), model)


def test_finished_run_trains_again(inprocess_stack, efs_root):
    spec = breast_cancer_spec("finished", training={"max_rounds": 4})
    assert run_job(inprocess_stack, spec).status == SUCCEEDED
    lose_table(inprocess_stack, "finished")

    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    assert "continued_from" not in record.attributes
    assert (efs_root / "jobs" / "finished" / "earlier-runs" / "1" / "model" / "params.npy").is_file()


def test_continuation_round_needs_committed_rounds(inprocess_stack, efs_root):
    spec = breast_cancer_spec("partial", training={"max_rounds": N_ROUNDS})
    inprocess_stack.submit(spec)
    run_until_round(inprocess_stack, "partial", 5)
    store = inprocess_stack.services.store
    assert continuation_round(store, "partial", N_ROUNDS) == 4

    # Without round 5's stopping state, round 5 is not committed, so the job goes on from 3.
    (store.round_dir("partial", 5) / "stopping.json").unlink()
    assert continuation_round(store, "partial", N_ROUNDS) == 3

    # Round 1 alone committed: a fresh start.
    assert continuation_round(store, "partial", 1) == 0
