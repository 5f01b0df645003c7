"""Where a round's time goes on the local runtime, for a9a with 4 workers.

The section runs examples/a9a.json through ``LocalStack`` with tracing on
(:mod:`shared.tracing`) and splits each round along its critical path. That path is the
dispatch of the tasks, the step of the worker that completed the round, the dispatch of
the aggregate message, and the aggregator's step up to the send of the next round's tasks. The phases add
up to the round time. Figures are medians over the rounds of a run, then over runs.

A second part repeats short runs at larger batch sizes, fits the worker's compute time as
a line in the batch size, and estimates the batch at which compute would be 80 % of a round.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import DATASETS, PROJECT_ROOT, Goal, Section, markdown_table
from shared import tracing
from shared.local.session import LocalStack
from shared.state import SUCCEEDED

SPEC_PATH = PROJECT_ROOT / "examples" / "a9a.json"
NON_COMPUTE_GOAL_PERCENT = 20.0
COMPUTE_SHARE_TARGET = 0.8

PHASE_LABELS = {
    "compute": "compute (worker maths)",
    "efs_read": "EFS reads",
    "efs_write": "EFS writes",
    "state": "state updates (DynamoDB)",
    "dispatch": "dispatch (SQS send, queue, lane, handler start-up)",
    "aggregation": "aggregation (combine, validation metrics)",
    "other": "other handler code (logging, batch processing, checks)",
}


def load_spec(job_id: str, **training) -> dict:
    """Return examples/a9a.json under ``job_id`` with ``training`` fields replaced."""
    spec = json.loads(SPEC_PATH.read_text())
    spec["job_id"] = job_id
    if "max_rounds" in training:
        spec["training"].pop("max_epochs", None)
    spec["training"].update(training)
    return spec


def run_traced(stack: LocalStack, spec: dict) -> tuple[list[tracing.RoundBreakdown], list[dict], float]:
    """Run ``spec`` to the end; return its round breakdowns, its spans and its wall time in seconds."""
    started = time.monotonic()
    stack.submit(spec)
    record = stack.wait(spec["job_id"], timeout_seconds=600)
    seconds = time.monotonic() - started
    if record.status != SUCCEEDED:
        raise RuntimeError(f"benchmark job {spec['job_id']} ended {record.status}: {record.error}")
    # The containers write their spans after replying to the lane; give the last ones a moment.
    time.sleep(0.5)
    assert stack.trace_dir is not None  # the caller builds the stack with a trace folder
    spans = [span for span in tracing.read_spans(stack.trace_dir) if span.get("job_id") == spec["job_id"]]
    return tracing.round_breakdown(spans, spec["job_id"]), spans, seconds


def median_of_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    """Return the median of each key over the runs' median breakdowns."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def call_medians(spans: list[dict]) -> list[tuple[str, str, int, float]]:
    """Return (function, call, calls per round, median ms) for the DynamoDB and SQS calls."""
    by_call: dict[tuple[str, str], list[float]] = {}
    rounds = {(span["job_id"], span.get("round")) for span in spans if span["phase"] == "step"}
    for span in spans:
        if span["phase"] in ("state", "send"):
            by_call.setdefault((span["function"], span["name"]), []).append(span["end"] - span["start"])
    return [(function, name, round(len(times) / max(1, len(rounds))), statistics.median(times) * 1000)
            for (function, name), times in sorted(by_call.items())]


