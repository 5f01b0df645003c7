"""Training maths shared by the worker and the aggregator, free of any AWS code.

A :class:`TrainingMode` decides what a worker computes in a round and how the aggregator
combines the workers' results. The service layer only moves the results between EFS and
the mode, so a new mode plugs in here without touching the message flow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from shared.errors import DivergenceError
from shared.models import Model, get_model_class
from shared.optim import Optimizer, OptimizerState
from shared.optim import build_optimizer as build_optimizer_by_name
from shared.sampling import batch_indices, rounds_per_epoch
from shared.spec import JobSpec


def build_model(spec: JobSpec, manifest: dict) -> Model:
    """Return the model a job trains, sized from its data manifest."""
    model_class = get_model_class(spec.model.name)
    n_classes = len(manifest["classes"]) if manifest.get("classes") else 2
    hyperparameters = {key: value for key, value in vars(spec.model).items() if key not in ("name",)}
    return model_class(n_features=manifest["n_features"], n_classes=n_classes, **hyperparameters)


def build_model_for_preparation(spec: JobSpec) -> Model:
    """Return a model instance good enough to check and encode labels before data is read."""
    return build_model(spec, {"n_features": 1, "classes": None})


def build_optimizer(spec: JobSpec) -> Optimizer:
    """Return the optimizer a job uses."""
    hyperparameters = {key: value for key, value in vars(spec.optimizer).items() if key != "name"}
    return build_optimizer_by_name(spec.optimizer.name, **hyperparameters)


@dataclass(frozen=True)
class WorkerResult:
    """What one worker contributes to a round."""

    grad_sum: np.ndarray
    loss_sum: float
    n_samples: int

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "grad_sum": self.grad_sum,
            "loss_sum": np.float64(self.loss_sum),
            "n_samples": np.int64(self.n_samples),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "WorkerResult":
        return cls(grad_sum=arrays["grad_sum"], loss_sum=float(arrays["loss_sum"]), n_samples=int(arrays["n_samples"]))


def compute_worker_result(model: Model, params: np.ndarray, X, y: np.ndarray) -> WorkerResult:
    """Return the summed loss and gradient of ``model`` on one mini-batch."""
    if X.shape[0] == 0:
        return WorkerResult(grad_sum=np.zeros_like(params), loss_sum=0.0, n_samples=0)
    loss_sum, grad_sum = model.loss_grad(params, X, y)
    return WorkerResult(grad_sum=grad_sum, loss_sum=loss_sum, n_samples=int(X.shape[0]))


@dataclass(frozen=True)
class RoundUpdate:
    """The outcome of combining one round."""

    params: np.ndarray
    optimizer_state: OptimizerState
    train_loss: float
    n_samples: int


def apply_round(model: Model, optimizer: Optimizer, params: np.ndarray, optimizer_state: OptimizerState,
                results: list[WorkerResult], round_index: int) -> RoundUpdate:
    """Combine the workers' results in worker order and take one optimizer step.

    The mean gradient is ``sum(grad_sum) / sum(n_samples)`` plus the penalty's gradient,
    so the step does not depend on how rows were split between workers.

    Raises
    ------
    DivergenceError
        If the loss or the new parameters are NaN or infinite.
    """
    grad_total = np.zeros_like(params)
    loss_total = 0.0
    n_samples = 0
    for result in results:
        grad_total += result.grad_sum
        loss_total += result.loss_sum
        n_samples += result.n_samples
    if n_samples == 0:
        raise DivergenceError(f"round {round_index} drew no rows from any worker; increase training.batch_size")

    penalty, penalty_grad = model.penalty_grad(params)
    grad = grad_total / n_samples + penalty_grad
    train_loss = loss_total / n_samples + penalty

    new_params, new_state = optimizer.step(params, grad, optimizer_state, round_index)
    if not np.isfinite(train_loss) or not np.all(np.isfinite(new_params)):
        raise DivergenceError(
            f"training diverged in round {round_index}: the loss or a weight became NaN or infinite "
            f"(training loss {train_loss!r}); lower optimizer.learning_rate and start a new job")
    return RoundUpdate(params=new_params, optimizer_state=new_state, train_loss=train_loss, n_samples=n_samples)


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
        """Return the progress of worker ``worker`` before its first step of the round."""

    @abstractmethod
    def advance(self, spec: JobSpec, manifest: dict, model: Model, params: np.ndarray, shard,
                round_index: int, worker: int, progress: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
        """Do one step; return the new progress and whether the worker's share is complete."""

    @abstractmethod
    def finish(self, progress: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the worker's result arrays from its completed progress."""

    @abstractmethod
    def combine(self, spec: JobSpec, model: Model, optimizer: Optimizer, params: np.ndarray,
                optimizer_state: OptimizerState, results: list[dict[str, np.ndarray]], round_index: int) -> RoundUpdate:
        """Combine the workers' results, given in worker order, into the next parameters."""

    def worker_result(self, spec: JobSpec, manifest: dict, model: Model, params: np.ndarray, shard,
                      round_index: int, worker: int) -> dict[str, np.ndarray]:
        """Run every step of a worker's share in one go; for the reference and for tests."""
        progress = self.begin(spec, manifest, model, params, shard, round_index, worker)
        done = False
        while not done:
            progress, done = self.advance(spec, manifest, model, params, shard, round_index, worker, progress)
        return self.finish(progress)


# Rows per step of a gradient computation. A constant, not a setting of the machine, so
# that results are bitwise identical however a worker's share is split into invocations.
GRADIENT_CHUNK_ROWS = 4096


class GradientAveraging(TrainingMode):
    """Each worker returns the summed gradient of one mini-batch; the aggregator takes one step.

    The batch is processed in chunks of :data:`GRADIENT_CHUNK_ROWS` rows, summed in order.
    """

    name = "gradient_average"

    def _batch_rows(self, spec, manifest, shard, round_index, worker) -> np.ndarray:
        per_epoch = rounds_per_epoch(manifest["shard_rows"], spec.training.batch_size)
        return batch_indices(spec.training.seed, round_index, worker, shard.n_rows, per_epoch, spec.training.batch_size)

    def begin(self, spec, manifest, model, params, shard, round_index, worker):
        return {
            "position": np.int64(0),
            "grad_sum": np.zeros(model.n_params, dtype=np.float64),
            "loss_sum": np.float64(0.0),
            "n_samples": np.int64(0),
        }

    def advance(self, spec, manifest, model, params, shard, round_index, worker, progress):
        rows = self._batch_rows(spec, manifest, shard, round_index, worker)
        position = int(progress["position"])
        chunk = rows[position:position + GRADIENT_CHUNK_ROWS]
        part = compute_worker_result(model, params, shard.X[chunk], np.asarray(shard.y[chunk]))
        new_progress = {
            "position": np.int64(position + len(chunk)),
            "grad_sum": progress["grad_sum"] + part.grad_sum,
            "loss_sum": np.float64(float(progress["loss_sum"]) + part.loss_sum),
            "n_samples": np.int64(int(progress["n_samples"]) + part.n_samples),
        }
        return new_progress, position + len(chunk) >= len(rows)

    def finish(self, progress):
        return WorkerResult(grad_sum=progress["grad_sum"], loss_sum=float(progress["loss_sum"]),
                            n_samples=int(progress["n_samples"])).to_arrays()

    def combine(self, spec, model, optimizer, params, optimizer_state, results, round_index):
        worker_results = [WorkerResult.from_arrays(arrays) for arrays in results]
        return apply_round(model, optimizer, params, optimizer_state, worker_results, round_index)


TRAINING_MODES: dict[str, TrainingMode] = {mode.name: mode for mode in (GradientAveraging(),)}


def get_training_mode(spec: JobSpec, model: Model) -> TrainingMode:
    """Return the training mode a job uses."""
    return TRAINING_MODES[GradientAveraging.name]
