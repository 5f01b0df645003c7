"""Shards on EFS: the rows each worker trains on, and the validation rows, memory-mapped.

Each shard folder contains ``y.npy`` and either ``X.npy`` (dense data) or the three CSR
arrays ``X-data.npy``, ``X-indices.npy`` and ``X-indptr.npy`` (sparse data). Features
are stored as float32 to halve what a worker reads from EFS, and models accumulate in
float64. :mod:`shared.preparation` writes the shards. Loading one checks its files'
shapes, labels and row pointers against the data manifest, so that a file damaged after
the preparation fails the job with the file's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from shared.efs import EfsStore, relative_efs_path
from shared.errors import DataError
from shared.formats.npy import check_npy_header
from shared.sampling import take_rows
from shared.source_files import FIX

VALIDATION = "validation"


# The unsigned integer type of each size of column index.
_UNSIGNED = {4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}


@dataclass
class Shard:
    """The rows one worker trains on, memory-mapped from EFS.

    Read rows of ``X`` through :meth:`rows`, which checks the column indices of the sparse
    rows it returns.
    """

    X: Any
    y: np.ndarray
    # The EFS name of a sparse shard's column index file, for messages.
    indices_file: str = "X-indices.npy"

    @property
    def n_rows(self) -> int:
        return self.X.shape[0]

    def rows(self, selection: np.ndarray | slice, dtype=None):
        """Return the rows ``selection`` of ``X``, as :func:`~shared.sampling.take_rows` does.

        Parameters
        ----------
        selection : ndarray of int or slice
            Sorted, distinct row indices, or a slice with step 1.
        dtype : numpy dtype, optional
            The dtype of the returned values.

        Raises
        ------
        DataError
            If a sparse row contains a column index outside the shard's width, which scipy
            would follow outside its arrays.
        """
        if isinstance(selection, slice):
            # Contiguous rows go through take_rows too, because scipy's own slicing of
            # a CSR matrix drops out-of-range columns without a word.
            selection = np.arange(*selection.indices(self.n_rows))
        chunk = take_rows(self.X, selection, dtype)
        if isinstance(chunk, np.ndarray):
            return chunk
        indices = chunk.indices
        # Read as unsigned, a negative index is larger than any width: one pass finds both.
        if indices.size and np.maximum.reduce(indices.view(_UNSIGNED[indices.itemsize])) >= chunk.shape[1]:
            raise _changed_shard_error(self.indices_file, f"contains a column index outside 0 to {chunk.shape[1] - 1}")
        return chunk


def shard_folder(store: EfsStore, job_id: str, destination: int | str) -> Path:
    """Return the folder of shard ``destination`` (a worker index) or of the validation rows."""
    name = VALIDATION if destination == VALIDATION else f"shard-{destination}"
    return store.data_dir(job_id) / name


def _shard_file_names(manifest: dict) -> list[str]:
    matrix = ["X-data.npy", "X-indices.npy", "X-indptr.npy"] if manifest["sparse"] else ["X.npy"]
    return ["y.npy", *matrix]


def _missing_shard_error(store: EfsStore, path: Path) -> DataError:
    return DataError(f"prepared shard file '{relative_efs_path(store, path)}' is missing: the job's prepared data on "
                     f"EFS was deleted or moved after its preparation, and Baton does not rebuild the shards of a "
                     f"started job; {FIX}")


def _damaged_shard_error(store: EfsStore, path: Path, problem: str) -> DataError:
    return _changed_shard_error(str(relative_efs_path(store, path)), problem)


def _changed_shard_error(efs_name: str, problem: str) -> DataError:
    return DataError(f"prepared shard file '{efs_name}' {problem}: Baton writes each shard file whole, so it was "
                     f"changed after the job's preparation, and Baton does not rebuild the shards of a started job; "
                     f"{FIX}")


def check_shards_present(store: EfsStore, job_id: str, manifest: dict) -> None:
    """Raise :class:`DataError` naming the first prepared shard file that is missing."""
    destinations = [*range(len(manifest["shard_rows"])), *([VALIDATION] if manifest["validation_rows"] else [])]
    for destination in destinations:
        folder = shard_folder(store, job_id, destination)
        for name in _shard_file_names(manifest):
            if not (folder / name).is_file():
                raise _missing_shard_error(store, folder / name)


# Values read at a time by :func:`_value_range`: 8 MiB of int64, so the check adds little to a
# worker's peak memory.
VALUE_CHECK_BLOCK = 2**20


def _value_range(path: Path) -> tuple[float, float, bool] | None:
    """Return the smallest and largest value of a ``.npy`` array and whether all are finite; None if empty.

    The file is read in blocks with plain reads rather than through a memory map, so the
    pass leaves no pages mapped in the process (a worker's memory stays its batch's).
    """
    smallest, largest, finite = math.inf, -math.inf, True
    with open(path, "rb") as handle:
        shape, dtype = check_npy_header(handle, f"'{path.name}'")
        remaining = int(np.prod(shape, dtype=np.int64))
        if remaining == 0:
            return None
        while remaining:
            block = np.fromfile(handle, dtype=dtype, count=min(remaining, VALUE_CHECK_BLOCK))
            if block.size == 0:
                raise EOFError(f"{path.name} ends {remaining} values early")
            remaining -= block.size
            if dtype.kind == "f":
                finite = finite and bool(np.isfinite(block).all())
                block = block[np.isfinite(block)]
                if block.size == 0:
                    continue
            smallest, largest = min(smallest, float(block.min())), max(largest, float(block.max()))
    return smallest, largest, finite


def _check_shard_values(store: EfsStore, folder: Path, manifest: dict, indptr: np.ndarray | None) -> None:
    """Raise unless the labels fit the manifest's classes and the row pointers rise row by row.

    Shapes alone let through a label that a changed file puts out of range, which trains on
    the wrong classes, or falling row pointers, which make scipy read outside its arrays.
    Both arrays have one value per row, a small part of the shard.
    """
    labels = _value_range(folder / "y.npy")
    classes = manifest.get("classes")
    if labels is not None and classes:
        smallest, largest, _ = labels
        if smallest < 0 or largest >= len(classes) or smallest != int(smallest) or largest != int(largest):
            raise _damaged_shard_error(store, folder / "y.npy", f"holds class codes from {smallest:g} to {largest:g}, "
                                                                f"but the job has {len(classes)} classes (codes 0 to "
                                                                f"{len(classes) - 1})")
    elif labels is not None and not labels[2]:
        raise _damaged_shard_error(store, folder / "y.npy", "holds a NaN or infinite label")
    if indptr is None:
        return
    if indptr.size and (int(indptr[0]) != 0 or bool(np.any(np.diff(indptr) < 0))):
        raise _damaged_shard_error(store, folder / "X-indptr.npy", "holds row pointers that do not start at 0 and "
                                                                   "rise row by row")
    # The column indices are most of a sparse shard, and a worker reads only its batches'
    # pages of them, so Shard.rows checks them as it reads them.


def _read_matrix(store: EfsStore, folder: Path, manifest: dict, rows: int) -> Shard:
    """Memory-map the arrays in ``folder``, checking their shapes against the manifest and ``rows``.

    Raises
    ------
    DataError
        If a file is missing, unreadable, not a ``.npy`` array, or of a shape that does not
        fit the others, naming the file.
    """
    arrays = {}
    for name in _shard_file_names(manifest):
        path = folder / name
        try:
            # numpy.asarray turns a memory map into a plain ndarray over the same mapped
            # pages, without copying; indexing one skips numpy.memmap's Python-level __getitem__.
            arrays[name] = np.asarray(store.read_npy(path))
        except FileNotFoundError:
            raise _missing_shard_error(store, path) from None
        except PermissionError:
            raise _damaged_shard_error(store, path, "cannot be read by this function (permission denied)") from None
        except (ValueError, EOFError) as error:
            # Other OSErrors, such as an I/O error of the file system, may pass: they are retried.
            raise _damaged_shard_error(store, path, f"is damaged ({type(error).__name__}: {error})") from None

    # NOTE: a shard file replaced by another of the same shape and valid values is read
    # as it is. Hashing it would read the whole shard on each cold start.
    y = arrays["y.npy"]
    if y.shape != (rows,):
        raise _damaged_shard_error(store, folder / "y.npy", f"holds labels of shape {y.shape} where the manifest "
                                                              f"records {rows} rows")
    if manifest["sparse"]:
        data, indices, indptr = arrays["X-data.npy"], arrays["X-indices.npy"], arrays["X-indptr.npy"]
        values = int(indptr[-1]) if indptr.shape == (rows + 1,) else None
        if values is None or not data.shape == indices.shape == (values,):
            raise _damaged_shard_error(store, folder / "X-indptr.npy",
                                       f"does not fit its shard: row pointers of shape {indptr.shape}, values of "
                                       f"shape {data.shape} and column indices of shape {indices.shape}, for {rows} "
                                       "rows")
        _check_shard_values(store, folder, manifest, indptr)
        X = sp.csr_matrix((data, indices, indptr), shape=(rows, manifest["n_features"]), copy=False)
        return Shard(X=X, y=y, indices_file=str(relative_efs_path(store, folder / "X-indices.npy")))

    X = arrays["X.npy"]
    if X.shape != (rows, manifest["n_features"]):
        raise _damaged_shard_error(store, folder / "X.npy", f"holds a matrix of shape {X.shape} where the "
                                                            f"manifest records {rows} rows of "
                                                            f"{manifest['n_features']} features")
    _check_shard_values(store, folder, manifest, None)
    return Shard(X=X, y=y)


def load_shard(store: EfsStore, job_id: str, manifest: dict, worker: int) -> Shard:
    """Memory-map worker ``worker``'s shard."""
    return _read_matrix(store, shard_folder(store, job_id, worker), manifest, rows=manifest["shard_rows"][worker])


