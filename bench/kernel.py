"""Worker gradient kernel: Baton's worker computation against bare numpy and memory bandwidth.

Baton's figure times what a warm worker process runs for one task once the shard is open:
the training mode's ``begin``, ``advance`` until done, and ``finish``
(:meth:`shared.training.TrainingMode.worker_result`), on a shard opened with
:func:`shared.shards.load_shard`, memory-mapped, as the worker opens it. Two references are
measured in the same run:

- bare numpy: the same logistic-regression gradient on the same memory-mapped arrays,
  written directly (float32 rows converted to float64 block by block, two matrix-vector
  products, and the loss and its derivative from one ``exp(-|m|)``), given the batch's
  sorted rows;
- memory bandwidth: ``numpy.sum`` over a float32 array far larger than the caches.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from bench.common import Goal, Section, markdown_table, median_seconds
from bench.shards import A9A, HIGGS, SourceSet, prepare_source, shard_bytes, tile_job
from shared.efs import EfsStore
from shared.models import Model
from shared.spec import JobSpec, parse_job_spec
from shared.sampling import batch_indices, rounds_per_epoch
from shared.shards import Shard, load_shard
from shared.training import GRADIENT_CHUNK_ROWS, build_model, get_training_mode

# Shard rows: the spec's largest batch_size, so that a whole-shard batch is a valid job.
FULL_ROWS = 1_000_000
QUICK_ROWS = 40_000
DEFAULT_BATCH = 128
BANDWIDTH_BYTES = 1 << 30
QUICK_BANDWIDTH_BYTES = 64 << 20
THROUGHPUT_GOAL = 0.9
BANDWIDTH_GOAL = 0.6


@dataclass
class Job:
    """An opened one-shard job: what a warm worker keeps between tasks."""

    spec: JobSpec
    manifest: dict
    model: Model
    shard: Shard
    params: np.ndarray


def open_job(efs_root: Path, job_id: str) -> Job:
    """Open ``job_id``'s spec, manifest and memory-mapped shard as the worker does."""
    store = EfsStore(efs_root)
    spec = parse_job_spec(store.read_json(store.spec_path(job_id)))
    manifest = store.read_json(store.data_dir(job_id) / "manifest.json")
    model = build_model(spec, manifest)
    # Non-zero weights, so that no margin is exactly 0 and every branch of the loss runs.
    params = np.random.default_rng(11).normal(scale=0.1, size=model.n_params)
    return Job(spec, manifest, model, load_shard(store, job_id, manifest, 0), params)


def run_baton(job: Job, rounds: range) -> int:
    """Run worker 0's share of each round in ``rounds``; return the rows processed."""
    mode = get_training_mode(job.spec, job.model)
    rows = 0
    for round_index in rounds:
        result = mode.worker_result(job.spec, job.manifest, job.model, job.params, job.shard, round_index, 0)
        rows += int(result["n_samples"])
    return rows


def _bare_block(X, y: np.ndarray, params: np.ndarray) -> tuple[float, np.ndarray]:
    if sp.issparse(X):
        # Only the values need float64; the index arrays are shared, not copied.
        X = sp.csr_matrix((X.data.astype(np.float64), X.indices, X.indptr), shape=X.shape, copy=False)
    else:
        X = X.astype(np.float64)
    signs = 2.0 * y - 1.0
    margins = signs * (np.asarray(X @ params[:-1]).ravel() + params[-1])
    # One exp(-|m|) gives both log(1 + exp(-m)) and sigmoid(-m) without overflow.
    decay = np.exp(-np.abs(margins))
    losses = np.log1p(decay) + np.maximum(-margins, 0.0)
    residuals = -signs * np.where(margins > 0.0, decay, 1.0) / (1.0 + decay)
    grad = np.empty_like(params)
    grad[:-1] = np.asarray(X.T @ residuals).ravel()
    grad[-1] = residuals.sum()
    return float(losses.sum()), grad


