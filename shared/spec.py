"""The job spec: what to train, on which data, and how.

A job spec is a JSON object with four sections (``model``, ``optimizer``, ``data``,
``training``) and a ``job_id``. Every field has a type, a default and a valid range,
declared once in the dataclasses below; :func:`parse_job_spec` checks a raw dictionary
against them and returns a :class:`JobSpec` with every default filled in. Unknown fields
are rejected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from shared.errors import JobSpecError

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_SPEC_BYTES = 64 * 1024


def spec_field(default: Any = MISSING, *, help: str, minimum: float | None = None,
               maximum: float | None = None, exclusive_minimum: bool = False,
               choices: tuple | None = None, nullable: bool = False):
    """Declare a spec field with its default, valid range and one-line meaning."""
    metadata = {
        "help": help,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "choices": choices,
        "nullable": nullable,
    }
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelSection:
    name: str = spec_field(help="Model to train.", choices=("logistic_regression",))
    alpha: float = spec_field(0.0, help="L2 penalty strength on the weights (not the bias).", minimum=0.0)


@dataclass(frozen=True)
class OptimizerSection:
    name: str = spec_field("momentum", help="Update rule.", choices=("sgd", "momentum"))
    learning_rate: float = spec_field(0.1, help="Step size.", minimum=0.0, exclusive_minimum=True, maximum=1e3)
    momentum: float = spec_field(0.9, help="Velocity decay for 'momentum'.", minimum=0.0, maximum=0.999)


@dataclass(frozen=True)
class DataSection:
    path: str = spec_field(help="Training file, relative to the EFS root.")
    format: str = spec_field("libsvm", help="File format.", choices=("libsvm", "csv"))
    n_features: int | None = spec_field(
        None, help="Number of features; for libsvm, inferred from the highest index when null.", minimum=1, nullable=True)
    validation_path: str | None = spec_field(
        None, help="Held-out file, relative to the EFS root; when null a fraction of the training rows is held out.",
        nullable=True)
    validation_fraction: float = spec_field(
        0.1, help="Share of training rows held out when validation_path is null.", minimum=0.0, maximum=0.5)
    label_column: int = spec_field(-1, help="CSV: index of the label column; negative counts from the end.")
    skip_rows: int = spec_field(0, help="CSV: lines to skip before the first row.", minimum=0)
    delimiter: str = spec_field(",", help="CSV: field separator.", choices=(",", ";", "\t", " "))


@dataclass(frozen=True)
class TrainingSection:
    n_workers: int = spec_field(4, help="Parallel workers, one data shard each.", minimum=1, maximum=1000)
    batch_size: int = spec_field(128, help="Rows per worker per round.", minimum=1, maximum=1_000_000)
    max_epochs: float = spec_field(5.0, help="Stop after this many passes over the training rows.",
                                   minimum=0.0, exclusive_minimum=True, maximum=10_000)
    max_rounds: int | None = spec_field(None, help="Stop after this many rounds, whichever comes first.",
                                        minimum=1, maximum=10_000_000, nullable=True)
    target_validation_loss: float | None = spec_field(
        None, help="Stop as soon as the validation loss is at or below this value.", minimum=0.0, nullable=True)
    seed: int = spec_field(0, help="Seed for shuffling, sharding, initialisation and batches.",
                           minimum=0, maximum=2**32 - 1)


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "optimizer": OptimizerSection,
    "data": DataSection,
    "training": TrainingSection,
}


@dataclass(frozen=True)
class JobSpec:
    """A validated job spec with every default filled in."""

    job_id: str
    model: ModelSection
    optimizer: OptimizerSection
    data: DataSection
    training: TrainingSection

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as plain JSON-ready data, defaults included."""
        return asdict(self)

    def canonical_json(self) -> str:
        """Return the spec as JSON with sorted keys, the form its hash is taken of."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """Return a sha256 hex digest identifying this spec, job id included."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def _type_name(annotation: str) -> str:
    return annotation.replace(" | None", "")


