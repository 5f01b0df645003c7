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
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from collections.abc import Mapping
from typing import Any, Callable

from shared import json_numbers
from shared.efs import JOBS_FOLDER, JOBS_FOLDER_DATA_PROBLEM
from shared.errors import JobSpecError
from shared.json_numbers import OversizedInteger, parses_as_float, shown
from shared.models import MODELS
from shared.models._penalty import L1_METHODS, PENALTIES
from shared.models.mlp import ACTIVATIONS
from shared.models.svm import SVM_LOSSES
from shared.optim import OPTIMIZERS, SCHEDULES
from shared.training import SELECTABLE_TRAINING_MODES

DATA_FORMATS = ("libsvm", "csv", "npy", "npz")
S3_URI_PATTERN = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(\S+)$")

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Baton's limit on a jobs-queue message body, in UTF-8 bytes, below SQS's own maximum message size.
MAX_SPEC_BYTES = 64 * 1024
# The maximum length in bytes of one file or folder name on Linux file systems (ext4, NFS) and on EFS.
MAX_NAME_BYTES = 255
SHRINK_SPEC_ADVICE = ("leave out fields that keep their default value (docs/job-spec.md gives each default) and "
                      "shorten the longest lists and strings")

# Characters SQS rejects in a message body. Its SendMessage reference allows only #x9, #xA,
# #xD, #x20 to #xD7FF, #xE000 to #xFFFD and #x10000 to #x10FFFF. json.dumps escapes the
# control characters below #x20 itself, but with ensure_ascii=False it writes these as
# they are.
_SQS_REJECTED_CHARACTERS = re.compile("[\ud800-\udfff\ufffe\uffff]")


def spec_field(default: Any = MISSING, *, help: str, minimum: float | None = None,
               maximum: float | None = None, exclusive_minimum: bool = False, exclusive_maximum: bool = False,
               choices: tuple | None = None, nullable: bool = False, min_length: int | None = None,
               max_length: int | None = None, validator: Callable[[str, Any], Any] | None = None):
    """Declare a spec field with its default, valid range and one-line meaning.

    For list fields, ``minimum`` and ``maximum`` bound every element and ``min_length``
    and ``max_length`` bound the length. ``validator(path, value)`` replaces the type
    check of a field whose type the generic checks do not cover; it returns the
    normalised value or raises :class:`JobSpecError`.
    """
    metadata = {
        "help": help,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "exclusive_maximum": exclusive_maximum,
        "choices": choices,
        "nullable": nullable,
        "min_length": min_length,
        "max_length": max_length,
        "validator": validator,
    }
    return field(default=default, metadata=metadata)


def _check_class_weight(path: str, value: Any) -> Any:
    """Accept ``"balanced"`` or an object mapping class labels to weights >= 0."""
    if value == "balanced":
        return value
    if not isinstance(value, dict) or not value:
        raise JobSpecError(path, f"got {shown(value)}; expected 'balanced', null, or an object such as {{\"1\": 5.0}} "
                                 "mapping class labels to weights")
    checked = {}
    # Labels are matched to the data's classes by number when they are numbers, so "1"
    # and "1.0" name the same class.
    named_by: dict[Any, str] = {}
    for label, weight in value.items():
        # abs() compares a huge int with the float range exactly, where math.isfinite() would overflow.
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or (isinstance(weight, float) and math.isnan(weight)) or abs(weight) > sys.float_info.max \
                or weight < 0:
            raise JobSpecError(path, f"class {label!r} has weight {shown(weight)}; expected a finite number >= 0")
        same_class: float | str
        try:
            same_class = float(label)
        except ValueError:
            same_class = str(label)
        if same_class in named_by:
            raise JobSpecError(path, f"labels {named_by[same_class]!r} and {label!r} name the same class; "
                                     "keep one of them")
        named_by[same_class] = str(label)
        checked[str(label)] = float(weight)
    return checked


# The words of the error for a field that the chosen model never reads. The CLI looks for
# them, so it suggests removing the field instead of setting another value.
NOT_APPLICABLE_WORDS = "does not apply to"


