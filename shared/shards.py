"""Shards on EFS: the rows each worker trains on, and the validation rows, memory-mapped.

Each shard folder contains ``y.npy`` and either ``X.npy`` (dense data) or the three CSR
arrays ``X-data.npy``, ``X-indices.npy`` and ``X-indptr.npy`` (sparse data). Features
are stored as float32 to halve what a worker reads from EFS, and models accumulate in
float64. :mod:`shared.preparation` writes the shards and records each file's size,
modification time, inode change time and inode number in the data manifest
(``shard_files``), and those of the training statistics (``standardize.npz``) when the
data is standardised. Loading a shard checks its files against that record, and their
shapes, labels and row pointers against the manifest. A warm worker or aggregator checks
the record again on every task, before it reads the rows it has mapped. So a file changed
after the preparation fails the job with the file's name before a round trains on it, and
``baton resume`` then prepares the shards again (:mod:`shared.repair`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from shared.efs import EfsStore, relative_efs_path
from shared.errors import DamagedShardError
from shared.formats.npy import check_npy_header
from shared.sampling import take_rows
from shared.source_files import describe_identity_change, file_identity

VALIDATION = "validation"
# The training rows' mean and scale of each feature, in the data folder, when the data is standardised.
STATISTICS = "standardize.npz"


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
    # The job the shard belongs to, named in the fix of an error; None leaves the id out.
    job_id: str | None = None

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
        DamagedShardError
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
            raise _changed_shard_error(self.indices_file, f"contains a column index outside 0 to {chunk.shape[1] - 1}",
                                       self.job_id)
        return chunk


def shard_folder(store: EfsStore, job_id: str, destination: int | str) -> Path:
    """Return the folder of shard ``destination`` (a worker index) or of the validation rows."""
    name = VALIDATION if destination == VALIDATION else f"shard-{destination}"
    return store.data_dir(job_id) / name


def _shard_file_names(manifest: dict) -> list[str]:
    matrix = ["X-data.npy", "X-indices.npy", "X-indptr.npy"] if manifest["sparse"] else ["X.npy"]
    return ["y.npy", *matrix]


def statistics_path(store: EfsStore, job_id: str) -> Path:
    """Return the path of the job's training statistics, which exist when its manifest records ``standardized``."""
    return store.data_dir(job_id) / STATISTICS


def _shard_destinations(manifest: dict) -> list[int | str]:
    """Return the destinations that have shard folders: every worker, then the validation rows if any."""
    return [*range(len(manifest["shard_rows"])), *([VALIDATION] if manifest["validation_rows"] else [])]


def _repair_fix(job_id: str | None) -> str:
    """Return the fix that every shard error ends with."""
    command = f"`baton resume {job_id}`" if job_id else "`baton resume` with the job's id"
    return (f"run {command}: it prepares the shards again from the job's data source, which must be unchanged, "
            "and the job goes on from its last completed round")


def _file_kind(efs_name: str) -> str:
    """Return how messages name a prepared file: the statistics file or a shard file."""
    return "statistics file" if efs_name.endswith(f"data/{STATISTICS}") else "shard file"


def _missing_shard_error(store: EfsStore, path: Path, job_id: str | None) -> DamagedShardError:
    efs_name = str(relative_efs_path(store, path))
    return DamagedShardError(f"prepared {_file_kind(efs_name)} '{efs_name}' is missing: the job's prepared data on EFS "
                             f"was deleted or moved after its preparation; {_repair_fix(job_id)}")


def _damaged_shard_error(store: EfsStore, path: Path, problem: str, job_id: str | None) -> DamagedShardError:
    return _changed_shard_error(str(relative_efs_path(store, path)), problem, job_id)


def _changed_shard_error(efs_name: str, problem: str, job_id: str | None) -> DamagedShardError:
    return DamagedShardError(f"prepared {_file_kind(efs_name)} '{efs_name}' {problem}: Baton writes each prepared "
                             f"file whole, so it was changed after the job's preparation; {_repair_fix(job_id)}")


def shard_file_key(folder: Path, name: str) -> str:
    """Return the key of a shard file in the manifest's ``shard_files``: its shard folder and name."""
    return f"{folder.name}/{name}"


