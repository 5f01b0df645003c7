"""Training maths shared by the worker and the aggregator, free of any AWS code.

A :class:`TrainingMode` decides what a worker computes in a round and how the aggregator
combines the workers' results. The service layer only moves the results between EFS and
the mode, so a new mode plugs in here without touching the message flow.

Combining is two functions: a reduction that sums the workers' results in worker order
(:func:`accumulate_vectors` and :meth:`TrainingMode.reduce_scalars`), and
:meth:`TrainingMode.step`, which turns the sums into the next parameters. The reduction
of the parameter-sized result array works element by element, so it can run on any slice
of it. The single aggregator and the scatter-reduce reducers call the same functions,
which is why both give the same bytes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.config import LAMBDA_MAX_MEMORY_MB
from shared.efs import json_preview
from shared.errors import DIVERGED_WORDS, DataError, DivergenceError, JobSpecError
from shared.models import Model, compute_class_weights, get_model_class
from shared.optim import Optimizer, OptimizerState, state_arrays, state_from_arrays
from shared.optim import build_optimizer as build_optimizer_by_name
from shared.sampling import batch_indices, initial_params_rng, rounds_per_epoch, take_rows
from shared.target_scaling import TargetScaling, loss_in_target_units, target_scaling

if TYPE_CHECKING:
    # shared.spec imports this module for the mode names, so JobSpec is for type checkers only.
    from shared.spec import JobSpec

#: Modes a job spec may choose in ``training.mode``. Statistics models such as k-means
#: always train in :class:`StatisticsMode`, whatever the spec says.
SELECTABLE_TRAINING_MODES = ("gradient_average", "model_average")

# Spec fields of the model section that are not constructor arguments of a model.
_NON_MODEL_FIELDS = ("name", "class_weight")


def build_model(spec: JobSpec, manifest: dict) -> Model:
    """Return the model a job trains, sized from its data manifest.

    For a job with standardised targets the model gets the manifest's ``target_scale``,
    which rescales its penalty (:mod:`shared.target_scaling`). That changes neither its
    predictions nor its metrics for given parameters.
    """
    model_class = get_model_class(spec.model.name)
    n_classes = len(manifest["classes"]) if manifest.get("classes") else 2
    hyperparameters = {key: value for key, value in vars(spec.model).items() if key not in _NON_MODEL_FIELDS}
    if manifest.get("target_scale") is not None:
        hyperparameters["target_scale"] = manifest["target_scale"]
    return model_class(n_features=manifest["n_features"], n_classes=n_classes, **hyperparameters)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_count_list(value) -> bool:
    return isinstance(value, list) and all(_is_count(item) for item in value)


# Each field the data preparation writes to data/manifest.json: what it must be, and its check.
MANIFEST_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "n_features": ("a positive integer", lambda value: _is_count(value) and value > 0),
    "classes": ("null or a list of at least 2 class labels",
                lambda value: value is None or (isinstance(value, list) and len(value) >= 2)),
    "class_counts": ("null or a list of row counts", lambda value: value is None or _is_count_list(value)),
    "sparse": ("true or false", lambda value: isinstance(value, bool)),
    "shard_rows": ("a list of row counts, one per worker, that adds up to at least 1 row",
                   lambda value: _is_count_list(value) and sum(value) > 0),
    "validation_rows": ("a row count", _is_count),
    "standardized": ("true or false", lambda value: isinstance(value, bool)),
}


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_file_identity_map(value) -> bool:
    """Return whether ``value`` maps names to file identities.

    An identity has an integer ``size``, ``mtime_ns`` and ``inode``, and may have an
    integer ``ctime_ns``, which manifests of earlier releases lack.
    """
    return isinstance(value, dict) and all(
        isinstance(name, str) and isinstance(identity, dict)
        and all(_is_integer(identity.get(field)) for field in ("size", "mtime_ns", "inode"))
        and ("ctime_ns" not in identity or _is_integer(identity["ctime_ns"]))
        for name, identity in value.items())


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Manifest fields that may be missing, because manifests written by earlier releases lack them.
OPTIONAL_MANIFEST_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "target_mean": ("null or a finite number", lambda value: value is None or _is_finite_number(value)),
    "target_scale": ("null or a finite number above 0",
                     lambda value: value is None or (_is_finite_number(value) and value > 0)),
    "shard_files": ("null or an object that maps each prepared file to its integer size, mtime_ns, inode and optional "
                    "ctime_ns",
                    lambda value: value is None or _is_file_identity_map(value)),
}


def manifest_problem(manifest: dict) -> str | None:
    """Return what makes a job's data manifest unusable, or None when every field is valid.

    The returned text follows the file's name in a message, as in 'has no "n_features"
    field (a positive integer)'. The handlers check a manifest once per warm process and
    job, and the commands a person runs check it on every read, since a person may have
    changed the file.
    """
    for name, (expected, is_valid) in MANIFEST_FIELDS.items():
        if name not in manifest:
            return f'has no "{name}" field ({expected})'
        if not is_valid(manifest[name]):
            return f'has "{name}": {json_preview(manifest[name])}, but it must be {expected}'
    for name, (expected, is_valid) in OPTIONAL_MANIFEST_FIELDS.items():
        if not is_valid(manifest.get(name)):
            return f'has "{name}": {json_preview(manifest[name])}, but it must be {expected}'
    if manifest.get("target_scale") is not None and manifest.get("target_mean") is None:
        return (f'has "target_scale": {json_preview(manifest["target_scale"])} but no "target_mean"; the '
                "standardised targets need both")
    classes, counts = manifest["classes"], manifest["class_counts"]
    if classes is None and counts is not None:
        return f'has "class_counts": {json_preview(counts)}, but it must be null when "classes" is null'
    if classes is not None and (counts is None or len(counts) != len(classes)):
        return (f'has "class_counts": {json_preview(counts)}, but it must contain one row count for each of the '
                f'{len(classes)} labels in "classes"')
    return None


def build_model_for_preparation(spec: JobSpec) -> Model:
    """Return a model instance good enough to check and encode labels before data is read."""
    return build_model(spec, {"n_features": 1, "classes": None})


# The parameter-sized float64 arrays a function keeps at its peak: the weights, up to two
# optimizer slots (Adam), the aggregator's running sum, the new weights and the temporaries
# of the step. Measured: an Adam job of an MLP with 35.4 million parameters peaked at
# 3,331 MiB in the aggregator, about 12 copies (8 bytes each) beyond the runtime.
PARAMETER_COPIES = 12

# Memory a function needs besides the parameter arrays, in MB: the imports alone take
# 70 MiB (bench/memory.py), and the rest covers the rows of a batch and the buffers of
# reads and writes.
RUNTIME_RESERVE_MB = 150


def check_model_fits(model: Model, worker_memory_mb: int = LAMBDA_MAX_MEMORY_MB,
                     aggregator_memory_mb: int = LAMBDA_MAX_MEMORY_MB) -> None:
    """Reject a model whose parameter arrays would not fit in the worker or aggregator function.

    Parameters
    ----------
    model : Model
    worker_memory_mb, aggregator_memory_mb : int, default=LAMBDA_MAX_MEMORY_MB
        The stack's memory settings of the two functions (:class:`shared.config.Settings`).

    Raises
    ------
    JobSpecError
        Naming the model's size, the memory that is short, and what to raise or shrink.
    """
    needed_mb = model.n_params * 8 * PARAMETER_COPIES / 2**20 + RUNTIME_RESERVE_MB
    field = "model.hidden_layer_sizes" if hasattr(model, "hidden_layer_sizes") else "model"
    shrink = "use fewer or smaller hidden layers, or fewer features or classes"
    size = (f"the model has {model.n_params:,} parameters, so its weights, optimizer state and gradients need "
            f"about {needed_mb - RUNTIME_RESERVE_MB:,.0f} MB, plus {RUNTIME_RESERVE_MB} MB for the runtime")
    if needed_mb > LAMBDA_MAX_MEMORY_MB:
        raise JobSpecError(field, f"{size}, more than the {LAMBDA_MAX_MEMORY_MB:,} MB a Lambda function can have; "
                                  f"{shrink}")
    for function, memory_mb in (("worker", worker_memory_mb), ("aggregator", aggregator_memory_mb)):
        if needed_mb > memory_mb:
            raise JobSpecError(field, f"{size}, more than the {memory_mb:,} MB of the stack's {function} function; "
                                      f"set params.{function}Memory in serverless.yml to at least "
                                      f"{math.ceil(needed_mb)} and deploy again, or {shrink}")


def build_optimizer(spec: JobSpec) -> Optimizer:
    """Return the optimizer a job uses."""
    hyperparameters = {key: value for key, value in vars(spec.optimizer).items() if key not in ("name", "betas")}
    beta_1, beta_2 = spec.optimizer.betas
    return build_optimizer_by_name(spec.optimizer.name, beta_1=beta_1, beta_2=beta_2, **hyperparameters)


def class_weights(spec: JobSpec, manifest: dict) -> np.ndarray | None:
    """Return the loss weight of each encoded class, or None when every class weighs 1.

    ``model.class_weight`` names classes by their label in the data, for example
    ``{"1": 5.0}`` for the label 1; this translates the labels to class indices.
    ``"balanced"`` uses the class counts of the training shards, recorded in the manifest.

    Raises
    ------
    JobSpecError
        If the mapping names a label that is not among the training classes.
    """
    setting = spec.model.class_weight
    if setting is None:
        return None
    classes = manifest["classes"]
    counts = np.asarray(manifest["class_counts"], dtype=np.int64)
    if isinstance(setting, str):
        # The spec accepts one string, "balanced".
        y_encoded = np.repeat(np.arange(len(classes)), counts)
        return compute_class_weights(y_encoded, len(classes), setting)

    by_index = {}
    for label, weight in setting.items():
        matches = [index for index, value in enumerate(classes) if _label_matches(label, value)]
        if not matches:
            raise JobSpecError("model.class_weight", f"label {label!r} is not one of the training classes {classes}; "
                                                     "use the labels as they are written in the data")
        by_index[matches[0]] = weight
    return compute_class_weights(np.zeros(0, dtype=np.int64), len(classes), by_index)


def _label_matches(label: str, value) -> bool:
    try:
        return float(label) == float(value)
    except (TypeError, ValueError):
        return str(label) == str(value)


def _sample_weight(weights: np.ndarray | None, y: np.ndarray) -> np.ndarray | None:
    return None if weights is None else weights[np.asarray(y, dtype=np.int64)]


def round_number(round_index: int) -> int:
    """Return the round number people read for a 0-based round index: 1 for the first round.

    Messages, DynamoDB keys, EFS round folders and log fields use the index. CLI output,
    job errors and metrics records use the number.
    """
    return round_index + 1


@dataclass(frozen=True)
class _BatchSettings:
    """The values every round of one job's workers derives from its spec and manifest."""

    spec: JobSpec
    manifest: dict
    seed: int
    batch_size: int
    per_epoch: int
    class_weights: np.ndarray | None
    # Model averaging's local steps use it; its state is passed to each step.
    optimizer: Optimizer
    target_scaling: TargetScaling | None

    def training_targets(self, y: np.ndarray) -> np.ndarray:
        """Return a batch's targets as the model trains on them: standardised when the job scales them."""
        return y if self.target_scaling is None else self.target_scaling.standardize(y)


