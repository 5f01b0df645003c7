"""Build a job spec for ``baton submit`` and ``baton run`` from a file, from options, or both.

The file is read first. The shortcut options in :data:`SPEC_SHORTCUTS` are applied next,
then each ``--set SECTION.FIELD=VALUE`` in the order given, so ``--set`` wins over a
shortcut for the same field. The result is validated with the parser the starter uses,
so a spec this module returns is one the starter accepts, and an invalid one stops the
command before anything is sent.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import math
import re
import time
from collections.abc import Mapping
from dataclasses import Field, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import click

from shared.errors import JobSpecError
from shared.json_numbers import read_number_text
from shared.spec import (JOB_ID_PATTERN, MAX_SPEC_BYTES, NOT_APPLICABLE_WORDS, SECTIONS, SHRINK_SPEC_ADVICE,
                         decode_spec_json, encode_job_message, load_job_message, message_bytes, parse_job_spec)
from shared.spec_overrides import SpecOverrideError, apply_overrides, parse_override


class NumberText(click.ParamType):
    """A number option, kept with its text and left to the spec check.

    The spec check then rejects ``--n-workers 4.0`` as it rejects ``--set
    training.n_workers=4.0``, and its messages show the value as typed.
    """

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (int, float)):
            return value
        number = read_number_text(value)
        if number is None:
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


@dataclass(frozen=True)
class SpecShortcut:
    """An option that sets one spec field, such as ``--data PATH`` for ``data.path``."""

    option: str
    key: str
    value_type: Any
    metavar: str
    # Help text where the spec field's own help reads wrong on the command line.
    help: str | None = None

    @property
    def parameter_name(self) -> str:
        """Name of the click parameter, prefixed so it cannot clash with a command's own options."""
        return "spec_" + self.key.replace(".", "_")


# The fields a job written without a file needs. training.n_workers gets --n-workers,
# because `baton run` already uses --workers for the number of worker containers.
SPEC_SHORTCUTS = (
    SpecShortcut("--job-id", "job_id", str, "ID",
                 help="Names the job in DynamoDB, on EFS and in logs. A spec without one is named after the spec "
                      "file (or 'job') and the current time in seconds."),
    SpecShortcut("--model", "model.name", str, "NAME"),
    SpecShortcut("--data", "data.path", str, "PATH"),
    SpecShortcut("--validation-data", "data.validation_path", str, "PATH",
                 help="Held-out file, like --data. Without one, a fraction of the training rows is held out."),
    SpecShortcut("--format", "data.format", str, "FORMAT"),
    SpecShortcut("--optimizer", "optimizer.name", str, "NAME"),
    SpecShortcut("--learning-rate", "optimizer.learning_rate", NumberText(), "RATE"),
    SpecShortcut("--n-workers", "training.n_workers", NumberText(), "N"),
    SpecShortcut("--batch-size", "training.batch_size", NumberText(), "ROWS"),
    SpecShortcut("--epochs", "training.max_epochs", NumberText(), "EPOCHS"),
)

# A section missing from the spec is fixed by setting its required field.
REQUIRED_FIELDS = {"model": "model.name", "data": "data.path"}


def _declared_field(key: str) -> Field | None:
    """Return the dataclass field that declares ``SECTION.FIELD``, or None if no section declares it."""
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        return None
    return next((declared for declared in fields(SECTIONS[section]) if declared.name == name), None)


def _shortcut_option(shortcut: SpecShortcut) -> Callable:
    """Return the click option for ``shortcut``, with the help and choices its spec field declares."""
    metadata: Mapping[str, Any] = {"help": "", "choices": None}
    if "." in shortcut.key:
        declared = _declared_field(shortcut.key)
        assert declared is not None, f"shortcut {shortcut.option} sets {shortcut.key}, which no spec section declares"
        metadata = declared.metadata
    help_text = f"{shortcut.help or metadata['help']} Sets {shortcut.key}."
    if metadata["choices"] is not None:
        # click lists the choices in place of a metavar.
        return click.option(shortcut.option, shortcut.parameter_name, type=click.Choice(metadata["choices"]),
                            default=None, help=help_text)
    return click.option(shortcut.option, shortcut.parameter_name, type=shortcut.value_type, default=None,
                        metavar=shortcut.metavar, help=help_text)