def record_shard_files(store: EfsStore, job_id: str, manifest: dict) -> dict[str, dict]:
    """Return the identity of every shard file of a prepared job, for the manifest's ``shard_files``.

    One ``stat`` call per file: its size, modification time and inode change time in
    nanoseconds, and its inode number, which :func:`load_shard` and
    :func:`check_shard_unchanged` compare with the file they find. The training statistics
    (``data/standardize.npz``) are recorded too when the manifest records ``standardized``.
    """
    paths = [shard_folder(store, job_id, destination) / name
             for destination in _shard_destinations(manifest) for name in _shard_file_names(manifest)]
    if manifest.get("standardized"):
        paths.append(statistics_path(store, job_id))
    identities = {}
    for path in paths:
        identity = file_identity(path, include_ctime=True)
        if identity is None:
            raise _missing_shard_error(store, path, job_id)
        identities[shard_file_key(path.parent, path.name)] = identity
    return identities


def _check_identity(store: EfsStore, path: Path, manifest: dict, job_id: str | None) -> None:
    """Raise :class:`DamagedShardError` if the file at ``path`` is not the one the manifest recorded.

    A manifest written before ``shard_files`` existed records no identities, and then
    nothing is checked.
    """
    recorded = (manifest.get("shard_files") or {}).get(shard_file_key(path.parent, path.name))
    if recorded is None:
        return
    current = file_identity(path, include_ctime=True)
    if current is None:
        raise _missing_shard_error(store, path, job_id)
    change = describe_identity_change(recorded, current)
    if change is not None:
        raise _damaged_shard_error(store, path, f"is not the file the preparation wrote: {change}", job_id)


def check_shards_intact(store: EfsStore, job_id: str, manifest: dict) -> None:
    """Raise :class:`DamagedShardError` naming the first prepared file that is missing or replaced.

    The prepared files are the shard files and, when the manifest records
    ``standardized``, the training statistics. A file is replaced when its size,
    modification time, inode change time or inode number differs from the manifest's
    record of it. The check costs one ``stat`` call per file and reads no data.
    """
    for destination in _shard_destinations(manifest):
        folder = shard_folder(store, job_id, destination)
        for name in _shard_file_names(manifest):
            if not (folder / name).is_file():
                raise _missing_shard_error(store, folder / name, job_id)
            _check_identity(store, folder / name, manifest, job_id)
    check_statistics_file(store, job_id, manifest)


def check_statistics_file(store: EfsStore, job_id: str, manifest: dict) -> None:
    """Raise :class:`DamagedShardError` if the job's training statistics are missing or replaced.

    Nothing is checked when the manifest does not record ``standardized``. A manifest
    written before the statistics' identity was recorded is checked for the file only.
    """
    if not manifest.get("standardized"):
        return
    path = statistics_path(store, job_id)
    if not path.is_file():
        raise _missing_shard_error(store, path, job_id)
    _check_identity(store, path, manifest, job_id)


def check_shard_unchanged(store: EfsStore, job_id: str, manifest: dict, destination: int | str) -> None:
    """Raise :class:`DamagedShardError` if a file of a mapped shard is no longer the one the preparation wrote.

    A warm process calls this on every task for a shard it mapped in an earlier one. A
    read-only memory map shares the page cache, so it shows a write to the file in place
    (``numpy.save`` over it, or a write through another memory map). Such a write changes
    the file's modification and inode change times, which one ``stat`` call per file reads.
    """
    # NOTE: a write that lands after this check, while the task reads its rows, is found
    # only by the next task, after this one has used the changed rows.
    _check_identities(store, shard_folder(store, job_id, destination), manifest, job_id)


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


def _check_shard_values(store: EfsStore, folder: Path, manifest: dict, indptr: np.ndarray | None,
                        job_id: str | None) -> None:
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
                                                                f"{len(classes) - 1})", job_id)
    elif labels is not None and not labels[2]:
        raise _damaged_shard_error(store, folder / "y.npy", "holds a NaN or infinite label", job_id)
    if indptr is None:
        return
    if indptr.size and (int(indptr[0]) != 0 or bool(np.any(np.diff(indptr) < 0))):
        raise _damaged_shard_error(store, folder / "X-indptr.npy", "holds row pointers that do not start at 0 and "
                                                                   "rise row by row", job_id)
    # The column indices are most of a sparse shard, and a worker reads only its batches'
    # pages of them, so Shard.rows checks them as it reads them.


