"""Worker results on EFS and their reduction, whole or one slice at a time.

A worker stores its result as one file in the round folder, ``result-<w>.npy``, written
atomically in three parts:

1. the .npy header of a flat float64 array of ``n`` values;
2. the mode's parameter-sized vector (:attr:`TrainingMode.vector_name`), ``n`` float64
   values, so a reader can map or read the slice it needs without the rest;
3. a trailer of JSON that names the file's job, round and worker, and contains the other,
   small arrays (loss sum, row count, k-means counts and inertia) with their dtype and
   shape. Python writes a float as the shortest text that reads back to the same
   float64, so the values round-trip exactly.

numpy's ``np.load`` reads parts 1 and 2 as the vector and ignores the trailer. A reader
here checks the header against the expected length and the trailer against the expected
job, round and worker, so a file of another job, round or worker, of an earlier format
or cut short is rejected with :class:`~shared.errors.ResultFileError`. Such a file does
not change on a retry, so that error fails the job at once. One file per worker means one
atomic write for the worker and one open for the reader, and the small arrays need no
second file.

With ``training.reducers`` R = 1 the aggregator reduces parameters ``[0, d)`` itself.
With R > 1, reducer k reduces parameters ``[k * d // R, (k + 1) * d // R)`` and writes
``reduced-<k>.npy`` in the same layout (its trailer names the slice instead of a worker);
the aggregator then joins the R slices. Both paths add the vectors element by element in
worker order (:func:`shared.training.accumulate_vectors`, or
:func:`~shared.training.add_scaled_vector` one worker at a time) and run the mode's
``reduce_scalars``, so the sums and the next parameters are the same bytes.
"""

from __future__ import annotations

import functools
import io
import json
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from shared.efs import EfsStore, stale_if_round_pruned, write_buffers_atomic
from shared.errors import JobSpecError, ResultFileError
from shared.training import (Reduction, TrainingMode, accumulate_vectors, add_scaled_vector, round_number,
                             split_result)

# Bytes read for a trailer in the same system call as the header and a vector read whole. A
# longer trailer, such as k-means counts of many clusters, takes more reads. A mapped file's
# trailer is taken from the mapping.
TRAILER_READ_BYTES = 4096

# Result vectors up to this size are read whole, with one system call into one buffer that
# every worker's file reuses. Larger ones are memory-mapped, and only the pages of the
# reduced slice, the header and the trailer are read. A read copies the vector, which costs
# more than mapping it from a few hundred KiB on, and a mapping has a fixed cost (map,
# unmap, page faults) that a small vector does not repay. On a 2-core AMD EPYC machine with
# files in the page cache, reading was faster up to 128 KiB, as fast at 256 KiB, and 1.3 to
# 2 times slower at 1 MiB.
READ_WHOLE_MAX_BYTES = 256 * 1024

_JSON_DECODER = json.JSONDecoder()


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


@functools.lru_cache(maxsize=64)
def vector_header(n_values: int) -> bytes:
    """Return the .npy header of a flat array of ``n_values`` float64 values, as result files start.

    Cached, because numpy builds the header in Python. That took 10 to 40 µs per call on a
    2-core AMD EPYC machine, about as long as adding a few hundred KiB of vectors.
    """
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": (n_values,)})
    return buffer.getvalue()


# Writing -----------------------------------------------------------------------------------


def write_worker_result(store: EfsStore, job_id: str, round_index: int, worker: int, mode: TrainingMode,
                        arrays: dict[str, np.ndarray]) -> None:
    """Store a worker's result as one file: its vector and, in the trailer, its identity and small arrays.

    The same result gives the same bytes, so a repeated task rewrites an identical file.
    """
    vector, scalars = split_result(mode, arrays)
    _write_result_file(store.result_path(job_id, round_index, worker),
                       {"job_id": job_id, "round": int(round_index), "worker": int(worker)}, vector, scalars)


def write_reduced_slice(store: EfsStore, job_id: str, round_index: int, slice_index: int,
                        reduction: Reduction) -> None:
    """Store a reducer's slice of the summed vectors and the round's small sums as one file."""
    _write_result_file(store.reduced_path(job_id, round_index, slice_index),
                       {"job_id": job_id, "round": int(round_index), "slice": int(slice_index)}, reduction.vector,
                       reduction.scalars)