def load_validation(store: EfsStore, job_id: str, manifest: dict) -> Shard | None:
    """Memory-map the validation rows, or return None if the job has none."""
    if manifest["validation_rows"] == 0:
        return None
    return _read_matrix(store, shard_folder(store, job_id, VALIDATION), manifest, rows=manifest["validation_rows"])


def load_training_sample(store: EfsStore, job_id: str, manifest: dict, max_rows: int) -> Any:
    """Return up to ``max_rows`` training rows taken evenly from every shard, in float64.

    Each shard contributes rows in proportion to its size, and at least one row,
    picked at evenly spaced positions, so the sample is deterministic and reads no
    shard whole.
    """
    total = sum(manifest["shard_rows"])
    takes = [min(rows, max(1, round(max_rows * rows / total))) if rows else 0 for rows in manifest["shard_rows"]]
    # Rounding up may go past max_rows by a row per shard: take those from the last shards.
    excess = sum(takes) - max_rows
    for worker in reversed(range(len(takes))):
        if excess <= 0:
            break
        cut = min(excess, takes[worker] - 1)
        takes[worker] -= cut
        excess -= cut
    parts = []
    for worker, (rows, take) in enumerate(zip(manifest["shard_rows"], takes)):
        if take == 0:
            continue
        shard = load_shard(store, job_id, manifest, worker)
        positions = np.linspace(0, rows - 1, take).round().astype(np.int64)
        parts.append(shard.rows(np.unique(positions)))
    if manifest["sparse"]:
        return sp.vstack(parts, format="csr").astype(np.float64)
    return np.concatenate(parts).astype(np.float64)
