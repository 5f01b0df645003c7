"""Reading data sets, splitting them into shards, and loading shards back.

Sparse data stays sparse end to end: libsvm files are parsed into CSR matrices and stored
as three memory-mappable arrays per shard. Features are stored as float32 to halve what a
worker reads from EFS; models accumulate in float64.

The readers here parse one part of a source: a byte range of a text file, a row range of
a ``.npy`` matrix, or a whole file. :mod:`shared.preparation` chains the parts into a
preparation that no single invocation has to hold in memory; :func:`prepare_data` runs
that chain in one process.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import itertools
import logging
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

from shared.efs import EfsStore
from shared.errors import DataError
from shared.sampling import data_split_rng, take_rows
from shared.source_files import FIX
from shared.spec import JobSpec

logger = logging.getLogger(__name__)

VALIDATION = "validation"
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
        raise DataError(f"data file not found: '{source}' is a symbolic link to a missing file, or one of a loop of "
                        f"links; check {field} and point the link at the file on EFS, or copy the file there")
    if not path.exists():
        raise DataError(f"data file not found: '{source}'; check {field} and that the file was copied onto EFS")
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
        raise DataError(f"data file not found: '{source}'; check data.path and that the file was copied onto EFS")
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


# Column indices are stored as int32 (scipy's CSR default), so this is the widest row.
MAX_FEATURE_INDEX = np.iinfo(np.int32).max


def _parse_number(text: str, what: str) -> float:
    # Python's float() reads "1_0" as 10 and Arabic-Indic or full-width digits as digits.
    # LIBSVM's own reader rejects both, and so does Baton.
    try:
        if "_" in text or not text.isascii():
            raise ValueError(text)
        return float(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number") from None


def parse_libsvm_text(text: str, source: str, first_line_number: int = 1) -> tuple[sp.csr_matrix, np.ndarray]:
    """Parse libsvm/svmlight text as :func:`parse_libsvm_lines` parses its lines.

    ASCII text goes through :func:`_parse_ascii_libsvm` first, which gives the same arrays
    in less than half the time on a9a. Text it does not parse goes to the line parsers.
    """
    parsed = _parse_ascii_libsvm(text) if text.isascii() else None
    if parsed is not None:
        return parsed
    return parse_libsvm_lines(text.split("\n"), source, first_line_number)


def parse_libsvm_lines(lines, source: str, first_line_number: int = 1) -> tuple[sp.csr_matrix, np.ndarray]:
    """Parse libsvm/svmlight lines into a CSR matrix as wide as its highest index, and labels.

    Empty lines and ``#`` comments are skipped; ``qid:`` tokens are ignored. The first of
    ``lines`` is line ``first_line_number`` of ``source``.

    Raises
    ------
    DataError
        On a malformed line, naming ``source`` and the line number.
    """
    lines = list(lines)
    parsed = _parse_plain_libsvm(lines)
    if parsed is not None:
        return parsed
    return _parse_libsvm_checked(lines, source, first_line_number)


def _parse_plain_libsvm(lines: list[str]) -> tuple[sp.csr_matrix, np.ndarray] | None:
    """Parse lines without comments or ``qid:`` tokens with whole-array numpy calls.

    Returns None when a line needs :func:`_parse_libsvm_checked`: a comment, a ``qid:``
    token, or anything it would reject. Otherwise the result equals that parser's,
    because numpy converts each ``str`` with Python's own ``int`` and ``float``.
    """
    if any("#" in line or "qid" in line or "_" in line or not line.isascii() for line in lines):
        return None
    rows = [tokens for tokens in map(str.split, lines) if tokens]
    pairs = list(itertools.chain.from_iterable(tokens[1:] for tokens in rows))
    joined = " ".join(pairs)
    # In valid pairs the separators alternate ":" and " ", starting and ending with ":". The
    # piece count catches an empty index or value, which leaves one piece fewer.
    separators = np.frombuffer(joined.encode(), dtype=np.uint8)
    separators = separators[(separators == ord(":")) | (separators == ord(" "))]
    pieces = joined.replace(":", " ").split()
    if (len(separators) != max(2 * len(pairs) - 1, 0) or np.any(separators[0::2] != ord(":"))
            or len(pieces) != 2 * len(pairs)):
        return None
    try:
        labels = np.array([tokens[0] for tokens in rows], dtype=np.float64)
        numbers = np.array(pieces[0::2], dtype=np.int64)
        values = np.array(pieces[1::2], dtype=np.float64)
    except (ValueError, OverflowError):
        return None

    counts = np.fromiter((len(tokens) - 1 for tokens in rows), dtype=np.int64, count=len(rows))
    return _csr_from_pairs(labels, numbers, values, counts)


def _csr_from_pairs(labels: np.ndarray, numbers: np.ndarray, values: np.ndarray,
                    counts: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray] | None:
    """Build the CSR matrix from every row's label and pair count, and the pairs' 1-based indices and values.

    Returns None when an index is out of range or not above the previous one of its row.
    """
    indptr = np.concatenate(([0], np.cumsum(counts)))
    same_row = np.repeat(np.arange(len(labels)), counts)
    increasing = (np.diff(numbers) > 0) | (same_row[1:] != same_row[:-1])
    if np.any(numbers < 1) or np.any(numbers > MAX_FEATURE_INDEX) or not np.all(increasing):
        return None
    indices = numbers - 1
    width = int(indices.max(initial=-1)) + 1
    X = sp.csr_matrix((values.astype(np.float32), indices.astype(np.int32), indptr.astype(np.int64)),
                      shape=(len(labels), width))
    return X, labels


# The ASCII parser works on blocks of about this many bytes, cut at line ends, so that its
# per-byte arrays stay small next to the text.
ASCII_BLOCK_BYTES = 4 * 1024 * 1024
# A block this long contains a line of several MiB, so the line parsers take such text instead.
LONG_BLOCK_BYTES = 2 * ASCII_BLOCK_BYTES
# Bytes that str.split() treats as whitespace in ASCII text.
_ASCII_WHITESPACE = np.zeros(256, dtype=bool)
_ASCII_WHITESPACE[list(b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f")] = True
# A float64 represents every integer of up to 15 digits and every power of ten up to 1e22
# exactly, so mantissa / 10**k of such a decimal is one correctly rounded division: the
# value float() returns for the same text.
_EXACT_DIGITS = 15
_POWERS_OF_TEN = 10.0 ** np.arange(23)
# Digits of a column index converted without int(). Larger indices exceed MAX_FEATURE_INDEX.
_INDEX_DIGITS = 10


def _parse_ascii_libsvm(text: str) -> tuple[sp.csr_matrix, np.ndarray] | None:
    """Parse ASCII libsvm text with whole-array numpy calls on its bytes.

    Returns None for anything :func:`_parse_plain_libsvm` would return None for (comments,
    ``qid:`` tokens, malformed pairs), and otherwise its result. Plain decimals are converted
    by digit arithmetic, and every other number by Python's own ``float`` or ``int``.
    """
    if "#" in text or "qid" in text or "_" in text:
        return None
    raw = text.encode("ascii")
    blocks = []
    start = 0
    while start < len(raw):
        stop = raw.find(b"\n", start + ASCII_BLOCK_BYTES)
        stop = len(raw) if stop < 0 else stop + 1
        if stop - start > LONG_BLOCK_BYTES:
            # A line of many MiB would make one block of it, and this parser's per-byte
            # arrays take several times the line parser's memory.
            return None
        numbers = _ascii_block_numbers(raw[start:stop])
        if numbers is None:
            return None
        blocks.append(numbers)
        start = stop
    if not blocks:
        return _csr_from_pairs(*(np.zeros(0, dtype=dtype) for dtype in (np.float64, np.int64, np.float64, np.int64)))
    return _csr_from_pairs(*(np.concatenate(arrays) for arrays in zip(*blocks)))


def _ascii_block_numbers(block: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Return the labels, 1-based indices, values and pair counts of the rows in ``block``.

    Returns None if a token after a row's label is not ``<index>:<value>``, or if a number
    does not convert.
    """
    # A space on each side, so that every token has a space before and after it.
    chars = np.frombuffer(b" " + block + b" ", dtype=np.uint8)

    # Tokens are runs of bytes other than whitespace. A row's label is the first token of
    # its line: the first token, and the first after each line end.
    edges = np.diff(_ASCII_WHITESPACE[chars].view(np.int8))
    token_starts = np.flatnonzero(edges == -1) + 1
    token_ends = np.flatnonzero(edges == 1) + 1
    after_line_ends = np.searchsorted(token_starts, np.flatnonzero(chars == ord("\n")))
    is_label = np.zeros(len(token_starts), dtype=bool)
    is_label[:1] = True
    is_label[after_line_ends[after_line_ends < len(token_starts)]] = True

    # Every pair token contains one colon, strictly inside it, and no label contains one:
    # with as many colons as pairs, colon j must fall inside pair j.
    colons = np.flatnonzero(chars == ord(":"))
    pair_starts, pair_ends = token_starts[~is_label], token_ends[~is_label]
    if len(colons) != len(pair_starts) or np.any(colons <= pair_starts) or np.any(colons >= pair_ends - 1):
        return None

    # Pieces in text order: each row's label, then an index and a value per pair. Token t
    # is piece t plus one per pair before it. Row r's label, token row_starts[r], follows
    # row_starts[r] - r pairs.
    row_starts = np.flatnonzero(is_label)
    counts = np.diff(np.append(row_starts, len(is_label))) - 1
    label_slots = 2 * row_starts - np.arange(len(row_starts))
    kinds = np.ones(len(token_starts) + len(colons), dtype=np.int8)
    kinds[label_slots] = 0
    pair_slots = np.flatnonzero(kinds == 1)
    kinds[pair_slots[1::2]] = 2
    piece_starts = np.empty(len(kinds), dtype=np.int64)
    piece_ends = np.empty(len(kinds), dtype=np.int64)
    piece_starts[label_slots], piece_ends[label_slots] = token_starts[is_label], token_ends[is_label]
    piece_starts[pair_slots[0::2]], piece_ends[pair_slots[0::2]] = pair_starts, colons
    piece_starts[pair_slots[1::2]], piece_ends[pair_slots[1::2]] = colons + 1, pair_ends

    numbers = _ascii_numbers(block, chars, piece_starts, piece_ends, kinds == 1)
    if numbers is None:
        return None
    return numbers[kinds == 0], numbers[kinds == 1].astype(np.int64), numbers[kinds == 2], counts


