"""Parsing libsvm/svmlight text into a CSR matrix of float32 features and float64 labels.

Sparse data stays sparse end to end: the parsed matrix becomes three memory-mappable
arrays per shard (:mod:`shared.shards`). Three parsers return the same arrays for text
that they all accept, and :func:`parse_libsvm_text` tries the fastest first. The first
runs whole-array numpy calls on the bytes of ASCII text, the second runs them on the
lines' tokens, and the last reads one token at a time. Only the last accepts comments
and ``qid:`` tokens, and it names the first malformed line.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from shared.errors import DataError, quote_value
from shared.formats.files import decode_text, read_text_bytes


# Column indices are stored as int32 (scipy's CSR default), so this is the widest row.
MAX_FEATURE_INDEX = np.iinfo(np.int32).max


def _parse_number(text: str, field_name: str) -> float:
    # Python's float() reads "1_0" as 10 and Arabic-Indic or full-width digits as digits.
    # LIBSVM's own reader rejects both, and so does Baton.
    try:
        if "_" in text or not text.isascii():
            raise ValueError(text)
        return float(text)
    except ValueError:
        raise ValueError(f"{field_name} {quote_value(text)} is not a number") from None


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


def _looks_delimited(line: str, content: str) -> bool:
    """Return whether a malformed libsvm line looks like delimited text, such as CSV or tab-separated values.

    That is a line with a comma, or a line of several tokens and no ``:`` at all, as a
    row of numbers separated by tabs or spaces is.
    """
    return "," in line or (":" not in content and len(content.split()) > 1)


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
                    raise ValueError(f"{quote_value(token)} is not an <index>:<value> pair")
                try:
                    if "_" in index_text or not index_text.isascii():
                        raise ValueError(index_text)
                    index = int(index_text)
                except ValueError:
                    raise ValueError(f"feature index {quote_value(index_text)} is not an integer") from None
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
                   if _looks_delimited(line, content) else "")
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

    Only the tests call this. They read a whole file with it, as a reference for the
    preparation, which parses a file in parts (:func:`shared.preparation.read_part`).

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
