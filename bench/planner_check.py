"""Check the planner's round model against local runs of the local runtime.

The section first measures the local profile (shared/planner.py ``LocalProfile``): atomic
writes, reads and stats in a local folder, Baton's gradient code per row, and the runtime's
overhead per invocation. It then runs several a9a jobs through ``LocalStack`` with one worker
container per worker (as ``baton run`` does). Right before each job it measures the latency
of SQS and DynamoDB calls on that job's own moto server, predicts the job's time per round
from the profile alone, and compares the prediction with the job's rounds. Last, it prints
the planner's AWS scaling table, which docs/planner.md also contains.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import PROJECT_ROOT, Goal, Section, markdown_table
from shared import planner
from shared.local.session import LocalStack

A9A_FOLDER = PROJECT_ROOT / "examples" / "data" / "a9a"
A9A_ROWS = 32561
A9A_FEATURES = 123
A9A_VALIDATION_ROWS = 16281
# Stored nonzeros per a9a row: every row has about 14 of the 123 binary features set.
A9A_DENSITY = 13.87 / 123
TARGET_ERROR = 0.25
# Rounds skipped at the start of a run: data preparation, cold containers and first reads.
WARMUP_ROUNDS = 5


def a9a_workload(batch_size: int, rounds: int) -> planner.Workload:
    """Return the planner's description of the a9a demo job."""
    return planner.Workload(rows=A9A_ROWS, features=A9A_FEATURES, density=A9A_DENSITY, batch_size=batch_size,
                            epochs=None, rounds=rounds, optimizer_slots=1, validation_rows=A9A_VALIDATION_ROWS)


def a9a_spec(job_id: str, workers: int, batch_size: int, rounds: int) -> dict:
    """Return the job spec of examples/a9a.json with another worker count, batch and length."""
    return {
        "job_id": job_id,
        "model": {"name": "logistic_regression", "alpha": 1e-5},
        "optimizer": {"name": "momentum", "learning_rate": 0.5, "momentum": 0.9},
        "data": {"path": "datasets/a9a/a9a", "format": "libsvm", "n_features": A9A_FEATURES,
                 "validation_path": "datasets/a9a/a9a.t"},
        "training": {"n_workers": workers, "batch_size": batch_size, "max_rounds": rounds, "max_epochs": 1000,
                     "seed": 7},
    }


def measure_invocation_overhead(stack: LocalStack, count: int) -> float:
    """Return the median time the runtime spends on one worker invocation that does no work.

    Sends ``count`` malformed task messages, which the handler logs and drops without
    any AWS call, and reads the invocation times the worker lanes record: the event
    through the pipe, the batch processing and its log line, and the response back.
    """
    assert stack.runtime is not None  # the stack has started
    lanes = stack.runtime.lanes["worker"]
    before = len(lanes.invocations)
    for index in range(count):
        stack.sqs.send_message(QueueUrl=stack.queue_urls["TasksQueue"], MessageBody=f'{{"probe": {index}}}')
    deadline = time.monotonic() + 60
    while len(lanes.invocations) < before + count and time.monotonic() < deadline:
        time.sleep(0.05)
    # The first invocation of each container includes its start; skip as many as there are lanes.
    seconds = [record.seconds for record in lanes.invocations[before:]][lanes.concurrency:]
    return statistics.median(seconds) if seconds else 0.0


def measure_local_profile(work_dir: Path, quick: bool) -> planner.LocalProfile:
    """Measure the local profile's compute and file costs.

    The request latencies and the invocation overhead are left at 0: :func:`run_case`
    measures them on each job's own stack.
    """
    compute = planner.measure_compute_profile(quick=quick)
    files = planner.measure_file_costs(work_dir / "file-probe", quick=quick)
    return planner.LocalProfile(request_seconds=0.0, request_service_seconds=0.0, cores=os.cpu_count() or 1,
                                invocation_overhead_seconds=0.0, compute=compute, **files)


def read_run_timings(metrics_dir: Path, workers: int) -> dict[str, float]:
    """Return medians over the timed rounds of one run, from its metrics files.

    ``round_seconds`` is the gap between consecutive metrics files' modification times.
    ``worker_seconds`` is the mean of the workers' own task times, because the metrics
    store their sum. ``aggregate_seconds`` is the aggregator's own time.
    """
    paths = sorted(metrics_dir.glob("*.json"), key=lambda path: int(path.stem))[WARMUP_ROUNDS:]
    if len(paths) < 3:
        raise RuntimeError(f"too few rounds in {metrics_dir} to time; run more rounds")
    times = [path.stat().st_mtime for path in paths]
    metrics = [json.loads(path.read_text()) for path in paths]
    return {
        # The median resists the slow rounds that other processes on the machine cause.
        "round_seconds": statistics.median(later - earlier for earlier, later in zip(times, times[1:])),
        "worker_seconds": statistics.median(entry["worker_seconds"] / workers for entry in metrics),
        "aggregate_seconds": statistics.median(entry["aggregate_seconds"] for entry in metrics),
    }


