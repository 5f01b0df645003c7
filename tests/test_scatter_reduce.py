"""Scatter-reduce (training.reducers > 1) trains to the single aggregator's bytes, whatever the delivery."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from shared.control import run_watchdog
from shared.efs import EfsStore
from shared.errors import InvalidMessageError, JobSpecError
from shared.local.session import LocalStack
from shared.queues import parse_aggregate
from shared import reduction
from shared.reduction import reduce_worker_results, slice_bounds, write_worker_result
from shared.spec import parse_job_spec
from shared.state import FAILED, SUCCEEDED
from shared.training import TRAINING_MODES, reduce_results
from tests.baton_jobs import breast_cancer_spec, final_params, run_job
from tests.inprocess import HANDLERS, FakeContext, sqs_event
from tests.reliability_support import FAST_RETRY_SECONDS, wait_all

# Section overrides of breast_cancer_spec for the three training modes.
MODE_SPECS = {
    "gradient_average": {},
    "model_average": {"training": {"mode": "model_average", "local_steps": 2}},
    "kmeans": {"model": {"name": "kmeans", "n_clusters": 3}},
}


def mode_spec(mode: str, job_id: str, reducers: int) -> dict:
    overrides = MODE_SPECS[mode]
    return breast_cancer_spec(job_id, model=overrides.get("model"),
                              training={"max_rounds": 4, **overrides.get("training", {}), "reducers": reducers})


def params_bytes(efs_root, job_id: str) -> bytes:
    return (efs_root / "jobs" / job_id / "model" / "params.npy").read_bytes()


def receive_all(stack, logical_id: str) -> list[dict]:
    messages = []
    while True:
        received = stack.sqs.receive_message(QueueUrl=stack.queue_urls[logical_id], MaxNumberOfMessages=10,
                                             AttributeNames=["All"]).get("Messages", [])
        if not received:
            return messages
        messages.extend(received)


def deliver_aggregate_queue(stack, message: dict, times: int = 1) -> None:
    """Run the aggregator on ``message`` ``times`` times (a redelivery), then delete it."""
    url = stack.queue_urls["AggregateQueue"]
    for _ in range(times):
        response = HANDLERS["AggregateQueue"](sqs_event([message], "aggregate"), FakeContext())
        assert not response["batchItemFailures"], message["Body"]
    stack.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


def run_until_reduce_messages(stack, round_index: int) -> list[dict]:
    """Deliver messages until round ``round_index``'s reduce messages wait; return them, received."""
    while True:
        while stack.step("JobsQueue") is not None or stack.step("TasksQueue") is not None:
            pass
        messages = receive_all(stack, "AggregateQueue")
        reduces = [message for message in messages if json.loads(message["Body"]).get("round") == round_index
                   and "reduce" in json.loads(message["Body"])]
        others = [message for message in messages if message not in reduces]
        for message in others:
            deliver_aggregate_queue(stack, message)
        if reduces:
            return reduces
        assert others, f"no reduce messages of round {round_index} arrived"


# In-process runs ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODE_SPECS))
def test_reducers_match_single_aggregator(inprocess_stack, mode):
    for reducers in (1, 2, 3, 7):
        record = run_job(inprocess_stack, mode_spec(mode, f"{mode}-r{reducers}", reducers))
        assert record.status == SUCCEEDED, record.error

    root = inprocess_stack.efs_root
    expected = final_params(root, f"{mode}-r1")
    for reducers in (2, 3, 7):
        job_id = f"{mode}-r{reducers}"
        assert np.array_equal(final_params(root, job_id), expected), job_id
        assert params_bytes(root, job_id) == params_bytes(root, f"{mode}-r1"), job_id


