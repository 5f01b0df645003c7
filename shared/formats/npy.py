"""Reading ``.npy`` matrices and ``.npz`` archives of features and labels.

Only arrays of plain numbers are read, and never through pickle, because unpickling a
file's objects could run code. A ``.npy`` matrix is memory-mapped, so that a part of the
preparation reads only its own rows.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from shared.errors import DATA_FILE_NOT_FOUND, DataError
from shared.formats.delimited import resolve_label_column
from shared.formats.files import check_not_compressed, detect_stream_format, wrong_format_error


# dtype kinds Baton reads: booleans, signed and unsigned integers, floating point.
NUMERIC_KINDS = "biuf"


NPY_SAVE_EXAMPLE = "numpy.save(path, table.astype(numpy.float64))"
NPZ_SAVE_EXAMPLE = "numpy.savez(path, X=features.astype(numpy.float64), y=labels.astype(numpy.float64))"

# Fields of a structured dtype that an error lists before it counts the rest.
LISTED_DTYPE_FIELDS = 3


def _describe_dtype(dtype: np.dtype) -> str:
    """Return ``dtype`` for a message, with the first fields of a structured dtype and the count of all."""
    if dtype.names is None or dtype.fields is None:
        return f"dtype {dtype}"
    listed = ", ".join(f"{name} {dtype.fields[name][0]}" for name in dtype.names[:LISTED_DTYPE_FIELDS])
    more = ", ..." if len(dtype.names) > LISTED_DTYPE_FIELDS else ""
    return f"a structured dtype of {len(dtype.names)} fields ({listed}{more})"


def check_npy_header(handle, array_name: str, save_example: str = NPY_SAVE_EXAMPLE) -> tuple[tuple[int, ...], np.dtype]:
    """Read the header of a ``.npy`` array from ``handle``; return its shape and dtype.

    ``array_name`` names the array in messages, such as ``"'data/train.npy'"``, and
    ``save_example`` is the call that the messages suggest to save numbers instead.

    Raises
    ------
    DataError
        If the data is not a ``.npy`` array, or its values are not plain numbers.
    """
    try:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
    except ValueError:
        raise DataError(f"{array_name} is not a .npy array because it does not start with numpy's .npy header; save "
                        "it with numpy.save, or use format 'csv' or 'libsvm' for a text file") from None
    if dtype.hasobject:
        raise DataError(f"{array_name} contains Python objects (dtype {dtype}), which Baton does not load because "
                        f"unpickling them could run code; save a numeric array instead, for example {save_example}")
    if dtype.names is not None:
        raise DataError(f"{array_name} contains records of {_describe_dtype(dtype)}, not plain numbers; save a "
                        "numeric matrix instead, for example with numpy.lib.recfunctions.structured_to_unstructured")
    if dtype.kind == "c":
        raise DataError(f"{array_name} contains complex numbers ({_describe_dtype(dtype)}), which Baton does not "
                        "train on; save the real part (numpy.real), the magnitude (numpy.abs) or both as separate "
                        f"real columns, for example {save_example}")
    if dtype.kind not in NUMERIC_KINDS:
        raise DataError(f"{array_name} contains values of {_describe_dtype(dtype)}, not numbers; save a plain "
                        f"numeric array, for example {save_example}")
    return shape, dtype


def load_npy_table(path: Path, source: str) -> np.ndarray:
    """Memory-map a ``.npy`` file that must contain a 2-D matrix of features and labels.

    Raises
    ------
    DataError
        If the array is not 2-D with at least two columns, or :func:`load_npy` rejects it.
    """
    table = load_npy(path, source)
    if table.ndim != 2 or table.shape[1] < 2:
        raise DataError(f"'{source}' contains an array of shape {table.shape}; format 'npy' expects a 2-D matrix "
                        "with the labels in data.label_column, or use format 'npz' with arrays X and y")
    return table


def read_npy_rows(path: Path, label_column: int, start: int = 0, stop: int | None = None,
                  source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read rows ``start:stop`` of a 2-D ``.npy`` matrix whose column ``label_column`` contains the labels.

    The file is memory-mapped, so only the requested rows are read.
    """
    source = source or str(path)
    table = load_npy_table(path, source)
    label_index = resolve_label_column(label_column, None, table.shape[1], source)
    rows = np.asarray(table[start:stop], dtype=np.float64)
    return np.delete(rows, label_index, axis=1).astype(np.float32), rows[:, label_index].copy()


def read_npz(path: Path, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read arrays ``X`` (2-D) and ``y`` (1-D) from a ``.npz`` archive."""
    source = source or str(path)
    if not path.is_file():
        raise DataError(f"{DATA_FILE_NOT_FOUND}: '{source}'; check data.path and that the file was copied onto EFS")
    if not zipfile.is_zipfile(path):
        check_not_compressed(path, source, text_format=False)
        with open(path, "rb") as handle:
            detected = detect_stream_format(handle)
        if detected is not None and detected != "npz":
            raise wrong_format_error(source, "npz", detected)
        raise DataError(f"'{source}' is not a .npz archive because it is not a zip file; save the features and "
                        "labels with numpy.savez(path, X=features, y=labels), or use format 'npy' for one matrix")
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = sorted(name[:-len(".npy")] for name in archive.namelist() if name.endswith(".npy"))
            missing = [name for name in ("X", "y") if name not in arrays]
            if missing:
                raise DataError(f"'{source}' has no array named {' or '.join(missing)} (its arrays: "
                                f"{', '.join(arrays) or 'none'}); format 'npz' reads the features from X and the "
                                "labels from y, so save them with numpy.savez(path, X=features, y=labels)")
            for name in ("X", "y"):
                with archive.open(f"{name}.npy") as member:
                    check_npy_header(member, f"array {name} in '{source}'", NPZ_SAVE_EXAMPLE)
        with np.load(path, allow_pickle=False) as archive:
            X, y = archive["X"], archive["y"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(f"'{source}' is a damaged .npz archive ({error}); copy or save it again") from None
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise DataError(f"'{source}' has X of shape {X.shape} and y of shape {y.shape}; save X as a matrix of "
                        "shape (n_samples, n_features) and y as a vector of shape (n_samples,)")
    return np.asarray(X, dtype=np.float32), np.asarray(y, dtype=np.float64)


def load_npy(path: Path, source: str | None = None) -> np.ndarray:
    """Memory-map a ``.npy`` file after checking that it is a complete array of numbers."""
    source = source or str(path)
    if not path.is_file():
        raise DataError(f"{DATA_FILE_NOT_FOUND}: '{source}'; check data.path and that the file was copied onto EFS")
    check_not_compressed(path, source, text_format=False)
    with open(path, "rb") as handle:
        detected = detect_stream_format(handle)
        if detected is not None and detected != "npy":
            raise wrong_format_error(source, "npy", detected)
        handle.seek(0)
        shape, dtype = check_npy_header(handle, f"'{source}'")
        data_offset = handle.tell()
    expected_bytes = data_offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual_bytes = path.stat().st_size
    if actual_bytes < expected_bytes:
        raise DataError(f"'{source}' is truncated: its header describes an array of shape {shape} and dtype "
                        f"{dtype}, {expected_bytes:,} bytes with the header, but the file has {actual_bytes:,}; "
                        "copy or save it again")
    return np.load(path, mmap_mode="r", allow_pickle=False)
