"""Opening data files for the format readers, and the checks that every format shares.

A ``.gz`` or ``.bz2`` file is decompressed as it is read, and text is decoded as UTF-8,
with errors that name the line and the byte. :func:`check_finite` rejects parsed rows
with a NaN or infinite value, whichever format they came from.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from shared.errors import DATA_FILE_NOT_FOUND, DataError

COMPRESSED_SUFFIXES = (".gz", ".bz2")


def check_data_file(path: Path, source: str, field: str) -> None:
    """Raise unless ``path`` is a regular file this process may read.

    Parameters
    ----------
    path : Path
        The file on EFS.
    source : str
        The path as the spec gives it, for the message.
    field : str
        The spec field that names it, such as ``data.path``.

    Raises
    ------
    DataError
        Naming the file, what it is instead, and what to do.
    """
    if path.is_symlink() and not path.exists():
        raise DataError(f"{DATA_FILE_NOT_FOUND}: '{source}' is a symbolic link to a missing file, or one of a loop of "
                        f"links; check {field} and point the link at the file on EFS, or copy the file there")
    if not path.exists():
        raise DataError(f"{DATA_FILE_NOT_FOUND}: '{source}'; check {field} and that the file was copied onto EFS")
    if path.is_dir():
        raise DataError(f"{field} '{source}' is a folder, not a file; name one data file in {field}")
    if not path.is_file():
        raise DataError(f"{field} '{source}' is not a regular file (it is a named pipe, socket or device); copy the "
                        "data into a regular file on EFS and name that file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{field} '{source}' cannot be read by the functions' user (uid {os.getuid()}, gid "
                        f"{os.getgid()}): permission denied; make the file readable by that user, for example "
                        "with chmod a+r, or copy it onto EFS as that user")


def open_binary(path: Path, source: str) -> io.BufferedIOBase:
    """Open a data file for reading bytes, decompressing a ``.gz`` or ``.bz2`` file as it is read."""
    if not path.is_file():
        raise DataError(f"{DATA_FILE_NOT_FOUND}: '{source}'; check data.path and that the file was copied onto EFS")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".bz2":
        return bz2.open(path, "rb")
    return open(path, "rb")


def read_text_bytes(path: Path, source: str) -> bytes:
    """Return the bytes of a text file, decompressing a ``.gz`` or ``.bz2`` file."""
    try:
        with open_binary(path, source) as handle:
            return handle.read()
    except (OSError, EOFError) as error:
        raise read_error(path, source, error) from None


def read_error(path: Path, source: str, error: OSError | EOFError) -> Exception:
    """Return the error to raise for ``error`` while reading ``path``.

    A decompressor's errors carry no errno, and they become :func:`decompression_error`.
    An error with an errno comes from the file system (an I/O error, say), not from the
    file's content, so it is returned as it is and its invocation retried.
    """
    if path.suffix in COMPRESSED_SUFFIXES and getattr(error, "errno", None) is None:
        return decompression_error(path, source, error)
    return error


def decompression_error(path: Path, source: str, error: Exception) -> DataError:
    """Return the error for a ``.gz`` or ``.bz2`` file that is truncated or not compressed at all.

    ``gzip`` raises ``BadGzipFile`` (an ``OSError``) and ``bz2`` an ``OSError`` or
    ``EOFError``. Retrying cannot change the file, so the caller raises this permanent error.
    """
    return DataError(f"'{source}' could not be decompressed ({error}); check that the file is complete, "
                     f"or rename it if it is not {path.suffix}-compressed")


def decode_text(raw: bytes, source: str, first_line_number: int = 1) -> str:
    """Decode UTF-8 text whose first line is line ``first_line_number`` of ``source``.

    Raises
    ------
    DataError
        Naming the line and the first byte that is not UTF-8.
    """
    # A byte order mark, as some Windows editors write, opens the file and is not data.
    if first_line_number == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line_number = first_line_number + raw.count(b"\n", 0, error.start)
        position = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise not_utf8_error(source, line_number, raw[error.start:error.start + 1], position) from None


def not_utf8_error(source: str, line_number: int, byte: bytes, position: int) -> DataError:
    """Return the error for a text data file with bytes that are not UTF-8."""
    return DataError(f"line {line_number} of '{source}' is not UTF-8 text because byte {position} of the line is "
                     f"{byte!r}; libsvm and CSV files must be UTF-8 (or ASCII) text, so convert the file or check "
                     "that data.path names the right file")


def check_finite(X, y: np.ndarray, source: str, first_row: int = 0) -> None:
    """Raise :class:`DataError` naming the first row with a NaN or infinite feature or label.

    ``first_row`` is the number of data rows of ``source`` before the first row of ``X``.
    """
    values = X.data if sp.issparse(X) else X
    if not np.all(np.isfinite(values)):
        if sp.issparse(X):
            # The row of the first bad stored value, found from the row pointers.
            position = int(np.flatnonzero(~np.isfinite(X.data))[0])
            row = int(np.searchsorted(X.indptr, position, side="right")) - 1
        else:
            row = int(np.argwhere(~np.isfinite(X))[0][0])
        raise DataError(f"'{source}' has a NaN or infinite feature value in data row {first_row + row + 1} "
                        "(features are stored as float32, so a value beyond ±3.4e38 becomes infinite); "
                        "clean, impute or rescale the data before training")
    if not np.all(np.isfinite(y)):
        row = int(np.argwhere(~np.isfinite(y))[0][0])
        raise DataError(f"'{source}' has a NaN or infinite label in data row {first_row + row + 1}; "
                        "fix or remove the rows without a finite label before training, and for CSV or .npy data "
                        "check that data.label_column names the label column")