@dataclass(frozen=True)
class ModelSection:
    name: str = spec_field(help="Model to train. docs/operations.md lists the loss each model reports, under "
                                "\"What a round records\".", choices=tuple(MODELS))
    alpha: float = spec_field(0.0, help="Penalty strength on the weights (never the biases).", minimum=0.0)
    penalty: str = spec_field("l2", help="Linear and softmax models: penalty on the weights.", choices=PENALTIES)
    l1_ratio: float = spec_field(0.15, help="Share of the L1 term for penalty 'elasticnet'.", minimum=0.0, maximum=1.0)
    l1_method: str = spec_field(
        "subgradient", help="How the L1 term is applied: in the gradient, or by soft-thresholding after each step "
                            "(exact zeros).", choices=L1_METHODS)
    loss: str = spec_field("hinge", help="linear_svm: per-row loss.", choices=SVM_LOSSES)
    hidden_layer_sizes: tuple[int, ...] = spec_field(
        (100,), help="MLP models: width of each hidden layer, for example [64, 32].", minimum=1, maximum=100_000,
        max_length=64)
    activation: str = spec_field("relu", help="MLP models: activation of the hidden layers.", choices=ACTIVATIONS)
    n_clusters: int = spec_field(8, help="kmeans: number of centroids.", minimum=1, maximum=100_000)
    class_weight: str | dict | None = spec_field(
        None, help="Classifiers: weight of each class in the loss; 'balanced' weighs class k by "
                   "n_rows / (n_classes * count_k); an object maps class labels as written in the data to weights.",
        nullable=True, validator=_check_class_weight)


@dataclass(frozen=True)
class OptimizerSection:
    name: str = spec_field("momentum", help="Update rule.", choices=tuple(OPTIMIZERS))
    learning_rate: float = spec_field(0.1, help="Initial step size.", minimum=0.0, exclusive_minimum=True, maximum=1e3)
    momentum: float = spec_field(0.9, help="momentum and nesterov: velocity decay.", minimum=0.0, maximum=0.999)
    schedule: str = spec_field("constant", help="How the learning rate changes with the step index.",
                               choices=tuple(SCHEDULES))
    step_size: int = spec_field(100, help="Schedule 'step': steps between two decays.", minimum=1)
    gamma: float = spec_field(0.5, help="Schedule 'step': decay factor.", minimum=0.0, exclusive_minimum=True,
                              maximum=1.0)
    decay: float = spec_field(0.01, help="Schedule 'inverse_scaling': decay per step.", minimum=0.0)
    power: float = spec_field(0.5, help="Schedule 'inverse_scaling': exponent.", minimum=0.0)
    total_steps: int | None = spec_field(
        None, help="Schedule 'cosine', required there: steps to anneal over. Later steps keep min_learning_rate "
                   "(0 by default), so to anneal over the whole job set it to the job's rounds (times the local steps per round "
                   "for model_average).",
        minimum=1, nullable=True)
    min_learning_rate: float = spec_field(0.0, help="Schedule 'cosine': final learning rate.", minimum=0.0)
    clip_norm: float | None = spec_field(None, help="Largest Euclidean norm of a gradient; longer ones are scaled "
                                                    "down. Null disables clipping.", minimum=0.0,
                                         exclusive_minimum=True, nullable=True)
    betas: tuple[float, ...] = spec_field((0.9, 0.999), help="adam: decay of the first and second moment estimates.",
                                          minimum=0.0, maximum=1.0, exclusive_maximum=True, min_length=2,
                                          max_length=2)
    epsilon: float = spec_field(1e-8, help="adam and adagrad: added to the denominator.", minimum=0.0,
                                exclusive_minimum=True)
    initial_accumulator_value: float = spec_field(0.0, help="adagrad: start value of the squared-gradient sums.",
                                                  minimum=0.0)


