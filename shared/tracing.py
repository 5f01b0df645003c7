"""Phase timings of the local runtime's handlers, for the round benchmark.

Tracing is off unless the environment variable ``BATON_TRACE_DIR`` names a folder when a
local container starts (``LocalStack(trace_dir=...)`` sets it). Only the environment
switches it on, never a job message. When it is off nothing is wrapped, so the handlers
run exactly the code they run on Lambda.

When it is on, :func:`install` wraps the methods that do I/O or maths, from outside
(class and module attributes), and records one span per call:

==============  ===========================================================================
phase           what is wrapped
==============  ===========================================================================
``step``        ``worker.run_task``, ``aggregation.aggregate_round`` and
                ``aggregation.reduce_slice``, the step of one record
``efs_read``    ``EfsStore`` reads, ``data.load_shard``/``load_validation``, the size scans
                of ``cost.py``
``efs_write``   ``EfsStore`` writes and ``prune_rounds``
``state``       every public ``StateStore`` method (DynamoDB)
``send``        every ``QueueClient.send_*`` method (SQS)
``compute``     a training mode's ``begin``, ``advance`` and ``finish`` (the worker's maths)
``aggregation`` a training mode's ``combine`` and a model's ``metrics`` (the aggregator's
                maths, validation included)
==============  ===========================================================================

The container loop adds an ``invoke`` span per invocation (from the event's arrival in
the container to the handler's return). Only the outermost span of a call chain is
recorded below ``step``, so a read inside a wrapped read counts once. Spans carry the job,
round and worker of the step that ran them, and times from ``time.monotonic()``.

NOTE: spans from different processes are compared directly, which assumes one clock for
every process of the machine. On Linux ``time.monotonic()`` reads CLOCK_MONOTONIC, which
is system-wide.

Each process appends its spans as JSON lines to ``<trace dir>/<function>-<pid>.jsonl``
after each invocation. :func:`read_spans` loads a folder, and :func:`round_breakdown`
splits each round's critical path into phases.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

TRACE_DIR_VARIABLE = "BATON_TRACE_DIR"

# Phases of a round's critical path, in report order; sums over them equal the round time.
BREAKDOWN_PHASES = ("compute", "efs_read", "efs_write", "state", "dispatch", "aggregation", "other")

_ids: contextvars.ContextVar[Mapping] = contextvars.ContextVar("baton_trace_ids", default=MappingProxyType({}))
_local = threading.local()
_tracer: "Tracer | None" = None
# (owner, attribute, original) of every wrapped attribute, so that uninstall() can undo it.
_patched: list[tuple[Any, str, Callable]] = []


class Tracer:
    """Collects spans in memory and appends them to one JSON-lines file on :meth:`flush`.

    Parameters
    ----------
    path : Path
        File the spans are appended to.
    function : str
        Name of the Lambda function this process runs, stored with every span.
    """

    def __init__(self, path: Path, function: str):
        self.path = Path(path)
        self.function = function
        self.spans: list[dict] = []
        self._lock = threading.Lock()

    def record(self, phase: str, name: str, start: float, end: float, **extra: Any) -> None:
        """Store one span with the ids of the step now running."""
        span = {"phase": phase, "name": name, "start": start, "end": end, "function": self.function,
                "pid": os.getpid(), **_ids.get(), **extra}
        with self._lock:
            self.spans.append(span)

    def flush(self) -> None:
        """Append the stored spans to the file and forget them."""
        with self._lock:
            spans, self.spans = self.spans, []
        if not spans:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.writelines(json.dumps(span) + "\n" for span in spans)


def active_tracer() -> Tracer | None:
    """Return the process's tracer, or None when tracing is off."""
    return _tracer