def probe_range(values: list[float]) -> str:
    """Return the median of ``values`` (seconds) in milliseconds, with their range."""
    return (f"{statistics.median(values) * 1000:.2f} ms ({min(values) * 1000:.2f} to "
            f"{max(values) * 1000:.2f})")


def comparable_parts(estimate: planner.RoundEstimate, profile: planner.LocalProfile) -> tuple[float, float]:
    """Return the predicted parts of a round that the metrics files time.

    A worker times its task from the job check to before it records itself: two DynamoDB
    reads, the file reads, the compute and the result write. The aggregator times its step
    from after its batched read of the job item and the round item to before its cost
    accounting: the reads, the combine, the validation and the state write, with no
    DynamoDB request.
    """
    phases = estimate.phases
    worker_task = (2 * profile.request_seconds + phases["worker: read weights"] + phases["worker: read batch"]
                   + phases["worker: compute"] + phases["worker: write result"])
    aggregator_step = (phases["aggregator: read results"] + phases["aggregator: combine and step"]
                       + phases.get("aggregator: validation", 0.0) + 3 * profile.write_op_seconds)
    return worker_task, aggregator_step


def run_case(work_dir: Path, workers: int, batch_size: int, rounds: int, profile: planner.LocalProfile,
             quick: bool, run_pass: int = 0) -> tuple[dict[str, float], planner.LocalProfile]:
    """Run one a9a job locally; return its timings and the profile measured on its stack.

    The request latencies come from the job's own moto server, measured just before the
    job starts, so the prediction uses costs measured under the load the job meets.
    The invocation overhead is measured once, on the first stack.
    """
    job_id = f"planner-{workers}w-{batch_size}b"
    efs_root = work_dir / f"efs-{workers}-{batch_size}-{run_pass}"
    with LocalStack(efs_root, concurrency={"worker": workers}) as stack:
        if profile.invocation_overhead_seconds == 0.0:
            overhead = measure_invocation_overhead(stack, count=workers + (10 if quick else 30))
            profile = replace(profile, invocation_overhead_seconds=overhead)
        assert stack.endpoint_url is not None  # the started stack's moto server
        request_seconds, service_seconds = planner.measure_request_seconds(stack.endpoint_url, quick=quick)
        profile = replace(profile, request_seconds=request_seconds, request_service_seconds=service_seconds)
        stack.import_data(A9A_FOLDER, "datasets/a9a")
        stack.submit(a9a_spec(job_id, workers, batch_size, rounds))
        record = stack.wait(job_id, timeout_seconds=600)
        if record.status != "SUCCEEDED":
            raise RuntimeError(f"local job {job_id} ended {record.status}: {record.attributes.get('error')}")
    return read_run_timings(efs_root / "jobs" / job_id / "metrics", workers), profile


