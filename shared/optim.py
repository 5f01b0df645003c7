"""Optimizers and learning-rate schedules over a flat parameter vector, in pure numpy.

An optimizer is stateless code plus a state dictionary of arrays that the aggregator keeps
on EFS between rounds, so a round can be replayed from its checkpoint and give the same
bytes. Every state value is a float64 ndarray shaped like the parameters, so the state
round-trips through ``numpy.savez`` and ``numpy.load`` unchanged.

Each step first clips the gradient by its global norm (when ``clip_norm`` is set), then
reads the learning rate of the step from the schedule, then applies the update rule.
Models with a non-smooth penalty expect the training loop to call
``model.proximal(params, optimizer.learning_rate_at(step_index))`` after the step.

A job spec's optimizer section maps onto :func:`build_optimizer`, for example
``{"name": "adam", "learning_rate": 0.01, "schedule": "cosine", "total_steps": 1000}``.
The spec's fields are the one source of every parameter's default and valid range
(:class:`shared.spec.OptimizerSection`, listed in docs/job-spec.md). The classes take each
parameter as a required keyword argument and check it against its field, and
:func:`build_optimizer` and :func:`build_schedule` fill in the defaults of the parameters
a caller leaves out.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from shared.errors import JobSpecError

OptimizerState = dict[str, np.ndarray]


# shared.spec imports this module for the optimizer and schedule names, so these helpers
# import it when they run instead of at the top.


def _checked(name: str, value: Any) -> Any:
    """Return parameter ``name`` checked against its job spec field, which raises JobSpecError if it is invalid."""
    from shared.spec import check_optimizer_value

    return check_optimizer_value(name, value)


def _default(name: str) -> Any:
    """Return the default of parameter ``name``: its job spec field's."""
    from shared.spec import optimizer_default

    return optimizer_default(name)


def _with_defaults(parameter_class: type, hyperparameters: Mapping[str, Any], skip: tuple[str, ...]) -> dict[str, Any]:
    """Return the keyword parameters of ``parameter_class`` but ``skip``, from ``hyperparameters`` or the spec's defaults."""
    names = [parameter.name for parameter in inspect.signature(parameter_class).parameters.values()
             if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.name not in skip]
    return {name: hyperparameters[name] if name in hyperparameters else _default(name) for name in names}


# Learning-rate schedules.


class LearningRateSchedule(ABC):
    """The learning rate as a function of the zero-based step index.

    Parameters
    ----------
    learning_rate : float
        Initial learning rate.
    """

    name: ClassVar[str]

    def __init__(self, *, learning_rate: float):
        self.learning_rate = _checked("learning_rate", learning_rate)

    @abstractmethod
    def __call__(self, step_index: int) -> float:
        """Return the learning rate of step ``step_index`` (0 for the first step)."""


class ConstantSchedule(LearningRateSchedule):
    """The same learning rate at every step."""

    name = "constant"

    def __call__(self, step_index: int) -> float:
        return self.learning_rate


