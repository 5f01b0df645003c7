"""Worker memory: peak resident memory of a worker process against the size of its shard.

Each measurement starts a fresh Python process (``python -m bench.memory --worker``) that
runs the steps of a worker task that touch data, in the order ``run_task`` runs them
(shared/worker.py): read the spec and manifest, memory-map the shard with
:func:`shared.shards.load_shard`, read the round's weights, compute the training mode's
result over the whole batch, and write the result file. The process then reports its
peak resident set. The queue and table calls of a task are left out, because they hold
no data.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.common import PROJECT_ROOT, Goal, Section, markdown_table
from bench.shards import A9A, HIGGS, SourceSet, prepare_source, shard_bytes, tile_job
from shared.efs import EfsStore

MIB = 1 << 20
# The spec's largest training.batch_size.
MAX_BATCH = 1_000_000
# Goal: peak resident memory <= SHARD_FACTOR x shard bytes + FIXED_ALLOWANCE.
SHARD_FACTOR = 1.2
FIXED_ALLOWANCE = 150 * MIB
# Bytes per row of the tiled shards, used only to pick row counts near a target size.
# A higgs_7k row is 28 float32 features and an int64 label. An a9a row is about 14
# float32 values with int32 column indices, an int64 row pointer and an int64 label.
HIGGS_ROW_BYTES = 28 * 4 + 8
A9A_ROW_BYTES = 14 * 8 + 16


@dataclass(frozen=True)
class ShardCase:
    """One shard to measure: its source data set, target size and label."""

    label: str
    source: SourceSet
    target_bytes: int
    row_bytes: int


FULL_CASES = [
    ShardCase("dense higgs_7k", HIGGS, 100 * 10**6, HIGGS_ROW_BYTES),
    ShardCase("dense higgs_7k", HIGGS, 500 * 10**6, HIGGS_ROW_BYTES),
    ShardCase("dense higgs_7k", HIGGS, 1000 * 10**6, HIGGS_ROW_BYTES),
    ShardCase("sparse a9a", A9A, 500 * 10**6, A9A_ROW_BYTES),
]
QUICK_CASES = [
    ShardCase("dense higgs_7k", HIGGS, 10 * 10**6, HIGGS_ROW_BYTES),
    ShardCase("dense higgs_7k", HIGGS, 30 * 10**6, HIGGS_ROW_BYTES),
    ShardCase("sparse a9a", A9A, 10 * 10**6, A9A_ROW_BYTES),
]


def run_worker(efs_root: Path, job_id: str) -> None:
    """Run the data steps of worker 0's task in round 0 of ``job_id``; print the peak RSS in bytes."""
    from shared.efs import EfsStore
    from shared.reduction import write_worker_result
    from shared.round_files import read_round_state
    from shared.shards import load_shard
    from shared.spec import parse_job_spec
    from shared.training import build_model, get_training_mode

    store = EfsStore(efs_root)
    spec = parse_job_spec(store.read_json(store.spec_path(job_id)))
    manifest = store.read_json(store.data_dir(job_id) / "manifest.json")
    shard = load_shard(store, job_id, manifest, 0)
    params, _ = read_round_state(store, job_id, 0)
    model = build_model(spec, manifest)
    mode = get_training_mode(spec, model)
    result = mode.worker_result(spec, manifest, model, params, shard, 0, 0)
    write_worker_result(store, job_id, 0, 0, mode, result)
    print(json.dumps({"max_rss_bytes": _max_rss_bytes(), "n_samples": int(result["n_samples"])}))


def run_baseline() -> None:
    """Import what a worker imports and print the peak RSS in bytes, with no data read."""
    import shared.shards  # noqa: F401
    import shared.training  # noqa: F401
    import shared.worker  # noqa: F401

    print(json.dumps({"max_rss_bytes": _max_rss_bytes()}))


