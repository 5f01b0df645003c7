"""Continuation chains: a worker's or aggregator's share of a round over several invocations.

A worker or aggregator does its share as a sequence of bounded steps. Before each step
after the first it checks its InvocationBudget for the time left. When that runs low, it saves
its progress atomically on EFS and sends a continuation message naming the next link of
the chain. Timeline of one link::

    start ── step ── step ── ... ── remaining < margin ── save progress ── send {continuation: n+1}
    (at least one step per link, so a chain always moves forward)

A progress file records which link should run next (``next``) and the SQS message id of
the link that wrote it (``writer``). A continuation message ``c`` then runs if
``next == c``, or if ``next == c + 1`` and the file was written by this very message (a
retry after the save). Any message with ``c < next`` otherwise is a duplicate of an old
link and is dropped, which merges duplicated chains back into one. A message without a
``continuation`` (the first task, or a re-send by the watchdog or resume) adopts whatever
progress is on EFS.
"""

from __future__ import annotations

import logging
import math
import time
import zipfile
from typing import Any, Callable

import numpy as np

from shared import faults
from shared.config import Settings
from shared.efs import EfsStore, relative_efs_path, stale_if_round_pruned
from shared.errors import DataError, StaleMessageError
from shared.round_files import round_progress_path
from shared.services import Services
from shared.training import round_number

logger = logging.getLogger(__name__)


class InvocationBudget:
    """The time and steps an invocation has left, which decide when it saves its progress and continues.

    Parameters
    ----------
    remaining_millis : callable or None
        The Lambda context's ``get_remaining_time_in_millis``; None means unbounded.
    settings : Settings
        ``continuation_margin_seconds`` and ``max_steps_per_invocation``.
    """

    def __init__(self, remaining_millis: Callable[[], int] | None, settings: Settings):
        self._remaining_millis = remaining_millis
        self.max_steps = settings.max_steps_per_invocation
        self.steps = 0
        self.margin_millis = 0.0
        if remaining_millis is not None:
            # A quarter of the starting time at most, so a short timeout still leaves
            # three quarters of it for work.
            self.margin_millis = min(settings.continuation_margin_seconds * 1000.0, remaining_millis() / 4.0)

    def count_step(self) -> None:
        self.steps += 1

    def exhausted(self) -> bool:
        """Return whether the invocation should save its progress now."""
        if self.steps == 0:
            return False
        if self.max_steps and self.steps >= self.max_steps:
            return True
        return self._remaining_millis is not None and self._remaining_millis() < self.margin_millis


def _chain_position(saved_next: int, saved_writer: str, continuation: int | None, message_id: str) -> int | None:
    """Return the link number this message runs as, or None if it is a stale duplicate."""
    if continuation is None:
        return saved_next
    if saved_next == continuation:
        return continuation
    if saved_next == continuation + 1 and saved_writer == message_id:
        return continuation
    if saved_next > continuation:
        return None
    # A slower twin chain overwrote newer progress with older; the steps are deterministic,
    # so continuing from the older progress gives the same bytes.
    return continuation


def _chain_fields(saved_next: Any, saved_writer: Any, seconds: Any) -> tuple[int, str, float]:
    """Return a progress file's next link, writer and seconds, checked; raise ValueError if one is not valid."""
    next_link = np.asarray(saved_next)
    if next_link.shape != () or next_link.dtype.kind not in "iu" or next_link < 1:
        raise ValueError(f"the next link is {saved_next!r}, not a whole number of 1 or more")
    writer = np.asarray(saved_writer)
    if writer.shape != () or writer.dtype.kind != "U":
        raise ValueError(f"the writer is {saved_writer!r}, not a message id")
    chain_seconds = np.asarray(seconds)
    if chain_seconds.shape != () or chain_seconds.dtype.kind not in "iuf" or not 0 <= chain_seconds < math.inf:
        raise ValueError(f"the chain's seconds are {seconds!r}, not a finite number of 0 or more")
    return int(next_link), str(writer), float(chain_seconds)