def measure(quick: bool) -> Section:
    """Measure the round breakdown at the default batch and the compute share at larger ones."""
    runs = 1 if quick else 3
    default_rounds = 12 if quick else None
    sweep_batches = (256, 8192) if quick else (256, 1024, 4096, 8192)
    sweep_rounds = 8 if quick else 30
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="baton-bench-rounds-") as folder:
        root = Path(folder)
        with LocalStack(root / "efs", trace_dir=root / "trace") as stack:
            stack.import_data(DATASETS / "a9a", "datasets/a9a")
            # One untimed round trip starts every container, as a warm stage would have them.
            stack.submit(load_spec("rounds-warmup", max_rounds=2))
            stack.wait("rounds-warmup", timeout_seconds=600)

            run_medians, job_seconds, all_spans = [], [], []
            for index in range(runs):
                extra = {} if default_rounds is None else {"max_rounds": default_rounds}
                breakdowns, spans, seconds = run_traced(stack, load_spec(f"rounds-default-{index}", **extra))
                run_medians.append(tracing.median_breakdown(breakdowns))
                job_seconds.append(seconds)
                all_spans.extend(spans)
            default = median_of_runs(run_medians)

            sweep = []
            for batch in sweep_batches:
                breakdowns, _, _ = run_traced(
                    stack, load_spec(f"rounds-batch-{batch}", batch_size=batch, max_rounds=sweep_rounds))
                sweep.append((batch, tracing.median_breakdown(breakdowns)))
    load_after = os.getloadavg()

    round_ms = default["round"] * 1000
    non_compute_percent = 100 * (1 - default["compute"] / default["round"])
    phase_rows = [[PHASE_LABELS[phase], f"{default[phase] * 1000:.2f}", f"{100 * default[phase] / default['round']:.1f} %"]
                  for phase in tracing.BREAKDOWN_PHASES]
    phase_rows.append(["**round**", f"**{round_ms:.2f}**", "100 %"])
    calls = call_medians(all_spans)
    call_rows = [[function, name, count, f"{ms:.2f}"] for function, name, count, ms in calls]

    # Compute grows linearly with the batch; the rest of a round barely depends on it.
    batches = np.array([batch for batch, _ in sweep], dtype=float)
    compute_ms = np.array([entry["compute"] * 1000 for _, entry in sweep])
    slope, intercept = np.polyfit(batches, compute_ms, 1)
    overhead_ms = statistics.median((entry["round"] - entry["compute"]) * 1000 for _, entry in sweep)
    needed_ms = COMPUTE_SHARE_TARGET / (1 - COMPUTE_SHARE_TARGET) * overhead_ms
    batch_for_target = (needed_ms - intercept) / slope if slope > 0 else float("inf")
    shard_rows = 32561 // 4
    sweep_rows = [[batch, f"{entry['round'] * 1000:.1f}", f"{entry['compute'] * 1000:.2f}",
                   f"{100 * entry['compute'] / entry['round']:.1f} %"] for batch, entry in sweep]

    reason = (f"compute is {default['compute'] * 1000:.2f} ms of a {round_ms:.0f} ms round at batch 256; "
              f"the largest part is {max(tracing.BREAKDOWN_PHASES[1:], key=lambda p: default[p])} "
              f"({max(default[p] for p in tracing.BREAKDOWN_PHASES[1:]) * 1000:.0f} ms), moto's server on the critical path")
    goals = [Goal("a9a round (local runtime): time that is not worker compute", non_compute_percent,
                  NON_COMPUTE_GOAL_PERCENT, higher_is_better=False, unit=" %", reason=reason)]

    body = f"""
examples/a9a.json (logistic regression, 4 workers, batch 256 rows per worker, momentum) runs
through `LocalStack`: moto's server on 127.0.0.1 for SQS and DynamoDB, each handler in its
own container process, EFS as a local folder. Tracing (`shared/tracing.py`, switched on by
`BATON_TRACE_DIR` in the containers' environment) records every EFS, DynamoDB, SQS and
training call with its job, round and worker.

A round runs from the end of the call that sent its tasks to the end of the call that sent
the next round's tasks. Its critical path is the dispatch of the tasks, the step of the
worker whose record completed the round, the dispatch of the aggregate message, and the
aggregator's step up to that send. Dispatch is the time from the end of a send to the start
of the step that handles the message: the queue, the lane's long poll, the hand-off to the
container and the handler's start-up, plus the SQS send calls themselves. "Other" is
handler time in none of the traced calls. The parts add up to the round. Medians over the
rounds of {'one run' if runs == 1 else f'each of {runs} runs'} of {default_rounds or 'all'} rounds (medians of the parts are scaled
to sum to the median round), then over runs. Whole job, submit to finish:
{', '.join(f'{seconds:.1f} s' for seconds in job_seconds)}.

{markdown_table(["phase", "ms per round", "share"], phase_rows)}

DynamoDB and SQS calls per round, with their median latency:

{markdown_table(["function", "call", "per round", "median ms"], call_rows)}

Compute at a9a's default batch is a fraction of a millisecond, while each request to
moto's server costs a few milliseconds. The server keeps connections open, but it runs
every request in one Python process, at a few milliseconds of CPU each, because moto parses
each update expression and serialises each response in Python. It also runs DynamoDB
requests one at a time (see `shared/local/moto_server.py`), so the worker that completes a
round waits behind the others' updates. The goal of at most {NON_COMPUTE_GOAL_PERCENT:.0f} % non-compute time is out of reach at this batch size.

Compute share at larger batches ({sweep_rounds} rounds each; a9a's shards hold about {shard_rows:,} rows,
so larger batches are capped there):

{markdown_table(["batch per worker", "round ms", "compute ms", "compute share"], sweep_rows)}

A line fitted to these points gives {slope * 1000:.3f} ms of compute per 1,000 rows per worker,
and the rest of a round stays near {overhead_ms:.0f} ms. Compute would reach {COMPUTE_SHARE_TARGET:.0%} of a
round at about {batch_for_target:,.0f} rows per worker (an extrapolation, beyond a9a's shard size).

Machine load (1, 5, 15 minute averages): {', '.join(f'{value:.1f}' for value in load_before)} before,
{', '.join(f'{value:.1f}' for value in load_after)} after.
"""
    return Section("Round breakdown on the local runtime", body, goals)