def _check_value(section: str, name: str, annotation: str, meta: dict, value: Any) -> Any:
    path = f"{section}.{name}"
    if value is None:
        if meta["nullable"]:
            return None
        raise JobSpecError(path, "must not be null")

    expected = _type_name(annotation)
    if expected == "int":
        # JSON has one number type; accept 4.0 for 4 but never a bool.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise JobSpecError(path, f"expected an integer, got {value!r}")
        value = int(value)
    elif expected == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise JobSpecError(path, f"expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise JobSpecError(path, f"expected a finite number, got {value!r}")
    elif expected == "str":
        if not isinstance(value, str) or not value:
            raise JobSpecError(path, f"expected a non-empty string, got {value!r}")

    if meta["choices"] is not None and value not in meta["choices"]:
        raise JobSpecError(path, f"got {value!r}; expected one of {', '.join(map(repr, meta['choices']))}")
    minimum, maximum = meta["minimum"], meta["maximum"]
    if minimum is not None:
        if meta["exclusive_minimum"] and not value > minimum:
            raise JobSpecError(path, f"got {value!r}; must be greater than {minimum}")
        if not meta["exclusive_minimum"] and value < minimum:
            raise JobSpecError(path, f"got {value!r}; must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise JobSpecError(path, f"got {value!r}; must be at most {maximum}")
    return value


def _parse_section(section: str, cls: type, raw: Any):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise JobSpecError(section, f"expected an object, got {type(raw).__name__}")

    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise JobSpecError(f"{section}.{unknown[0]}", f"unknown field; valid fields are {', '.join(known)}")

    values = {}
    for name, declared in known.items():
        if name not in raw:
            if declared.default is MISSING:
                raise JobSpecError(f"{section}.{name}", "missing required field")
            values[name] = declared.default
            continue
        values[name] = _check_value(section, name, declared.type, declared.metadata, raw[name])
    return cls(**values)


def check_relative_path(field_path: str, value: str) -> str:
    """Return ``value`` normalised if it stays inside its root; raise :class:`JobSpecError` if not."""
    if value.startswith("/") or "\\" in value or "\x00" in value:
        raise JobSpecError(field_path, f"got {value!r}; use a path relative to the EFS root, without a leading '/'")
    parts = value.split("/")
    if ".." in parts:
        raise JobSpecError(field_path, f"got {value!r}; '..' is not allowed, the path must stay under the EFS root")
    return posixpath.normpath(value)


def parse_job_spec(raw: Any, default_job_id: str | None = None) -> JobSpec:
    """Validate a raw job spec and fill in its defaults.

    Parameters
    ----------
    raw : dict
        The decoded JSON body of a job message.
    default_job_id : str, optional
        Used when ``raw`` carries no ``job_id``.

    Returns
    -------
    JobSpec

    Raises
    ------
    JobSpecError
        Naming the first offending field and what to do about it.
    """
    if not isinstance(raw, dict):
        raise JobSpecError("<root>", f"expected a JSON object, got {type(raw).__name__}")

    unknown = sorted(set(raw) - set(SECTIONS) - {"job_id"})
    if unknown:
        raise JobSpecError(unknown[0], f"unknown field; valid top-level fields are job_id, {', '.join(SECTIONS)}")

    job_id = raw.get("job_id", default_job_id)
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
        raise JobSpecError(
            "job_id", f"got {job_id!r}; use 1 to 64 letters, digits, '-' or '_', starting with a letter or digit")

    for required in ("model", "data"):
        if required not in raw:
            raise JobSpecError(required, "missing required section")

    sections = {name: _parse_section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()}

    data = sections["data"]
    normalised_paths = {"path": check_relative_path("data.path", data.path)}
    if data.validation_path is not None:
        normalised_paths["validation_path"] = check_relative_path("data.validation_path", data.validation_path)
    sections["data"] = DataSection(**{**asdict(data), **normalised_paths})

    return JobSpec(job_id=job_id, **sections)


def load_job_message(body: str, default_job_id: str | None = None) -> JobSpec:
    """Decode and validate the body of a jobs-queue message."""
    if len(body.encode()) > MAX_SPEC_BYTES:
        raise JobSpecError("<root>", f"message is {len(body.encode())} bytes; a job spec may be at most {MAX_SPEC_BYTES}")
    try:
        raw = json.loads(body)
    except json.JSONDecodeError as error:
        raise JobSpecError("<root>", f"body is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    return parse_job_spec(raw, default_job_id=default_job_id)
