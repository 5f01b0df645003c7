"""Continuation chains: a worker's or aggregator's share of a round over several invocations.

A worker or aggregator does its share as a sequence of bounded steps. Before each step
after the first it asks its InvocationBudget whether time is running out; if so it saves
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

from pathlib import Path
from typing import Callable

import numpy as np

from shared.config import Settings
from shared.efs import EfsStore
from shared.errors import StaleMessageError


class InvocationBudget:
    """Decides when an invocation should stop and continue in a new one.

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


def load_worker_progress(store: EfsStore, path: Path, continuation: int | None,
                          message_id: str) -> tuple[dict[str, np.ndarray] | None, int, float]:
    """Return the saved progress (None to begin afresh), this link's number, and the
    seconds the earlier links of the chain took."""
    if not path.exists():
        return None, continuation or 0, 0.0
    arrays = store.read_arrays(path)
    link = _chain_position(int(arrays.pop("_next")), str(arrays.pop("_writer")), continuation, message_id)
    if link is None:
        raise StaleMessageError(f"continuation {continuation} is a duplicate of an earlier link; dropped")
    # Absent from progress files that an earlier version of Baton wrote.
    earlier_seconds = float(arrays.pop("_seconds", 0.0))
    return arrays, link, earlier_seconds


def load_aggregate_progress(store: EfsStore, path: Path, continuation: int | None,
                             message_id: str) -> tuple[dict, int, float]:
    """Return the aggregator's saved progress of a round (empty to begin), this link's
    number, and the seconds the earlier links of the chain took."""
    if not path.exists():
        return {}, continuation or 0, 0.0
    saved = store.read_json(path)
    link = _chain_position(saved.pop("next"), saved.pop("writer"), continuation, message_id)
    if link is None:
        raise StaleMessageError(f"aggregate continuation {continuation} is a duplicate of an earlier link; dropped")
    # Absent from progress files that an earlier version of Baton wrote.
    return saved, link, float(saved.pop("seconds", 0.0))