# The settings of the last job a worker process computed a batch for. A warm worker runs
# task after task of one job with the same spec and manifest objects (the service keeps
# them per job), so the settings are derived once instead of once per chunk.
_last_batch_settings: _BatchSettings | None = None


def _batch_settings(spec: JobSpec, manifest: dict) -> _BatchSettings:
    """Return ``spec``'s and ``manifest``'s batch settings, derived again only for other objects.

    The cache compares identity, so a manifest dictionary changed in place would keep the
    old settings. Baton reads manifests from EFS and does not change them.
    """
    global _last_batch_settings
    settings = _last_batch_settings
    if settings is not None and settings.spec is spec and settings.manifest is manifest:
        return settings
    training = spec.training
    settings = _BatchSettings(spec, manifest, training.seed, training.batch_size,
                              rounds_per_epoch(manifest["shard_rows"], training.batch_size),
                              class_weights(spec, manifest), build_optimizer(spec), target_scaling(manifest))
    _last_batch_settings = settings
    return settings


# Weights beyond this magnitude count as diverged: squaring one in a loss or a metric
# would overflow float64 (whose maximum is about 1.8e308).
MAX_WEIGHT_MAGNITUDE = 1e100


# How to train a diverged job again. A resume would take the same steps, and a job id on
# EFS keeps the spec it was first trained with, so the changed spec needs a new job.
NEW_JOB_REMEDY = ("then train the changed spec as a new job: under a new job_id (--job-id), or with `baton run "
                  "--fresh`, which deletes this job's local files first")


