"""Aggregation: summing N worker results of d bytes with Baton's reduction, against a memory copy.

The reduction is :func:`shared.reduction.reduce_worker_results`, the code the aggregator
(``training.reducers`` = 1) and every reducer run. It reads result files that Baton's own
writer put in a local folder, after one untimed run has loaded them into the page cache.
The reference is ``np.copyto`` over the same number of bytes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from bench.common import Goal, Section, markdown_table, median_seconds
from shared.efs import EfsStore
from shared.reduction import (READ_WHOLE_MAX_BYTES, read_reduced_round, reduce_worker_results, slice_bounds,
                              write_reduced_slice, write_worker_result)
from shared.training import TRAINING_MODES, accumulate_vectors

MEGABYTE = 1_000_000
WORKERS = (4, 16, 64, 256)
MODEL_MEGABYTES = (1, 10, 100)
QUICK_WORKERS = (4, 16)
QUICK_MODEL_MEGABYTES = (1,)
# Cells whose N * d exceeds this share of the machine's RAM are skipped. Their files must
# stay in the page cache beside the copy's buffers, the reduction and other programs.
MAX_MEMORY_SHARE = 1 / 3
# The copy reference moves at most this much per np.copyto and repeats it. That is far
# above the CPU caches, so the throughput does not depend on the cap.
COPY_CHUNK_BYTES = 2**30
REDUCER_COUNTS = (1, 2, 4, 8, 16)
QUICK_REDUCER_COUNTS = (1, 2, 4)
GOAL_RATIO = 0.5

JOB_ID = "bench"
MODE = TRAINING_MODES["gradient_average"]


def max_total_bytes() -> int:
    """Return the largest N * d the grid measures: a share of this machine's physical memory."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * MAX_MEMORY_SHARE)


def last_level_cache_bytes() -> int:
    """Return the size of this CPU's L3 cache in bytes from Linux's sysfs, or 0 when it is not reported."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return 0
    units = {"K": 1024, "M": 1024**2}
    return int(text[:-1]) * units[text[-1]] if text and text[-1] in units else int(text or 0)


def write_results(store: EfsStore, n_workers: int, n_params: int) -> None:
    """Write ``n_workers`` gradient-averaging results of ``n_params`` values with Baton's writer."""
    vector = np.random.default_rng(0).standard_normal(n_params)
    # The aggregator creates a round's folder when it writes the round's state.
    store.round_dir(JOB_ID, 0).mkdir(parents=True, exist_ok=True)
    for worker in range(n_workers):
        vector[0] = worker
        write_worker_result(store, JOB_ID, 0, worker, MODE, {
            "grad_sum": vector, "loss_sum": np.array(worker, dtype=np.float64),
            "n_samples": np.array(128, dtype=np.int64)})


def copy_seconds(total_bytes: int, repeats: int) -> float:
    """Return the median time of copying exactly ``total_bytes`` between two float64 buffers.

    The last copy of a total above ``COPY_CHUNK_BYTES`` is cut to the bytes left, so that
    the copy moves the N × d bytes that its throughput is divided by, as the reduction does.
    """
    chunk = min(total_bytes, COPY_CHUNK_BYTES) // 8
    source = np.ones(chunk)
    destination = np.empty_like(source)

    def run() -> None:
        remaining = total_bytes // 8
        while remaining:
            count = min(remaining, chunk)
            np.copyto(destination[:count], source[:count])
            remaining -= count

    return median_seconds(run, repeats)


def reduce_seconds(store: EfsStore, n_workers: int, n_params: int, start: int, stop: int, repeats: int) -> float:
    """Return the median time of one reduction of parameters ``[start, stop)`` of ``n_workers`` results."""
    return median_seconds(
        lambda: reduce_worker_results(store, JOB_ID, 0, n_workers, MODE, n_params, start, stop), repeats)


def per_worker_overhead(store: EfsStore, n_workers: int, repeats: int) -> float:
    """Return the seconds per worker of a reduction of one parameter: opening, reading and checking the files."""
    write_results(store, n_workers, 1)
    seconds = reduce_seconds(store, n_workers, 1, 0, 1, repeats)
    shutil.rmtree(store.job_dir(JOB_ID))
    return seconds / n_workers