def _read_matrix(store: EfsStore, folder: Path, manifest: dict, rows: int, job_id: str | None = None) -> Shard:
    """Memory-map the arrays in ``folder``, checking them against the manifest and ``rows``.

    Each file's shape must fit the others, and, once the shapes and values pass, the file
    must be the one the preparation wrote, by the identity that the manifest records (when
    it records one). The shape checks come first for their more precise messages.

    Raises
    ------
    DamagedShardError
        If a file is missing, replaced, unreadable, not a ``.npy`` array, or of a shape
        that does not fit the others, naming the file and, in the fix, ``job_id``.
    """
    arrays = {}
    for name in _shard_file_names(manifest):
        path = folder / name
        try:
            # numpy.asarray turns a memory map into a plain ndarray over the same mapped
            # pages, without copying; indexing one skips numpy.memmap's Python-level __getitem__.
            arrays[name] = np.asarray(store.read_npy(path))
        except FileNotFoundError:
            raise _missing_shard_error(store, path, job_id) from None
        except PermissionError:
            raise _damaged_shard_error(store, path, "cannot be read by this function (permission denied)",
                                       job_id) from None
        except (ValueError, EOFError) as error:
            # Other OSErrors, such as an I/O error of the file system, may pass: they are retried.
            raise _damaged_shard_error(store, path, f"is damaged ({type(error).__name__}: {error})", job_id) from None

    y = arrays["y.npy"]
    if y.shape != (rows,):
        raise _damaged_shard_error(store, folder / "y.npy", f"holds labels of shape {y.shape} where the manifest "
                                                              f"records {rows} rows", job_id)
    if manifest["sparse"]:
        data, indices, indptr = arrays["X-data.npy"], arrays["X-indices.npy"], arrays["X-indptr.npy"]
        values = int(indptr[-1]) if indptr.shape == (rows + 1,) else None
        if values is None or not data.shape == indices.shape == (values,):
            raise _damaged_shard_error(store, folder / "X-indptr.npy",
                                       f"does not fit its shard: row pointers of shape {indptr.shape}, values of "
                                       f"shape {data.shape} and column indices of shape {indices.shape}, for {rows} "
                                       "rows", job_id)
        _check_shard_values(store, folder, manifest, indptr, job_id)
        _check_identities(store, folder, manifest, job_id)
        X = sp.csr_matrix((data, indices, indptr), shape=(rows, manifest["n_features"]), copy=False)
        return Shard(X=X, y=y, indices_file=str(relative_efs_path(store, folder / "X-indices.npy")), job_id=job_id)

    X = arrays["X.npy"]
    if X.shape != (rows, manifest["n_features"]):
        raise _damaged_shard_error(store, folder / "X.npy", f"holds a matrix of shape {X.shape} where the "
                                                            f"manifest records {rows} rows of "
                                                            f"{manifest['n_features']} features", job_id)
    _check_shard_values(store, folder, manifest, None, job_id)
    _check_identities(store, folder, manifest, job_id)
    return Shard(X=X, y=y, job_id=job_id)


def _check_identities(store: EfsStore, folder: Path, manifest: dict, job_id: str | None) -> None:
    """Raise :class:`DamagedShardError` if a file in ``folder`` is not the one the preparation wrote.

    One ``stat`` call per file. A file replaced before its mapping is found here. One that
    a rename replaces afterwards is not read, because the mapping keeps the file it opened.
    A write in place after the mapping is found by :func:`check_shard_unchanged` on the
    next task. A write with the old modification time put back (``touch -d``) still
    changes the inode change time, which the identity records.
    """
    # NOTE: a manifest written before ctime_ns was recorded has no inode change time, so a
    # file rewritten in place at the same size with its old modification time put back
    # keeps its identity. Hashing the files instead would read the whole shard on each cold
    # start. The column indices are still checked as a batch reads them.
    for name in _shard_file_names(manifest):
        _check_identity(store, folder / name, manifest, job_id)


def load_shard(store: EfsStore, job_id: str, manifest: dict, worker: int) -> Shard:
    """Memory-map worker ``worker``'s shard, checked as :func:`_read_matrix` describes."""
    return _read_matrix(store, shard_folder(store, job_id, worker), manifest, rows=manifest["shard_rows"][worker],
                        job_id=job_id)


def load_validation(store: EfsStore, job_id: str, manifest: dict) -> Shard | None:
    """Memory-map the validation rows, or return None if the job has none."""
    if manifest["validation_rows"] == 0:
        return None
    return _read_matrix(store, shard_folder(store, job_id, VALIDATION), manifest, rows=manifest["validation_rows"],
                        job_id=job_id)


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
