"""Numbers read from a job spec's JSON or from an option, kept with the text they were written as.

A message about a number shows it as the user typed it: ``1e30`` stays ``1e30`` instead of
the integer Python makes of it, and ``Infinity`` stays ``Infinity``. :class:`TypedInt` and
:class:`TypedFloat` are ``int`` and ``float`` with a ``text`` attribute, so every check and
``json.dumps`` treats them as plain numbers.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

# Characters of a number's text that a message shows before it shortens the rest.
SHOWN_NUMBER_CHARACTERS = 20
# Characters of a string or of a JSON object's text that a message shows before it shortens the rest.
SHOWN_TEXT_CHARACTERS = 60

_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")


def parses_as_float(text: str) -> bool:
    """Return whether Python's ``float`` reads ``text`` as a number."""
    try:
        float(text)
    except ValueError:
        return False
    return True


class _TypedNumber:
    """A number with the text it was read from; mixed into ``int`` or ``float``, named by ``plain_type``."""

    plain_type: type
    text: str

    def __new__(cls, value, text: str):
        number = super().__new__(cls, value)  # type: ignore[call-arg]  # super() is int or float in a subclass
        number.text = text
        return number

    def __getnewargs__(self):
        # copy.deepcopy and pickle rebuild the number from these.
        return self.plain_type(self), self.text


class TypedInt(_TypedNumber, int):
    """An integer with the text it was read from."""

    plain_type = int


class TypedFloat(_TypedNumber, float):
    """A float, Infinity or NaN with the text it was read from."""

    plain_type = float


class OversizedInteger(TypedFloat):
    """An integer whose text has more digits than Python converts to an int.

    Python's limit is ``sys.get_int_max_str_digits()``, 4300 digits by default. The value
    is infinity with the integer's sign, so the integer fails every range check.
    """

    def __new__(cls, text: str):
        return super().__new__(cls, -math.inf if text.startswith("-") else math.inf, text)

    def __getnewargs__(self):
        return (self.text,)


def read_integer(text: str) -> TypedInt | OversizedInteger:
    """Return the integer that ``text`` writes, or an :class:`OversizedInteger` if it has too many digits."""
    try:
        return TypedInt(int(text), text)
    except ValueError:
        if _INTEGER_TEXT.fullmatch(text):
            return OversizedInteger(text)
        raise


def read_float(text: str) -> TypedFloat:
    """Return the float that ``text`` writes, infinity for one beyond the float range."""
    return TypedFloat(float(text), text)


def read_number_text(text: str) -> TypedInt | TypedFloat | None:
    """Return the number that an option's text writes, as Python's int() or float() reads it, or None."""
    stripped = text.strip()
    if _INTEGER_TEXT.fullmatch(stripped):
        return read_integer(stripped)
    try:
        return read_float(stripped)
    except ValueError:
        return None


def loads(text: str, **options: Any) -> Any:
    """Decode JSON text as :func:`json.loads` does, keeping each number's text.

    An integer with more digits than Python converts becomes an :class:`OversizedInteger`
    instead of raising ``ValueError``.
    """
    return json.loads(text, parse_int=read_integer, parse_float=read_float, parse_constant=read_float, **options)


def shortened_number(text: str) -> str:
    """Return a number's text, or its first characters and its digit count when it is long."""
    if len(text) <= SHOWN_NUMBER_CHARACTERS:
        return text
    digits = sum(character.isdigit() for character in text)
    return f"{text[:SHOWN_NUMBER_CHARACTERS]}... ({digits} digits)"


def shown(value: Any) -> str:
    """Return ``value`` as a message shows it: as typed when it was read from text, else in JSON's words.

    A string keeps Python's quotes, as the other messages of the project show strings. A
    long number, string, array or object is shortened to its first characters and its
    length. A float beyond the float range that was not read from text, such as 1e400
    decoded without :func:`loads`, is named as infinity.
    """
    if isinstance(value, (TypedInt, TypedFloat)):
        return shortened_number(value.text)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and math.isinf(value):
        return f"{'-' if value < 0 else ''}a number beyond the float range (read as infinity)"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, int):
        try:
            return shortened_number(str(value))
        except ValueError:
            return f"an integer of more than {sys.get_int_max_str_digits()} digits"
    if isinstance(value, str):
        if len(value) <= SHOWN_TEXT_CHARACTERS:
            return repr(value)
        return f"{value[:SHOWN_TEXT_CHARACTERS]!r}... ({len(value)} characters)"
    if isinstance(value, (dict, list, tuple)):
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            return "an array" if isinstance(value, (list, tuple)) else "an object"
        if len(text) <= SHOWN_TEXT_CHARACTERS:
            return text
        return f"{text[:SHOWN_TEXT_CHARACTERS]}... ({len(text)} characters of JSON)"
    return repr(value)
