"""Worker results on EFS and their reduction, whole or one slice at a time.

A worker stores its result as two files in the round folder, so that a reader can take a
slice of the large part without reading the whole file:

``result-<w>.npy``
    The mode's parameter-sized vector (:attr:`TrainingMode.vector_name`) as a flat
    float64 array. Readers memory-map it, so they load only the pages of their slice.
``result-<w>.npz``
    The other, small arrays: loss sum, row count, k-means counts and inertia.

With ``training.reducers`` R = 1 the aggregator reduces parameters ``[0, d)`` itself.
With R > 1, reducer k reduces parameters ``[k * d // R, (k + 1) * d // R)`` and writes
``reduced-<k>.npz``; the aggregator then concatenates the R slices. Both paths run
:func:`shared.training.accumulate_vectors` and the mode's ``reduce_scalars``, element by
element in worker order, so the sums and the next parameters are the same bytes.
"""

from __future__ import annotations

import numpy as np

from shared.efs import EfsStore
from shared.errors import JobSpecError
from shared.training import Reduction, TrainingMode, accumulate_vectors, split_result

# Key of the vector slice in a reduced-<k>.npz file; the small totals sit beside it
# under this prefix.
_VECTOR_KEY = "vector"
_SCALAR_PREFIX = "scalar."


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
    """Store a worker's result as its vector (.npy) and its small arrays (.npz), each written atomically.

    The same result gives the same bytes, so a repeated task rewrites identical files.
    """
    vector, scalars = split_result(mode, arrays)
    store.write_npy(store.result_vector_path(job_id, round_index, worker), vector)
    store.write_arrays(store.result_path(job_id, round_index, worker), scalars)


def _map_vector(store: EfsStore, job_id: str, round_index: int, worker: int, n_params: int) -> np.ndarray:
    """Return worker ``worker``'s result vector memory-mapped read-only, checked against ``n_params``."""
    path = store.result_vector_path(job_id, round_index, worker)
    mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    if mapped.dtype != np.float64 or mapped.shape != (n_params,):
        raise ValueError(f"result vector '{path}' holds {mapped.dtype} of shape {mapped.shape}, but the model has "
                         f"{n_params} float64 parameters; the file is not from this job's round, so delete it "
                         "and re-send the worker's task")
    # A plain ndarray view: ufuncs on np.memmap views pay for the subclass on every call.
    return np.asarray(mapped)


def reduce_worker_results(store: EfsStore, job_id: str, round_index: int, n_workers: int, mode: TrainingMode,
                          n_params: int, start: int, stop: int) -> Reduction:
    """Sum the results of a round's workers, in worker order, over parameters ``[start, stop)``.

    Reads every worker's small arrays and, of its vector, only the pages of the slice.
    The running sum is the only array the size of the slice in memory.
    """
    scalars = [store.read_arrays(store.result_path(job_id, round_index, worker)) for worker in range(n_workers)]
    vectors = [_map_vector(store, job_id, round_index, worker, n_params)[start:stop] for worker in range(n_workers)]
    total = np.zeros(stop - start, dtype=np.float64)
    accumulate_vectors(mode.vector_factors(scalars), vectors, total)
    return Reduction(vector=total, scalars=mode.reduce_scalars(scalars))


def write_reduced_slice(store: EfsStore, job_id: str, round_index: int, slice_index: int,
                        reduction: Reduction) -> None:
    """Store a reducer's slice of the sums and the round's small totals, atomically."""
    arrays = {_VECTOR_KEY: reduction.vector,
              **{_SCALAR_PREFIX + name: value for name, value in reduction.scalars.items()}}
    store.write_arrays(store.reduced_path(job_id, round_index, slice_index), arrays)


def read_reduced_round(store: EfsStore, job_id: str, round_index: int, reducers: int, n_params: int) -> Reduction:
    """Return the whole round's reduction from the reducers' slices, concatenated in slice order.

    Every reducer stores the same small totals; those of slice 0 are used.
    """
    vector = np.empty(n_params, dtype=np.float64)
    scalars: dict[str, np.ndarray] = {}
    for slice_index in range(reducers):
        start, stop = slice_bounds(n_params, reducers, slice_index)
        path = store.reduced_path(job_id, round_index, slice_index)
        arrays = store.read_arrays(path)
        part = arrays.pop(_VECTOR_KEY)
        if part.shape != (stop - start,):
            raise ValueError(f"reduced slice '{path}' has shape {part.shape}, expected ({stop - start},) for "
                             f"parameters [{start}, {stop}); delete it and let the watchdog re-send its reduce "
                             "message")
        vector[start:stop] = part
        if slice_index == 0:
            scalars = {name[len(_SCALAR_PREFIX):]: value for name, value in arrays.items()}
    return Reduction(vector=vector, scalars=scalars)