def test_reducers_wrote_slices(inprocess_stack):
    spec = mode_spec("gradient_average", "slices-written", 3)
    spec["training"]["max_rounds"] = 1
    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    assert inprocess_stack.services.state.get_reduced_slices("slices-written", 0) == [0, 1, 2]
    round_dir = inprocess_stack.efs_root / "jobs" / "slices-written" / "rounds" / "0"
    assert sorted(path.name for path in round_dir.glob("reduced-*")) == ["reduced-0.npy", "reduced-1.npy",
                                                                         "reduced-2.npy"]
    reduce_bodies = [delivery.body for delivery in inprocess_stack.deliveries if "reduce" in delivery.body]
    assert sorted(body["reduce"] for body in reduce_bodies) == [0, 1, 2]


def test_duplicated_reordered_and_late_reduce_messages(inprocess_stack):
    reference = run_job(inprocess_stack, mode_spec("model_average", "scrambled-r1", 1))
    assert reference.status == SUCCEEDED, reference.error

    spec = mode_spec("model_average", "scrambled", 3)
    inprocess_stack.submit(spec)
    first_round_bodies = []
    for round_index in range(spec["training"]["max_rounds"]):
        reduces = run_until_reduce_messages(inprocess_stack, round_index)
        # Later rounds hold copies too: a duplicate that finds the set complete re-sends
        # the aggregate message, whose copy re-sends the tasks, whose copies re-send these.
        # One message per slice is kept, so the copies do not multiply round after round.
        first_of_slice = {}
        for message in reduces:
            first_of_slice.setdefault(json.loads(message["Body"])["reduce"], message)
        assert sorted(first_of_slice) == [0, 1, 2]
        for message in reduces:
            if message not in first_of_slice.values():
                inprocess_stack.sqs.delete_message(QueueUrl=inprocess_stack.queue_urls["AggregateQueue"],
                                                   ReceiptHandle=message["ReceiptHandle"])
        if round_index == 0:
            first_round_bodies = [json.loads(message["Body"]) for message in first_of_slice.values()]
        if round_index == 2:
            # Copies of round 0's reduce messages arrive long after that round committed.
            for body in first_round_bodies:
                inprocess_stack.send("AggregateQueue", body)
        # Back to front, and each one delivered twice.
        for slice_index in (2, 1, 0):
            deliver_aggregate_queue(inprocess_stack, first_of_slice[slice_index], times=2)
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("scrambled")
    assert record.status == SUCCEEDED, record.error
    assert not any(delivery.failed for delivery in inprocess_stack.deliveries)
    assert params_bytes(inprocess_stack.efs_root, "scrambled") == params_bytes(inprocess_stack.efs_root,
                                                                                "scrambled-r1")


def test_watchdog_resends_missing_reduce_message(inprocess_stack):
    reference = run_job(inprocess_stack, mode_spec("kmeans", "stuck-r1", 1))
    assert reference.status == SUCCEEDED, reference.error

    spec = mode_spec("kmeans", "stuck", 3)
    inprocess_stack.submit(spec)
    reduces = run_until_reduce_messages(inprocess_stack, 1)
    lost = [message for message in reduces if json.loads(message["Body"])["reduce"] == 1]
    for message in reduces:
        if message in lost:
            inprocess_stack.sqs.delete_message(QueueUrl=inprocess_stack.queue_urls["AggregateQueue"],
                                               ReceiptHandle=message["ReceiptHandle"])
        else:
            deliver_aggregate_queue(inprocess_stack, message)
    assert inprocess_stack.run() == 0
    assert inprocess_stack.services.state.get_reduced_slices("stuck", 1) == [0, 2]

    counts = run_watchdog(inprocess_stack.services, now=time.time() + 10 * inprocess_stack.settings.stall_seconds)
    assert counts["resent"] == 1
    resent = [json.loads(message["Body"]) for message in receive_all(inprocess_stack, "AggregateQueue")]
    assert resent == [{"job_id": "stuck", "round": 1, "reduce": 1}]

    inprocess_stack.send("AggregateQueue", resent[0])
    inprocess_stack.run()
    record = inprocess_stack.services.state.get_job("stuck")
    assert record.status == SUCCEEDED, record.error
    assert params_bytes(inprocess_stack.efs_root, "stuck") == params_bytes(inprocess_stack.efs_root, "stuck-r1")