@dataclass(frozen=True)
class DataSection:
    path: str = spec_field(help="Training file, relative to the EFS root and outside its jobs/ folder, or an "
                                "s3://bucket/key URI.")
    format: str = spec_field("libsvm", help="File format: libsvm text, delimited text, a .npy matrix whose "
                                            "label_column holds the labels, or a .npz archive with arrays X and y.",
                             choices=DATA_FORMATS)
    n_features: int | None = spec_field(
        None, help="Number of features; for libsvm, inferred when null from the highest index in the training "
                   "file and data.validation_path together.", minimum=1, nullable=True)
    validation_path: str | None = spec_field(
        None, help="Held-out file, like path; when null a fraction of the training rows is held out.",
        nullable=True)
    validation_fraction: float = spec_field(
        0.1, help="Share of training rows held out when validation_path is null.", minimum=0.0, maximum=0.5)
    label_column: int | str = spec_field(
        -1, help="csv and npy: index of the label column (negative counts from the end), or for csv with "
                 "header=true its name, which only one column of the header may have. Labels are numbers: "
                 "class labels such as 0/1 or 1..k, or regression targets, so map text labels to numbers first.")
    header: bool = spec_field(False, help="csv: the first line after skip_rows that is not blank names the columns. "
                                          "The header of "
                                          "data.validation_path must name the same feature columns in the same "
                                          "order, because features are read by position. The label column may "
                                          "sit elsewhere when label_column is a name.")
    skip_rows: int = spec_field(0, help="csv: lines to skip before the header or the first row, blank lines "
                                        "included. Blank lines after them are passed over.", minimum=0)
    delimiter: str = spec_field(",", help="csv: field separator; 'whitespace' means any run of spaces and tabs.",
                                choices=(",", ";", "\t", " ", "whitespace"))
    standardize: bool = spec_field(
        False, help="Scale every feature to zero mean and unit variance, with statistics of the training shards "
                    "only; sparse data is scaled but not centred, and a constant feature is left unscaled. "
                    "Regression targets are scaled only by data.standardize_target.")
    standardize_target: bool = spec_field(
        False, help="Regression models: train on the targets minus their mean, divided by their standard "
                    "deviation, both from the training shards only (a constant target is only centred), so the "
                    "learning rate works alike whatever the targets' units. Without it the output bias starts at "
                    "the targets' mean, but targets with a spread far from 1 (such as 1e6) can make adam, "
                    "adagrad, clip_norm and mlp_regressor learn little or diverge. The penalty is rescaled so "
                    "that the optimum stays that of the unscaled targets with the same model.alpha, so alpha "
                    "still acts in the targets' units: for mlp_regressor on targets far below 1, lower it "
                    "with them. Metrics, "
                    "training.target_validation_loss, the saved model and the export are in the targets' own "
                    "units.")
    stratify: bool | None = spec_field(
        None, help="Keep each class's share equal across shards and the held-out rows; null means true for "
                   "classifiers.", nullable=True)
    part_bytes: int = spec_field(
        64 * 1024 * 1024, help="Uncompressed text and .npy sources are prepared in parts of about this many bytes. "
                               "When the sources hold more than one part's bytes together, each step of the "
                               "preparation runs in its own invocation.", minimum=4096)