@dataclass
class CsrArrays:
    """A CSR shard as its three memory-mapped arrays, and one scipy matrix over them."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    matrix: sp.csr_matrix


def _bare_rows(X, rows: np.ndarray):
    contiguous = len(rows) > 0 and rows[-1] - rows[0] == len(rows) - 1
    if not isinstance(X, CsrArrays):
        return X[int(rows[0]):int(rows[-1]) + 1] if contiguous else X[rows]
    if not contiguous:
        return X.matrix[rows]
    first, stop = int(rows[0]), int(rows[-1]) + 1
    begin, end = int(X.indptr[first]), int(X.indptr[stop])
    return sp.csr_matrix((X.data[begin:end], X.indices[begin:end], X.indptr[first:stop + 1] - begin),
                         shape=(stop - first, X.matrix.shape[1]), copy=False)


def sorted_batches(order: np.ndarray, batch_size: int, n_batches: int) -> list[np.ndarray]:
    """Return batch ``b`` = the sorted slice ``b`` of the row order ``order``, for each batch."""
    return [np.sort(order[batch * batch_size:(batch + 1) * batch_size]) for batch in range(n_batches)]


def run_bare(X, y: np.ndarray, params: np.ndarray, batches: list[np.ndarray]) -> int:
    """Compute the summed logistic loss and gradient of each batch in ``batches``; return the rows.

    The batches are drawn beforehand (:func:`sorted_batches`), as a warm Baton worker has
    its batches cached after its first call. Each batch is computed in blocks of
    :data:`GRADIENT_CHUNK_ROWS` rows, as Baton's chunks are. ``X`` is a dense memory map
    or the :class:`CsrArrays` of a sparse shard.
    """
    rows_done = 0
    for rows in batches:
        contiguous = len(rows) > 0 and rows[-1] - rows[0] == len(rows) - 1
        loss, grad = 0.0, np.zeros_like(params)
        for start in range(0, len(rows), GRADIENT_CHUNK_ROWS):
            block = rows[start:start + GRADIENT_CHUNK_ROWS]
            labels = y[block[0]:block[-1] + 1] if contiguous else y[block]
            block_loss, block_grad = _bare_block(_bare_rows(X, block), labels, params)
            loss += block_loss
            grad += block_grad
        rows_done += len(rows)
    return rows_done


def _bare_arrays(efs_root: Path, job_id: str):
    store = EfsStore(efs_root)
    manifest = store.read_json(store.data_dir(job_id) / "manifest.json")
    folder = store.data_dir(job_id) / "shard-0"
    # Plain ndarrays over the mapped pages, as the worker uses: numpy.memmap's own
    # indexing and ufunc wrapping cost Python time on every block.
    y = np.asarray(np.load(folder / "y.npy", mmap_mode="r"))
    if not manifest["sparse"]:
        return np.asarray(np.load(folder / "X.npy", mmap_mode="r")), y
    data, indices, indptr = (np.asarray(np.load(folder / f"X-{name}.npy", mmap_mode="r"))
                             for name in ("data", "indices", "indptr"))
    matrix = sp.csr_matrix((data, indices, indptr), shape=(len(y), manifest["n_features"]))
    return CsrArrays(data, indices, indptr, matrix), y


def interleaved_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Return the wall times of every run in ``runs`` over ``repeats`` rounds, taken in turn.

    Each run is called once untimed first. Then every round calls each run once, so runs
    compared with each other see the same load on the machine. Callers take a ratio
    within each round and report its median.
    """
    for run in runs.values():
        run()
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - started)
    return timings


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Return the median of the element-wise ratios of two equally long lists."""
    return statistics.median(top / bottom for top, bottom in zip(numerators, denominators))


@dataclass
class CaseFigures:
    """The figures of one data set. Throughputs are in rows per second, bandwidths in bytes per second."""

    label: str
    shard_bytes: int
    n_rows: int
    full_baton: float
    full_bare: float
    full_ratio: float
    read_bandwidth: float
    bandwidth_ratio: float
    batch_baton: float
    batch_bare: float
    batch_ratio: float
    batch_draw_seconds: float
    cold_draw_seconds: float


def measure_case(efs_root: Path, source: SourceSet, label: str, n_rows: int, repeats: int,
                 batch_rounds: int, bandwidth_array: np.ndarray) -> CaseFigures:
    """Measure Baton, bare numpy and ``numpy.sum`` on shards of ``n_rows`` rows of ``source``."""
    source_job = prepare_source(efs_root, source)
    full_job, batch_job = f"{source.name}-full", f"{source.name}-batch"
    tile_job(efs_root, source_job, full_job, n_rows, batch_size=n_rows)
    tile_job(efs_root, source_job, batch_job, n_rows, batch_size=DEFAULT_BATCH)
    n_bytes = shard_bytes(EfsStore(efs_root), full_job)

    X, y = _bare_arrays(efs_root, full_job)
    full = open_job(efs_root, full_job)
    whole_shard = sorted_batches(np.arange(n_rows), n_rows, 1)
    full_times = interleaved_seconds({
        "baton": lambda: run_baton(full, range(1)),
        "bare": lambda: run_bare(X, y, full.params, whole_shard),
        "sum": bandwidth_array.sum,
    }, repeats)
    read_bandwidths = [bandwidth_array.nbytes / seconds for seconds in full_times["sum"]]
    effective_bandwidths = [2 * n_bytes / seconds for seconds in full_times["baton"]]

    X_batch, y_batch = _bare_arrays(efs_root, batch_job)
    batched = open_job(efs_root, batch_job)
    order = np.random.default_rng([batched.spec.training.seed, 0, 0]).permutation(n_rows)
    batches = sorted_batches(order, DEFAULT_BATCH, batch_rounds)
    # Baton's untimed first call draws the epoch's order, which later rounds of the epoch
    # reuse. The reference gets the same batches, drawn and sorted beforehand.
    batch_times = interleaved_seconds({
        "baton": lambda: run_baton(batched, range(batch_rounds)),
        "bare": lambda: run_bare(X_batch, y_batch, batched.params, batches),
    }, repeats)

    # Drawing a round's rows from the kept epoch order and sorting them, which the
    # reference gets done beforehand. The rounds follow the timed ones in the same epoch,
    # so the epoch order is already drawn.
    per_epoch = rounds_per_epoch(batched.manifest["shard_rows"], DEFAULT_BATCH)
    draw_rounds = range(batch_rounds, min(2 * batch_rounds, per_epoch))
    draw_seconds = median_seconds(lambda: [batch_indices(batched.spec.training.seed, round_index, 0, n_rows,
                                                         per_epoch, DEFAULT_BATCH) for round_index in draw_rounds],
                                  repeats) / len(draw_rounds)

    started = time.perf_counter()
    np.random.default_rng([batched.spec.training.seed, 0, 99]).permutation(n_rows)
    cold_draw_seconds = time.perf_counter() - started

    batch_rows = batch_rounds * DEFAULT_BATCH
    return CaseFigures(
        label, n_bytes, n_rows,
        full_baton=n_rows / statistics.median(full_times["baton"]),
        full_bare=n_rows / statistics.median(full_times["bare"]),
        full_ratio=median_ratio(full_times["bare"], full_times["baton"]),
        read_bandwidth=statistics.median(read_bandwidths),
        bandwidth_ratio=median_ratio(effective_bandwidths, read_bandwidths),
        batch_baton=batch_rows / statistics.median(batch_times["baton"]),
        batch_bare=batch_rows / statistics.median(batch_times["bare"]),
        batch_ratio=median_ratio(batch_times["bare"], batch_times["baton"]),
        batch_draw_seconds=draw_seconds,
        cold_draw_seconds=cold_draw_seconds)


def _reason_throughput(case: CaseFigures, batch: bool) -> str:
    if batch:
        baton_us, bare_us = DEFAULT_BATCH / case.batch_baton * 1e6, DEFAULT_BATCH / case.batch_bare * 1e6
        return (f"{case.label}: {baton_us:.0f} µs per {DEFAULT_BATCH}-row round against bare numpy's "
                f"{bare_us:.0f} µs. Of the difference, drawing and sorting the round's rows, which bare numpy gets "
                f"sorted beforehand, took {case.batch_draw_seconds * 1e6:.0f} µs (timed alone). The rest is the "
                "training mode's per-round bookkeeping (begin, advance and finish, their progress arrays, "
                "and the model's input checks)")
    return f"{case.label}: Python overhead per {GRADIENT_CHUNK_ROWS}-row chunk"


def _reason_bandwidth(case: CaseFigures, sparse: bool) -> str:
    if sparse:
        return ("scipy's CSR and CSC matrix-vector products (indirect access, one row at a time) and the "
                "float32 to float64 copy of each chunk's values bound the speed, not memory")
    return ("per-row work bound the speed, not memory: the float32 to float64 copy of each chunk, two float64 "
            "matrix-vector products and the exp and log1p of each row's loss, for rows of only 28 features")


def measure(quick: bool) -> Section:
    """Measure the worker kernel on dense higgs_7k and sparse a9a shards."""
    n_rows = QUICK_ROWS if quick else FULL_ROWS
    repeats = 3 if quick else 9
    batch_rounds = 20 if quick else 400
    bandwidth_array = np.ones((QUICK_BANDWIDTH_BYTES if quick else BANDWIDTH_BYTES) // 4, dtype=np.float32)

    with tempfile.TemporaryDirectory(prefix="baton-bench-kernel-") as folder:
        efs_root = Path(folder)
        cases = [
            (measure_case(efs_root, HIGGS, "dense higgs_7k", n_rows, repeats, batch_rounds, bandwidth_array), False),
            (measure_case(efs_root, A9A, "sparse a9a", n_rows, repeats, batch_rounds, bandwidth_array), True),
        ]

    table_rows, goals = [], []
    for case, sparse in cases:
        effective = 2 * case.shard_bytes * case.full_baton / case.n_rows
        table_rows.append([case.label, f"{case.shard_bytes / 1e6:.0f} MB", "whole shard",
                           f"{case.full_baton / 1e6:.2f}", f"{case.full_bare / 1e6:.2f}", f"{case.full_ratio:.2f}",
                           f"{effective / 1e9:.2f}", f"{case.read_bandwidth / 1e9:.1f}",
                           f"{case.bandwidth_ratio:.2f}"])
        table_rows.append([case.label, "", f"{DEFAULT_BATCH} rows", f"{case.batch_baton / 1e6:.2f}",
                           f"{case.batch_bare / 1e6:.2f}", f"{case.batch_ratio:.2f}", "", "", ""])
        goals += [
            Goal(f"kernel {case.label}, whole shard: Baton / bare numpy", case.full_ratio, THROUGHPUT_GOAL, True,
                 reason=_reason_throughput(case, batch=False)),
            Goal(f"kernel {case.label}, {DEFAULT_BATCH}-row batch: Baton / bare numpy", case.batch_ratio,
                 THROUGHPUT_GOAL, True, reason=_reason_throughput(case, batch=True)),
            Goal(f"kernel {case.label}, whole shard: effective / measured bandwidth", case.bandwidth_ratio,
                 BANDWIDTH_GOAL, True, reason=_reason_bandwidth(case, sparse)),
        ]

    table = markdown_table(["data", "shard", "batch", "Baton Mrows/s", "bare numpy Mrows/s", "Baton / bare",
                            "effective GB/s", "numpy.sum GB/s", "of bandwidth"], table_rows)
    body = f"""
