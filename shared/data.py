"""Reading data sets, splitting them into shards, and loading shards back.

Sparse data stays sparse end to end: libsvm files are parsed into CSR matrices and stored
as three memory-mappable arrays per shard. Features are stored as float32 to halve what a
worker reads from EFS; models accumulate in float64.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from shared.efs import EfsStore
from shared.errors import DataError
from shared.spec import JobSpec

logger = logging.getLogger(__name__)

VALIDATION = "validation"


def _open_text(path: Path) -> io.TextIOBase:
    if not path.is_file():
        raise DataError(f"data file not found: '{path}'; check data.path and that the file was copied onto EFS")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, "rt", encoding="utf-8")


def read_libsvm(path: Path, n_features: int | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """Parse a libsvm/svmlight file into a CSR matrix and a label vector.

    Parameters
    ----------
    path : Path
        Text file, optionally ``.gz`` or ``.bz2``; indices are 1-based.
    n_features : int, optional
        Number of columns. Inferred from the highest index when None.

    Returns
    -------
    X : csr_matrix of shape (n_samples, n_features), float32
    y : ndarray of shape (n_samples,), float64

    Raises
    ------
    DataError
        On a missing or empty file, a malformed line (with its line number), an index out
        of range, or a non-finite value.
    """
    labels: list[float] = []
    indices: list[int] = []
    values: list[float] = []
    indptr = [0]

    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            content = line.split("#", 1)[0].strip()
            if not content:
                continue
            tokens = content.split()
            try:
                labels.append(float(tokens[0]))
                previous_index = 0
                for token in tokens[1:]:
                    if token.startswith("qid:"):
                        continue
                    index_text, value_text = token.split(":", 1)
                    index = int(index_text)
                    if index <= previous_index:
                        raise ValueError(f"index {index} is not above the previous index {previous_index}")
                    previous_index = index
                    indices.append(index - 1)
                    values.append(float(value_text))
            except ValueError as error:
                raise DataError(
                    f"malformed libsvm line {line_number} in '{path}': {error}; "
                    "expected '<label> <index>:<value> ...' with increasing 1-based indices"
                ) from None
            indptr.append(len(indices))

    if not labels:
        raise DataError(f"data file '{path}' has no rows; check that it is the right file and not empty")

    highest_index = max(indices, default=-1) + 1
    if n_features is None:
        n_features = highest_index
    elif highest_index > n_features:
        raise DataError(
            f"'{path}' uses feature index {highest_index} but data.n_features is {n_features}; "
            f"raise data.n_features to at least {highest_index}")

    X = sp.csr_matrix(
        (np.asarray(values, dtype=np.float32), np.asarray(indices, dtype=np.int32), np.asarray(indptr, dtype=np.int64)),
        shape=(len(labels), n_features))
    return X, np.asarray(labels, dtype=np.float64)


def read_csv(path: Path, label_column: int = -1, skip_rows: int = 0, delimiter: str = ",") -> tuple[np.ndarray, np.ndarray]:
    """Parse a numeric CSV file into a dense feature matrix and a label vector.

    Parameters
    ----------
    path : Path
        Text file, optionally ``.gz`` or ``.bz2``.
    label_column : int, default=-1
        Index of the label column; negative counts from the end.
    skip_rows : int, default=0
        Lines to skip before the first row, for example a header.
    delimiter : str, default=","

    Returns
    -------
    X : ndarray of shape (n_samples, n_features), float32
    y : ndarray of shape (n_samples,), float64
    """
    with _open_text(path) as handle:
        try:
            table = np.loadtxt(handle, delimiter=delimiter, skiprows=skip_rows, ndmin=2, dtype=np.float64)
        except ValueError as error:
            raise DataError(f"malformed CSV file '{path}': {error}; check data.delimiter and data.skip_rows") from None

    if table.shape[0] == 0:
        raise DataError(f"data file '{path}' has no rows; check that it is the right file and not empty")
    n_columns = table.shape[1]
    if not -n_columns <= label_column < n_columns or n_columns < 2:
        raise DataError(f"data.label_column is {label_column} but '{path}' has {n_columns} columns")

    label_index = label_column % n_columns
    y = table[:, label_index].copy()
    X = np.delete(table, label_index, axis=1).astype(np.float32)
    return X, y


def read_dataset(store: EfsStore, spec: JobSpec, relative_path: str, n_features: int | None):
    """Read one data file named in ``spec`` and check its values are finite."""
    path = store.resolve_data_path(relative_path)
    if spec.data.format == "libsvm":
        X, y = read_libsvm(path, n_features)
        feature_values = X.data
    else:
        X, y = read_csv(path, spec.data.label_column, spec.data.skip_rows, spec.data.delimiter)
        if n_features is not None and X.shape[1] != n_features:
            raise DataError(f"'{path}' has {X.shape[1]} feature columns but {n_features} are expected; "
                            "check data.n_features and that training and validation files match")
        feature_values = X

    if not np.all(np.isfinite(feature_values)):
        row = int(np.argwhere(~np.isfinite(X.toarray() if sp.issparse(X) else X))[0][0])
        raise DataError(f"'{path}' has a NaN or infinite feature value in data row {row + 1}; "
                        "clean or impute the data before training")
    if not np.all(np.isfinite(y)):
        row = int(np.argwhere(~np.isfinite(y))[0][0])
        raise DataError(f"'{path}' has a NaN or infinite label in data row {row + 1}")
    return X, y


@dataclass
class Shard:
    """The rows one worker trains on, memory-mapped from EFS."""

    X: Any
    y: np.ndarray

    @property
    def n_rows(self) -> int:
        return self.X.shape[0]


def split_rows(n_rows: int, n_workers: int, validation_rows: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Shuffle row indices with ``seed`` and split them into worker shards and a held-out part.

    Returns the row indices of each shard (sizes differ by at most one) and of the
    validation part, which is empty when ``validation_rows`` is 0.
    """
    order = np.random.default_rng([seed, 0x5EED]).permutation(n_rows)
    validation = np.sort(order[:validation_rows])
    shards = [np.sort(part) for part in np.array_split(order[validation_rows:], n_workers)]
    return shards, validation


