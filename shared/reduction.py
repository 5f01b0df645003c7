"""Worker results on EFS and their reduction, whole or one slice at a time.

A worker stores its result as two files in the round folder, so that a reader can take a
slice of the large part without reading the whole file:

``result-<w>.npy``
    The mode's parameter-sized vector (:attr:`TrainingMode.vector_name`) as a flat
    float64 array. Readers memory-map it, so they read the pages of their slice only.
``result-<w>.json``
    The other, small arrays (loss sum, row count, k-means counts and inertia) as JSON
    with their dtype and shape. Python writes a float as the shortest text that reads
    back to the same float64, so the values round-trip exactly. JSON because a reducer
    reads this file of every worker, and decoding a small .npz costs ten times more.

With ``training.reducers`` R = 1 the aggregator reduces parameters ``[0, d)`` itself.
With R > 1, reducer k reduces parameters ``[k * d // R, (k + 1) * d // R)`` and writes
``reduced-<k>.npy`` and ``reduced-<k>.json`` in the same two formats; the aggregator then
joins the R slices. Both paths run
:func:`shared.training.accumulate_vectors` and the mode's ``reduce_scalars``, element by
element in worker order, so the sums and the next parameters are the same bytes.
"""

from __future__ import annotations

import io
import json
import mmap
import os
from pathlib import Path

import numpy as np

from shared.efs import EfsStore, write_bytes_atomic
from shared.errors import JobSpecError
from shared.training import Reduction, TrainingMode, accumulate_vectors, split_result

def slice_bounds(n_params: int, reducers: int, slice_index: int) -> tuple[int, int]:
    """Return the parameters ``[start, stop)`` that reducer ``slice_index`` of ``reducers`` sums.

    The slices depend only on ``n_params`` and ``reducers``, differ in length by at most
    one, and cover every parameter once.
    """
    return slice_index * n_params // reducers, (slice_index + 1) * n_params // reducers


def check_reducers(reducers: int, n_params: int) -> None:
    """Reject more reducers than the model has parameters, since a reducer would get an empty slice.

    Raises
    ------
    JobSpecError
        Naming ``training.reducers``, the value, the parameter count and the fix.
    """
    if reducers > n_params:
        raise JobSpecError("training.reducers", f"got {reducers}, but the model has only {n_params} parameters; "
                                                f"use at most {n_params} reducers (or 1 to let the aggregator sum)")


def write_worker_result(store: EfsStore, job_id: str, round_index: int, worker: int, mode: TrainingMode,
                        arrays: dict[str, np.ndarray]) -> None:
    """Store a worker's result as its vector (.npy) and its small arrays (.json), each written atomically.

    The same result gives the same bytes, so a repeated task rewrites identical files.
    """
    vector, scalars = split_result(mode, arrays)
    _write_vector_and_scalars(store, store.result_vector_path(job_id, round_index, worker),
                              store.result_path(job_id, round_index, worker), vector, scalars)


def _write_vector_and_scalars(store: EfsStore, vector_path: Path, scalars_path: Path, vector: np.ndarray,
                              scalars: dict[str, np.ndarray]) -> None:
    store.write_npy(vector_path, vector)
    encoded = {name: {"dtype": np.asarray(value).dtype.str, "shape": list(np.shape(value)),
                      "values": np.ravel(value).tolist()} for name, value in scalars.items()}
    write_bytes_atomic(scalars_path, json.dumps(encoded, sort_keys=True, separators=(",", ":")).encode())


