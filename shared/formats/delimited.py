"""Parsing delimited numeric text, such as CSV, into float32 features and float64 labels.

``numpy.loadtxt`` reads the rows. When it fails, :func:`find_csv_problem` finds the line
and column at fault, so that the error names them. :func:`read_csv_layout` finds the
header and the first data row past the skipped and blank lines, and the label column by
its index or by its name in the header.

A blank line, empty or of whitespace only, is passed over wherever it is: before the
header, before the first data row and between rows. Line numbers in messages count every
line of the file, blank ones included.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from shared.errors import DataError, preview_list, quote_value
from shared.formats.files import (HEAD_BYTES, decode_text, detect_format, read_text_bytes,
                                  wrong_format_error)


def csv_delimiter(delimiter: str) -> str | None:
    """Return the ``numpy.loadtxt`` delimiter for a ``data.delimiter`` setting."""
    return None if delimiter == "whitespace" else delimiter


def _split_lines(text: str) -> list[str]:
    """Return the lines of ``text`` as ``numpy.loadtxt`` reads them: ended by LF, CR LF or CR alone."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _split_fields(line: str, delimiter: str) -> list[str]:
    """Return the fields of one CSV line as ``numpy.loadtxt`` splits them; none for an empty line.

    A field in double quotes may contain the delimiter, as in ``"1,001.5"``, because
    ``numpy.loadtxt`` reads with ``quotechar='"'``.
    """
    content = line.rstrip("\r\n")
    separator = csv_delimiter(delimiter)
    if separator is None:
        return content.split()
    if not content:
        return []
    if '"' not in content:
        return content.split(separator)
    return _split_quoted(content, separator)


def _split_quoted(content: str, separator: str) -> list[str]:
    """Split ``content`` at ``separator`` except inside a field that opens and closes with a double quote.

    The quotes stay on the field, for the messages. A quote that is not closed is
    taken as text, so that the message names the field where it starts.
    """
    fields = []
    start = 0
    while True:
        end = content.find(separator, start)
        if content.startswith('"', start):
            close = content.find('"', start + 1)
            # A doubled quote inside the field is a quote character, not the end.
            while close != -1 and content.startswith('""', close):
                close = content.find('"', close + 2)
            if close != -1:
                end = content.find(separator, close + 1)
        if end == -1:
            fields.append(content[start:])
            return fields
        fields.append(content[start:end])
        start = end + len(separator)