def measure(quick: bool) -> Section:
    """Calibrate the local profile, predict the local runs, run them and compare."""
    cases = [(2, 256), (4, 256)] if quick else [(2, 256), (4, 256), (8, 256), (2, 2048), (4, 2048), (8, 2048)]
    rounds = 20 if quick else 60
    passes = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="baton-planner-") as folder:
        work_dir = Path(folder)
        profile = measure_local_profile(work_dir, quick)
        # Every case runs once per pass, and the passes follow each other, so a busy spell
        # of the machine lands on one run of several cases rather than on every run of one.
        runs: dict[tuple[int, int], list[tuple[dict[str, float], planner.LocalProfile]]] = {case: [] for case in cases}
        for run_pass in range(passes):
            for workers, batch_size in cases:
                timings, profile = run_case(work_dir, workers, batch_size, rounds, profile, quick, run_pass)
                runs[(workers, batch_size)].append((timings, profile))

        rows = []
        errors = []
        worker_gaps = []
        for (workers, batch_size), case_runs in runs.items():
            # Each run is predicted from the profile measured on its own stack. The table
            # shows medians over the runs, of the predictions and of the measurements.
            workload = a9a_workload(batch_size, rounds)
            estimates = [planner.predict_local_round(workload, workers, run_profile) for _, run_profile in case_runs]
            parts = [comparable_parts(estimate, run_profile) for estimate, (_, run_profile) in zip(estimates, case_runs)]
            predicted = statistics.median(estimate.seconds for estimate in estimates)
            worker_task = statistics.median(part[0] for part in parts)
            aggregator_step = statistics.median(part[1] for part in parts)
            timings = {key: statistics.median(run[key] for run, _ in case_runs) for key in case_runs[0][0]}
            measured = timings["round_seconds"]
            spread = [run["round_seconds"] * 1000 for run, _ in case_runs]
            error = predicted / measured - 1
            errors.append(abs(error))
            worker_gaps.append(timings["worker_seconds"] - worker_task)
            rows.append([workers, batch_size, f"{predicted * 1000:.0f}", f"{measured * 1000:.0f}",
                         f"{min(spread):.0f} to {max(spread):.0f}", f"{error:+.0%}", f"{worker_task * 1000:.0f}",
                         f"{timings['worker_seconds'] * 1000:.0f}", f"{aggregator_step * 1000:.1f}",
                         f"{timings['aggregate_seconds'] * 1000:.1f}"])
        probes = [run_profile for case_runs in runs.values() for _, run_profile in case_runs]
        load = os.getloadavg()[0]

    worst = max(errors)
    profile_rows = [
        ["SQS or DynamoDB call to moto on 127.0.0.1, one client (runs' median and range)",
         probe_range([probe.request_seconds for probe in probes])],
        ["the same, wall time per call with 4 clients at once", probe_range([probe.request_service_seconds
                                                                              for probe in probes])],
        ["atomic write step (a third of write, fsync, rename)", f"{profile.write_op_seconds * 1000:.3f} ms"],
        ["small file read", f"{profile.read_op_seconds * 1e6:.0f} µs"],
        ["write throughput with fsync", f"{profile.write_bytes_per_second / planner.MIB:.0f} MiB/s"],
        ["runtime overhead per invocation", f"{profile.invocation_overhead_seconds * 1000:.2f} ms"],
        ["gradient, per sparse nonzero", f"{profile.compute.seconds_per_sparse_value * 1e9:.2f} ns"],
        ["gradient, per dense value", f"{profile.compute.seconds_per_dense_value * 1e9:.2f} ns"],
        ["gradient, per row", f"{profile.compute.seconds_per_row * 1e9:.1f} ns"],
        ["shuffle, per shard row", f"{profile.compute.seconds_per_shuffled_row * 1e9:.1f} ns"],
        ["cores", str(profile.cores)],
    ]
    body = "\n".join([
        "The planner (shared/planner.py, docs/planner.md) predicts a round from per-operation costs. Here",
        "those costs are measured on this machine, then a9a jobs (logistic regression, momentum,",
        f"validation on the {A9A_VALIDATION_ROWS:,} test rows) run through the local runtime with one worker",
        f"container per worker, {rounds} rounds each; the first {WARMUP_ROUNDS} rounds are not timed. The",
        "request latencies are measured on each job's own moto server just before the job starts,",
        "because they drift with the machine's load from one minute to the next. Each run is predicted",
        "from its own measured profile alone, with no fitting to the runs.",
        "",
        markdown_table(["measured cost", "value"], profile_rows),
        "",
        markdown_table(["workers", "batch per worker", "predicted ms per round", "measured ms", "runs' range, ms", "error",
                        "worker task, predicted ms", "measured", "aggregator step, predicted ms", "measured"],
                       rows),
        "",
        f"Measured times are medians over the timed rounds of each run, then over {passes} run{'s' if passes > 1 else ''}"
        " of each case; the range shows the runs' own medians. Predictions are medians over the same runs. The worker task and the aggregator step are",
        "the parts that the metrics files time (`worker_seconds`, `aggregate_seconds`): the worker from its",
        "job check to before it records itself, the aggregator from after its batched read to before",
        "its cost accounting. A worker task measured longer than predicted means it waited for a core",
        "or for moto's server while other workers ran.",
        f"The 1-minute load average at the end was {load:.1f} on {profile.cores} cores, so other",
        "processes on the machine shared the cores with these runs.",
        "",
        "On this machine one moto server process answers every request and runs DynamoDB requests one",
        "at a time, so a round costs about six requests per worker in sequence: the local time per round",
        "grows linearly with the workers,",
        "which is the opposite of AWS, where the workers' requests run in parallel.",
        "",
        "Predicted scaling on AWS (docs/planner.md explains the columns):",
        "",
        planner.scaling_table_markdown(),
    ])
    # NOTE: the local model's queueing term (moto's single server, two cores) is the weak
    # part: the worker task's measured excess over its prediction is most of the error.
    reason = "" if worst <= TARGET_ERROR else (
        f"workers waited for moto's server and the cores longer than the model's queueing term says: "
        f"the worker task took {statistics.median(worker_gaps) * 1000:.0f} ms more than predicted "
        f"(median over the cases), at a load average of {load:.1f} on {profile.cores} cores")
    goal = Goal("planner local round prediction, worst error", worst * 100, TARGET_ERROR * 100,
                higher_is_better=False, unit=" %", reason=reason)
    return Section(title="Planner check: predicted against measured local rounds", body=body, goals=[goal])
