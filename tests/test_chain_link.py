"""ChainLink: the progress files of continuation chains keep their format, and stale links are dropped."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from shared.continuation import ChainLink
from shared.efs import EfsStore
from shared.errors import StaleMessageError

JOB_ID, ROUND = "chain-job", 3


class RecordingQueues:
    def __init__(self):
        self.sent = []

    def send_task(self, job_id, round_index, worker, continuation=None):
        self.sent.append(("task", job_id, round_index, worker, continuation))

    def send_aggregate(self, job_id, round_index, continuation=None):
        self.sent.append(("aggregate", job_id, round_index, continuation))


class RecordingState:
    def __init__(self):
        self.progress = []

    def record_progress(self, job_id, round_index):
        self.progress.append((job_id, round_index))


@pytest.fixture
def store(tmp_path):
    """A store with the round's folder, as the aggregator leaves it when it writes the round's state."""
    store = EfsStore(tmp_path / "efs")
    store.round_dir(JOB_ID, ROUND).mkdir(parents=True)
    return store


@pytest.fixture
def services():
    return SimpleNamespace(queues=RecordingQueues(), state=RecordingState())


def save_link(store, services, worker, continuation, message_id, value):
    """Run one link that saves ``{"x": value}`` and sends the next link's message."""
    link = ChainLink(store, JOB_ID, ROUND, worker, continuation, message_id)
    link.continue_later(services, {"x": np.float64(value)}, time.monotonic(), steps=1)


def test_worker_progress_bytes_unchanged(store, services):
    progress = {"gradient": np.arange(4, dtype=np.float64), "next_row": np.int64(4096)}
    started = time.monotonic()
    ChainLink(store, JOB_ID, ROUND, 1, None, "message-a").continue_later(services, progress, started, steps=2)

    # The layout that workers wrote before ChainLink, so a progress file of either version loads in the other.
    path = store.round_dir(JOB_ID, ROUND) / "progress-1.npz"
    seconds = store.read_arrays(path)["_seconds"]
    expected = store.root / "expected.npz"
    store.write_arrays(expected, {**progress, "_next": np.int64(1), "_writer": np.str_("message-a"),
                                  "_seconds": np.float64(seconds)})
    assert path.read_bytes() == expected.read_bytes()
    assert 0.0 <= seconds <= time.monotonic() - started
    assert services.queues.sent == [("task", JOB_ID, ROUND, 1, 1)]
    assert services.state.progress == [(JOB_ID, ROUND)]


def test_aggregate_progress_fields_unchanged(store, services):
    progress = {"train_loss": 0.5, "n_samples": 10, "partials": []}
    started = time.monotonic() - 2.0
    ChainLink(store, JOB_ID, ROUND, None, None, "message-b").continue_later(services, progress, started, steps=1)

    path = store.round_dir(JOB_ID, ROUND) / "aggregate-progress.json"
    saved = json.loads(path.read_text())
    assert saved.pop("seconds") >= 2.0
    assert saved == {**progress, "next": 1, "writer": "message-b"}
    assert services.queues.sent == [("aggregate", JOB_ID, ROUND, 1)]
    assert services.state.progress == [(JOB_ID, ROUND)]


@pytest.mark.parametrize("worker", [0, None])
def test_next_link_resumes_saved_progress(store, services, worker):
    first = ChainLink(store, JOB_ID, ROUND, worker, None, "message-a")
    assert (first.number, first.progress, first.earlier_seconds) == (0, None, 0.0)
    first.continue_later(services, {"train_loss": np.float64(0.25)}, time.monotonic() - 2.0, steps=1)

    second = ChainLink(store, JOB_ID, ROUND, worker, 1, "message-c")
    assert second.number == 1
    assert float(second.progress["train_loss"]) == 0.25
    assert set(second.progress) == {"train_loss"}
    assert second.earlier_seconds >= 2.0
    assert second.total_seconds(time.monotonic() - 3.0) >= second.earlier_seconds + 3.0