def _write_matrix(store: EfsStore, folder: Path, X, y: np.ndarray) -> None:
    if sp.issparse(X):
        X = X.tocsr()
        store.write_npy(folder / "X-data.npy", X.data.astype(np.float32))
        store.write_npy(folder / "X-indices.npy", X.indices.astype(np.int32))
        store.write_npy(folder / "X-indptr.npy", X.indptr.astype(np.int64))
    else:
        store.write_npy(folder / "X.npy", np.ascontiguousarray(X, dtype=np.float32))
    store.write_npy(folder / "y.npy", np.asarray(y))


def _read_matrix(store: EfsStore, folder: Path, manifest: dict) -> Shard:
    y = store.read_npy(folder / "y.npy")
    if manifest["sparse"]:
        data = store.read_npy(folder / "X-data.npy")
        indices = store.read_npy(folder / "X-indices.npy")
        indptr = store.read_npy(folder / "X-indptr.npy")
        X = sp.csr_matrix((data, indices, indptr), shape=(len(y), manifest["n_features"]), copy=False)
    else:
        X = store.read_npy(folder / "X.npy")
    return Shard(X=X, y=y)


def prepare_data(store: EfsStore, spec: JobSpec, model) -> dict:
    """Read the job's data, split it into shards and store them on EFS.

    The manifest is written last, so its presence means every shard is complete; a
    repeated call returns the existing manifest without reading the source again.

    Returns
    -------
    manifest : dict
        ``n_features``, ``classes``, ``sparse``, ``shard_rows`` (one count per worker) and
        ``validation_rows``.
    """
    manifest_path = store.data_dir(spec.job_id) / "manifest.json"
    if manifest_path.exists():
        return store.read_json(manifest_path)

    X, y_raw = read_dataset(store, spec, spec.data.path, spec.data.n_features)
    n_features = X.shape[1]
    n_workers = spec.training.n_workers

    classes = None
    if model.task in ("binary", "multiclass"):
        classes = np.unique(y_raw)
        model.check_classes(classes)
    y = model.encode_targets(y_raw, classes)

    if spec.data.validation_path is not None:
        validation_rows = 0
        X_validation, y_validation_raw = read_dataset(store, spec, spec.data.validation_path, n_features)
        y_validation = model.encode_targets(y_validation_raw, classes)
    else:
        validation_rows = int(round(spec.data.validation_fraction * X.shape[0]))

    if X.shape[0] - validation_rows < n_workers:
        raise DataError(
            f"training.n_workers is {n_workers} but only {X.shape[0] - validation_rows} training rows remain; "
            "use fewer workers or more data")

    shard_indices, validation_indices = split_rows(X.shape[0], n_workers, validation_rows, spec.training.seed)
    if spec.data.validation_path is None:
        X_validation, y_validation = X[validation_indices], y[validation_indices]

    data_dir = store.data_dir(spec.job_id)
    for worker, rows in enumerate(shard_indices):
        _write_matrix(store, data_dir / f"shard-{worker}", X[rows], y[rows])
    if X_validation.shape[0] > 0:
        _write_matrix(store, data_dir / VALIDATION, X_validation, y_validation)

    manifest = {
        "n_features": int(n_features),
        "classes": None if classes is None else classes.tolist(),
        "sparse": bool(sp.issparse(X)),
        "shard_rows": [int(len(rows)) for rows in shard_indices],
        "validation_rows": int(X_validation.shape[0]),
    }
    store.write_json(manifest_path, manifest)
    logger.info("prepared data", extra={"job_id": spec.job_id, "n_rows": int(X.shape[0]), "n_features": n_features})
    return manifest


def load_shard(store: EfsStore, job_id: str, manifest: dict, worker: int) -> Shard:
    """Memory-map worker ``worker``'s shard."""
    return _read_matrix(store, store.data_dir(job_id) / f"shard-{worker}", manifest)


def load_validation(store: EfsStore, job_id: str, manifest: dict) -> Shard | None:
    """Memory-map the validation rows, or return None if the job has none."""
    if manifest["validation_rows"] == 0:
        return None
    return _read_matrix(store, store.data_dir(job_id) / VALIDATION, manifest)