def divergence_remedy(spec: JobSpec | None, regression: bool = False) -> str:
    """Return the changes that usually stop a divergence, most likely first, and how to train the job again.

    A regression model trains on targets in their own units unless ``data.standardize_target``
    is set. Targets of a large spread make its steps far too large at any usual learning
    rate, so that setting comes first when the spec lacks it. ``spec`` None (where only the
    round's metrics are known) suggests it for a ``regression`` model whose spec may lack it.
    """
    step_size = "lower optimizer.learning_rate (or set optimizer.clip_norm)"
    if spec is not None:
        regression = get_model_class(spec.model.name).task == "regression"
    if regression and spec is None:
        return (f"unless the spec sets data.standardize_target, set it to true, so that the model trains on targets "
                f"of unit spread; if the job still diverges, {step_size}; {NEW_JOB_REMEDY}")
    if regression and spec is not None and not spec.data.standardize_target:
        return (f"set data.standardize_target to true, which the spec leaves false, so that the model trains on "
                f"targets of unit spread; if the job still diverges, {step_size}; {NEW_JOB_REMEDY}")
    return f"{step_size}; {NEW_JOB_REMEDY}"


def _check_finite(round_index: int, train_loss: float, params: np.ndarray, spec: JobSpec) -> None:
    with np.errstate(invalid="ignore"):
        too_large = not np.all(np.abs(params) <= MAX_WEIGHT_MAGNITUDE)
    if not math.isfinite(train_loss) or too_large:
        # In round 1 the loss comes from the first steps alone, so huge values in the data,
        # the labels or the penalty are as likely a cause as the step size.
        first_round_hint = ("; as this is round 1, also check for huge values in the features or labels "
                            "(data.standardize, and data.standardize_target for regression targets), model.alpha "
                            "and the class weights") if round_index == 0 else ""
        raise DivergenceError(
            f"{DIVERGED_WORDS} {round_number(round_index)}: the loss or a weight became NaN, infinite "
            f"or above {MAX_WEIGHT_MAGNITUDE:g} in magnitude "
            f"(training loss {train_loss!r}); {divergence_remedy(spec)}{first_round_hint}")


def check_validation_finite(round_index: int, metrics: dict[str, float], spec: JobSpec | None = None) -> None:
    """Raise :class:`DivergenceError` if a validation metric of the round is NaN or infinite.

    A model whose weights stay below :data:`MAX_WEIGHT_MAGNITUDE` can still overflow its
    validation loss, as a multilayer perceptron's outputs grow with the product of its
    layers' weights. Without ``spec``, a round with a ``validation_r2`` counts as one of a
    regression model for the message's remedy.
    """
    for name, value in metrics.items():
        if name.startswith("validation_") and not math.isfinite(value):
            raise DivergenceError(
                f"{DIVERGED_WORDS} {round_number(round_index)}: {name} became {value!r} while the "
                f"training loss was {metrics['train_loss']!r}; "
                f"{divergence_remedy(spec, regression='validation_r2' in metrics)}")


