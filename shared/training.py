"""Training maths shared by the worker and the aggregator, free of any AWS code."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.errors import DivergenceError
from shared.models import Model, get_model_class
from shared.optim import OPTIMIZERS, Optimizer, OptimizerState
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
    return OPTIMIZERS[spec.optimizer.name](**hyperparameters)


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