def sum_seconds(n_workers: int, n_params: int, repeats: int) -> float:
    """Return the median time of the reduction's sums alone, over ``n_workers`` vectors already in memory."""
    vectors = [np.random.default_rng(worker).standard_normal(n_params) for worker in range(n_workers)]
    factors = MODE.vector_factors([{}] * n_workers)
    # accumulate_vectors overwrites the total, so one buffer serves every run.
    total = np.empty(n_params)
    return median_seconds(lambda: accumulate_vectors(factors, vectors, total), repeats)


def measure_speedup(store: EfsStore, n_workers: int, n_params: int, reducer_counts: tuple[int, ...],
                    repeats: int) -> list[list[object]]:
    """Return table rows: per reducer count, bytes each reducer reads and the reduce phase's estimated time.

    Reducers run in parallel in separate invocations, so the phase takes about one
    reducer's time (slice 0, the longest) plus the aggregator's read of the R slices.
    """
    rows = []
    single = None
    for reducers in reducer_counts:
        start, stop = slice_bounds(n_params, reducers, 0)
        reducer = reduce_seconds(store, n_workers, n_params, start, stop, repeats)
        gather = 0.0
        if reducers > 1:
            for index in range(reducers):
                part = reduce_worker_results(store, JOB_ID, 0, n_workers, MODE, n_params,
                                             *slice_bounds(n_params, reducers, index))
                write_reduced_slice(store, JOB_ID, 0, index, part)
            gather = median_seconds(partial(read_reduced_round, store, JOB_ID, 0, reducers, n_params), repeats)
        phase = reducer + gather
        single = phase if single is None else single
        rows.append([reducers, f"{n_workers * (stop - start) * 8 / MEGABYTE:,.0f} MB", f"{reducer * 1000:,.1f} ms",
                     f"{gather * 1000:,.1f} ms", f"{phase * 1000:,.1f} ms", f"{single / phase:.2f}x"])
    return rows