@dataclass(frozen=True)
class RoundUpdate:
    """New parameters, optimizer state and training loss after combining one round."""

    params: np.ndarray
    optimizer_state: OptimizerState
    train_loss: float
    n_samples: int


# Elements per block of a reduction. The block of the running total stays in the CPU cache
# while every worker's block is added to it, so each worker's vector is read from memory
# once. The block size does not change the sums: each element still adds the workers in
# worker order. Blocks of 1 MiB summed 1 and 10 MB vectors 5 to 15 % faster than 256 KiB
# blocks on a 2-core AMD EPYC machine, because numpy makes fewer calls and reads longer runs.
REDUCTION_BLOCK_ELEMENTS = 131072


def accumulate_vectors(factors: Sequence[float | None], vectors: Sequence[np.ndarray], total: np.ndarray) -> None:
    """Write the sum of ``factor * vector`` over the workers, in worker order, into ``total``.

    Parameters
    ----------
    factors : sequence of float or None
        One per worker, from :meth:`TrainingMode.vector_factors`. 1.0 adds the vector as
        it is; None skips the worker.
    vectors : sequence of ndarray
        One float64 array per worker, each as long as ``total``: the whole result vector
        or one slice of it. Memory-mapped files work, and only the pages read are loaded.
    total : ndarray of float64
        Overwritten with the sums, so its contents before the call do not matter. Element
        ``i`` ends as ``((0 + f_0 * v_0[i]) + f_1 * v_1[i]) + ...``, whatever slice of the
        parameters ``total`` stands for, and is 0.0 when every worker is skipped.
    """
    length = len(total)
    added = [(factor, vector) for factor, vector in zip(factors, vectors) if factor is not None]
    if not added:
        total.fill(0.0)
        return
    # The buffer for factor * vector is allocated only when a factor needs it. With an unused
    # 1 MiB buffer, glibc's malloc gave the freed memory back to the kernel after each call,
    # so each new 1 MB total took about 200 page faults (some 200 µs on a 2-core AMD EPYC VM).
    scratch = None
    if any(factor != 1.0 for factor, _ in added):
        scratch = np.empty(min(length, REDUCTION_BLOCK_ELEMENTS), dtype=np.float64)
    # Overflow to inf is reported by the mode's step, with the round, as divergence.
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, length, REDUCTION_BLOCK_ELEMENTS):
            stop = min(start + REDUCTION_BLOCK_ELEMENTS, length)
            block = total[start:stop]
            for index, (factor, vector) in enumerate(added):
                add_scaled_vector(block, factor, vector[start:stop], scratch, first=index == 0)


def add_scaled_vector(total: np.ndarray, factor: float | None, vector: np.ndarray, scratch: np.ndarray | None,
                      first: bool = False) -> None:
    """Add ``factor * vector`` into ``total`` in place: one worker's step of :func:`accumulate_vectors`.

    A reduction that reads one worker's vector at a time calls this once per worker and
    gets the same sums as :func:`accumulate_vectors`. ``scratch`` is a float64 array at
    least as long as ``total``, for a factor other than 1.0 (None when the factor is 1.0
    or None); a factor of None adds nothing.

    ``first`` is True for the first worker whose factor is not None. ``total`` is then
    overwritten with ``0.0 + factor * vector``, which gives the bytes of adding into zeros
    without a pass that writes the zeros, because IEEE 754 addition is commutative and
    turns -0.0 into 0.0 in either order. Callers wrap the calls in
    ``np.errstate(over="ignore", invalid="ignore")``, because the mode's step reports an
    overflow as divergence.
    """
    if factor is None:
        return
    if factor == 1.0:
        weighted = vector
    else:
        assert scratch is not None  # the caller passes one whenever a factor is not 1.0
        weighted = scratch[:len(total)]
        np.multiply(vector, factor, out=weighted)
    if first:
        np.add(weighted, 0.0, out=total)
    else:
        np.add(total, weighted, out=total)


@dataclass(frozen=True)
class Reduction:
    """The sums over a round's workers: one slice of the result vector and the small totals.

    ``vector`` covers parameters ``[start, start + len(vector))`` of the round. ``scalars``
    are the mode's totals of the small result arrays (:meth:`TrainingMode.reduce_scalars`).
    """

    vector: np.ndarray
    scalars: dict[str, np.ndarray]