def test_early_aggregate_message_resends_reduces(inprocess_stack):
    spec = mode_spec("gradient_average", "early", 2)
    inprocess_stack.submit(spec)
    reduces = run_until_reduce_messages(inprocess_stack, 0)
    for message in reduces:
        inprocess_stack.sqs.delete_message(QueueUrl=inprocess_stack.queue_urls["AggregateQueue"],
                                           ReceiptHandle=message["ReceiptHandle"])

    inprocess_stack.send("AggregateQueue", {"job_id": "early", "round": 0})
    delivery = inprocess_stack.step("AggregateQueue")

    assert not delivery.failed
    assert inprocess_stack.services.state.get_job("early").round == 0
    resent = sorted(json.loads(message["Body"])["reduce"] for message in receive_all(inprocess_stack,
                                                                                     "AggregateQueue"))
    assert resent == [0, 1]


def test_reduce_message_for_single_aggregator_dropped(inprocess_stack):
    reference = run_job(inprocess_stack, mode_spec("gradient_average", "single-reference", 1))
    assert reference.status == SUCCEEDED, reference.error
    inprocess_stack.submit(mode_spec("gradient_average", "single", 1))
    while inprocess_stack.step("JobsQueue") is not None or inprocess_stack.step("TasksQueue") is not None:
        pass

    inprocess_stack.send("AggregateQueue", {"job_id": "single", "round": 0, "reduce": 0})
    messages = receive_all(inprocess_stack, "AggregateQueue")
    stray = [message for message in messages if "reduce" in json.loads(message["Body"])]
    assert len(stray) == 1
    deliver_aggregate_queue(inprocess_stack, stray[0])

    assert inprocess_stack.services.state.get_reduced_slices("single", 0) == []
    round_dir = inprocess_stack.efs_root / "jobs" / "single" / "rounds" / "0"
    assert not list(round_dir.glob("reduced-*"))

    for message in messages:
        if message not in stray:
            deliver_aggregate_queue(inprocess_stack, message)
    inprocess_stack.run()
    record = inprocess_stack.services.state.get_job("single")
    assert record.status == SUCCEEDED, record.error
    assert params_bytes(inprocess_stack.efs_root, "single") == params_bytes(inprocess_stack.efs_root,
                                                                            "single-reference")


def test_more_reducers_than_parameters_fails_job(inprocess_stack):
    # Logistic regression on 30 features has 31 parameters.
    record = run_job(inprocess_stack, mode_spec("gradient_average", "too-many-reducers", 32))

    assert record.status == FAILED
    assert "training.reducers" in record.error
    assert "got 32" in record.error
    assert "only 31 parameters" in record.error


# Spec and messages -------------------------------------------------------------------------


@pytest.mark.parametrize("value,problem", [(0, "must be at least 1"), (1001, "must be at most 1000"),
                                           ("two", "expected an integer"), (1.5, "expected an integer")])
def test_spec_rejects_bad_reducers(value, problem):
    spec = breast_cancer_spec("bad-reducers", training={"reducers": value})

    with pytest.raises(JobSpecError) as raised:
        parse_job_spec(spec)

    assert raised.value.field == "training.reducers"
    assert problem in str(raised.value)


def test_spec_reducers_default_is_one():
    assert parse_job_spec(breast_cancer_spec("default-reducers")).training.reducers == 1


@pytest.mark.parametrize("body,problem", [
    ({"job_id": "a", "round": 0, "reduce": -1}, "'reduce' must be an integer from 0 to"),
    ({"job_id": "a", "round": 0, "reduce": True}, "'reduce' must be an integer from 0 to"),
    ({"job_id": "a", "round": 0, "reduce": 1, "continuation": 2}, "never carries 'continuation'"),
])
def test_parse_rejects_bad_reduce_message(body, problem):
    with pytest.raises(InvalidMessageError, match=problem):
        parse_aggregate(json.dumps(body))