def measure(quick: bool) -> Section:
    workers = QUICK_WORKERS if quick else WORKERS
    model_megabytes = QUICK_MODEL_MEGABYTES if quick else MODEL_MEGABYTES
    reducer_counts = QUICK_REDUCER_COUNTS if quick else REDUCER_COUNTS
    repeats = 3 if quick else 7

    rows: list[list[object]] = []
    skipped: list[tuple[int, int]] = []
    ratios: dict[int, list[tuple[float, int, float]]] = {}
    largest: tuple[int, int, int] | None = None
    # The scatter-reduce speed-up runs on the largest model size that has a cell, while its
    # result files exist. Larger sizes may have none on a machine with little memory.
    sizes_with_cells = [megabytes for megabytes in model_megabytes
                        if min(workers) * megabytes * MEGABYTE <= max_total_bytes()]
    speedup_rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="baton-bench-aggregation-") as folder:
        store = EfsStore(Path(folder))
        overhead = per_worker_overhead(store, max(workers), repeats)
        for megabytes in model_megabytes:
            n_params = megabytes * MEGABYTE // 8
            fitting = [n_workers for n_workers in workers if n_workers * megabytes * MEGABYTE <= max_total_bytes()]
            skipped += [(n_workers, megabytes) for n_workers in workers if n_workers not in fitting]
            if not fitting:
                continue
            started = time.monotonic()
            write_results(store, max(fitting), n_params)
            print(f"[bench] aggregation: wrote {max(fitting)} results of {megabytes} MB in "
                  f"{time.monotonic() - started:.0f} s", flush=True)
            for n_workers in fitting:
                total_bytes = n_workers * n_params * 8
                reduction = reduce_seconds(store, n_workers, n_params, 0, n_params, repeats)
                copy = copy_seconds(total_bytes, repeats)
                ratio = copy / reduction
                ratios.setdefault(megabytes, []).append((ratio, n_workers, reduction))
                share = overhead * n_workers / reduction
                rows.append([n_workers, f"{megabytes} MB", f"{total_bytes / MEGABYTE:,.0f} MB",
                             f"{total_bytes / reduction / 1e9:.2f} GB/s", f"{total_bytes / copy / 1e9:.2f} GB/s",
                             f"{ratio:.2f}", f"{min(share, 1.0):.0%}"])
                largest = (n_workers, megabytes, n_params)
            if megabytes == sizes_with_cells[-1]:
                speedup_rows = measure_speedup(store, max(fitting), n_params, reducer_counts, repeats)
            shutil.rmtree(store.job_dir(JOB_ID))
    if largest is None:
        raise RuntimeError(f"no cell of the aggregation grid fits in {max_total_bytes():,} bytes, "
                           f"{MAX_MEMORY_SHARE:.0%} of this machine's memory; run the benchmark on a machine with "
                           "more memory")

    goals = []
    for megabytes, cells in ratios.items():
        ratio, n_workers, reduction = min(cells)
        reason = ""
        if ratio < GOAL_RATIO:
            sums = sum_seconds(n_workers, megabytes * MEGABYTE // 8, repeats)
            reason = (f"for N = {n_workers}, opening, checking and memory-mapping the result files and the page "
                      f"faults on their pages took {max(0.0, 1 - sums / reduction):.0%} of the reduction. The sums "
                      f"alone, on vectors already in memory, ran at {n_workers * megabytes * MEGABYTE / sums / 1e9:.1f} "
                      "GB/s")
            if 2 * n_workers * megabytes * MEGABYTE <= last_level_cache_bytes():
                reason += f", while the copy's {2 * n_workers * megabytes} MB of buffers stay in the CPU cache"
        goals.append(Goal(f"aggregation throughput / copy throughput, {megabytes} MB model (lowest over N)",
                          ratio, GOAL_RATIO, higher_is_better=True, reason=reason))

    skipped_text = ", ".join(f"N = {n_workers} with {megabytes} MB" for n_workers, megabytes in skipped) or "none"
    body = f"""
Combining N worker results of d bytes each, as the aggregator does with `training.reducers`
= 1 and as each reducer does on its slice: `shared.reduction.reduce_worker_results` opens
each worker's result file (`result-<w>.npy`, written by Baton's writer into a local folder:
the float64 vector, then a JSON trailer with the file's job, round and worker and the small
arrays) and checks its header and trailer. It memory-maps a vector above
{READ_WHOLE_MAX_BYTES // 1024} KiB and adds the vectors in worker order, block by block, into
one float64 buffer. It reads a smaller one whole, with one system call into a reused buffer,
and adds it before opening the next file. One untimed run first loads the files into the page cache.
The reference is `np.copyto` over the same total bytes (in copies of at most 1 GiB).
Throughput is N × d divided by the median time over {repeats} runs; the goal is a ratio of
at least {GOAL_RATIO} of the copy's throughput.

Grid: N in {', '.join(map(str, workers))} × d in {', '.join(f'{value} MB' for value in model_megabytes)}.
Skipped, because N × d exceeds {max_total_bytes() / 1e9:.1f} GB, a third of this machine's RAM,
which the page cache must hold beside the copy's buffers: {skipped_text}.
The last column is the share of the reduction's time that goes to the fixed cost per
worker ({overhead * 1e6:.0f} µs: opening the file, reading it in one system call, decoding
and checking the trailer), measured with 1-parameter results. The vectors of the grid are
memory-mapped, which adds the mapping and its page faults to that cost.

{markdown_table(["N", "d", "N × d", "reduction", "copy", "ratio", "fixed cost"], rows)}

Scatter-reduce on the largest cell (N = {largest[0]}, d = {largest[1]} MB): each of R reducers reads
its slice of every result, so the bytes one reducer reads fall as 1/R. Reducers run in
parallel in separate invocations, so the estimated time of the reduce phase is one reducer
(the first slice, the longest) plus the aggregator's read of the R reduced slices.
Measured one reducer at a time on this machine; on Lambda, EFS throughput per client and the
`aggregatorMaxConcurrency` setting bound how far this carries.

{markdown_table(["R", "bytes per reducer", "one reducer", "aggregator reads slices", "reduce phase",
                 "speed-up"], speedup_rows)}
"""
    return Section(title="Aggregation", body=body, goals=goals)