def _timed(phase: str, function: Callable, name: str) -> Callable:
    """Wrap ``function`` so that each outermost call records a ``phase`` span."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        tracer = _tracer
        if tracer is None or getattr(_local, "depth", 0) > 0:
            return function(*args, **kwargs)
        _local.depth = 1
        start = time.monotonic()
        try:
            return function(*args, **kwargs)
        finally:
            tracer.record(phase, name, start, time.monotonic())
            _local.depth = 0

    wrapper.__baton_traced__ = True  # type: ignore[attr-defined]  # a function attribute, checked before wrapping
    return wrapper


def _traced_step(function: Callable, name: str, ids_of: Callable[[Any], dict]) -> Callable:
    """Wrap a service step so that its spans carry the ids of its message."""

    @functools.wraps(function)
    def wrapper(services, message, *args, **kwargs):
        tracer = _tracer
        if tracer is None:
            return function(services, message, *args, **kwargs)
        token = _ids.set(ids_of(message))
        start = time.monotonic()
        try:
            return function(services, message, *args, **kwargs)
        finally:
            tracer.record("step", name, start, time.monotonic())
            _ids.reset(token)

    wrapper.__baton_traced__ = True  # type: ignore[attr-defined]  # a function attribute, checked before wrapping
    return wrapper


def _wrap_attribute(owner: Any, attribute: str, phase: str) -> None:
    original = owner.__dict__.get(attribute) if isinstance(owner, type) else getattr(owner, attribute, None)
    if original is None or getattr(original, "__baton_traced__", False):
        return
    label = f"{getattr(owner, '__name__', owner)}.{attribute}"
    _patched.append((owner, attribute, original))
    setattr(owner, attribute, _timed(phase, original, label))


def _all_subclasses(base: type[Any]) -> Iterable[type[Any]]:
    for subclass in base.__subclasses__():
        yield subclass
        yield from _all_subclasses(subclass)


def _message_ids(message: dict) -> dict:
    return {key: message[key] for key in ("job_id", "round", "worker", "continuation") if key in message}


def install(function: str, trace_dir: str | os.PathLike) -> Tracer:
    """Switch tracing on in this process and wrap the traced methods; return the tracer.

    Must run before the handler module is imported, because ``functions/*.py`` bind
    ``run_task`` and ``aggregate_round`` when they are imported.
    """
    global _tracer
    from shared import aggregation, cost, reduction, shards, worker
    from shared.efs import EfsStore
    from shared.models.base import Model
    from shared.queues import QueueClient
    from shared.state import StateStore
    from shared.training import TrainingMode

    _tracer = Tracer(Path(trace_dir) / f"{function}-{os.getpid()}.jsonl", function)

    for module, name in ((worker, "run_task"), (aggregation, "aggregate_round"), (aggregation, "reduce_slice")):
        original = getattr(module, name)
        if not getattr(original, "__baton_traced__", False):
            _patched.append((module, name, original))
            setattr(module, name, _traced_step(original, name, _message_ids))
    for name in ("read_json", "read_arrays", "read_npy"):
        _wrap_attribute(EfsStore, name, "efs_read")
    for name in ("write_json", "write_arrays", "write_npy", "prune_rounds"):
        _wrap_attribute(EfsStore, name, "efs_write")
    for module, names in ((shards, ("load_shard", "load_validation")), (cost, ("file_bytes", "folder_bytes"))):
        for name in names:
            _wrap_attribute(module, name, "efs_read")
    for name, member in list(vars(StateStore).items()):
        if inspect.isfunction(member) and not name.startswith("_"):
            _wrap_attribute(StateStore, name, "state")
    for name, member in list(vars(QueueClient).items()):
        if inspect.isfunction(member) and name.startswith("send"):
            _wrap_attribute(QueueClient, name, "send")
    # Only the leaf functions of shared/reduction.py: its file reads and writes and its sum.
    # Its other functions call these and the store, so wrapping them would count twice.
    for name in ("_read_file_into", "_map_file_slice"):
        _wrap_attribute(reduction, name, "efs_read")
    _wrap_attribute(reduction, "write_buffers_atomic", "efs_write")
    for name in ("accumulate_vectors", "add_scaled_vector"):
        _wrap_attribute(reduction, name, "aggregation")
    for mode in _all_subclasses(TrainingMode):
        for name in ("begin", "advance", "finish"):
            _wrap_attribute(mode, name, "compute")
        _wrap_attribute(mode, "step", "aggregation")
    for model in (Model, *_all_subclasses(Model)):
        _wrap_attribute(model, "metrics", "aggregation")
    return _tracer


def uninstall() -> None:
    """Restore every wrapped attribute and switch tracing off; for tests."""
    global _tracer
    while _patched:
        owner, attribute, original = _patched.pop()
        setattr(owner, attribute, original)
    _tracer = None


def install_from_environment(function: str, environ: dict | None = None) -> Tracer | None:
    """Call :func:`install` if ``BATON_TRACE_DIR`` is set in ``environ``; else return None."""
    trace_dir = (os.environ if environ is None else environ).get(TRACE_DIR_VARIABLE)
    return install(function, trace_dir) if trace_dir else None


def record_invocation(event: dict, start: float, end: float) -> None:
    """Record one container invocation; a no-op when tracing is off."""
    tracer = _tracer
    if tracer is None:
        return
    ids = {}
    records = event.get("Records") if isinstance(event, dict) else None
    if records and len(records) == 1:
        try:
            ids = _message_ids(json.loads(records[0].get("body", "")))
        except (ValueError, RecursionError, TypeError, AttributeError):
            ids = {}
    tracer.record("invoke", "invoke", start, end, **ids)


def flush() -> None:
    """Write the spans recorded so far; a no-op when tracing is off."""
    if _tracer is not None:
        _tracer.flush()


def read_spans(trace_dir: str | os.PathLike) -> list[dict]:
    """Return every span stored under ``trace_dir``, sorted by start time."""
    spans: list[dict] = []
    for path in sorted(Path(trace_dir).glob("*.jsonl")):
        with open(path) as handle:
            spans.extend(json.loads(line) for line in handle if line.strip())
    return sorted(spans, key=lambda span: span["start"])


# Analysis --------------------------------------------------------------------------------


@dataclass
class RoundBreakdown:
    """The critical path of one round, split into :data:`BREAKDOWN_PHASES` (seconds).

    ``seconds`` is the round time: from the end of the call that sent the round's tasks to
    the end of the call that sent the next round's tasks.
    """

    job_id: str
    round: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    critical_worker: int = -1


def _phase_sums(spans: list[dict], start: float, end: float, step_name: str) -> dict[str, float]:
    """Sum the spans of one step that end within [start, end], by breakdown phase."""
    sums: dict[str, float] = {}
    for span in spans:
        if span["phase"] in ("step", "invoke") or span["start"] < start or span["end"] > end:
            continue
        phase = span["phase"]
        if phase == "send":
            phase = "dispatch"
        elif phase == "compute" and step_name == "aggregate_round":
            phase = "aggregation"
        sums[phase] = sums.get(phase, 0.0) + span["end"] - span["start"]
    return sums


def round_breakdown(spans: list[dict], job_id: str) -> list[RoundBreakdown]:
    """Split every complete round of ``job_id`` along its critical path.

    A round's critical path has four parts. The first is the tasks' dispatch: from the end
    of their send to the start of the worker's step, which includes the queue, the lane and
    the handler's start-up. Then comes the step of the worker whose record completed the
    round, up to the end of its send of the aggregate message. The aggregate message's
    dispatch follows, and last the aggregator's step up to the end of its send of the next
    round's tasks. Within a
    step, time in no wrapped call counts as ``other``, and SQS send calls count as
    ``dispatch``, so the phases add up to the round time.

    Rounds without a traced predecessor (round 0) or successor (the last) are left out,
    and so are rounds of a job with ``training.reducers`` above 1, whose aggregate message a
    reducer sends.
    """
    job_spans = [span for span in spans if span.get("job_id") == job_id]
    steps = [span for span in job_spans if span["phase"] == "step"]
    by_pid_step: dict[int, list[dict]] = {}
    for span in job_spans:
        by_pid_step.setdefault(span["pid"], []).append(span)

    def children(step: dict) -> list[dict]:
        return [span for span in by_pid_step[step["pid"]]
                if span["start"] >= step["start"] and span["end"] <= step["end"] and span is not step]

    def send_in(step: dict, name: str) -> dict | None:
        sends = [span for span in children(step) if span["phase"] == "send" and span["name"].endswith(name)]
        return sends[0] if sends else None

    # The aggregation of round r that sent round r + 1's tasks, by r.
    aggregations = {}
    for step in steps:
        if step["name"] == "aggregate_round" and step.get("round") not in aggregations:
            sent = send_in(step, "send_tasks")
            if sent is not None:
                aggregations[step["round"]] = (step, sent)

    breakdowns = []
    for round_index in sorted(aggregations):
        if round_index - 1 not in aggregations:
            continue
        previous_send = aggregations[round_index - 1][1]
        round_start = previous_send["end"]
        aggregation, tasks_sent = aggregations[round_index]
        task_steps = [(step, send_in(step, "send_aggregate")) for step in steps
                      if step["name"] == "run_task" and step.get("round") == round_index]
        # A worker may start before the aggregator's send call has returned, so compare
        # with the send's start.
        completing = [(step, sent) for step, sent in task_steps
                      if sent is not None and step["start"] >= previous_send["start"]]
        if not completing:
            continue
        worker_step, aggregate_sent = min(completing, key=lambda pair: pair[1]["end"])

        phases = dict.fromkeys(BREAKDOWN_PHASES, 0.0)
        segments = ((worker_step, aggregate_sent["end"], round_start),
                    (aggregation, tasks_sent["end"], aggregate_sent["end"]))
        for step, segment_end, ready in segments:
            phases["dispatch"] += step["start"] - ready
            sums = _phase_sums(children(step), step["start"], segment_end, step["name"])
            for phase, seconds in sums.items():
                phases[phase] += seconds
            phases["other"] += (segment_end - step["start"]) - sum(sums.values())
        seconds = tasks_sent["end"] - round_start
        breakdowns.append(RoundBreakdown(job_id, round_index, seconds, phases, worker_step.get("worker", -1)))
    return breakdowns


def median_breakdown(breakdowns: list[RoundBreakdown]) -> dict[str, float]:
    """Return the median of each phase and of the round time, scaled so the phases sum to it.

    Medians of parts do not add up to the median of a sum, so each phase's median is
    scaled by the same factor. The shares stay those of the medians.
    """
    if not breakdowns:
        return {}
    round_seconds = statistics.median(entry.seconds for entry in breakdowns)
    medians = {phase: statistics.median(entry.phases[phase] for entry in breakdowns) for phase in BREAKDOWN_PHASES}
    total = sum(medians.values())
    scale = round_seconds / total if total > 0 else 0.0
    return {"round": round_seconds, **{phase: value * scale for phase, value in medians.items()}}