def _ascii_numbers(block: bytes, chars: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                   integer: np.ndarray) -> np.ndarray | None:
    """Convert the pieces ``chars[starts[i]:ends[i]]`` to float64, or return None if one is not a number.

    ``chars`` is ``block`` with one byte in front. The pieces are in order and contain every
    digit and dot of ``chars``. A piece of an optional sign, digits and at most one dot (no
    sign or dot where ``integer``), with few enough digits, is converted here. Any other
    goes to Python's ``float`` or ``int``, as in the line parsers.
    """
    if len(starts) == 0:
        return np.zeros(0, dtype=np.float64)
    is_digit = (chars >= ord("0")) & (chars <= ord("9"))
    is_dot = chars == ord(".")
    # Blocks are a few MiB, so int32 counts suffice.
    digits_through = np.cumsum(is_digit, dtype=np.int32)
    dots_through = np.cumsum(is_dot, dtype=np.int32)
    n_digits = digits_through[ends - 1] - digits_through[starts - 1]
    dots_before = dots_through[starts - 1]
    n_dots = dots_through[ends - 1] - dots_before
    negative = chars[starts] == ord("-")
    signed = negative | (chars[starts] == ord("+"))
    simple = (ends - starts == n_digits + n_dots + signed) & (n_digits >= 1)
    simple &= np.where(integer, (n_dots == 0) & ~signed & (n_digits <= _INDEX_DIGITS),
                       (n_dots <= 1) & (n_digits <= _EXACT_DIGITS))

    # Each digit adds digit * 10**(digits after it in its piece), which a float64 sums
    # exactly while the sum stays below 2**53. The digits are in piece order.
    piece_of_digit = np.repeat(np.arange(len(starts)), n_digits)
    last_digit = np.cumsum(n_digits, dtype=np.int64) - 1
    later_digits = last_digit[piece_of_digit] - np.arange(len(piece_of_digit))
    digit_values = chars[is_digit] - ord("0")
    terms = digit_values * _POWERS_OF_TEN[np.minimum(later_digits, 22)]
    mantissas = np.bincount(piece_of_digit, weights=terms, minlength=len(starts))

    # In a simple piece, the digits after its one dot are the fraction.
    fraction_digits = np.zeros(len(starts), dtype=np.int64)
    dotted = np.flatnonzero(simple & (n_dots == 1))
    dot_positions = np.flatnonzero(is_dot)[dots_before[dotted]]
    fraction_digits[dotted] = n_digits[dotted] - (dot_positions - starts[dotted] - signed[dotted])
    numbers = mantissas / _POWERS_OF_TEN[fraction_digits]
    numbers[negative] = -numbers[negative]

    for piece in np.flatnonzero(~simple):
        text = block[starts[piece] - 1:ends[piece] - 1]
        try:
            number = int(text) if integer[piece] else float(text)
        except ValueError:
            return None
        # An index beyond 2**53 would not survive the float64, and it is out of range anyway.
        if integer[piece] and abs(number) > 2**53:
            return None
        numbers[piece] = number
    return numbers