@dataclass(frozen=True)
class TrainingSection:
    n_workers: int = spec_field(4, help="Parallel workers, one data shard each.", minimum=1, maximum=1000)
    reducers: int = spec_field(
        1, help="Reducers that each sum one slice of the workers' results before the aggregator's step, so no one "
                "function reads every result in full; 1 means the aggregator sums them itself. At most the model's "
                "number of parameters.", minimum=1, maximum=1000)
    batch_size: int = spec_field(128, help="Rows per worker per mini-batch step.", minimum=1, maximum=1_000_000)
    max_epochs: float = spec_field(5.0, help="Stop after this many passes over the training rows.",
                                   minimum=0.0, exclusive_minimum=True, maximum=10_000)
    max_rounds: int | None = spec_field(None, help="Stop after this many rounds, whichever comes first.",
                                        minimum=1, maximum=10_000_000, nullable=True)
    mode: str = spec_field(
        "gradient_average", help="gradient_average: each round takes one step on the workers' mean gradient. "
                                 "model_average: each worker takes several local steps and the models are averaged. "
                                 "kmeans runs Lloyd iterations in gradient_average only, and ignores the "
                                 "optimizer section.",
        choices=SELECTABLE_TRAINING_MODES)
    local_steps: int = spec_field(1, help="model_average: local mini-batch steps per worker per round.",
                                  minimum=1, maximum=100_000)
    local_epoch: bool = spec_field(False, help="model_average: each round is one pass over the worker's shard "
                                               "instead of local_steps steps.")
    target_validation_loss: float | None = spec_field(
        None, help="Stop as soon as the validation loss is at or below this value. Needs held-out rows: "
                   "data.validation_fraction above 0 or a data.validation_path.", minimum=0.0, nullable=True)
    target_validation_accuracy: float | None = spec_field(
        None, help="Stop as soon as the validation accuracy is at or above this value. Needs held-out rows, as "
                   "target_validation_loss does.", minimum=0.0,
        exclusive_minimum=True, maximum=1.0, nullable=True)
    early_stopping_patience: int | None = spec_field(
        None, help="Stop after this many rounds in a row without a new lowest validation loss. Needs held-out "
                   "rows, as target_validation_loss does.", minimum=1,
        nullable=True)
    budget_usd: float | None = spec_field(
        None, help="Stop, keeping the model, once the estimated AWS cost in US dollars reaches this value. The "
                   "estimate uses measured durations, so two runs of the same spec and seed may stop at different "
                   "rounds.",
        minimum=0.0, exclusive_minimum=True, nullable=True)
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


def _integer_fix(value: float) -> str:
    """Return how to write a float that an integer field got, such as 'write 2' for 2.0."""
    if abs(value) >= 2**53:
        # From 2**53 on, a float is not exact, so int(value) may differ from what was meant.
        return "write the integer with digits only, without a decimal point or exponent"
    if value.is_integer():
        return f"write {int(value)}"
    return f"write {math.floor(value)} or {math.ceil(value)}"


def _unquote_hint(value: Any, is_json_value: Callable[[str], bool]) -> str:
    """Return "; write 4 without quotes" for a string such as "4" whose text is the JSON value expected, else ""."""
    if isinstance(value, str) and value.strip() and is_json_value(value.strip()):
        return f"; write {value.strip()} without quotes"
    return ""


def _check_number(path: str, expected: str, meta: Mapping[str, Any], value: Any) -> int | float:
    """Return ``value`` as an int or a float within the field's range, or raise showing it as typed."""
    kind = "an integer" if expected == "int" else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and math.isnan(value)):
        raise JobSpecError(path, f"expected {kind}, got {shown(value)}{_unquote_hint(value, parses_as_float)}")
    # Python compares ints and floats exactly, so a huge integer or an infinity gets the
    # range's message before any conversion.
    _check_range(path, meta, value)
    if isinstance(value, OversizedInteger):
        raise JobSpecError(path, f"got {shown(value)}; Baton reads integers of at most "
                                 f"{sys.get_int_max_str_digits()} digits")
    if isinstance(value, float) and math.isinf(value):
        raise JobSpecError(path, f"expected {'an integer' if expected == 'int' else 'a finite number'}, "
                                 f"got {shown(value)}")
    if expected == "int":
        # JSON has one number type, but an integer field takes an integer as written, so
        # 2.0 is rejected as 2.5 is and never silently truncated.
        if isinstance(value, float):
            raise JobSpecError(path, f"expected an integer, got {shown(value)}; {_integer_fix(value)}")
        return int(value)
    if abs(value) > sys.float_info.max:
        raise JobSpecError(path, f"got {shown(value)}, beyond the float range; expected a finite number")
    return float(value)