class ChainLink:
    """One invocation's place in the continuation chain of a worker's or the aggregator's share of a round.

    A worker's progress file is ``progress-<w>.npz``: the training mode's arrays and the
    chain fields ``_next``, ``_writer`` and ``_seconds``. The aggregator's is
    ``aggregate-progress.json``: its progress and the fields ``next``, ``writer`` and
    ``seconds``. ``seconds`` is the time that the links before the next one took.

    Parameters
    ----------
    store : EfsStore
    job_id : str
    round_index : int
    worker : int or None
        The worker, or None for the aggregator.
    continuation : int or None
        The message's ``continuation``; None for a message that starts or re-sends a chain.
    message_id : str
        The SQS message id, saved as the writer of the next progress file.

    Attributes
    ----------
    number : int
        This link's position in the chain; 0 when no link saved progress yet.
    progress : dict or None
        The progress that the earlier links saved, without the chain fields, or None.
    earlier_seconds : float
        The seconds the earlier links of the chain took.

    Raises
    ------
    StaleMessageError
        If the message is a duplicate of an earlier link.
    """

    def __init__(self, store: EfsStore, job_id: str, round_index: int, worker: int | None,
                 continuation: int | None, message_id: str):
        self.store, self.job_id, self.round_index, self.worker = store, job_id, round_index, worker
        self.message_id = message_id
        self.path = round_progress_path(store, job_id, round_index, worker)
        self.number, self.progress, self.earlier_seconds = 0, None, 0.0
        if not self.path.exists():
            # Every link saves its progress before it sends the next one, so a continuation
            # without a progress file starts the chain again, as link 0. Its number would
            # otherwise count, unchecked, in the round's invocations and cost.
            return

        try:
            if worker is None:
                saved = store.read_json(self.path)
                saved_next, saved_writer = saved.pop("next"), saved.pop("writer")
                # Absent from progress files that an earlier version of Baton wrote.
                earlier_seconds = saved.pop("seconds", 0.0)
            else:
                saved = store.read_arrays(self.path)
                saved_next, saved_writer = saved.pop("_next"), saved.pop("_writer")
                earlier_seconds = saved.pop("_seconds", 0.0)
            saved_next, saved_writer, earlier_seconds = _chain_fields(saved_next, saved_writer, earlier_seconds)
        except (ValueError, TypeError, KeyError, AttributeError, EOFError, IsADirectoryError,
                zipfile.BadZipFile) as error:
            # The file is written atomically, so something else changed it. Without it the
            # chain computes its share of the round again from the start, to the same bytes.
            share = "aggregation" if worker is None else f"worker {worker}'s share"
            raise DataError(f"progress file '{relative_efs_path(store, self.path)}' is damaged "
                            f"({type(error).__name__}: {error}); delete it and run `baton resume {job_id}`, and the "
                            f"{share} of that round is computed again from its start, with the same result") from None
        number = _chain_position(saved_next, saved_writer, continuation, message_id)
        if number is None:
            kind = "continuation" if worker is not None else "aggregate continuation"
            raise StaleMessageError(f"{kind} {continuation} is a duplicate of an earlier link; dropped")
        self.number, self.progress, self.earlier_seconds = number, saved, earlier_seconds

    def total_seconds(self, started: float) -> float:
        """Return the chain's seconds so far: the earlier links' and this one's since ``started`` (monotonic)."""
        return self.earlier_seconds + time.monotonic() - started

    def continue_later(self, services: Services, progress: dict, started: float, steps: int) -> None:
        """Save ``progress`` for the next link, send the next link's message and record the round's progress.

        The progress is saved before the message is sent, so the next link always finds it.
        A crash between the save and the send leaves no message for the next link, so the
        retry of this message continues from the saved progress and sends it.
        """
        following = self.number + 1
        seconds = self.total_seconds(started)
        ids = {"job_id": self.job_id, "round": self.round_index}
        round_label = f"round {round_number(self.round_index)} of job {self.job_id}"
        if self.worker is None:
            with stale_if_round_pruned(self.path.parent, round_label):
                self.store.write_json(self.path, {**progress, "next": following, "writer": self.message_id,
                                                  "seconds": seconds}, create_folder=False)
            faults.maybe_fail("aggregator.after_progress", **ids)
            services.queues.send_aggregate(self.job_id, self.round_index, continuation=following)
            event = "aggregation continues"
        else:
            ids["worker"] = self.worker
            with stale_if_round_pruned(self.path.parent, round_label):
                self.store.write_arrays(self.path, {**progress, "_next": np.array(following, dtype=np.int64),
                                                    "_writer": np.array(self.message_id, dtype=np.str_),
                                                    "_seconds": np.array(seconds, dtype=np.float64)},
                                        create_folder=False)
            faults.maybe_fail("worker.after_progress", **ids)
            services.queues.send_task(self.job_id, self.round_index, self.worker, continuation=following)
            event = "task continues"

        services.state.record_progress(self.job_id, self.round_index)
        logger.info(event, extra={**ids, "continuation": following, "steps": steps})