# Slices and the reduction ------------------------------------------------------------------


@pytest.mark.parametrize("n_params,reducers", [(31, 1), (31, 2), (31, 7), (31, 31), (1000, 3)])
def test_slices_cover_parameters_once(n_params, reducers):
    bounds = [slice_bounds(n_params, reducers, index) for index in range(reducers)]

    assert bounds[0][0] == 0
    assert bounds[-1][1] == n_params
    assert all(previous[1] == current[0] for previous, current in zip(bounds, bounds[1:]))
    assert all(stop > start for start, stop in bounds)


def random_results(mode_name: str, n_workers: int, n_params: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    results = []
    for worker in range(n_workers):
        # Worker 1 drew no rows, which model averaging leaves out of the sum.
        rows = np.int64(0 if worker == 1 else rng.integers(1, 50))
        vector = rng.standard_normal(n_params) * 10.0 ** rng.integers(-5, 5, n_params)
        if mode_name == "statistics":
            results.append({"sums": vector.reshape(4, -1), "counts": rng.random(4), "inertia": rng.random(1),
                            "n_samples": rows})
        else:
            name = TRAINING_MODES[mode_name].vector_name
            results.append({name: vector, "loss_sum": np.float64(rng.random()), "n_samples": rows})
    return results


@pytest.mark.parametrize("read_whole_max_bytes", [0, 10**9], ids=["mapped", "read-whole"])
@pytest.mark.parametrize("mode_name", sorted(TRAINING_MODES))
def test_file_reduction_equals_in_memory(tmp_path, monkeypatch, mode_name, read_whole_max_bytes):
    monkeypatch.setattr(reduction, "READ_WHOLE_MAX_BYTES", read_whole_max_bytes)
    mode = TRAINING_MODES[mode_name]
    n_workers, n_params = 5, 40_000
    results = random_results(mode_name, n_workers, n_params, seed=3)
    store = EfsStore(tmp_path)
    store.round_dir("job", 0).mkdir(parents=True)
    for worker, arrays in enumerate(results):
        write_worker_result(store, "job", 0, worker, mode, arrays)

    whole = reduce_results(mode, results, 0, n_params)
    for reducers in (1, 3, 7):
        parts = [reduce_worker_results(store, "job", 0, n_workers, mode, n_params,
                                       *slice_bounds(n_params, reducers, index)) for index in range(reducers)]
        joined = np.concatenate([part.vector for part in parts])
        assert joined.tobytes() == whole.vector.tobytes(), reducers
        for part in parts:
            assert part.scalars.keys() == whole.scalars.keys()
            for name, value in whole.scalars.items():
                assert np.asarray(part.scalars[name]).tobytes() == np.asarray(value).tobytes(), name


# Local runtime -----------------------------------------------------------------------------


def test_local_runtime_reducers_match(efs_root):
    job_ids = []
    with LocalStack(efs_root, retry_delay_seconds=FAST_RETRY_SECONDS, concurrency={"aggregator": 3}) as stack:
        for mode in sorted(MODE_SPECS):
            for reducers in (1, 3):
                job_id = f"local-{mode}-r{reducers}".replace("_", "-")
                stack.submit(mode_spec(mode, job_id, reducers))
                job_ids.append(job_id)
        records = wait_all(stack, job_ids, timeout_seconds=300)

    for job_id, record in records.items():
        assert record.status == SUCCEEDED, f"{job_id}: {record.error}"
    for mode in sorted(MODE_SPECS):
        single, scattered = (f"local-{mode}-r{reducers}".replace("_", "-") for reducers in (1, 3))
        assert params_bytes(efs_root, scattered) == params_bytes(efs_root, single), mode