class StepSchedule(LearningRateSchedule):
    """Multiply the learning rate by ``gamma`` every ``step_size`` steps.

    The rate at step ``t`` is ``learning_rate * gamma ** floor(t / step_size)``.

    Parameters
    ----------
    learning_rate : float
        Initial learning rate.
    step_size : int
        Steps between two decays.
    gamma : float
        Decay factor.
    """

    name = "step"

    def __init__(self, *, learning_rate: float, step_size: int, gamma: float):
        super().__init__(learning_rate=learning_rate)
        self.step_size = _checked("step_size", step_size)
        self.gamma = _checked("gamma", gamma)

    def __call__(self, step_index: int) -> float:
        return self.learning_rate * self.gamma ** (step_index // self.step_size)


class InverseScalingSchedule(LearningRateSchedule):
    """Decay the learning rate as ``learning_rate / (1 + decay * t) ** power`` at step ``t``.

    Parameters
    ----------
    learning_rate : float
        Initial learning rate.
    decay : float
        Decay per step. 0 gives a constant rate.
    power : float
        Exponent. 1 gives the classic ``1 / t`` decay of stochastic approximation.
    """

    name = "inverse_scaling"

    def __init__(self, *, learning_rate: float, decay: float, power: float):
        super().__init__(learning_rate=learning_rate)
        self.decay = _checked("decay", decay)
        self.power = _checked("power", power)

    def __call__(self, step_index: int) -> float:
        try:
            return self.learning_rate / (1.0 + self.decay * step_index) ** self.power
        except OverflowError:
            # The divisor is beyond the float range, so the rate has decayed to nothing.
            return 0.0


class CosineSchedule(LearningRateSchedule):
    """Anneal the learning rate along a half cosine from ``learning_rate`` to ``min_learning_rate``.

    The rate at step ``t`` is
    ``min_lr + (lr - min_lr) * (1 + cos(pi * min(t, total_steps) / total_steps)) / 2``,
    so it reaches ``min_learning_rate`` at step ``total_steps`` and stays there.

    Parameters
    ----------
    learning_rate : float
        Initial learning rate.
    total_steps : int
        Length of the annealing in steps. None, the spec's default, is rejected because
        the length depends on the job, usually its number of rounds.
    min_learning_rate : float
        Final learning rate, at most ``learning_rate``.
    """

    name = "cosine"

    def __init__(self, *, learning_rate: float, total_steps: int | None, min_learning_rate: float):
        super().__init__(learning_rate=learning_rate)
        if total_steps is None:
            raise JobSpecError("optimizer.total_steps",
                               "missing; the cosine schedule needs the number of steps to anneal over")
        self.total_steps = _checked("total_steps", total_steps)
        self.min_learning_rate = _checked("min_learning_rate", min_learning_rate)
        if self.min_learning_rate > self.learning_rate:
            raise JobSpecError("optimizer.min_learning_rate", f"got {self.min_learning_rate!r}; must be at most "
                                                              f"learning_rate ({self.learning_rate!r})")

    def __call__(self, step_index: int) -> float:
        progress = min(step_index, self.total_steps) / self.total_steps
        cosine_factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_learning_rate + (self.learning_rate - self.min_learning_rate) * cosine_factor


SCHEDULES: dict[str, type[LearningRateSchedule]] = {
    cls.name: cls for cls in (ConstantSchedule, StepSchedule, InverseScalingSchedule, CosineSchedule)
}


def build_schedule(name: str, learning_rate: float, **hyperparameters) -> LearningRateSchedule:
    """Return the learning-rate schedule registered under ``name``.

    Parameters
    ----------
    name : {"constant", "step", "inverse_scaling", "cosine"}
    learning_rate : float
        Initial learning rate.
    **hyperparameters
        The schedule's own parameters, described on each schedule class. A parameter left
        out takes the job spec's default, and parameters of other schedules are ignored.

    Raises
    ------
    JobSpecError
        If ``name`` is unknown or a parameter is out of range.
    """
    schedule_class = SCHEDULES[_checked("schedule", name)]
    return schedule_class(learning_rate=learning_rate,
                          **_with_defaults(schedule_class, hyperparameters, skip=("learning_rate",)))


def clip_by_global_norm(grad: np.ndarray, clip_norm: float | None) -> np.ndarray:
    """Return ``grad`` scaled down to Euclidean norm ``clip_norm`` if its norm is larger.

    The direction is kept. With a single flat vector, the global norm over all layers is
    the vector's L2 norm. ``clip_norm=None`` returns ``grad`` unchanged.
    """
    if clip_norm is None:
        return grad
    norm = float(np.linalg.norm(grad))
    if norm <= clip_norm:
        return grad
    return grad * (clip_norm / norm)


# Optimizers.


class Optimizer(ABC):
    """Base class of Baton's optimizers.

    Use :func:`build_optimizer`, which builds the schedule and fills in the defaults.

    Parameters
    ----------
    schedule : LearningRateSchedule
        The learning rate of each step (:func:`build_schedule`).
    clip_norm : float or None
        The maximum Euclidean norm of the gradient. Larger gradients are scaled down to it
        before the update. None disables clipping.
    """

    name: ClassVar[str]

    def __init__(self, *, schedule: LearningRateSchedule, clip_norm: float | None):
        self.schedule = schedule
        self.learning_rate = schedule.learning_rate
        self.clip_norm = _checked("clip_norm", clip_norm)

    def init_state(self, params: np.ndarray) -> OptimizerState:
        """Return the state before the first step; empty for plain SGD."""
        return {}

    def learning_rate_at(self, step_index: int) -> float:
        """Return the scheduled learning rate of step ``step_index``."""
        return self.schedule(step_index)

    def step(self, params: np.ndarray, grad: np.ndarray, state: OptimizerState,
             step_index: int, schedule_index: int | None = None) -> tuple[np.ndarray, OptimizerState]:
        """Return the new parameters and state after one step on ``grad``.

        Parameters
        ----------
        params, grad : ndarray of shape (n_params,)
            Neither is modified.
        state : dict of str to ndarray
            State returned by the previous step or by :meth:`init_state`. Not modified.
        step_index : int
            Zero-based index of this step since ``state`` was initialised, for bias
            corrections, and for the schedule unless ``schedule_index`` is given.
        schedule_index : int, default=None
            Step index at which to read the learning-rate schedule, for a loop that
            restarts its state but not its schedule (local steps of model averaging).
        """
        grad = clip_by_global_norm(np.asarray(grad, dtype=np.float64), self.clip_norm)
        learning_rate = self.learning_rate_at(step_index if schedule_index is None else schedule_index)
        return self._update(params, grad, state, learning_rate, step_index)

    @abstractmethod
    def _update(self, params: np.ndarray, grad: np.ndarray, state: OptimizerState, learning_rate: float,
                step_index: int) -> tuple[np.ndarray, OptimizerState]:
        """Apply the update rule to an already clipped gradient, without modifying any input."""


class SGD(Optimizer):
    """Plain stochastic gradient descent: ``w <- w - lr * g``."""

    name = "sgd"

    def _update(self, params: np.ndarray, grad: np.ndarray, state: OptimizerState, learning_rate: float,
                step_index: int) -> tuple[np.ndarray, OptimizerState]:
        return params - learning_rate * grad, {}


class Momentum(Optimizer):
    """Heavy-ball momentum: ``v <- mu * v + g``, ``w <- w - lr * v``.

    Parameters
    ----------
    schedule, clip_norm
        As for :class:`Optimizer`.
    momentum : float
        Decay ``mu`` of the velocity.
    """

    name = "momentum"

    def __init__(self, *, schedule: LearningRateSchedule, clip_norm: float | None, momentum: float):
        super().__init__(schedule=schedule, clip_norm=clip_norm)
        self.momentum = _checked("momentum", momentum)

    def init_state(self, params: np.ndarray) -> OptimizerState:
        return {"velocity": np.zeros_like(params, dtype=np.float64)}

    def _update(self, params: np.ndarray, grad: np.ndarray, state: OptimizerState, learning_rate: float,
                step_index: int) -> tuple[np.ndarray, OptimizerState]:
        velocity = self.momentum * state["velocity"] + grad
        return params - learning_rate * velocity, {"velocity": velocity}


class Nesterov(Momentum):
    """Nesterov accelerated gradient: ``v <- mu * v + g``, ``w <- w - lr * (g + mu * v)``.

    This form needs the gradient at the current parameters only, because the look-ahead
    is folded into the update. It is the rule of ``torch.optim.SGD(nesterov=True)`` as
    documented for PyTorch 2.0. Its parameters are those of :class:`Momentum`.
    """

    name = "nesterov"

    def _update(self, params: np.ndarray, grad: np.ndarray, state: OptimizerState, learning_rate: float,
                step_index: int) -> tuple[np.ndarray, OptimizerState]:
        velocity = self.momentum * state["velocity"] + grad
        return params - learning_rate * (grad + self.momentum * velocity), {"velocity": velocity}


class Adam(Optimizer):
    """Adam (Kingma and Ba, 2015) with bias-corrected moment estimates.

    With ``t = step_index + 1``::

        m <- beta_1 * m + (1 - beta_1) * g
        v <- beta_2 * v + (1 - beta_2) * g ** 2
        w <- w - lr * (m / (1 - beta_1 ** t)) / (sqrt(v / (1 - beta_2 ** t)) + epsilon)

    Parameters
    ----------
    schedule, clip_norm
        As for :class:`Optimizer`.
    beta_1, beta_2 : float
        Decay of the first- and second-moment estimates: the two elements of the job
        spec's ``optimizer.betas``.
    epsilon : float
        Added to the denominator for numerical stability.

    Notes
    -----
    The bias correction uses ``step_index``, so the state stays correct only if steps are
    numbered consecutively from 0 for the same state.
    """

    name = "adam"

    def __init__(self, *, schedule: LearningRateSchedule, clip_norm: float | None, beta_1: float, beta_2: float,
                 epsilon: float):
        super().__init__(schedule=schedule, clip_norm=clip_norm)
        self.beta_1 = _checked("beta_1", beta_1)
        self.beta_2 = _checked("beta_2", beta_2)
        self.epsilon = _checked("epsilon", epsilon)

    def init_state(self, params: np.ndarray) -> OptimizerState:
        return {"first_moment": np.zeros_like(params, dtype=np.float64),
                "second_moment": np.zeros_like(params, dtype=np.float64)}

    def _update(self, params: np.ndarray, grad: np.ndarray, state: OptimizerState, learning_rate: float,
                step_index: int) -> tuple[np.ndarray, OptimizerState]:
        first_moment = self.beta_1 * state["first_moment"] + (1.0 - self.beta_1) * grad
        second_moment = self.beta_2 * state["second_moment"] + (1.0 - self.beta_2) * grad * grad

        t = step_index + 1
        first_unbiased = first_moment / (1.0 - self.beta_1 ** t)
        second_unbiased = second_moment / (1.0 - self.beta_2 ** t)
        new_params = params - learning_rate * first_unbiased / (np.sqrt(second_unbiased) + self.epsilon)
        return new_params, {"first_moment": first_moment, "second_moment": second_moment}


class Adagrad(Optimizer):
    """Adagrad (Duchi, Hazan and Singer, 2011): per-coordinate steps shrinking with the summed squared gradients.

    ``G <- G + g ** 2``, ``w <- w - lr * g / (sqrt(G) + epsilon)``.

    Parameters
    ----------
    schedule, clip_norm
        As for :class:`Optimizer`.
    epsilon : float
        Added to the denominator for numerical stability.
    initial_accumulator_value : float
        Starting value of every entry of ``G``.
    """

    name = "adagrad"

    def __init__(self, *, schedule: LearningRateSchedule, clip_norm: float | None, epsilon: float,
                 initial_accumulator_value: float):
        super().__init__(schedule=schedule, clip_norm=clip_norm)
        self.epsilon = _checked("epsilon", epsilon)
        self.initial_accumulator_value = _checked("initial_accumulator_value", initial_accumulator_value)

    def init_state(self, params: np.ndarray) -> OptimizerState:
        return {"sum_of_squares": np.full_like(params, self.initial_accumulator_value, dtype=np.float64)}

    def _update(self, params: np.ndarray, grad: np.ndarray, state: OptimizerState, learning_rate: float,
                step_index: int) -> tuple[np.ndarray, OptimizerState]:
        sum_of_squares = state["sum_of_squares"] + grad * grad
        new_params = params - learning_rate * grad / (np.sqrt(sum_of_squares) + self.epsilon)
        return new_params, {"sum_of_squares": sum_of_squares}


OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in (SGD, Momentum, Nesterov, Adam, Adagrad)}