def _write_result_file(path: Path, identity: dict, vector: np.ndarray, scalars: dict[str, np.ndarray]) -> None:
    vector = np.ascontiguousarray(vector, dtype=np.float64)
    arrays = {name: {"dtype": np.asarray(value).dtype.str, "shape": list(np.shape(value)),
                     "values": np.ravel(value).tolist()} for name, value in scalars.items()}
    trailer = json.dumps({**identity, "arrays": arrays}, sort_keys=True, separators=(",", ":")).encode()
    with stale_if_round_pruned(path.parent, f"round {round_number(identity['round'])} of job {identity['job_id']}"):
        # ndarray has the buffer protocol, but numpy's stubs declare it for Python 3.12 and later only.
        vector_bytes = memoryview(vector).cast("B")  # type: ignore[arg-type]
        write_buffers_atomic(path, [vector_header(len(vector)), vector_bytes, trailer], create_folder=False)


# Reading -----------------------------------------------------------------------------------


def _describe(identity: dict) -> str:
    """Name the job, round, worker or slice of a trailer, with the round counted from 1 as job errors count it."""
    names = []
    for key in ("job_id", "round", "worker", "slice"):
        if key not in identity:
            continue
        value = identity[key]
        if key == "round" and isinstance(value, int) and not isinstance(value, bool):
            names.append(f"round {round_number(value)} (folder rounds/{value})")
        else:
            names.append(f"{key} {value!r}")
    return ", ".join(names) or "no Baton job"