def _check_range(path: str, meta: Mapping[str, Any], value: int | float) -> None:
    minimum, maximum = meta["minimum"], meta["maximum"]
    if minimum is not None:
        if meta["exclusive_minimum"] and not value > minimum:
            raise JobSpecError(path, f"got {shown(value)}; must be greater than {minimum}")
        if not meta["exclusive_minimum"] and value < minimum:
            raise JobSpecError(path, f"got {shown(value)}; must be at least {minimum}")
    if maximum is not None:
        if meta["exclusive_maximum"] and not value < maximum:
            raise JobSpecError(path, f"got {shown(value)}; must be less than {maximum}")
        if not meta["exclusive_maximum"] and value > maximum:
            raise JobSpecError(path, f"got {shown(value)}; must be at most {maximum}")


def _check_list(path: str, element_type: str, meta: Mapping[str, Any], value: Any) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise JobSpecError(path, f"expected a list of {element_type} values, got {shown(value)}")
    if meta["min_length"] is not None and len(value) < meta["min_length"]:
        raise JobSpecError(path, f"got {len(value)} values; expected at least {meta['min_length']}")
    if meta["max_length"] is not None and len(value) > meta["max_length"]:
        raise JobSpecError(path, f"got {len(value)} values; expected at most {meta['max_length']}")
    checked = []
    for index, element in enumerate(value):
        element_path = f"{path}[{index}]"
        checked.append(_check_number(element_path, element_type, meta, element))
    return tuple(checked)


def _check_value(section: str, name: str, annotation: str, meta: Mapping[str, Any], value: Any) -> Any:
    path = f"{section}.{name}"
    if value is None:
        if meta["nullable"]:
            return None
        raise JobSpecError(path, "must not be null")
    if meta["validator"] is not None:
        return meta["validator"](path, value)

    expected = _type_name(annotation)
    if expected.startswith("tuple["):
        return _check_list(path, expected[len("tuple["):].split(",")[0], meta, value)
    if expected in ("int", "float"):
        value = _check_number(path, expected, meta, value)
    elif expected == "bool":
        if not isinstance(value, bool):
            raise JobSpecError(path, f"expected true or false, got {shown(value)}"
                                     f"{_unquote_hint(value, lambda text: text in ('true', 'false'))}")
    elif expected == "str":
        if not isinstance(value, str) or not value:
            raise JobSpecError(path, f"expected a non-empty string, got {shown(value)}")
    elif expected == "int | str":
        if isinstance(value, str):
            if not value:
                raise JobSpecError(path, "expected an integer or a non-empty string, got ''")
            return value
        value = _check_number(path, "int", meta, value)
    else:
        raise TypeError(f"spec field {path} has annotation {annotation!r}, which _check_value does not handle")

    if meta["choices"] is not None and value not in meta["choices"]:
        raise JobSpecError(path, f"got {shown(value)}; expected one of {', '.join(map(repr, meta['choices']))}")
    return value


def _parse_section(section: str, cls: type, raw: Any):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise JobSpecError(section, f"expected an object, got {shown(raw)}")

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
        # The __future__ import makes declared.type the annotation's text.
        assert isinstance(declared.type, str)
        values[name] = _check_value(section, name, declared.type, declared.metadata, raw[name])
    return cls(**values)


# The Adam parameters that stand for the two elements of the spec's optimizer.betas.
_BETA_INDEX = {"beta_1": 0, "beta_2": 1}


def _optimizer_field(name: str):
    """Return the OptimizerSection field that optimizer parameter ``name`` reads."""
    declared = {spec_field_.name: spec_field_ for spec_field_ in fields(OptimizerSection)}
    return declared["betas" if name in _BETA_INDEX else name]


def optimizer_default(name: str) -> Any:
    """Return the default of optimizer parameter ``name``: its OptimizerSection field's.

    ``beta_1`` and ``beta_2`` are the two elements of ``betas``. :mod:`shared.optim` fills
    in every parameter that a caller leaves out with this value.
    """
    default = _optimizer_field(name).default
    return default[_BETA_INDEX[name]] if name in _BETA_INDEX else default