def build_optimizer(name: str, **hyperparameters) -> Optimizer:
    """Build the optimizer registered under ``name``, with its schedule, from ``hyperparameters``.

    Parameters
    ----------
    name : {"sgd", "momentum", "nesterov", "adam", "adagrad"}
    **hyperparameters
        ``learning_rate`` (required), ``schedule``, the parameters of that schedule,
        ``clip_norm`` and the optimizer's own parameters. A parameter left out takes the
        job spec's default. Parameters that belong to other optimizers or schedules are
        ignored, so one flat optimizer section of a job spec can configure every optimizer.

    Raises
    ------
    JobSpecError
        If ``name`` is unknown, ``learning_rate`` is missing or a value is out of range.
    """
    optimizer_class = OPTIMIZERS[_checked("name", name)]
    if "learning_rate" not in hyperparameters:
        raise JobSpecError("optimizer.learning_rate", "missing required field")
    schedule = build_schedule(hyperparameters.get("schedule", _default("schedule")), **hyperparameters)
    return optimizer_class(schedule=schedule, **_with_defaults(optimizer_class, hyperparameters, skip=("schedule",)))


# The prefix of the optimizer's arrays when they are stored beside other arrays, such as the
# parameters in a round's state file or a worker's local progress.
STATE_ARRAY_PREFIX = "optimizer."


def state_arrays(state: OptimizerState) -> dict[str, np.ndarray]:
    """Return the optimizer ``state`` as arrays named for storage beside other arrays."""
    return {STATE_ARRAY_PREFIX + name: value for name, value in state.items()}


def state_from_arrays(arrays: dict[str, np.ndarray]) -> OptimizerState:
    """Return the optimizer state among ``arrays``, as :func:`state_arrays` named it."""
    return {name[len(STATE_ARRAY_PREFIX):]: value for name, value in arrays.items()
            if name.startswith(STATE_ARRAY_PREFIX)}