def _efs_name(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """Return ``path`` relative to the EFS root, as a user sees it on their mount."""
    return Path(os.path.relpath(path, root)).as_posix()


def _fix_hint() -> str:
    return ("The round already records that worker or slice as done, so Baton does not write the file again: "
            "find what else writes into this job's folder on EFS, then submit the job again under a new job id")


def _read_until_end(fd: int, offset: int) -> bytes:
    """Return the bytes of ``fd`` from ``offset`` to the end of the file."""
    parts: list[bytes] = []
    while True:
        part = os.pread(fd, TRAILER_READ_BYTES, offset)
        if not part:
            return b"".join(parts)
        parts.append(part)
        offset += len(part)


def _read_into(fd: int, buffers: list[memoryview], minimum: int) -> int:
    """Fill ``buffers`` from the start of the file, at least ``minimum`` bytes unless the file is shorter.

    Returns the bytes read. ``os.preadv`` may return fewer bytes than requested before the
    end of a file, for example on NFS, so this reads again from where it stopped.
    """
    total = 0
    while buffers:
        count = os.preadv(fd, buffers, total)
        total += count
        if count == 0 or total >= minimum:
            return total
        while buffers and count >= len(buffers[0]):
            count -= len(buffers[0])
            buffers.pop(0)
        if buffers:
            buffers[0] = buffers[0][count:]
    return total


def _decode_trailer(payload: bytes) -> Any:
    """Return the JSON value of a trailer, or None when ``payload`` is not one whole JSON value.

    ``raw_decode`` skips the whitespace handling of ``json.loads``, which took about as long
    as parsing a trailer. The writer puts no whitespace around the object, so any byte after
    it makes the trailer invalid.
    """
    try:
        text = payload.decode()
        decoded, end = _JSON_DECODER.raw_decode(text)
    except ValueError:
        return None
    return decoded if end == len(text) else None


def _trailer_arrays(path: str | os.PathLike, root: str | os.PathLike, decoded: Any, length: int,
                    expected: dict) -> dict[str, np.ndarray]:
    """Return the small arrays of a decoded trailer after checking its identity against ``expected``.

    ``decoded`` is the trailer's JSON value from :func:`_decode_trailer`, and ``length`` the
    trailer's length in bytes, for the error message.

    Raises
    ------
    ResultFileError
        If the trailer is missing or not valid, or names another job, round, worker or slice.
    """
    # NOTE: earlier versions wrote the small arrays to a result-<w>.json beside a vector
    # without a trailer, which fails here. A round whose workers ran before a stack update
    # fails its aggregation, so let running jobs finish before deploying this format.
    try:
        identity = {key: decoded[key] for key in expected}
        arrays = {name: _decode_array(entry) for name, entry in decoded["arrays"].items()}
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        raise ResultFileError(f"result file '{_efs_name(path, root)}' has no valid trailer after its vector "
                              f"({length} bytes), so it was cut short or written by an earlier version of "
                              f"Baton. {_fix_hint()}") from None
    if identity != expected:
        raise ResultFileError(f"result file '{_efs_name(path, root)}' belongs to {_describe(identity)}, not to "
                              f"{_describe(expected)}. {_fix_hint()}")
    return arrays


def _decode_array(entry: dict) -> np.ndarray:
    if not entry["shape"]:
        # A 0-d array straight from its one value; the general path would reshape a copy.
        (value,) = entry["values"]
        return np.array(value, dtype=entry["dtype"])
    return np.array(entry["values"], dtype=entry["dtype"]).reshape(entry["shape"])


def _header_summary(found: bytes) -> str:
    """Describe the first bytes of a file that should open with a .npy header, for a message."""
    if not found:
        return "it is empty"
    if not found.startswith(b"\x93NUMPY"):
        return "it does not start with a .npy header"
    text = found[10:].decode("latin-1")
    closing = text.find("}")
    return f"its .npy header is {text[:closing + 1] if closing >= 0 else text.strip()}"


def _check_header(path: str | os.PathLike, root: str | os.PathLike, found: bytes, header: bytes,
                  n_values: int) -> None:
    if found != header:
        raise ResultFileError(f"result file '{_efs_name(path, root)}' does not hold {n_values} float64 values "
                              f"({_header_summary(found)}), so it is not from this job's round. {_fix_hint()}")


def _check_length(path: str | os.PathLike, root: str | os.PathLike, length: int, vector_end: int,
                  n_values: int) -> None:
    if length < vector_end:
        raise ResultFileError(f"result file '{_efs_name(path, root)}' ends after {length} bytes, inside its "
                              f"{n_values} float64 values. {_fix_hint()}")


def _read_file_into(path: str | os.PathLike, root: str | os.PathLike, header: bytes, out: np.ndarray,
                    expected: dict) -> dict[str, np.ndarray]:
    """Read a result file, usually with one system call, with its vector into ``out``; return its small arrays.

    ``out`` is a contiguous float64 array as long as the file's vector. ``root`` is the EFS
    root, which errors leave out of the path they show.

    Raises
    ------
    ResultFileError
        If the header does not match ``len(out)`` values, the file is cut short, or the
        trailer is not valid or names another job, round, worker or slice.
    """
    found = bytearray(len(header))
    trailer = bytearray(TRAILER_READ_BYTES)
    vector_end = len(header) + out.nbytes
    fd = os.open(path, os.O_RDONLY)
    try:
        # At least one byte of the trailer, so that a file cut short inside its vector shows.
        # ndarray has the buffer protocol, but numpy's stubs declare it for Python 3.12 and later only.
        out_bytes = memoryview(out).cast("B")  # type: ignore[arg-type]
        count = _read_into(fd, [memoryview(found), out_bytes, memoryview(trailer)], vector_end + 1)
        _check_header(path, root, bytes(found[:count]), header, len(out))
        _check_length(path, root, count, vector_end, len(out))
        payload = bytes(trailer[:count - vector_end])
        decoded = _decode_trailer(payload)
        if decoded is None:
            # A trailer is one JSON object, so one that does not parse may go on past this read.
            payload += _read_until_end(fd, count)
            decoded = _decode_trailer(payload)
    finally:
        os.close(fd)
    return _trailer_arrays(path, root, decoded, len(payload), expected)


def _map_file_slice(path: str | os.PathLike, root: str | os.PathLike, header: bytes, n_values: int, start: int,
                    stop: int, expected: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return values ``[start, stop)`` of a result file's vector, memory-mapped read-only, and its small arrays.

    The whole file is mapped, and its header, length and trailer are checked through the
    mapping. So a file costs an open and the mapping, whose fstat gives the length, and no
    read. Only the pages that the checks and the caller touch are loaded. Python's mmap
    keeps its own duplicate of the file descriptor, and both are released with the array.

    Raises
    ------
    ResultFileError
        If the header does not match ``n_values`` values, the file is cut short, or the
        trailer is missing, not valid or names another job, round, worker or slice.
    """
    vector_end = len(header) + 8 * n_values
    fd = os.open(path, os.O_RDONLY)
    mapped: mmap.mmap | bytes
    try:
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except ValueError:
        # mmap rejects an empty file, and the header check below then rejects it too.
        if os.fstat(fd).st_size:
            raise
        mapped = b""
    finally:
        os.close(fd)
    try:
        _check_header(path, root, mapped[:len(header)], header, n_values)
        _check_length(path, root, len(mapped), vector_end, n_values)
        payload = mapped[vector_end:]
        scalars = _trailer_arrays(path, root, _decode_trailer(payload), len(payload), expected)
    except ResultFileError:
        if isinstance(mapped, mmap.mmap):
            mapped.close()
        raise
    # np.frombuffer gives a plain ndarray, cheaper per ufunc call than an np.memmap view.
    return np.frombuffer(mapped, dtype=np.float64, count=stop - start, offset=len(header) + 8 * start), scalars


def read_worker_result(store: EfsStore, job_id: str, round_index: int, worker: int,
                       n_params: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return a worker's result vector and small arrays, as :func:`write_worker_result` stored them.

    Raises
    ------
    ResultFileError
        If the file does not hold ``n_params`` values of this job's round and worker.
    """
    vector = np.empty(n_params, dtype=np.float64)
    scalars = _read_file_into(store.result_path(job_id, round_index, worker), store.root, vector_header(n_params),
                              vector,
                              {"job_id": job_id, "round": int(round_index), "worker": int(worker)})
    return vector, scalars


def reduce_worker_results(store: EfsStore, job_id: str, round_index: int, n_workers: int, mode: TrainingMode,
                          n_params: int, start: int, stop: int) -> Reduction:
    """Sum the results of a round's workers, in worker order, over parameters ``[start, stop)``.

    Each worker's file is opened once. A small vector is read whole into one buffer that
    every worker reuses, and its slice is added before the next file is read. A large one
    is memory-mapped, only the pages of the slice, the header and the trailer are read, and
    the slices of all workers are added block by block. Either way each element adds the workers in worker order, so
    the sums are the same bytes. The running sum is the only array the size of the slice
    that the reduction allocates, besides the read buffer of a small vector. The first
    worker's vector is written into it, so it is never filled with zeros first.

    Raises
    ------
    ResultFileError
        If a result file does not hold ``n_params`` values of this job's round and worker.
    """
    header = vector_header(n_params)
    paths = store.result_paths(job_id, round_index, n_workers)
    identities = [{"job_id": job_id, "round": int(round_index), "worker": worker} for worker in range(n_workers)]
    total = np.empty(stop - start, dtype=np.float64)
    scalars = []
    if 8 * n_params <= READ_WHOLE_MAX_BYTES:
        buffer = np.empty(n_params, dtype=np.float64)
        scratch = np.empty(stop - start, dtype=np.float64)
        first = True
        # As in accumulate_vectors: the mode's step reports an overflow as divergence.
        with np.errstate(over="ignore", invalid="ignore"):
            for path, identity in zip(paths, identities):
                scalars.append(_read_file_into(path, store.root, header, buffer, identity))
                # A worker's factor depends on its own small arrays only (TrainingMode.vector_factors).
                factor = mode.vector_factors(scalars[-1:])[0]
                add_scaled_vector(total, factor, buffer[start:stop], scratch, first=first)
                first = first and factor is None
        if first:
            total.fill(0.0)
    else:
        vectors = []
        for path, identity in zip(paths, identities):
            vector, worker_scalars = _map_file_slice(path, store.root, header, n_params, start, stop, identity)
            vectors.append(vector)
            scalars.append(worker_scalars)
        accumulate_vectors(mode.vector_factors(scalars), vectors, total)
    return Reduction(vector=total, scalars=mode.reduce_scalars(scalars))


def read_reduced_round(store: EfsStore, job_id: str, round_index: int, reducers: int, n_params: int) -> Reduction:
    """Return the whole round's reduction from the reducers' slices, joined in slice order.

    Each slice file is read with one system call into its place in the joined vector.
    Every reducer stores the same small sums; those of slice 0 are used.

    Raises
    ------
    ResultFileError
        If a slice file does not hold the slice's number of float64 values of this job's
        round and slice.
    """
    vector = np.empty(n_params, dtype=np.float64)
    scalars = None
    for slice_index in range(reducers):
        start, stop = slice_bounds(n_params, reducers, slice_index)
        slice_scalars = _read_file_into(store.reduced_path(job_id, round_index, slice_index), store.root,
                                        vector_header(stop - start), vector[start:stop],
                                        {"job_id": job_id, "round": int(round_index), "slice": slice_index})
        scalars = slice_scalars if scalars is None else scalars
    assert scalars is not None  # the callers pass reducers > 1
    return Reduction(vector=vector, scalars=scalars)
