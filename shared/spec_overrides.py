"""Set fields of a raw job spec from the command line, before the spec is validated.

``baton submit`` and ``baton run`` take ``--set KEY=VALUE`` and shortcut options such as
``--data PATH``. Each becomes a dotted key and a value, and :func:`apply_overrides` writes
them into the spec. Nothing here checks field names or values: the caller validates the
result with :func:`shared.spec.parse_job_spec`, which names the field and the problem.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Iterable

from shared import json_numbers
from shared.errors import BatonError


class SpecOverrideError(BatonError):
    """Error for an override that is malformed or whose key leads into a value that is not an object.

    Parameters
    ----------
    key : str
        The dotted key, or the whole ``KEY=VALUE`` text when it has no valid key.
    problem : str
        What is wrong and how to write it instead.
    """

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key!r}: {problem}")


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE`` into the dotted key and the value.

    The value is decoded as JSON when it is valid JSON (``8``, ``0.5``, ``true``,
    ``null``, ``[64, 32]``, ``"8"``), and is kept as a string otherwise
    (``adam``, ``datasets/a9a/a9a``). Numbers keep the text they were written as
    (:mod:`shared.json_numbers`), so a message about one shows it as typed. The text is split at its first ``=``, so the value
    may contain ``=``. White space around the key and its dotted parts is ignored.

    Raises
    ------
    SpecOverrideError
        If the text has no ``=`` or the key before it is empty.
    """
    key, separator, raw_value = text.partition("=")
    key = ".".join(part.strip() for part in key.split("."))
    if not separator:
        raise SpecOverrideError(text, "the '=' is missing. Expected KEY=VALUE, such as training.n_workers=8")
    if not key:
        raise SpecOverrideError(text, "the key before '=' is empty. Name a field, such as training.n_workers")
    try:
        value = json_numbers.loads(raw_value)
    except (ValueError, RecursionError):
        value = raw_value
    return key, value


def apply_overrides(spec: dict[str, Any], overrides: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Return a copy of a raw job spec with each dotted key set to its value.

    Parameters
    ----------
    spec : dict
        The raw spec, as decoded from JSON. It is not modified.
    overrides : iterable of (str, object)
        Dotted keys and their values, applied in order, so a later value for the same key
        wins. ``"training.n_workers"`` sets ``spec["training"]["n_workers"]`` and
        ``"job_id"`` sets a top-level field. An object missing on the way, such as the
        ``training`` section, is created empty. A value that is an object replaces the
        whole object, so ``("data", {...})`` replaces the data section.

    Returns
    -------
    dict
        A deep copy of ``spec`` with the overrides applied.

    Raises
    ------
    SpecOverrideError
        If a key is empty or has an empty part, or leads into a value that is not an
        object, such as ``training.n_workers.x`` when ``training.n_workers`` is 4.
    """
    result = copy.deepcopy(spec)
    for key, value in overrides:
        parts = key.split(".")
        if "" in parts:
            raise SpecOverrideError(key, "the key has an empty part. Write SECTION.FIELD, such as optimizer.name")

        target = result
        for depth, part in enumerate(parts[:-1]):
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                parent = ".".join(parts[:depth + 1])
                raise SpecOverrideError(key, f"{parent} is {json.dumps(child)}, not an object, so it has no field "
                                             f"{parts[depth + 1]!r}. Set {parent} as a whole instead.")
            target = child
        target[parts[-1]] = copy.deepcopy(value)
    return result