def _parse_set_options(ctx: click.Context, param: click.Parameter, texts: tuple[str, ...]) -> list[tuple[str, Any]]:
    overrides = []
    for text in texts:
        try:
            overrides.append(parse_override(text))
        except SpecOverrideError as error:
            raise click.BadParameter(f"{text!r}: {error.problem}", ctx=ctx, param=param) from None
    return overrides


def spec_options(command: Callable) -> Callable:
    """Add ``--set`` and the shortcut options to a command.

    The command receives them as one keyword argument, ``overrides``: a list of
    ``(option, key, value)`` in the order :func:`build_spec` applies them.
    """

    @functools.wraps(command)
    def with_overrides(*args, **kwargs):
        overrides = []
        for shortcut in SPEC_SHORTCUTS:
            value = kwargs.pop(shortcut.parameter_name)
            if value is not None:
                overrides.append((shortcut.option, shortcut.key, value))
        overrides += [("--set", key, value) for key, value in kwargs.pop("set_overrides")]
        return command(*args, overrides=overrides, **kwargs)

    with_overrides = click.option(
        "--set", "set_overrides", multiple=True, metavar="SECTION.FIELD=VALUE", callback=_parse_set_options,
        help="Set any spec field, such as training.n_workers=8 or optimizer.name=adam. VALUE is read as JSON "
             "when it is valid JSON (8, 0.5, true, null, [64, 32]) and as a string otherwise. Applied after "
             "the file and the other spec options. Repeatable.")(with_overrides)
    for shortcut in reversed(SPEC_SHORTCUTS):
        with_overrides = _shortcut_option(shortcut)(with_overrides)
    return with_overrides