def _max_rss_bytes() -> int:
    """Return the peak resident set of this process since it started its program, in bytes.

    This is ``VmHWM`` of /proc/self/status. ``ru_maxrss`` of a process started from a
    large one keeps the parent's peak from before the exec: every worker process here
    reported 1623 MiB, the benchmark parent's size, after the kernel section had run in
    that parent. The smaller of the two is taken, and they agree when the parent is small.
    """
    status = Path("/proc/self/status").read_text()
    high_water_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    # Linux reports both in KiB.
    return 1024 * min(high_water_kib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _child(arguments: list[str]) -> dict:
    completed = subprocess.run([sys.executable, "-m", "bench.memory", *arguments], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class MemoryFigures:
    """Peak RSS of one worker process and the shard it read."""

    case: ShardCase
    n_rows: int
    batch_rows: int
    shard_bytes: int
    max_rss_bytes: int

    @property
    def limit_bytes(self) -> float:
        return SHARD_FACTOR * self.shard_bytes + FIXED_ALLOWANCE


def measure_shard(efs_root: Path, case: ShardCase, index: int, repeats: int) -> MemoryFigures:
    """Write a shard for ``case``; return the median peak RSS of ``repeats`` fresh worker processes on it."""
    source_job = prepare_source(efs_root, case.source)
    n_rows = case.target_bytes // case.row_bytes
    batch_rows = min(n_rows, MAX_BATCH)
    job_id = f"memory-{index}"
    tile_job(efs_root, source_job, job_id, n_rows, batch_size=batch_rows)
    peaks = []
    for _ in range(repeats):
        figures = _child(["--worker", str(efs_root), job_id])
        if figures["n_samples"] != batch_rows:
            raise RuntimeError(f"the worker computed {figures['n_samples']} rows, expected {batch_rows}")
        peaks.append(figures["max_rss_bytes"])
    return MemoryFigures(case, n_rows, batch_rows, shard_bytes(EfsStore(efs_root), job_id),
                         int(statistics.median(peaks)))


def measure(quick: bool) -> Section:
    """Measure the peak RSS of worker processes on shards from small to large."""
    repeats = 1 if quick else 3
    baseline = statistics.median(_child(["--baseline"])["max_rss_bytes"] for _ in range(repeats))
    results = []
    with tempfile.TemporaryDirectory(prefix="baton-bench-memory-") as folder:
        for index, case in enumerate(QUICK_CASES if quick else FULL_CASES):
            results.append(measure_shard(Path(folder), case, index, repeats))

    rows, goals = [], []
    for figures in results:
        rows.append([figures.case.label, f"{figures.n_rows:,}", f"{figures.batch_rows:,}",
                     f"{figures.shard_bytes / MIB:.0f}", f"{figures.max_rss_bytes / MIB:.0f}",
                     f"{(figures.max_rss_bytes - baseline) / figures.shard_bytes:.2f}",
                     f"{figures.limit_bytes / MIB:.0f}"])
        goals.append(Goal(f"worker peak RSS, {figures.case.label} shard of {figures.shard_bytes / MIB:.0f} MiB",
                          figures.max_rss_bytes / MIB, figures.limit_bytes / MIB, False, unit=" MiB"))

    table = markdown_table(["data", "shard rows", "batch rows", "shard MiB", "peak RSS MiB",
                            "(RSS - imports) / shard", "goal MiB"], rows)
    body = f"""
What runs: a fresh Python process per shard (`python -m bench.memory --worker`) reads the
spec and manifest, memory-maps its shard with `load_shard`, reads the round's weights,
computes logistic regression's gradient-averaging result over its batch and writes the
result file, as a worker task does (shared/worker.py, `run_task`, without the queue and
table calls). The figure is the median peak resident set of {repeats} such processes per shard:
`VmHWM` from /proc/self/status, because `ru_maxrss` also counted the benchmark parent's
peak from before the exec (1623 MiB for every shard once the kernel section had run). The shards repeat the rows of higgs_7k (dense,
28 float32 features) and a9a (sparse CSR, float32 values, int32 column indices) as Baton's
preparation stored them (bench/shards.py). The batch is the whole shard up to the spec's
largest batch_size, {MAX_BATCH:,} rows, and otherwise {MAX_BATCH:,} rows spread over the whole shard,
so the worker touches nearly every page of it either way.

Pages of a memory-mapped file count in the resident set once read. So a worker that reads
its whole shard has at least the shard's size resident, and a copy of the shard would
double that. A process that only imports what a worker imports peaks at {baseline / MIB:.0f} MiB.
Goal: peak RSS <= {SHARD_FACTOR} × shard + {FIXED_ALLOWANCE // MIB} MiB.

{table}

Beyond the mapped shard a worker holds its epoch's row order (8 bytes per shard row,
kept for the rounds of the epoch, shared/sampling.py), the batch's row indices and one
chunk of rows in float64.
"""
    return Section("Worker memory", body, goals)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one worker-memory measurement in this process.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--worker", nargs=2, metavar=("EFS_ROOT", "JOB_ID"),
                       help="run worker 0's round 0 of job JOB_ID under EFS_ROOT and print the peak RSS")
    group.add_argument("--baseline", action="store_true", help="import the worker's modules and print the peak RSS")
    arguments = parser.parse_args(argv)
    if arguments.baseline:
        run_baseline()
    else:
        run_worker(Path(arguments.worker[0]), arguments.worker[1])


if __name__ == "__main__":
    main()