# A number written with commas between groups of three digits, as spreadsheets export it.
_THOUSANDS_SEPARATED = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")


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
    that is not blank when None), or when a field is not a number. ``reference`` names where
    ``n_columns`` came from, such as ``"the header"``.
    """
    expected = n_columns
    for offset, line in enumerate(_split_lines(text)):
        if not line.strip():
            continue
        fields = _split_fields(line, delimiter)
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
                problem = "is empty" if not field.strip() else f"is {quote_value(field.strip())}, which is not a number"
                if field.strip() and not field.isascii():
                    problem += " (only ASCII digits 0-9 are read)"
                if _THOUSANDS_SEPARATED.match(field.strip().strip('"')):
                    problem += " (remove the thousands separator ',')"
                return DataError(f"line {line_number} of '{source}', column {column} {problem}; CSV data must be "
                                 "numeric, so encode or remove that value, or check data.delimiter, data.header "
                                 "and data.skip_rows")
    return None


# A line of whitespace only, up to its line end.
_WHITESPACE_LINE = re.compile(r"^[^\S\n]+$", re.MULTILINE)


def _read_table(text: str, delimiter: str) -> np.ndarray:
    return np.loadtxt(io.StringIO(text, newline=None), delimiter=csv_delimiter(delimiter), ndmin=2,
                      dtype=np.float64, comments=None, quotechar='"')


def _read_table_past_blank_lines(text: str, delimiter: str) -> np.ndarray:
    """Read ``text`` with ``numpy.loadtxt``, passing over lines of whitespace as over empty lines.

    ``numpy.loadtxt`` passes over empty lines, but it reads a line of spaces as one empty
    field. Only when it fails are such lines emptied, which keeps the line count, and the
    text read again, so that clean text is read once.
    """
    try:
        return _read_table(text, delimiter)
    except ValueError:
        emptied = _WHITESPACE_LINE.sub("", text)
        if emptied == text:
            raise
    return _read_table(emptied, delimiter)


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
        table = _read_table_past_blank_lines(text, delimiter)
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


# Header names that an error lists before it counts the rest.
LISTED_HEADER_NAMES = 10


def _header_names(header: list[str] | None) -> list[str]:
    return [name.strip().strip('"') for name in header or []]


def _preview_names(names: list[str]) -> str:
    """Return the first header names for a message, each cut to a short quote, with the count of the others."""
    return preview_list(names, LISTED_HEADER_NAMES, quote_value)


def _looks_like_data_row(names: list[str]) -> bool:
    """Return whether every name read from a header line is a number, as in a data row."""
    return bool(names) and all(_is_number(name) for name in names)


def _missing_header_hint(validation: bool) -> str:
    """Return the advice for a header line whose names are all numbers, so that the file likely has no header."""
    if validation:
        return ("; these are numbers, so the validation file (data.validation_path) seems to have no header line. "
                "data.header true reads the first line of the training file and of the validation file as a "
                "header, so add a header line like the training file's to the validation file, or remove the "
                "training file's header and set data.header false")
    return ("; these are numbers, so the file seems to have no header line: set data.header false and give "
            "data.label_column as a column index counting from 0, or add a header line")


def _join_numbers(numbers: list[int]) -> str:
    """Return ``[2, 5, 9]`` as ``"2, 5 and 9"``."""
    texts = [str(number) for number in numbers]
    return texts[0] if len(texts) == 1 else f"{', '.join(texts[:-1])} and {texts[-1]}"


def resolve_label_column(label_column: int | str, header: list[str] | None, n_columns: int, source: str,
                         validation: bool = False) -> int:
    """Return the non-negative index of the label column, given by index or by header name.

    ``validation`` True names ``source`` as the validation file in messages.

    Raises
    ------
    DataError
        If the header does not contain the name or gives it to more than one column, or
        if the index is out of range.
    """
    file_name = f"validation file '{source}'" if validation else f"'{source}'"
    if isinstance(label_column, str):
        names = _header_names(header)
        if label_column not in names:
            hint = _missing_header_hint(validation) if _looks_like_data_row(names) else "; use one of those names"
            raise DataError(f"data.label_column is {label_column!r} but the header of {file_name} names "
                            f"{len(names):,} columns {_preview_names(names)}{hint}")
        indices = [index for index, name in enumerate(names) if name == label_column]
        if len(indices) > 1:
            raise DataError(f"data.label_column is {label_column!r}, but the header of {file_name} gives that name "
                            f"to columns {_join_numbers([index + 1 for index in indices])} (counting from 1), so "
                            "the label column is ambiguous. Rename the other columns in the header, or set "
                            "data.label_column to the label column's index counting from 0 "
                            f"({_join_numbers(indices).replace(' and ', ' or ')})")
        return indices[0]
    if not -n_columns <= label_column < n_columns:
        raise DataError(f"data.label_column is {label_column} but {file_name} has {n_columns} columns, so give an "
                        f"index from 0 to {n_columns - 1}, or from -{n_columns} to -1 to count from the last column "
                        "(-1, the default, is the last column)")
    return label_column % n_columns


def _feature_columns(header: list[str], label_column: int | str, source: str,
                     validation: bool = False) -> list[tuple[int, str]]:
    """Return the column number (counting from 1) and name of each feature column in ``header``."""
    names = _header_names(header)
    label_index = resolve_label_column(label_column, header, len(names), source, validation)
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
    validation_features = _feature_columns(validation_header, label_column, validation_source, validation=True)
    pairs = itertools.zip_longest(train_features, validation_features)
    for position, (train_column, validation_column) in enumerate(pairs, start=1):
        if train_column is not None and validation_column is not None and train_column[1] == validation_column[1]:
            continue
        in_train, in_validation = (f"{quote_value(column[1])} (column {column[0]})" if column else "missing"
                                   for column in (train_column, validation_column))
        message = (f"the header of validation file '{validation_source}' does not match the header of "
                   f"training file '{train_source}': feature column {position}, not counting the label column, is "
                   f"{in_validation} in the validation file but {in_train} in the training file")
        validation_names = _header_names(validation_header)
        if _looks_like_data_row(validation_names):
            raise DataError(f"{message}. The validation file's header names {_preview_names(validation_names)}"
                            f"{_missing_header_hint(validation=True)}")
        raise DataError(f"{message}. Baton reads the features by position, so reorder the validation file's columns "
                        "to the training file's order, or write the same header names if the columns already match")


class CsvLayout(NamedTuple):
    """The start of a CSV file's data rows, and their columns.

    Attributes
    ----------
    names : list of str or None
        The column names in the header line, or None without ``data.header``.
    skip_lines : int
        The lines before the first data row: the skipped lines, the header line and the
        blank lines around it. The first data row is line ``skip_lines + 1``.
    data_start : int
        The byte offset of the first data row in the file, decompressed.
    n_columns : int
        The number of columns, from the header or else from the first data row.
    label_index : int
        The index of the label column, counting from 0.
    """

    names: list[str] | None
    skip_lines: int
    data_start: int
    n_columns: int
    label_index: int


class _LineReader:
    """A reader of a binary file's lines, one at a time and decoded, that counts lines and bytes.

    NOTE: lines end at LF only here, so a file with CR-only line ends is one line to this
    reader. Without data.header and data.skip_rows such a file still reads, but with them
    the header or the skipped line takes the whole file.
    """

    def __init__(self, handle: io.BufferedIOBase, source: str):
        self.handle = handle
        self.source = source
        self.n_lines = 0
        self.line_start = 0
        self.n_bytes = 0

    def read_line(self) -> str | None:
        """Return the next line, with its line end, or None at the end of the file."""
        raw = self.handle.readline()
        if not raw:
            return None
        self.n_lines += 1
        self.line_start = self.n_bytes
        self.n_bytes += len(raw)
        return decode_text(raw, self.source, self.n_lines)

    def read_content_line(self) -> str | None:
        """Return the next line that is not blank, or None if the file ends first."""
        while (line := self.read_line()) is not None:
            if line.strip():
                return line
        return None


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def _no_data_rows_error(file_name: str, n_lines: int, n_skipped: int, header_line: int | None) -> DataError:
    """Return the error for a CSV file that ends before its first data row."""
    if n_lines == 0:
        return DataError(f"{file_name} has no data rows because it is empty; check that the file was copied whole and "
                         "that the path names the right file")
    passed = [_plural(n_skipped, "skipped line") + " (data.skip_rows)"] if n_skipped else []
    if header_line is not None:
        passed.append(f"the header line (line {header_line})")
    n_blank = n_lines - n_skipped - (header_line is not None)
    if n_blank:
        passed.append(_plural(n_blank, "blank line"))
    listed = passed[0] if len(passed) == 1 else f"{', '.join(passed[:-1])} and {passed[-1]}"
    return DataError(f"{file_name} has no data rows: it ends at line {n_lines:,}, after {listed}; check that the "
                     "file was copied whole, and data.skip_rows and data.header")


def read_csv_layout(handle: io.BufferedIOBase, source: str, skip_rows: int = 0, header: bool = False,
                    delimiter: str = ",", label_column: int | str = -1, validation: bool = False) -> CsvLayout:
    """Read a CSV file up to its first data row; return where the rows start and their columns.

    The first ``skip_rows`` lines are skipped, whatever they contain. Blank lines after them
    are passed over, before the header line when ``header`` is true and before the first
    data row.

    Parameters
    ----------
    handle : binary file
        The file, decompressed, read from its start. It is read up to :data:`HEAD_BYTES`
        bytes past the first data row.
    source : str
        The path as the spec gives it, for messages.
    skip_rows, header, delimiter, label_column
        The job spec's ``data.skip_rows``, ``data.header``, ``data.delimiter`` and
        ``data.label_column``.
    validation : bool, default=False
        Whether ``source`` is the validation file, for messages.

    Returns
    -------
    CsvLayout

    Raises
    ------
    DataError
        If the file ends before a data row, if its first data row starts libsvm text, if
        it has fewer than two columns, or if the label column is not one of them.
    """
    file_name = f"validation file '{source}'" if validation else f"'{source}'"
    reader = _LineReader(handle, source)
    for _ in range(skip_rows):
        if reader.read_line() is None:
            break
    n_skipped = reader.n_lines
    header_text = reader.read_content_line() if header else None
    header_line = reader.n_lines if header_text is not None else None
    first_row = reader.read_content_line()
    if first_row is None:
        raise _no_data_rows_error(file_name, reader.n_lines, n_skipped, header_line)
    row_line, data_start = reader.n_lines, reader.line_start

    # Read as CSV, a libsvm row fails on its column count or on its '<index>:<value>' fields,
    # and those errors would point at data.delimiter rather than data.format. The lines after
    # the first row decide when it is a '#' comment.
    following = handle.read(HEAD_BYTES + 1)
    if detect_format(first_row.encode() + following[:HEAD_BYTES], cut=len(following) > HEAD_BYTES) == "libsvm":
        raise wrong_format_error(source, "csv", "libsvm")

    names = split_header(header_text, delimiter) if header_text is not None else None
    n_columns = len(names) if names is not None else count_columns(first_row, delimiter)
    if n_columns < 2:
        where = f"the header (line {header_line})" if names is not None else f"the first row (line {row_line})"
        raise DataError(f"{file_name} has {n_columns} column(s) in {where}, but a CSV data set needs features and a "
                        "label column; check data.delimiter")
    label_index = resolve_label_column(label_column, names, n_columns, source, validation)
    return CsvLayout(names, row_line - 1, data_start, n_columns, label_index)


def read_csv(path: Path, label_column: int | str = -1, skip_rows: int = 0, delimiter: str = ",",
             header: bool = False, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Parse a numeric delimited text file into a dense feature matrix and a label vector.

    Only the tests call this. They read a whole file with it, where the preparation
    parses a file in parts (:func:`shared.preparation.read_part`).

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
        Whether the first line after ``skip_rows`` that is not blank names the columns.
    source : str, optional
        The file's name in error messages, as the spec gives it; ``path`` when None.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features), float32
    y : ndarray of shape (n_samples,), float64
    """
    source = source or str(path)
    raw = read_text_bytes(path, source)
    layout = read_csv_layout(io.BytesIO(raw), source, skip_rows, header, delimiter, label_column)
    first_line_number = layout.skip_lines + 1
    reference = "the header" if header else f"the first row (line {first_line_number})"
    text = decode_text(raw[layout.data_start:], source, first_line_number)
    return parse_csv_text(text, delimiter, layout.label_index, layout.n_columns, source, first_line_number, reference)


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
    for line in _split_lines(text):
        if line.strip():
            return len(_split_fields(line, delimiter))
    return 0