def _read_scalars(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as handle:
        encoded = json.loads(handle.read())
    return {name: np.array(entry["values"], dtype=entry["dtype"]).reshape(entry["shape"])
            for name, entry in encoded.items()}


def read_worker_scalars(store: EfsStore, job_id: str, round_index: int, worker: int) -> dict[str, np.ndarray]:
    """Return a worker's small result arrays, as :func:`write_worker_result` stored them."""
    # NOTE: earlier versions wrote one result-<w>.npz per worker, which this does not read.
    # A round whose workers ran before a stack update fails its aggregation with
    # FileNotFoundError; let running jobs finish before deploying this format.
    return _read_scalars(store.result_path(job_id, round_index, worker))


def vector_header(n_params: int) -> bytes:
    """Return the .npy header that :func:`write_worker_result` writes for ``n_params`` float64 values."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": (n_params,)})
    return buffer.getvalue()


def _open_vector(path: Path, header: bytes, n_params: int) -> int:
    """Open a float64 vector file and check its header and size; return the descriptor."""
    fd = os.open(path, os.O_RDONLY)
    try:
        prefix = os.pread(fd, len(header), 0)
        size = os.fstat(fd).st_size
        if prefix != header or size != len(header) + 8 * n_params:
            raise ValueError(f"vector file '{path}' ({size} bytes, header {prefix[:70]!r}) does not hold "
                             f"{n_params} float64 values; it is not from this job's round, so delete it and let the "
                             "watchdog or `baton resume` re-send the round's messages")
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_worker_vector(path: Path, header: bytes, n_params: int) -> np.ndarray:
    """Return a worker's result vector memory-mapped read-only; only the pages a caller touches are read.

    The mapping holds no file descriptor and closes when the array is released.

    Raises
    ------
    ValueError
        If the file's header or size does not match ``n_params`` float64 values.
    """
    fd = _open_vector(path, header, n_params)
    try:
        mapped = mmap.mmap(fd, len(header) + 8 * n_params, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    # np.frombuffer gives a plain ndarray, cheaper per ufunc call than an np.memmap view.
    return np.frombuffer(mapped, dtype=np.float64, count=n_params, offset=len(header))


def _read_vector_into(path: Path, out: np.ndarray) -> None:
    """Fill ``out`` from a float64 vector file of the same length, with one copy from the page cache."""
    header = vector_header(len(out))
    fd = _open_vector(path, header, len(out))
    try:
        view = memoryview(out).cast("B")
        read = 0
        while read < len(view):
            count = os.preadv(fd, [view[read:]], len(header) + read)
            if count == 0:
                raise ValueError(f"vector file '{path}' ended after {read} of {len(view)} bytes")
            read += count
    finally:
        os.close(fd)


def reduce_worker_results(store: EfsStore, job_id: str, round_index: int, n_workers: int, mode: TrainingMode,
                          n_params: int, start: int, stop: int) -> Reduction:
    """Sum the results of a round's workers, in worker order, over parameters ``[start, stop)``.

    Reads every worker's small arrays and, of its vector, only the pages of the slice.
    The running sum is the only array the size of the slice in memory.
    """
    scalars = [read_worker_scalars(store, job_id, round_index, worker) for worker in range(n_workers)]
    header = vector_header(n_params)
    vectors = [map_worker_vector(store.result_vector_path(job_id, round_index, worker), header, n_params)[start:stop]
               for worker in range(n_workers)]
    total = np.zeros(stop - start, dtype=np.float64)
    accumulate_vectors(mode.vector_factors(scalars), vectors, total)
    return Reduction(vector=total, scalars=mode.reduce_scalars(scalars))


def write_reduced_slice(store: EfsStore, job_id: str, round_index: int, slice_index: int,
                        reduction: Reduction) -> None:
    """Store a reducer's slice of the summed vectors (.npy) and the round's small sums (.json), atomically."""
    _write_vector_and_scalars(store, store.reduced_vector_path(job_id, round_index, slice_index),
                              store.reduced_path(job_id, round_index, slice_index), reduction.vector,
                              reduction.scalars)


def read_reduced_round(store: EfsStore, job_id: str, round_index: int, reducers: int, n_params: int) -> Reduction:
    """Return the whole round's reduction from the reducers' slices, joined in slice order.

    Every reducer stores the same small sums; those of slice 0 are used.

    Raises
    ------
    ValueError
        If a slice file does not hold the slice's number of float64 values.
    """
    vector = np.empty(n_params, dtype=np.float64)
    for slice_index in range(reducers):
        start, stop = slice_bounds(n_params, reducers, slice_index)
        _read_vector_into(store.reduced_vector_path(job_id, round_index, slice_index), vector[start:stop])
    scalars = _read_scalars(store.reduced_path(job_id, round_index, 0))
    return Reduction(vector=vector, scalars=scalars)
