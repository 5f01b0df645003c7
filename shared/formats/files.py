"""Opening data files for the format readers, and the checks that every format shares.

A ``.gz`` or ``.bz2`` file is decompressed as it is read, and text is decoded as UTF-8,
with errors that name the line and the byte. :func:`check_finite` rejects parsed rows
with a NaN or infinite value, whichever format they came from. :func:`detect_format`
reads the format from a file's first bytes, so that a file read with the wrong
``data.format`` gets an error that names the right one.
"""

from __future__ import annotations

import bz2
import codecs
import errno
import gzip
import io
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from shared.efs import NPY_SIGNATURE
from shared.errors import DATA_FILE_NOT_FOUND, DataError
from shared.json_numbers import parses_as_float

COMPRESSED_SUFFIXES = (".gz", ".bz2")

# The first bytes of a zip archive, such as a .npz file: a member's local header, or the
# end record of an archive without members.
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
# Bytes from the start of a file that detect_stream_format reads. A first row cut at this
# size is judged by its complete tokens. A file whose comment and blank lines fill all of
# these bytes shows no row, so it is detected as plain text.
HEAD_BYTES = 64 * 1024
# Descriptions of the input each data.format reads, for the errors on a file of another format.
FORMAT_DESCRIPTIONS = {
    "libsvm": "libsvm text (data.format libsvm, the default)",
    "csv": "delimited text (data.format csv)",
    "npy": "a .npy matrix (data.format npy)",
    "npz": "a .npz archive (data.format npz)",
}


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
    try:
        dangling = path.is_symlink() and not path.exists()
    except OSError as error:
        # pathlib passes over a missing file and a link loop, but not a name or path
        # that is too long. Retrying cannot make it shorter, so the error is permanent.
        if error.errno == errno.ENAMETOOLONG:
            raise DataError(f"{field} '{source}' is too long for the file system: a file or folder name may have "
                            "at most 255 bytes, and the whole path on EFS at most 4,095; rename the file or folders "
                            f"to shorter names and give the new path in {field}") from None
        raise
    if dangling:
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


def _is_libsvm_row(line: str) -> bool:
    """Return whether ``line`` is a label followed by at least one ``<index>:<value>`` pair."""
    tokens = line.split("#", 1)[0].split()
    pairs = [token.partition(":") for token in tokens[1:] if not token.startswith("qid:")]
    return (len(tokens) >= 2 and parses_as_float(tokens[0]) and bool(pairs)
            and all(separator and index.isdigit() and parses_as_float(value) for index, separator, value in pairs))


def detect_format(head: bytes, cut: bool = False) -> str | None:
    """Return the data format that the first bytes of a file show, or None when they show none.

    Returns "npy" for numpy's .npy header, "npz" for a zip archive, "libsvm" for text whose
    first row is ``<label> <index>:<value> ...``, "text" for other UTF-8 text, and None for
    other bytes. The content decides, not the file name, so that a file saved under the
    wrong extension is still named correctly. Blank lines, ``#`` comments and a UTF-8 byte
    order mark before the first row are passed over.

    ``cut`` True means that the file goes on after ``head``. Unless ``head`` ends with a
    line end, its last line may then stop inside a token, so that line is judged by the
    tokens before its last one.
    """
    if head.startswith(NPY_SIGNATURE):
        return "npy"
    if head.startswith(ZIP_SIGNATURES):
        return "npz"
    if b"\0" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        # A character cut at the end of the head is not an error in the file.
        if not cut or error.start < len(head) - 3:
            return None
        text = head[:error.start].decode("utf-8")
    lines = text.removeprefix("\ufeff").splitlines()
    if cut and lines and not text.endswith(("\n", "\r")):
        lines[-1] = lines[-1].rsplit(maxsplit=1)[0] if len(lines[-1].split()) > 1 else ""
    rows = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if rows and _is_libsvm_row(rows[0]):
        return "libsvm"
    return "text"


def detect_stream_format(handle: io.BufferedIOBase) -> str | None:
    """Return :func:`detect_format` of the next :data:`HEAD_BYTES` bytes that ``handle`` reads."""
    head = handle.read(HEAD_BYTES + 1)
    return detect_format(head[:HEAD_BYTES], cut=len(head) > HEAD_BYTES)