def check_optimizer_value(name: str, value: Any) -> Any:
    """Return optimizer parameter ``name`` checked as :func:`parse_job_spec` checks its field.

    This is the one check of an optimizer's and a schedule's parameters, which the classes
    of :mod:`shared.optim` call. ``beta_1`` and ``beta_2`` are checked as elements of
    ``betas``.

    Raises
    ------
    JobSpecError
        Naming ``optimizer.<name>``, if the value has the wrong type or is out of range.
    """
    declared = _optimizer_field(name)
    if name in _BETA_INDEX:
        return _check_number(f"optimizer.{name}", "float", declared.metadata, value)
    return _check_value("optimizer", name, declared.type, declared.metadata, value)


def check_relative_path(field_path: str, value: str) -> str:
    """Return ``value`` normalised if it stays inside its root; raise :class:`JobSpecError` if not."""
    if "\x00" in value:
        raise JobSpecError(field_path, f"got {shown(value)}, which contains a NUL byte (\\x00) at character "
                                       f"{value.index(chr(0)) + 1}; remove it")
    if "\\" in value:
        raise JobSpecError(field_path, f"got {shown(value)}; separate folders with '/', not '\\'")
    if value.startswith("/"):
        raise JobSpecError(field_path, f"got {value!r}; use a path relative to the EFS root, without a leading '/'")
    parts = value.split("/")
    if ".." in parts:
        raise JobSpecError(field_path, f"got {value!r}; '..' is not allowed, the path must stay under the EFS root")
    for part in parts:
        size = len(part.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            raise JobSpecError(field_path, f"got a file or folder name of {size} bytes ({shown(part)}); Linux and "
                                           f"EFS allow at most {MAX_NAME_BYTES} bytes in one name, so rename the "
                                           "file or folder to a shorter name and give that name")
    return posixpath.normpath(value)


def check_data_path(field_path: str, value: str) -> str:
    """Return a data path checked as an ``s3://bucket/key`` URI or as a path relative to the EFS root.

    A path relative to the EFS root must not be in ``jobs/``. The starter checks again
    once symbolic links are resolved (:meth:`shared.efs.EfsStore.resolve_data_path`).
    """
    if value.startswith("s3://"):
        match = S3_URI_PATTERN.match(value)
        if match is None or ".." in match.group(2).split("/") or match.group(2).endswith("/"):
            raise JobSpecError(field_path, f"got {value!r}; expected s3://<bucket>/<key> naming one object")
        return value
    if "://" in value:
        raise JobSpecError(field_path, f"got {value!r}; only s3:// URIs and paths relative to the EFS root are "
                                       "supported")
    normalised = check_relative_path(field_path, value)
    if normalised.split("/")[0] == JOBS_FOLDER:
        raise JobSpecError(field_path, f"{value!r} {JOBS_FOLDER_DATA_PROBLEM}")
    return normalised


# Training fields that stop a job on its validation rows, so a job without any cannot use them.
VALIDATION_STOP_FIELDS = ("target_validation_loss", "target_validation_accuracy", "early_stopping_patience")


def _check_combinations(sections: dict[str, Any]) -> None:
    """Raise :class:`JobSpecError` for fields that are valid alone but not together."""
    model, optimizer, data, training = (sections[name] for name in ("model", "optimizer", "data", "training"))
    model_class = MODELS[model.name]

    if training.mode != "gradient_average" and model_class.training_mode == "statistics":
        raise JobSpecError("training.mode", f"got {training.mode!r}, but model '{model.name}' is trained by "
                                            "statistics, not by an optimizer; remove training.mode")
    if training.mode == "gradient_average" and (training.local_steps != 1 or training.local_epoch):
        set_field = "local_steps" if training.local_steps != 1 else "local_epoch"
        raise JobSpecError(f"training.{set_field}", "local_steps and local_epoch apply only to training.mode "
                                                    "'model_average'; set the mode or remove them")
    if model.class_weight is not None and model_class.task not in ("binary", "multiclass"):
        raise JobSpecError("model.class_weight", f"model '{model.name}' is not a classifier; remove class_weight")
    # A field set away from its default for a model that never reads it is most likely
    # meant for another model, so it is named instead of ignored.
    read = model_class.spec_fields()
    for spec_field_ in fields(ModelSection):
        if spec_field_.name != "name" and spec_field_.name not in read \
                and getattr(model, spec_field_.name) != spec_field_.default:
            default = list(spec_field_.default) if isinstance(spec_field_.default, tuple) else spec_field_.default
            raise JobSpecError(f"model.{spec_field_.name}",
                               f"{NOT_APPLICABLE_WORDS} model '{model.name}', which reads {', '.join(read)}; "
                               f"remove it (or set it to its default, {json.dumps(default)})")
    if training.target_validation_accuracy is not None and model_class.task not in ("binary", "multiclass"):
        raise JobSpecError("training.target_validation_accuracy",
                           f"model '{model.name}' reports no accuracy; use target_validation_loss instead")
    if data.validation_path is None and data.validation_fraction == 0:
        for name in VALIDATION_STOP_FIELDS:
            if getattr(training, name) is not None:
                raise JobSpecError(f"training.{name}",
                                   "stops on the validation rows, but there are none: data.validation_fraction is 0 "
                                   "and data.validation_path is null. Set data.validation_fraction above 0 or "
                                   f"data.validation_path to a held-out file, or remove training.{name}")
    if data.standardize_target and model_class.task != "regression":
        kind = "a classifier, whose labels are classes" if model_class.task in ("binary", "multiclass") \
            else "a clustering model, which reads no labels"
        raise JobSpecError("data.standardize_target", f"model '{model.name}' is {kind}, so it has no regression "
                                                      "targets to standardise; set it to false or remove it")
    if data.stratify and model_class.task not in ("binary", "multiclass"):
        raise JobSpecError("data.stratify", f"model '{model.name}' has no classes to stratify by; set it to "
                                            "false or null")
    if isinstance(data.label_column, str) and not (data.format == "csv" and data.header):
        raise JobSpecError("data.label_column", f"got the name {data.label_column!r}; a column name needs "
                                                "format 'csv' with header true, otherwise give an index")
    if optimizer.schedule == "cosine" and optimizer.total_steps is None:
        raise JobSpecError("optimizer.total_steps", "missing; schedule 'cosine' needs the number of steps to "
                                                    "anneal over, usually the job's number of optimizer steps")
    if optimizer.min_learning_rate > optimizer.learning_rate:
        raise JobSpecError("optimizer.min_learning_rate", f"got {optimizer.min_learning_rate!r}; must be at most "
                                                          f"learning_rate ({optimizer.learning_rate!r})")


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
        raise JobSpecError("<root>", f"expected a JSON object, got {shown(raw)}")

    unknown = sorted(set(raw) - set(SECTIONS) - {"job_id"})
    if unknown:
        raise JobSpecError(unknown[0], f"unknown field; valid top-level fields are job_id, {', '.join(SECTIONS)}")

    job_id = raw.get("job_id", default_job_id)
    if job_id == "":
        raise JobSpecError("job_id", "is empty; use 1 to 64 letters, digits, '-' or '_', starting with a letter or "
                                     "digit, or leave job_id out so that Baton names the job")
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
        raise JobSpecError(
            "job_id", f"got {shown(job_id)}; use 1 to 64 letters, digits, '-' or '_', starting with a letter or digit")

    for required in ("model", "data"):
        if required not in raw:
            raise JobSpecError(required, "missing required section")

    sections = {name: _parse_section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()}

    data = sections["data"]
    normalised_paths = {"path": check_data_path("data.path", data.path)}
    if data.validation_path is not None:
        normalised_paths["validation_path"] = check_data_path("data.validation_path", data.validation_path)
    sections["data"] = DataSection(**{**asdict(data), **normalised_paths})
    _check_combinations(sections)

    return JobSpec(job_id=job_id, **sections)


class _RepeatedKeys(dict):
    """A decoded JSON object that named some keys more than once (kept in ``repeated``)."""

    repeated: list[str]


def _object_noting_repeats(pairs: list[tuple[str, Any]]) -> dict:
    decoded = dict(pairs)
    if len(decoded) == len(pairs):
        return decoded
    seen: set[str] = set()
    noted = _RepeatedKeys(decoded)
    noted.repeated = []
    for key, _ in pairs:
        if key in seen:
            noted.repeated.append(key)
        seen.add(key)
    return noted


def _first_repeated_key(node: Any, path: str = "") -> str | None:
    """Return the dotted path of the first key named twice in one object, or None."""
    if isinstance(node, _RepeatedKeys):
        return f"{path}{node.repeated[0]}"
    if isinstance(node, dict):
        children = [(child, f"{path}{key}.") for key, child in node.items()]
    elif isinstance(node, list):
        children = [(child, f"{path.removesuffix('.')}[{index}].") for index, child in enumerate(node)]
    else:
        return None
    for child, child_path in children:
        found = _first_repeated_key(child, child_path)
        if found is not None:
            return found
    return None


def decode_spec_json(text: str) -> Any:
    """Decode the JSON text of a job spec, rejecting a key named twice in one object.

    JSON readers disagree on which of two equal keys wins, so a spec that names
    ``learning_rate`` twice would train with a value its author may not have meant.
    Numbers keep the text they were written as (:mod:`shared.json_numbers`), so messages
    about them show that text.

    Raises
    ------
    json.JSONDecodeError
        If ``text`` is not valid JSON.
    JobSpecError
        If one object names a key twice; the field is the key's dotted path.
    """
    decoded = json_numbers.loads(text, object_pairs_hook=_object_noting_repeats)
    repeated = _first_repeated_key(decoded)
    if repeated is not None:
        raise JobSpecError(repeated, "is given more than once in the same JSON object; keep one of them")
    return decoded


def encode_job_message(value: Any) -> str:
    """Return ``value``, a job spec or one of its values, as Baton sends it to the jobs queue.

    The JSON has no spaces, and text outside ASCII stays UTF-8 (2 bytes for "é", where the
    escape ``\\u00e9`` takes 6), which keeps the body small against the
    :data:`MAX_SPEC_BYTES` limit. Only the characters SQS rejects are escaped.
    """
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return _SQS_REJECTED_CHARACTERS.sub(lambda match: f"\\u{ord(match.group()):04x}", body)


def message_bytes(body: str) -> int:
    """Return the size of a message body in UTF-8 bytes, as SQS and :data:`MAX_SPEC_BYTES` count it."""
    # surrogatepass: a lone surrogate (never in a body SQS delivered) counts 3 bytes
    # instead of raising here.
    return len(body.encode("utf-8", "surrogatepass"))


def derive_job_id(message_id: str) -> str:
    """Return the job id that Baton gives a jobs-queue message by its SQS message id.

    That is the job of a message sent without a usable ``job_id``, and the id under which
    the starter records the rejection of a message whose ``job_id`` belongs to a job of
    another spec. It is ``job-`` and the first 18 characters of the message id, such as
    ``job-5dd08062-2efd-4b22``.
    """
    return f"job-{message_id[:18]}"


def load_job_message(body: str, default_job_id: str | None = None) -> JobSpec:
    """Decode and validate the body of a jobs-queue message.

    Raises
    ------
    JobSpecError
        If the body is over :data:`MAX_SPEC_BYTES`, is not JSON, or is not a valid spec.
    """
    size = message_bytes(body)
    if size > MAX_SPEC_BYTES:
        raise JobSpecError("<root>", f"the message body is {size:,} bytes, over Baton's limit of {MAX_SPEC_BYTES:,} "
                                     f"bytes (64 KiB) for a job spec; send the spec as compact JSON, without "
                                     f"indentation or spaces, {SHRINK_SPEC_ADVICE}")
    try:
        raw = decode_spec_json(body)
    except json.JSONDecodeError as error:
        raise JobSpecError("<root>", f"body is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    except RecursionError:
        raise JobSpecError("<root>", "body nests arrays or objects too deeply to decode; a job spec nests at most "
                                     "a few levels") from None
    return parse_job_spec(raw, default_job_id=default_job_id)