@pytest.mark.parametrize("worker", [0, None])
def test_retry_of_saving_link_runs_again(store, services, worker):
    save_link(store, services, worker, None, "message-a", 1.0)
    save_link(store, services, worker, 1, "message-c", 2.0)

    # The file now names link 2 and its writer message-c: a redelivery of message-c runs as link 1 again.
    retry = ChainLink(store, JOB_ID, ROUND, worker, 1, "message-c")
    assert retry.number == 1
    assert float(retry.progress["x"]) == 2.0


@pytest.mark.parametrize("worker", [0, None])
def test_old_link_duplicate_dropped(store, services, worker):
    save_link(store, services, worker, None, "message-a", 1.0)
    save_link(store, services, worker, 1, "message-c", 2.0)

    with pytest.raises(StaleMessageError, match="continuation 1 is a duplicate of an earlier link"):
        ChainLink(store, JOB_ID, ROUND, worker, 1, "message-d")


def test_progress_without_seconds_loads(store):
    # Progress files from before the chain recorded its seconds have no _seconds array.
    path = store.round_dir(JOB_ID, ROUND) / "progress-0.npz"
    store.write_arrays(path, {"x": np.float64(1.0), "_next": np.int64(1), "_writer": np.str_("message-a")})

    link = ChainLink(store, JOB_ID, ROUND, 0, 1, "message-c")
    assert link.number == 1
    assert link.earlier_seconds == 0.0
    assert set(link.progress) == {"x"}


@pytest.mark.parametrize("worker", [0, None], ids=["worker", "aggregator"])
def test_pruned_round_not_made_again(store, services, worker):
    link = ChainLink(store, JOB_ID, ROUND, worker, None, "message-a")
    store.round_dir(JOB_ID, ROUND).rmdir()

    with pytest.raises(StaleMessageError, match=r"round 4 of job chain-job is over: its folder '.*rounds/3' was pruned"):
        link.continue_later(services, {"x": np.float64(1.0)}, time.monotonic(), steps=1)

    assert not store.round_dir(JOB_ID, ROUND).exists()
    assert services.queues.sent == []


@pytest.mark.parametrize("worker, damage", [(0, b"not a zip archive"), (None, b"{\"next\": 2"), (None, b"[1, 2]")],
                         ids=["worker-garbage", "aggregator-cut", "aggregator-not-object"])
def test_damaged_progress_names_file_and_fix(store, services, worker, damage):
    from shared.errors import DataError

    save_link(store, services, worker, None, "message-a", 1.0)
    link_path = ChainLink(store, JOB_ID, ROUND, worker, 1, "message-c").path
    link_path.write_bytes(damage)

    with pytest.raises(DataError) as raised:
        ChainLink(store, JOB_ID, ROUND, worker, 1, "message-c")

    message = str(raised.value)
    assert f"progress file 'jobs/{JOB_ID}/rounds/{ROUND}/{link_path.name}' is damaged" in message
    assert f"delete it and run `baton resume {JOB_ID}`" in message


@pytest.mark.parametrize("worker", [0, None], ids=["worker", "aggregator"])
def test_continuation_without_progress_starts_chain(store, worker):
    # A continuation number that no saved progress backs (a forged or stray message) is not
    # counted: the link runs as the chain's first, from the start of the share.
    link = ChainLink(store, JOB_ID, ROUND, worker, 10**9, "message-x")

    assert link.number == 0
    assert link.progress is None


@pytest.mark.parametrize("field, value", [("next", "1"), ("next", None), ("writer", 7), ("seconds", "abc"),
                                          ("seconds", float("nan")), ("seconds", [1])])
def test_damaged_aggregate_progress_field(store, services, field, value):
    from shared.errors import DataError

    save_link(store, services, None, None, "message-a", 1.0)
    path = store.round_dir(JOB_ID, ROUND) / "aggregate-progress.json"
    saved = json.loads(path.read_text())
    saved[field] = value
    path.write_text(json.dumps(saved))

    with pytest.raises(DataError, match="aggregate-progress.json' is damaged"):
        ChainLink(store, JOB_ID, ROUND, None, 1, "message-c")


def test_progress_path_that_is_folder(store):
    from shared.errors import DataError

    (store.round_dir(JOB_ID, ROUND) / "progress-0.npz").mkdir()

    with pytest.raises(DataError, match="progress-0.npz' is damaged"):
        ChainLink(store, JOB_ID, ROUND, 0, 1, "message-c")