def wrong_format_error(source: str, data_format: str, detected: str) -> DataError:
    """Return the error for a data file whose content shows the format ``detected`` while ``data_format`` is set.

    ``detected`` is a return value of :func:`detect_format` other than None.
    """
    expected = FORMAT_DESCRIPTIONS[data_format]
    if detected == "npy":
        return DataError(f"'{source}' is a NumPy .npy file, because it starts with numpy's .npy header, not "
                         f"{expected}; set data.format to npy, which reads a 2-D matrix with the labels in "
                         "data.label_column")
    if detected == "npz":
        return DataError(f"'{source}' is a zip archive, as numpy.savez writes a .npz file, not {expected}; set "
                         "data.format to npz if it contains arrays X and y, or else extract the data file from it")
    if detected == "libsvm":
        return DataError(f"'{source}' looks like libsvm text, because its first row is '<label> <index>:<value> "
                         f"...', not {expected}; set data.format to libsvm")
    save = {"npy": "a .npy matrix, save one with numpy.save", "npz": "a .npz archive, save arrays X and y with "
            "numpy.savez"}.get(data_format)
    return DataError(f"'{source}' is text, not {expected}; set data.format to csv for delimited text such as CSV"
                     + (f", or, if the file should be {save}" if save else ""))


# The first bytes of a file compressed by each tool, and the suffix that makes Baton
# decompress it as it reads (None: Baton does not read that compression).
COMPRESSION_SIGNATURES = (
    ("gzip", (b"\x1f\x8b",), ".gz", "gunzip"),
    # "BZh", the block size digit, then the magic of a block or of the end of the stream.
    ("bzip2", tuple(b"BZh" + str(level).encode() + magic for level in range(1, 10)
                    for magic in (b"1AY&SY", b"\x17rE8P\x90")), ".bz2", "bunzip2"),
    ("xz", (b"\xfd7zXZ\x00",), None, "xz -d"),
    ("zstd", (b"\x28\xb5\x2f\xfd",), None, "zstd -d"),
)


def check_not_compressed(path: Path, source: str, text_format: bool) -> None:
    """Raise :class:`DataError` if ``path`` is compressed in a way its reader will not undo.

    ``text_format`` True means libsvm or CSV, whose reader decompresses a gzip file named
    ``.gz`` and a bzip2 file named ``.bz2``. The .npy and .npz readers decompress nothing.
    Without this check, such a file fails as text that is not UTF-8 or as a file without
    the .npy header, which does not say that it is compressed.
    """
    with open(path, "rb") as handle:
        head = handle.read(16)
    for tool, signatures, suffix, decompress in COMPRESSION_SIGNATURES:
        if not head.startswith(signatures):
            continue
        if text_format and suffix is not None and path.suffix == suffix:
            return
        if not text_format:
            fix = f"decompress it ({decompress}), because format npy and npz files are read as they are"
        elif suffix is None:
            fix = f"decompress it ({decompress}), or compress it with gzip and name it .gz"
        else:
            fix = f"rename it to end in {suffix}, so that Baton decompresses it as it reads, or decompress it"
        raise DataError(f"'{source}' is {tool}-compressed; {fix}")


def check_text_format(path: Path, source: str, data_format: str) -> None:
    """Raise :func:`wrong_format_error` if a file read as text starts as another format.

    A file read as libsvm or csv may not start as a .npy file or a zip archive, and a file
    read as csv may not start with a libsvm row. Read as CSV, such a row would fail on its
    column count or its ``<index>:<value>`` fields, and that error would point at
    ``data.delimiter`` rather than ``data.format``.
    """
    try:
        check_not_compressed(path, source, text_format=True)
        with open_binary(path, source) as handle:
            detected = detect_stream_format(handle)
    except (OSError, EOFError) as error:
        raise read_error(path, source, error) from None
    if detected in ("npy", "npz") or (data_format == "csv" and detected == "libsvm"):
        raise wrong_format_error(source, data_format, detected)


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