def split_result(mode: "TrainingMode", arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return a worker result's vector as flat float64 and its other, small arrays."""
    vector = np.ravel(np.asarray(arrays[mode.vector_name], dtype=np.float64))
    scalars = {name: value for name, value in arrays.items() if name != mode.vector_name}
    return vector, scalars


def reduce_results(mode: "TrainingMode", results: Sequence[Mapping[str, np.ndarray]], start: int,
                   stop: int) -> Reduction:
    """Reduce in-memory worker results, given in worker order, over parameters ``[start, stop)``."""
    parts = [split_result(mode, arrays) for arrays in results]
    scalars = [part[1] for part in parts]
    total = np.empty(stop - start, dtype=np.float64)
    accumulate_vectors(mode.vector_factors(scalars), [part[0][start:stop] for part in parts], total)
    return Reduction(vector=total, scalars=mode.reduce_scalars(scalars))


class TrainingMode(ABC):
    """What workers compute in a round and how the aggregator combines it.

    A worker's share of a round is processed as a sequence of steps over a ``progress``
    dictionary of arrays: :meth:`begin` creates it, each :meth:`advance` does one bounded
    piece of work (a chunk of rows, or one local step), and :meth:`finish` turns it into
    the result the aggregator reads. The arithmetic depends only on the step boundaries
    the mode chooses, never on how many steps fit in one invocation, so a worker that
    saves ``progress`` and continues in a new invocation produces identical bytes.
    """

    name: str

    @abstractmethod
    def begin(self, spec: JobSpec, manifest: dict, model: Model, params: np.ndarray, shard,
              round_index: int, worker: int) -> dict[str, np.ndarray]:
        """Return the progress of worker ``worker`` before its first step of the round.

        Parameters
        ----------
        spec : JobSpec
        manifest : dict
            The job's data manifest (``data/manifest.json``): shard rows, features, classes.
        model : Model
        params : ndarray of shape (n_params,)
            The parameters stored in the round's state file. Not modified.
        shard : shared.shards.Shard
            The worker's memory-mapped training rows.
        round_index : int
            The round, from 0.
        worker : int
            The worker, from 0; with the seed and the round it decides the batch.
        """

    @abstractmethod
    def advance(self, spec: JobSpec, manifest: dict, model: Model, params: np.ndarray, shard,
                round_index: int, worker: int, progress: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
        """Do one step; return the new progress and whether the worker's share is complete.

        The parameters are those of :meth:`begin`, and ``progress`` is what :meth:`begin`
        or the previous :meth:`advance` returned. It is not modified, so a step that fails
        halfway leaves the saved progress as it was.
        """

    @abstractmethod
    def finish(self, progress: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the worker's result arrays from its completed progress."""

    #: The result array with one value per parameter, which reducers split into slices.
    #: Every other result array is small and is summed whole.
    vector_name: str

    def vector_factors(self, scalars: Sequence[Mapping[str, np.ndarray]]) -> list[float | None]:
        """Return each worker's factor on its vector in the sum: 1.0 adds it unchanged, None skips it.

        ``scalars`` are the workers' small result arrays, in worker order. A worker's factor
        depends on its own arrays only, so a reduction that reads one worker at a time
        computes one factor at a time.
        """
        return [1.0] * len(scalars)

    @abstractmethod
    def reduce_scalars(self, scalars: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Return the sums over workers, in worker order, of the small result arrays."""

    @abstractmethod
    def step(self, spec: JobSpec, model: Model, optimizer: Optimizer, params: np.ndarray,
             optimizer_state: OptimizerState, reduction: Reduction, round_index: int) -> RoundUpdate:
        """Turn the reduction of a whole round (every parameter) into the next parameters.

        Raises
        ------
        DivergenceError
            If the new parameters or the training loss are NaN or infinite; the message
            names the round.
        """

    def combine(self, spec: JobSpec, model: Model, optimizer: Optimizer, params: np.ndarray,
                optimizer_state: OptimizerState, results: list[dict[str, np.ndarray]], round_index: int) -> RoundUpdate:
        """Combine the workers' results, given in worker order, into the next parameters.

        :func:`reduce_results` over every parameter, then :meth:`step`.

        Raises
        ------
        DivergenceError
            If the new parameters or the training loss are NaN or infinite; the message
            names the round.
        """
        reduction = reduce_results(self, results, 0, len(params))
        return self.step(spec, model, optimizer, params, optimizer_state, reduction, round_index)

    def worker_result(self, spec: JobSpec, manifest: dict, model: Model, params: np.ndarray, shard,
                      round_index: int, worker: int) -> dict[str, np.ndarray]:
        """Run every step of a worker's share in one go; for the reference and for tests."""
        progress = self.begin(spec, manifest, model, params, shard, round_index, worker)
        done = False
        while not done:
            progress, done = self.advance(spec, manifest, model, params, shard, round_index, worker, progress)
        return self.finish(progress)

    def batches_per_round(self, spec: JobSpec, manifest: dict) -> int:
        """Return how many mini-batches of ``training.batch_size`` rows a worker processes per round."""
        return 1

    def total_rounds(self, spec: JobSpec, manifest: dict) -> int:
        """Return the number of rounds after which the job stops, at most ``training.max_rounds``."""
        per_epoch = rounds_per_epoch(manifest["shard_rows"], spec.training.batch_size)
        batches = max(1, math.ceil(spec.training.max_epochs * per_epoch))
        rounds = math.ceil(batches / self.batches_per_round(spec, manifest))
        return rounds if spec.training.max_rounds is None else min(rounds, spec.training.max_rounds)

    def epochs_after_round(self, spec: JobSpec, manifest: dict, round_index: int) -> float:
        """Return the passes over the training rows completed once round ``round_index`` is done."""
        per_epoch = rounds_per_epoch(manifest["shard_rows"], spec.training.batch_size)
        return (round_index + 1) * self.batches_per_round(spec, manifest) / per_epoch

    def initial_params(self, spec: JobSpec, manifest: dict, model: Model,
                       load_sample: Callable[[int], object]) -> np.ndarray:
        """Return the parameters of round 0.

        ``load_sample(max_rows)`` returns up to ``max_rows`` training rows; it is called
        only by models whose start depends on the data. A regression model's output bias,
        its last parameter, starts at the mean of the training targets (the manifest's
        ``target_mean``), where a least-squares intercept lands for centred features.
        Targets far from zero then need no long walk of the bias. An optimizer whose step
        is bounded by its learning rate, such as Adam, would need far more rounds for it
        than a job runs. Standardised targets (``data.standardize_target``) have mean 0,
        so there the bias keeps the model's own start, 0.
        """
        params = model.init_params(initial_params_rng(spec.training.seed))
        if model.task == "regression" and manifest.get("target_mean") is not None \
                and target_scaling(manifest) is None:
            params[-1] = manifest["target_mean"]
        return params


_INT64_ZERO = np.int64(0)
_FLOAT64_ZERO = np.float64(0.0)

# Rows per step of a gradient computation. A constant, not a setting of the machine, so
# that results are bitwise identical however a worker's share is split into invocations.
GRADIENT_CHUNK_ROWS = 4096


class GradientAveraging(TrainingMode):
    """Each worker returns the summed gradient of one mini-batch; the aggregator takes one step.

    The batch is processed in chunks of :data:`GRADIENT_CHUNK_ROWS` rows, summed in order.
    Class weights enter as per-row sample weights; the mean still divides by the row count.
    """

    name = "gradient_average"
    vector_name = "grad_sum"

    def begin(self, spec, manifest, model, params, shard, round_index, worker):
        # numpy scalars are immutable, so every round can share the zeros.
        return {"position": _INT64_ZERO, "grad_sum": np.zeros(model.n_params, dtype=np.float64),
                "loss_sum": _FLOAT64_ZERO, "n_samples": _INT64_ZERO}

    def advance(self, spec, manifest, model, params, shard, round_index, worker, progress):
        settings = _batch_settings(spec, manifest)
        rows = batch_indices(settings.seed, round_index, worker, shard.n_rows, settings.per_epoch, settings.batch_size)
        position = int(progress["position"])
        chunk = rows[position:position + GRADIENT_CHUNK_ROWS]
        grad_sum, loss_sum = progress["grad_sum"], float(progress["loss_sum"])
        # Only the empty batch of a shard one row short of the largest has no rows here, and
        # its sums stay the zeros of begin.
        if len(chunk):
            y_chunk = take_rows(shard.y, chunk)
            # Rows gathered straight into float64, which the model would otherwise convert.
            loss, grad = model.loss_grad(params, shard.rows(chunk, dtype=np.float64),
                                         settings.training_targets(y_chunk),
                                         _sample_weight(settings.class_weights, y_chunk))
            grad_sum = np.add(grad_sum, grad, out=grad)
            loss_sum += loss
        stop = position + len(chunk)
        # Every row of the batch so far is counted once, so the row count is the position.
        rows_done = np.int64(stop)
        new_progress = {"position": rows_done, "grad_sum": grad_sum, "loss_sum": np.float64(loss_sum),
                        "n_samples": rows_done}
        return new_progress, stop >= len(rows)

    def finish(self, progress):
        return {"grad_sum": progress["grad_sum"], "loss_sum": np.float64(progress["loss_sum"]),
                "n_samples": np.int64(progress["n_samples"])}

    def reduce_scalars(self, scalars):
        loss_total = 0.0
        n_samples = 0
        for arrays in scalars:
            loss_total += float(arrays["loss_sum"])
            n_samples += int(arrays["n_samples"])
        return {"loss_sum": np.float64(loss_total), "n_samples": np.int64(n_samples)}

    def step(self, spec, model, optimizer, params, optimizer_state, reduction, round_index):
        """Take one optimizer step on the mean gradient of the round.

        The mean gradient is ``sum(grad_sum) / sum(n_samples)`` plus the penalty's
        gradient, so the step does not depend on how rows were split between workers. A
        model with an L1 term applied by soft-thresholding (``l1_method="proximal"``) is
        thresholded after the step with that step's learning rate. The training loss is
        in the targets' units (:func:`~shared.target_scaling.loss_in_target_units`).
        """
        n_samples = int(reduction.scalars["n_samples"])
        if n_samples == 0:
            raise DivergenceError(f"round {round_number(round_index)} drew no rows from any worker; "
                                  "increase training.batch_size")

        penalty, penalty_grad = model.penalty_grad(params)
        grad = reduction.vector / n_samples + penalty_grad
        train_loss = loss_in_target_units(model, float(reduction.scalars["loss_sum"]) / n_samples + penalty)

        new_params, new_state = optimizer.step(params, grad, optimizer_state, round_index)
        new_params = model.proximal(new_params, optimizer.learning_rate_at(round_index))
        _check_finite(round_index, train_loss, new_params, spec)
        return RoundUpdate(params=new_params, optimizer_state=new_state, train_loss=train_loss, n_samples=n_samples)


class ModelAveraging(TrainingMode):
    """Each worker takes several optimizer steps from the round's parameters; the aggregator averages the models.

    In round ``r`` a worker starts from the round's parameters and a fresh optimizer
    state and takes ``k`` steps, one per mini-batch, where ``k`` is
    ``training.local_steps``, or the batches in one pass over the shard when
    ``training.local_epoch`` is true. Local step ``j`` uses the batch that gradient
    averaging would use in round ``r * k + j``, so the workers walk through their shards
    at the same pace in both modes, and the learning-rate schedule is read at that same
    global step index. The aggregator averages the workers' final parameters weighted by
    the rows each one processed. One :meth:`advance` is one local step.

    Notes
    -----
    Momentum, Adam moments and Adagrad sums restart from zero every round, because a
    worker reads only the round's parameters, and Adam's bias correction counts the
    local steps. The aggregator stores no optimizer state of its own.
    """

    name = "model_average"
    vector_name = "params"

    def batches_per_round(self, spec, manifest):
        if spec.training.local_epoch:
            return rounds_per_epoch(manifest["shard_rows"], spec.training.batch_size)
        return spec.training.local_steps

    def begin(self, spec, manifest, model, params, shard, round_index, worker):
        optimizer_state = _batch_settings(spec, manifest).optimizer.init_state(params)
        return {
            "step": np.int64(0),
            "params": np.array(params, dtype=np.float64),
            "loss_sum": np.float64(0.0),
            "n_samples": np.int64(0),
            **state_arrays(optimizer_state),
        }

    def advance(self, spec, manifest, model, params, shard, round_index, worker, progress):
        settings = _batch_settings(spec, manifest)
        optimizer = settings.optimizer
        steps = self.batches_per_round(spec, manifest)
        step = int(progress["step"])
        global_step = round_index * steps + step
        rows = batch_indices(settings.seed, global_step, worker, shard.n_rows, settings.per_epoch,
                             settings.batch_size)

        local_params = progress["params"]
        state = state_from_arrays(progress)
        loss_sum, n_samples = float(progress["loss_sum"]), int(progress["n_samples"])

        # A shard one row shorter than the largest can draw an empty last batch; it skips the step.
        # A worker whose weights already overflowed stops stepping, and the aggregator reports it.
        if len(rows) > 0 and np.all(np.isfinite(local_params)):
            y_batch = take_rows(shard.y, rows)
            batch_loss, batch_grad = model.loss_grad(local_params, shard.rows(rows, dtype=np.float64),
                                                     settings.training_targets(y_batch),
                                                     _sample_weight(settings.class_weights, y_batch))
            _, penalty_grad = model.penalty_grad(local_params)
            grad = batch_grad / len(rows) + penalty_grad
            with np.errstate(over="ignore", invalid="ignore"):
                local_params, state = optimizer.step(local_params, grad, state, step, schedule_index=global_step)
            local_params = model.proximal(local_params, optimizer.learning_rate_at(global_step))
            loss_sum += batch_loss
            n_samples += len(rows)

        new_progress = {
            "step": np.int64(step + 1),
            "params": local_params,
            "loss_sum": np.float64(loss_sum),
            "n_samples": np.int64(n_samples),
            **state_arrays(state),
        }
        return new_progress, step + 1 >= steps

    def finish(self, progress):
        return {"params": progress["params"], "loss_sum": progress["loss_sum"], "n_samples": progress["n_samples"]}

    def vector_factors(self, scalars):
        # Each model is weighted by its rows; a worker that drew no rows is left out.
        return [None if int(arrays["n_samples"]) == 0 else float(int(arrays["n_samples"])) for arrays in scalars]

    def reduce_scalars(self, scalars):
        loss_sum, n_samples = 0.0, 0
        for arrays in scalars:
            rows = int(arrays["n_samples"])
            if rows == 0:
                continue
            loss_sum += float(arrays["loss_sum"])
            n_samples += rows
        return {"loss_sum": np.float64(loss_sum), "n_samples": np.int64(n_samples)}

    def step(self, spec, model, optimizer, params, optimizer_state, reduction, round_index):
        """Return the row-weighted mean of the workers' models, with the training loss in the targets' units."""
        n_samples = int(reduction.scalars["n_samples"])
        if n_samples == 0:
            raise DivergenceError(f"round {round_number(round_index)} drew no rows from any worker; "
                                  "increase training.batch_size")

        with np.errstate(over="ignore", invalid="ignore"):
            new_params = reduction.vector / n_samples
        penalty, _ = model.penalty_grad(new_params) if np.all(np.isfinite(new_params)) else (math.inf, None)
        train_loss = loss_in_target_units(model, float(reduction.scalars["loss_sum"]) / n_samples + penalty)
        _check_finite(round_index, train_loss, new_params, spec)
        return RoundUpdate(params=new_params, optimizer_state=optimizer_state, train_loss=train_loss,
                           n_samples=n_samples)


# Rows that k-means++ initialisation reads at job start, at most.
KMEANS_INIT_SAMPLE_ROWS = 20_000


class StatisticsMode(TrainingMode):
    """Each worker sums a model's statistics over its whole shard; the aggregator combines them.

    For k-means a round is one Lloyd iteration over every training row: the workers
    return per-centroid row sums and counts, and the aggregator moves every centroid to
    the mean of its rows. One :meth:`advance` handles :data:`GRADIENT_CHUNK_ROWS` rows.
    Round 0 starts from k-means++ on a sample of at most :data:`KMEANS_INIT_SAMPLE_ROWS`
    training rows taken evenly from the shards.
    """

    name = "statistics"
    vector_name = "sums"

    def batches_per_round(self, spec, manifest):
        return rounds_per_epoch(manifest["shard_rows"], spec.training.batch_size)

    def initial_params(self, spec, manifest, model, load_sample):
        sample = load_sample(KMEANS_INIT_SAMPLE_ROWS)
        return model.init_params_from_data(sample, initial_params_rng(spec.training.seed))

    def begin(self, spec, manifest, model, params, shard, round_index, worker):
        empty = model.partial_statistics(params, shard.rows(slice(0, 0)))
        return {"position": np.int64(0), "n_samples": np.int64(0),
                **{name: np.zeros_like(value) for name, value in empty.items()}}

    def advance(self, spec, manifest, model, params, shard, round_index, worker, progress):
        position = int(progress["position"])
        stop = min(position + GRADIENT_CHUNK_ROWS, shard.n_rows)
        new_progress = dict(progress)
        if stop > position:
            part = model.partial_statistics(params, shard.rows(slice(position, stop)))
            for name, value in part.items():
                new_progress[name] = progress[name] + value
        new_progress["position"] = np.int64(stop)
        new_progress["n_samples"] = np.int64(int(progress["n_samples"]) + stop - position)
        return new_progress, stop >= shard.n_rows

    def finish(self, progress):
        return {name: value for name, value in progress.items() if name != "position"}

    def reduce_scalars(self, scalars):
        n_samples = 0
        counts = np.zeros_like(np.asarray(scalars[0]["counts"], dtype=np.float64))
        inertia = 0.0
        for arrays in scalars:
            n_samples += int(arrays["n_samples"])
            np.add(counts, np.asarray(arrays["counts"], dtype=np.float64), out=counts)
            inertia += float(arrays["inertia"][0])
        return {"n_samples": np.int64(n_samples), "counts": counts, "inertia": np.array([inertia])}

    def step(self, spec, model, optimizer, params, optimizer_state, reduction, round_index):
        """Apply the model's update to the summed statistics, for k-means one Lloyd step."""
        n_samples = int(reduction.scalars["n_samples"])
        if n_samples == 0:
            raise DataError(f"round {round_number(round_index)} saw no training rows; check the data set")
        counts = reduction.scalars["counts"]
        totals = {"sums": reduction.vector.reshape(len(counts), -1), "counts": counts}
        new_params = model.combine_statistics([totals], params)
        train_loss = float(reduction.scalars["inertia"][0]) / n_samples
        _check_finite(round_index, train_loss, new_params, spec)
        return RoundUpdate(params=new_params, optimizer_state=optimizer_state, train_loss=train_loss,
                           n_samples=n_samples)


TRAINING_MODES: dict[str, TrainingMode] = {
    mode.name: mode for mode in (GradientAveraging(), ModelAveraging(), StatisticsMode())}


def get_training_mode(spec: JobSpec, model: Model) -> TrainingMode:
    """Return the training mode a job uses: statistics for models such as k-means, else ``training.mode``."""
    if model.training_mode == "statistics":
        return TRAINING_MODES[StatisticsMode.name]
    return TRAINING_MODES[spec.training.mode]


# Stopping rules ----------------------------------------------------------------------


@dataclass(frozen=True)
class StoppingState:
    """The best validation loss so far and the round that reached it, carried from round to round."""

    best_validation_loss: float | None = None
    best_round: int | None = None

    def to_dict(self) -> dict:
        return {"best_validation_loss": self.best_validation_loss, "best_round": self.best_round}

    @classmethod
    def from_dict(cls, values: dict | None) -> "StoppingState":
        values = values or {}
        return cls(values.get("best_validation_loss"), values.get("best_round"))


def check_stopping(spec: JobSpec, metrics: dict, state: StoppingState) -> tuple[StoppingState, str | None]:
    """Apply the spec's stopping rules to the metrics of one aggregated round.

    Parameters
    ----------
    spec : JobSpec
    metrics : dict
        The round's metrics: ``round`` (the round number, from 1) and, when the job has
        validation rows, ``validation_loss`` and ``validation_accuracy``.
    state : StoppingState
        The state returned for the previous round; ``StoppingState()`` for the first round.

    Returns
    -------
    state : StoppingState
        To pass in with the next round's metrics.
    reason : str or None
        ``"target_loss"``, ``"target_accuracy"`` or ``"early_stopping"`` when the job
        should stop after this round, else None. The round limit is not checked here.
    """
    training = spec.training
    current_round = int(metrics["round"])
    loss = metrics.get("validation_loss")
    accuracy = metrics.get("validation_accuracy")

    if loss is not None and (state.best_validation_loss is None or loss < state.best_validation_loss):
        state = StoppingState(best_validation_loss=float(loss), best_round=current_round)

    if training.target_validation_loss is not None and loss is not None and loss <= training.target_validation_loss:
        return state, "target_loss"
    if (training.target_validation_accuracy is not None and accuracy is not None
            and accuracy >= training.target_validation_accuracy):
        return state, "target_accuracy"
    if (training.early_stopping_patience is not None and state.best_round is not None
            and current_round - state.best_round >= training.early_stopping_patience):
        return state, "early_stopping"
    return state, None