class FiniteFloatRange(click.FloatRange):
    """A float option within a range that also rejects nan and inf, which click's FloatRange lets through."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def check_job_id_argument(context: click.Context, parameter: click.Parameter, job_id: str) -> str:
    """Reject a JOB_ID that Baton would never accept, before it names a folder or a key."""
    if not JOB_ID_PATTERN.match(job_id):
        raise click.BadParameter(f"{job_id[:80]!r} is not a job id: it starts with a letter or digit and has up to "
                                 "64 letters, digits, '-' and '_'; `baton list` shows the jobs", context, parameter)
    return job_id


def checked_output_path(value: str | None, default: Path, example: str, folder: bool = False) -> Path:
    """Return the path an ``--output`` option names, or ``default``, once it is known to be writable.

    Parameters
    ----------
    value : str or None
        The option's value as typed (a click.Path without ``path_type``, so an empty value
        stays empty instead of becoming ".").
    default : Path
        The path to use when the option is not given.
    example : str
        A valid value, for the message, such as ``curves.png``.
    folder : bool, default=False
        Whether the option names a folder to write into rather than a file.

    Raises
    ------
    click.ClickException
        If the value is empty, names no file, or has a file where a folder must be.
    """
    if value is not None and (not value.strip() or (not folder and Path(value).name in ("", ".", ".."))):
        raise click.ClickException(f"--output {value!r} names no {'folder' if folder else 'file'}; give one such "
                                   f"as {example}")
    path = default if value is None else Path(value)
    candidates = ([path] if folder else []) + list(path.absolute().parents)
    existing = next(candidate for candidate in candidates if candidate.exists())
    if not existing.is_dir():
        raise click.ClickException(f"cannot write to {path}: {existing} is a file, not a folder; choose another "
                                   "--output")
    return path


@contextlib.contextmanager
def writing_output(path: Path):
    """Turn an ``OSError`` on ``path``, a file inside it or a folder above it into a message naming the file.

    Any other ``OSError``, such as a failed read of the job's own files, passes through.
    """
    try:
        yield
    except OSError as error:
        target = Path(error.filename) if error.filename else None
        if target is None or not (target == path or path in target.parents or target in path.parents):
            raise
        raise click.ClickException(f"cannot write {target}: {error.strerror or error}; choose another "
                                   "--output") from None


def _read_spec_file(spec_file: Path) -> dict:
    """Read a JSON spec file as UTF-8, with or without a byte order mark."""
    try:
        raw = spec_file.read_bytes()
    except OSError as error:
        raise click.ClickException(f"cannot read {spec_file}: {error.strerror}") from None
    try:
        # "utf-8-sig" drops a leading UTF-8 byte order mark, as Windows editors write one.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise click.ClickException(_not_utf8_message(spec_file, raw, error)) from None
    try:
        spec = decode_spec_json(text)
    except JobSpecError as error:
        raise click.ClickException(f"{spec_file}: {error}") from None
    except (ValueError, RecursionError) as error:
        raise click.ClickException(f"{spec_file} is not a valid JSON file: {error}{_json_syntax_hint(text)}") from None
    if not isinstance(spec, dict):
        raise click.ClickException(f"{spec_file} contains a JSON {type(spec).__name__}, but a job spec is a JSON object")
    return spec


# A comment (// or /* */) that starts a line or follows a space, and a comma before a closing
# bracket or brace. JavaScript and JSON5 allow both, but JSON does not.
_JSON_COMMENT = re.compile(r"(^|\s)(//|/\*)", re.MULTILINE)
_TRAILING_COMMA = re.compile(r",\s*[}\]]")


def _json_syntax_hint(text: str) -> str:
    """Return a hint for comments or trailing commas in a spec file that is not valid JSON, or ""."""
    found = [name for name, pattern in (("comments", _JSON_COMMENT), ("a comma after the last item", _TRAILING_COMMA))
             if pattern.search(text)]
    if not found:
        return ""
    return f"; the file seems to contain {' and '.join(found)}, which JSON does not allow, so remove them"


def _not_utf8_message(spec_file: Path, raw: bytes, error: UnicodeDecodeError) -> str:
    encoding = ""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = " (it starts with a UTF-16 byte order mark)"
    return (f"{spec_file} is not UTF-8 text{encoding}: byte {error.start + 1} is "
            f"{raw[error.start:error.start + 1]!r}; save the spec file as UTF-8")


def _default_job_id(spec_file: Path | None) -> str:
    # Job ids allow letters, digits, '-' and '_' only, so other characters of the name become '-'.
    stem = "" if spec_file is None else re.sub(r"[^A-Za-z0-9_-]+", "-", spec_file.stem).strip("-_")[:40]
    return f"{stem or 'job'}-{int(time.time())}"


def _keys_overlap(key: str, other: str) -> bool:
    """Return whether dotted keys ``key`` and ``other`` name the same field, or one contains the other."""
    return key == other or key.startswith(f"{other}.") or other.startswith(f"{key}.")


def _setting_option(key: str, overrides: list[tuple[str, str, Any]]) -> str | None:
    """Return the last option of ``overrides`` that wrote field ``key``, a section above it or a key below it.

    The option is returned as typed before its value, such as ``--n-workers`` or
    ``--set training.n_workers``, or None when the spec file alone gave the field.
    """
    for option, override_key, _ in reversed(overrides):
        if _keys_overlap(key, override_key):
            return f"--set {override_key}" if option == "--set" else option
    return None


def _spec_error_message(error: JobSpecError, spec: dict, spec_file: Path | None,
                        overrides: list[tuple[str, str, Any]]) -> str:
    """Return the validation message followed by what to change: the option that set the field, or else its sources."""
    # An element path such as model.hidden_layer_sizes[1] is fixed by setting the whole list.
    key = re.sub(r"\[\d+\]$", "", error.field)
    # The options are applied after the file, so the value that failed is the option's.
    unknown = key != "job_id" and key not in SECTIONS and _declared_field(key) is None
    option = _setting_option(key, overrides)
    if option == f"--set {key}" and unknown:
        return f"{error}\nTo fix it, correct the field name in {option} or drop that option. Nothing was sent."
    if option is not None:
        return f"{error}\nTo fix it, change the value of {option} or drop that option. Nothing was sent."
    if key in REQUIRED_FIELDS and key not in spec:
        key = REQUIRED_FIELDS[key]
        unknown = False
    # The message of an unknown field already lists the valid ones, and <root> is the whole spec.
    if unknown:
        return f"{error}\nNothing was sent."
    if NOT_APPLICABLE_WORDS in str(error):
        # The field is valid for another model or optimizer, which an option may have replaced.
        section = key.split(".")[0]
        fix = f"remove {key} from {spec_file}" if spec_file is not None else f"leave {key} out"
        chooser = _setting_option(f"{section}.name", overrides)
        if chooser is not None:
            fix += f", or drop {chooser}, which chose that {section}"
        return f"{error}\nTo fix it, {fix}. Nothing was sent."

    options = [f"{shortcut.option} {shortcut.metavar}" for shortcut in SPEC_SHORTCUTS if shortcut.key == key]
    options.append(f"--set {key}=VALUE")
    fix = f"pass {' or '.join(options)}"
    if spec_file is not None:
        fix = f"edit {spec_file} or {fix}"
    return f"{error}\nTo fix it, {fix}. Nothing was sent."


def _largest_field(spec: dict) -> tuple[str, int]:
    """Return the dotted name of the spec field whose value takes the most bytes in the message, and those bytes."""
    sizes = []
    for key, value in spec.items():
        if key in SECTIONS and isinstance(value, dict) and value:
            sizes += [(f"{key}.{name}", message_bytes(encode_job_message(child))) for name, child in value.items()]
        else:
            sizes.append((key, message_bytes(encode_job_message(value))))
    return max(sizes, key=lambda item: item[1])


def _check_message_size(spec: dict, spec_file: Path | None) -> None:
    """Raise unless the body sent for ``spec`` fits in :data:`MAX_SPEC_BYTES`, naming its largest field."""
    size = message_bytes(encode_job_message(spec))
    if size <= MAX_SPEC_BYTES:
        return
    file_size = ""
    if spec_file is not None:
        file_size = f", so its size can differ from the {spec_file.stat().st_size:,} bytes of {spec_file}"
    field, field_bytes = _largest_field(spec)
    raise click.ClickException(
        f"the job message is {size:,} bytes, over Baton's limit of {MAX_SPEC_BYTES:,} bytes (64 KiB) for a job spec. "
        f"baton sends the spec as compact JSON{file_size}. Its largest field is {field} at {field_bytes:,} bytes. "
        f"To fix it, {SHRINK_SPEC_ADVICE}. Nothing was sent.")


def build_spec(spec_file: Path | None, overrides: list[tuple[str, str, Any]]) -> dict:
    """Read a spec file (or start from an empty spec), apply the overrides and validate the result.

    Parameters
    ----------
    spec_file : Path or None
        JSON file with the job spec; None builds the spec from the overrides alone.
    overrides : list of (str, str, object)
        ``(option, key, value)`` from :func:`spec_options`, applied in order.

    Returns
    -------
    dict
        The spec as it is to be sent. A spec without a ``job_id`` gets one from the file's
        name (``job`` without a file) and the current time in seconds.

    Raises
    ------
    click.UsageError
        If neither a file nor an override is given.
    click.ClickException
        If the file is not a JSON object, the message to send (:func:`encode_job_message`)
        is over :data:`MAX_SPEC_BYTES`, or the resulting spec is invalid. The message names
        the field and the options that set it.
    click.BadParameter
        If an override leads into a value that is not an object, naming its option.
    """
    if spec_file is None and not overrides:
        command = f"baton {click.get_current_context().info_name}"
        raise click.UsageError(f"missing SPEC_FILE and spec options: give a spec file, spec options (--model, --data "
                               f"and the others that --help lists), or both, such as `{command} examples/a9a.json` "
                               f"or `{command} --model logistic_regression --data datasets/a9a/a9a --format libsvm`. "
                               "Nothing was sent.")
    spec = {} if spec_file is None else _read_spec_file(spec_file)
    for option, key, value in overrides:
        try:
            spec = apply_overrides(spec, [(key, value)])
        except SpecOverrideError as error:
            raise click.BadParameter(f"cannot set {key}: {error.problem}", param_hint=f"'{option}'") from None
    if "job_id" not in spec:
        spec = {"job_id": _default_job_id(spec_file), **spec}

    _check_message_size(spec, spec_file)
    try:
        # The spec as built keeps each number's text for the messages. The message body
        # is then checked as the starter reads it.
        parse_job_spec(spec)
        load_job_message(encode_job_message(spec))
    except JobSpecError as error:
        raise click.ClickException(_spec_error_message(error, spec, spec_file, overrides)) from None
    return spec