def _parse_libsvm_checked(lines: list[str], source: str, first_line_number: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Parse libsvm lines one token at a time, naming the first malformed line."""
    labels: list[float] = []
    indices: list[int] = []
    values: list[float] = []
    indptr = [0]

    for line_number, line in enumerate(lines, start=first_line_number):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        tokens = content.split()
        try:
            labels.append(_parse_number(tokens[0], "label"))
            previous_index = 0
            for token in tokens[1:]:
                if token.startswith("qid:"):
                    continue
                index_text, separator, value_text = token.partition(":")
                if not separator:
                    raise ValueError(f"{token!r} is not an <index>:<value> pair")
                try:
                    if "_" in index_text or not index_text.isascii():
                        raise ValueError(index_text)
                    index = int(index_text)
                except ValueError:
                    raise ValueError(f"feature index {index_text!r} is not an integer") from None
                if index < 1:
                    raise ValueError(f"feature index {index} is not valid because libsvm indices start at 1")
                if index > MAX_FEATURE_INDEX:
                    raise ValueError(f"feature index {index} is above {MAX_FEATURE_INDEX:,}, the largest Baton stores")
                if index <= previous_index:
                    raise ValueError(f"index {index} is not above the previous index {previous_index}")
                previous_index = index
                indices.append(index - 1)
                values.append(_parse_number(value_text, f"value of feature {index}"))
        except ValueError as error:
            raise DataError(
                f"malformed libsvm line {line_number} in '{source}': {error}; "
                "expected '<label> <index>:<value> ...' with increasing 1-based indices"
                + (" (data.format is libsvm, the default; set it to csv or npy if the file is not libsvm)"
                   if "," in line else "")
            ) from None
        indptr.append(len(indices))

    width = max(indices, default=-1) + 1
    X = sp.csr_matrix(
        (np.asarray(values, dtype=np.float32), np.asarray(indices, dtype=np.int32), np.asarray(indptr, dtype=np.int64)),
        shape=(len(labels), width))
    return X, np.asarray(labels, dtype=np.float64)


def _widen(X: sp.csr_matrix, n_features: int | None, source: str) -> sp.csr_matrix:
    """Return ``X`` with ``n_features`` columns, or as parsed when None."""
    if n_features is None:
        return X
    if X.shape[1] > n_features:
        raise DataError(
            f"'{source}' uses feature index {X.shape[1]} but data.n_features is {n_features}; "
            f"raise data.n_features to at least {X.shape[1]}")
    return sp.csr_matrix((X.data, X.indices, X.indptr), shape=(X.shape[0], n_features))


def read_libsvm(path: Path, n_features: int | None = None,
                source: str | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """Parse a libsvm/svmlight file into a CSR matrix and a label vector.

    Parameters
    ----------
    path : Path
        Text file, optionally ``.gz`` or ``.bz2``; indices are 1-based.
    n_features : int, optional
        Number of columns. Inferred from the highest index when None.
    source : str, optional
        The file's name in error messages, as the spec gives it; ``path`` when None.

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
    source = source or str(path)
    text = decode_text(read_text_bytes(path, source), source)
    X, y = parse_libsvm_text(text, source)
    if len(y) == 0:
        raise DataError(f"data file '{source}' has no rows; check that it is the right file and not empty")
    return _widen(X, n_features, source), y


def csv_delimiter(delimiter: str) -> str | None:
    """Return the ``numpy.loadtxt`` delimiter for a ``data.delimiter`` setting."""
    return None if delimiter == "whitespace" else delimiter


def _split_fields(line: str, delimiter: str) -> list[str]:
    """Return the fields of one CSV line as ``numpy.loadtxt`` splits them; none for an empty line."""
    content = line.rstrip("\r")
    separator = csv_delimiter(delimiter)
    if separator is None:
        return content.split()
    return content.split(separator) if content else []


def _is_number(field: str) -> bool:
    # A number may stand in double quotes, as spreadsheets write it; numpy.loadtxt reads
    # it with quotechar='"'. Its text then runs from the opening to the closing quote.
    unquoted = field.rstrip()
    if unquoted.startswith('"') and unquoted.endswith('"') and len(unquoted) >= 2:
        field = unquoted[1:-1]
    # float() also accepts digit separators ("1_000") and any Unicode digit or space
    # ("٢٠.٢٩", full-width "２０"), which numpy.loadtxt rejects.
    if "_" in field or not field.isascii():
        return False
    try:
        float(field)
    except ValueError:
        return False
    return True


def find_csv_problem(text: str, delimiter: str, label_index: int, n_columns: int | None, source: str,
                     first_line_number: int = 1, reference: str = "the first row") -> DataError | None:
    """Return the error for the first line of ``text`` that ``numpy.loadtxt`` cannot read, or None.

    A line is wrong when its column count differs from ``n_columns`` (from the first line
    with fields when None), or when a field is not a number. ``reference`` names where
    ``n_columns`` came from, such as ``"the header"``.
    """
    expected = n_columns
    for offset, line in enumerate(text.split("\n")):
        fields = _split_fields(line, delimiter)
        if not fields:
            continue
        line_number = first_line_number + offset
        if expected is None:
            expected = len(fields)
        if len(fields) != expected and len(fields) <= label_index:
            return DataError(f"line {line_number} of '{source}' has {len(fields)} columns, so it has no column "
                             f"{label_index + 1} for the label (data.label_column); every row needs {expected} "
                             "columns, so fix or remove that line")
        if len(fields) != expected:
            return DataError(f"line {line_number} of '{source}' has {len(fields)} columns but {reference} has "
                             f"{expected}; every row needs the same columns, so fix or remove that line, or check "
                             "data.delimiter")
        for column, field in enumerate(fields, start=1):
            if not field.strip() and column == len(fields) and column > 1:
                return DataError(f"line {line_number} of '{source}' ends with the delimiter {delimiter!r}, so "
                                 f"its last column ({column}) is empty; remove the delimiter at the end of each line "
                                 "that has one too many, or write the missing value")
            if not _is_number(field):
                problem = "is empty" if not field.strip() else f"is {field.strip()!r}, which is not a number"
                if field.strip() and not field.isascii():
                    problem += " (only ASCII digits 0-9 are read)"
                return DataError(f"line {line_number} of '{source}', column {column} {problem}; CSV data must be "
                                 "numeric, so encode or remove that value, or check data.delimiter, data.header "
                                 "and data.skip_rows")
    return None


def parse_csv_text(text: str, delimiter: str, label_index: int, n_columns: int | None, source: str,
                   first_line_number: int = 1, reference: str = "the first row") -> tuple[np.ndarray, np.ndarray]:
    """Parse numeric delimited text (no header) into float32 features and float64 labels.

    ``label_index`` is a non-negative column index. ``n_columns``, when given, is the
    width every row must have, and ``reference`` names where it came from. The first line
    of ``text`` is line ``first_line_number`` of ``source``.
    """
    if not text.strip():
        width = 0 if n_columns is None else n_columns - 1
        return np.zeros((0, width), dtype=np.float32), np.zeros(0, dtype=np.float64)
    try:
        table = np.loadtxt(io.StringIO(text, newline=None), delimiter=csv_delimiter(delimiter), ndmin=2,
                           dtype=np.float64, comments=None, quotechar='"')
    except ValueError as error:
        problem = find_csv_problem(text, delimiter, label_index, n_columns, source, first_line_number, reference)
        # NOTE: numpy's own message is the fallback for a line that the check above accepts.
        raise problem or DataError(f"'{source}' could not be read as numeric CSV ({error}); check data.delimiter, "
                                   "data.header and data.skip_rows") from None
    if n_columns is not None and table.shape[1] != n_columns:
        raise find_csv_problem(text, delimiter, label_index, n_columns, source, first_line_number, reference) or \
            DataError(f"'{source}' has rows of {table.shape[1]} columns where {n_columns} are expected")
    if not 0 <= label_index < table.shape[1] or table.shape[1] < 2:
        raise DataError(f"data.label_column points at column {label_index} but '{source}' has "
                        f"{table.shape[1]} columns")
    y = table[:, label_index].copy()
    X = np.delete(table, label_index, axis=1).astype(np.float32)
    return X, y


def _header_names(header: list[str] | None) -> list[str]:
    return [name.strip().strip('"') for name in header or []]


def _join_numbers(numbers: list[int]) -> str:
    """Return ``[2, 5, 9]`` as ``"2, 5 and 9"``."""
    texts = [str(number) for number in numbers]
    return texts[0] if len(texts) == 1 else f"{', '.join(texts[:-1])} and {texts[-1]}"


def resolve_label_column(label_column: int | str, header: list[str] | None, n_columns: int, source: str) -> int:
    """Return the non-negative index of the label column, given by index or by header name.

    Raises
    ------
    DataError
        If the header does not contain the name or gives it to more than one column, or
        if the index is out of range.
    """
    if isinstance(label_column, str):
        names = _header_names(header)
        if label_column not in names:
            raise DataError(f"data.label_column is {label_column!r} but the header of '{source}' names the "
                            f"columns {names}; use one of those names")
        indices = [index for index, name in enumerate(names) if name == label_column]
        if len(indices) > 1:
            raise DataError(f"data.label_column is {label_column!r}, but the header of '{source}' gives that name "
                            f"to columns {_join_numbers([index + 1 for index in indices])} (counting from 1), so "
                            "the label column is ambiguous. Rename the other columns in the header, or set "
                            "data.label_column to the label column's index counting from 0 "
                            f"({_join_numbers(indices).replace(' and ', ' or ')})")
        return indices[0]
    if not -n_columns <= label_column < n_columns:
        raise DataError(f"data.label_column is {label_column} but '{source}' has {n_columns} columns")
    return label_column % n_columns


def _feature_columns(header: list[str], label_column: int | str, source: str) -> list[tuple[int, str]]:
    """Return the column number (counting from 1) and name of each feature column in ``header``."""
    names = _header_names(header)
    label_index = resolve_label_column(label_column, header, len(names), source)
    return [(index + 1, name) for index, name in enumerate(names) if index != label_index]


def check_same_features(train_header: list[str], validation_header: list[str], label_column: int | str,
                        train_source: str, validation_source: str) -> None:
    """Raise unless the validation file's header names the training file's features in the same order.

    The features of both files are read by position, so a validation file whose columns
    come in another order would be scored on the wrong features. The label column is left
    out of the comparison and, when ``label_column`` is a name, may be at another position.

    Raises
    ------
    DataError
        Naming both files and the first feature column that differs.
    """
    train_features = _feature_columns(train_header, label_column, train_source)
    validation_features = _feature_columns(validation_header, label_column, validation_source)
    pairs = itertools.zip_longest(train_features, validation_features)
    for position, (train_column, validation_column) in enumerate(pairs, start=1):
        if train_column is not None and validation_column is not None and train_column[1] == validation_column[1]:
            continue
        in_train, in_validation = (f"{column[1]!r} (column {column[0]})" if column else "missing"
                                   for column in (train_column, validation_column))
        raise DataError(f"the header of validation file '{validation_source}' does not match the header of "
                        f"training file '{train_source}': feature column {position}, not counting the label column, is "
                        f"{in_validation} in the validation file but {in_train} in the training file. Baton "
                        "reads the features by position, so reorder the validation file's columns to the training "
                        "file's order, or write the same header names if the columns already match")


def read_csv(path: Path, label_column: int | str = -1, skip_rows: int = 0, delimiter: str = ",",
             header: bool = False, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Parse a numeric delimited text file into a dense feature matrix and a label vector.

    Parameters
    ----------
    path : Path
        Text file, optionally ``.gz`` or ``.bz2``.
    label_column : int or str, default=-1
        Index of the label column (negative counts from the end), or its name in the header.
    skip_rows : int, default=0
        Lines to skip before the header or the first row.
    delimiter : str, default=","
        Field separator, or ``"whitespace"`` for runs of spaces and tabs.
    header : bool, default=False
        Whether the first line after ``skip_rows`` names the columns.
    source : str, optional
        The file's name in error messages, as the spec gives it; ``path`` when None.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features), float32
    y : ndarray of shape (n_samples,), float64
    """
    source = source or str(path)
    lines = decode_text(read_text_bytes(path, source), source).split("\n")
    names = split_header(lines[skip_rows], delimiter) if header and skip_rows < len(lines) else None
    data_lines = lines[skip_rows + (1 if header else 0):]
    text = "\n".join(data_lines)
    if names is not None:
        n_columns, reference = len(names), "the header"
    else:
        n_columns, reference = count_columns(text, delimiter), "the first row"
    label_index = resolve_label_column(label_column, names, n_columns, source)
    X, y = parse_csv_text(text, delimiter, label_index, n_columns, source,
                          first_line_number=len(lines) - len(data_lines) + 1, reference=reference)
    if len(y) == 0:
        raise DataError(f"data file '{source}' has no rows; check that it is the right file and not empty")
    return X, y


def split_header(line: str, delimiter: str) -> list[str]:
    """Return the column names of a header line; a name in double quotes may contain the delimiter."""
    line = line.rstrip("\r\n")
    separator = csv_delimiter(delimiter)
    if separator is None:
        # Runs of spaces and tabs separate the names, as one space between quoted names.
        line, separator = " ".join(line.split()), " "
    return next(csv.reader([line], delimiter=separator, quotechar='"', skipinitialspace=True), [])


def count_columns(text: str, delimiter: str) -> int:
    """Return the number of columns in the first non-blank line of ``text``, 0 if there is none."""
    for line in text.splitlines():
        if line.strip():
            return len(line.strip().split(csv_delimiter(delimiter)))
    return 0


# .npy and .npz files --------------------------------------------------------------------

# dtype kinds Baton reads: booleans, signed and unsigned integers, floating point.
NUMERIC_KINDS = "biuf"


NPY_SAVE_EXAMPLE = "numpy.save(path, table.astype(numpy.float64))"
NPZ_SAVE_EXAMPLE = "numpy.savez(path, X=features.astype(numpy.float64), y=labels.astype(numpy.float64))"

# Fields of a structured dtype that an error lists before it counts the rest.
LISTED_DTYPE_FIELDS = 3


def _describe_dtype(dtype: np.dtype) -> str:
    """Return ``dtype`` for a message, with the first fields of a structured dtype and the count of all."""
    if dtype.names is None:
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
    """Read rows ``start:stop`` of a 2-D ``.npy`` matrix whose column ``label_column`` holds the labels.

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
        raise DataError(f"data file not found: '{source}'; check data.path and that the file was copied onto EFS")
    if not zipfile.is_zipfile(path):
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
        raise DataError(f"data file not found: '{source}'; check data.path and that the file was copied onto EFS")
    with open(path, "rb") as handle:
        shape, dtype = check_npy_header(handle, f"'{source}'")
        data_offset = handle.tell()
    expected_bytes = data_offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual_bytes = path.stat().st_size
    if actual_bytes < expected_bytes:
        raise DataError(f"'{source}' is truncated: its header describes an array of shape {shape} and dtype "
                        f"{dtype}, {expected_bytes:,} bytes with the header, but the file has {actual_bytes:,}; "
                        "copy or save it again")
    return np.load(path, mmap_mode="r", allow_pickle=False)


# Checks and whole-file reads -------------------------------------------------------------


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


def split_rows(n_rows: int, n_workers: int, validation_rows: int, seed: int,
               labels: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Split row indices, shuffled with ``seed``, into worker shards and a held-out part.

    Returns the sorted row indices of each shard (sizes differ by at most one) and of the
    validation part, which is empty when ``validation_rows`` is 0.

    Without ``labels`` the first ``validation_rows`` of a seeded permutation are held out
    and the rest is cut into ``n_workers`` contiguous pieces. With ``labels`` (encoded
    classes) the split is stratified. Rows are ordered by their rank within their class
    divided by the class size, so every prefix of that order holds each class in
    proportion, and the held-out part is such a prefix. The remaining rows are dealt out
    class by class, round-robin over the workers, each class starting where the previous
    one stopped, so each shard's count of a class is within one of every other shard's,
    and so are the shard sizes.
    """
    order = data_split_rng(seed).permutation(n_rows)
    if labels is None:
        validation = np.sort(order[:validation_rows])
        shards = [np.sort(part) for part in np.array_split(order[validation_rows:], n_workers)]
        return shards, validation

    labels = np.asarray(labels, dtype=np.int64)[order]
    counts = np.bincount(labels)
    # Rank of each row among the rows of its class, in permutation order.
    by_class = np.argsort(labels, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    ranks = np.empty(n_rows, dtype=np.int64)
    ranks[by_class] = np.arange(n_rows) - np.repeat(starts, counts)
    spread = (ranks + 0.5) / counts[labels]
    stratified = order[np.argsort(spread, kind="stable")]

    validation = np.sort(stratified[:validation_rows])
    rest = stratified[validation_rows:]
    # A stable sort by class keeps each class's rows in permutation order.
    row_labels = np.empty_like(labels)
    row_labels[order] = labels
    rest = rest[np.argsort(row_labels[rest], kind="stable")]
    shards = [np.sort(rest[worker::n_workers]) for worker in range(n_workers)]
    return shards, validation


def standardization_scale(variance: np.ndarray, mean: np.ndarray, count: float) -> np.ndarray:
    """Return the standard deviation of each feature, with 1 for constant features.

    A constant feature is left as it is instead of being divided by a rounding error, as
    scikit-learn's ``StandardScaler`` does. A feature counts as constant when its variance
    is no larger than the error that summing ``count`` rows in float64 can leave in it,
    ``count * eps * variance + (count * |mean| * eps) ** 2``, so a constant column of
    large values (1e6, say) stays unscaled too.

    Parameters
    ----------
    variance, mean : ndarray of shape (n_features,)
        Of the training rows.
    count : float
        The number of training rows.
    """
    variance = np.maximum(variance, 0.0)
    eps = np.finfo(np.float64).eps
    rounding = count * eps * variance + (count * np.abs(mean) * eps) ** 2
    scale = np.sqrt(variance)
    scale[(variance <= rounding) | (scale < 10 * eps)] = 1.0
    return scale


def standardize_rows(X, mean: np.ndarray | None, scale: np.ndarray):
    """Return ``(X - mean) / scale`` in float64, or ``X / scale`` when ``mean`` is None.

    ``mean`` is None for a job whose training data was sparse, which is scaled but not
    centred. Its rows may still come dense, as a user's array to predict on.
    """
    if sp.issparse(X):
        return sp.csr_matrix(X.astype(np.float64).multiply(1.0 / scale).tocsr())
    X = np.asarray(X, dtype=np.float64)
    return X / scale if mean is None else (X - mean) / scale


def shard_folder(store: EfsStore, job_id: str, destination: int | str) -> Path:
    """Return the folder of shard ``destination`` (a worker index) or of the validation rows."""
    name = VALIDATION if destination == VALIDATION else f"shard-{destination}"
    return store.data_dir(job_id) / name


def _shard_file_names(manifest: dict) -> list[str]:
    matrix = ["X-data.npy", "X-indices.npy", "X-indptr.npy"] if manifest["sparse"] else ["X.npy"]
    return ["y.npy", *matrix]


def _efs_name(store: EfsStore, path: Path) -> Path:
    return path.relative_to(store.root) if store.is_under_root(path) else path


def _missing_shard_error(store: EfsStore, path: Path) -> DataError:
    return DataError(f"prepared shard file '{_efs_name(store, path)}' is missing: the job's prepared data on EFS was "
                     f"deleted or moved after its preparation, and Baton does not rebuild the shards of a started job; "
                     f"{FIX}")


def read_job_json(store: EfsStore, path: Path, problem_of: Callable[[Any], str | None] | None = None) -> Any:
    """Read a JSON file that Baton wrote for a job (its spec or data manifest).

    Parameters
    ----------
    store : EfsStore
    path : Path
    problem_of : callable, optional
        Returns what makes the parsed value unusable, as text that follows the file's name
        (such as 'has no "n_features" field'), or None when it is usable.

    Raises
    ------
    DataError
        If the file is not valid JSON, or ``problem_of`` finds a problem. Baton writes
        these files whole, so a retry would read the same bytes.
    """
    try:
        value = store.read_json(path)
    except ValueError as error:
        raise _changed_job_file_error(store, path, f"is damaged ({type(error).__name__}: {error})") from None
    problem = None if problem_of is None else problem_of(value)
    if problem is not None:
        raise _changed_job_file_error(store, path, problem)
    return value


def _changed_job_file_error(store: EfsStore, path: Path, problem: str) -> DataError:
    return DataError(f"file '{_efs_name(store, path)}' {problem}: Baton writes it whole, so it was changed after it "
                     f"was written, and the job cannot go on from it; {FIX}")


def _damaged_shard_error(store: EfsStore, path: Path, problem: str) -> DataError:
    return _changed_shard_error(str(_efs_name(store, path)), problem)


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
        return Shard(X=X, y=y, indices_file=str(_efs_name(store, folder / "X-indices.npy")))

    X = arrays["X.npy"]
    if X.shape != (rows, manifest["n_features"]):
        raise _damaged_shard_error(store, folder / "X.npy", f"holds a matrix of shape {X.shape} where the "
                                                            f"manifest records {rows} rows of "
                                                            f"{manifest['n_features']} features")
    _check_shard_values(store, folder, manifest, None)
    return Shard(X=X, y=y)


def prepare_data(store: EfsStore, spec: JobSpec, model, s3_client=None) -> dict:
    """Read the job's data, split it into shards and store them on EFS, all in this process.

    Runs every step of :mod:`shared.preparation` in order; the starter instead runs one
    step per invocation when the sources hold more than ``data.part_bytes`` together. A repeated call returns the
    existing manifest without reading the source again, once it has checked that no source
    changed since (:func:`shared.source_files.check_reusable`).

    Returns
    -------
    manifest : dict
        ``n_features``, ``classes``, ``class_counts``, ``sparse``, ``shard_rows`` (one
        count per worker), ``validation_rows`` and ``standardized``.
    """
    from shared.preparation import run_preparation

    outcome = run_preparation(store, spec, model, step=None, one_step_per_invocation=False, s3_client=s3_client)
    return outcome.manifest


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