What runs: logistic regression's worker computation for one task, on one shard of
{n_rows:,} rows made by repeating the rows of a real data set that Baton's own preparation
stored (bench/shards.py). Dense: higgs_7k, 28 float32 features per row. Sparse: a9a, 123
features, about 14 stored values per row, in CSR with float32 values and int32 column
indices. {n_rows:,} rows is the spec's largest batch_size, so a whole-shard batch is a
valid job. Baton's time covers the training mode's begin, advance and finish on the
memory-mapped shard, as a warm worker runs them (shared/training.py). Bare numpy computes
the same sums on the same memory-mapped arrays in blocks of {GRADIENT_CHUNK_ROWS} rows, with
the same numerically stable formula (one `exp(-|m|)` per row for the loss and its
derivative), on plain arrays over the same mapped pages, with each batch's rows drawn
and sorted beforehand. So the ratio is Baton's own overhead over the same arithmetic. The whole-shard batch reads every row once; the {DEFAULT_BATCH}-row case is the
spec's default batch_size, timed over {batch_rounds} consecutive rounds.

Memory bandwidth is the read rate of `numpy.sum` over
{bandwidth_array.nbytes >> 20} MiB of float32. A linear model's gradient reads its rows twice
(scores, then the gradient), so effective bandwidth = 2 × shard bytes / time. The three runs
of a case take turns, {repeats} times after one untimed call each, and every ratio is the
median of the ratios within a turn, because other processes shared the machine. The shard
files are in the page cache.

{table}

A worker draws its epoch's row order once per epoch and process and keeps it
(shared/sampling.py). The untimed call draws it, so the timed {DEFAULT_BATCH}-row rounds
reuse it. The first round of an epoch in a fresh process also pays the draw, a permutation
of the shard's rows: {cases[0][0].cold_draw_seconds * 1e3:.0f} ms for {n_rows:,} rows here.
"""
    return Section("Worker gradient kernel", body, goals)
