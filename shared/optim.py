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
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from shared.errors import JobSpecError

OptimizerState = dict[str, np.ndarray]


def _check_number(field: str, value, *, minimum: float | None = None, maximum: float | None = None,
                  exclusive_minimum: bool = False, exclusive_maximum: bool = False) -> float:
    """Return ``value`` as a float, or raise :class:`JobSpecError` naming ``optimizer.<field>``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise JobSpecError(f"optimizer.{field}", f"expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise JobSpecError(f"optimizer.{field}", f"expected a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
        relation = "greater than" if exclusive_minimum else "at least"
        raise JobSpecError(f"optimizer.{field}", f"got {value!r}; must be {relation} {minimum}")
    if maximum is not None and (value >= maximum if exclusive_maximum else value > maximum):
        relation = "less than" if exclusive_maximum else "at most"
        raise JobSpecError(f"optimizer.{field}", f"got {value!r}; must be {relation} {maximum}")
    return value


def _check_integer(field: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or value != int(value):
        raise JobSpecError(f"optimizer.{field}", f"expected an integer, got {value!r}")
    if value < minimum:
        raise JobSpecError(f"optimizer.{field}", f"got {value!r}; must be at least {minimum}")
    return int(value)


# Learning-rate schedules.


class LearningRateSchedule(ABC):
    """The learning rate as a function of the zero-based step index.

    Parameters
    ----------
    learning_rate : float
        Initial learning rate, > 0.
    """

    name: ClassVar[str]

    def __init__(self, learning_rate: float):
        self.learning_rate = _check_number("learning_rate", learning_rate, minimum=0.0, exclusive_minimum=True)

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
        Initial learning rate, > 0.
    step_size : int, default=100
        Steps between two decays, >= 1.
    gamma : float, default=0.5
        Decay factor, in (0, 1].
    """

    name = "step"

    def __init__(self, learning_rate: float, step_size: int = 100, gamma: float = 0.5):
        super().__init__(learning_rate)
        self.step_size = _check_integer("step_size", step_size, minimum=1)
        self.gamma = _check_number("gamma", gamma, minimum=0.0, maximum=1.0, exclusive_minimum=True)

    def __call__(self, step_index: int) -> float:
        return self.learning_rate * self.gamma ** (step_index // self.step_size)


class InverseScalingSchedule(LearningRateSchedule):
    """Decay the learning rate as ``learning_rate / (1 + decay * t) ** power`` at step ``t``.

    Parameters
    ----------
    learning_rate : float
        Initial learning rate, > 0.
    decay : float, default=0.01
        Decay per step, >= 0. 0 gives a constant rate.
    power : float, default=0.5
        Exponent, >= 0. 1 gives the classic ``1 / t`` decay of stochastic approximation.
    """

    name = "inverse_scaling"

    def __init__(self, learning_rate: float, decay: float = 0.01, power: float = 0.5):
        super().__init__(learning_rate)
        self.decay = _check_number("decay", decay, minimum=0.0)
        self.power = _check_number("power", power, minimum=0.0)

    def __call__(self, step_index: int) -> float:
        return self.learning_rate / (1.0 + self.decay * step_index) ** self.power


class CosineSchedule(LearningRateSchedule):
    """Anneal the learning rate along a half cosine from ``learning_rate`` to ``min_learning_rate``.

    The rate at step ``t`` is
    ``min_lr + (lr - min_lr) * (1 + cos(pi * min(t, total_steps) / total_steps)) / 2``,
    so it reaches ``min_learning_rate`` at step ``total_steps`` and stays there.

    Parameters
    ----------
    learning_rate : float
        Initial learning rate, > 0.
    total_steps : int
        Length of the annealing in steps, >= 1. There is no default because it depends
        on the job, usually its number of rounds.
    min_learning_rate : float, default=0.0
        Final learning rate, in [0, learning_rate].
    """

    name = "cosine"

    def __init__(self, learning_rate: float, total_steps: int | None = None, min_learning_rate: float = 0.0):
        super().__init__(learning_rate)
        if total_steps is None:
            raise JobSpecError("optimizer.total_steps",
                               "missing; the cosine schedule needs the number of steps to anneal over")
        self.total_steps = _check_integer("total_steps", total_steps, minimum=1)
        self.min_learning_rate = _check_number("min_learning_rate", min_learning_rate,
                                               minimum=0.0, maximum=self.learning_rate)

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
        Initial learning rate, > 0.
    **hyperparameters
        The schedule's own parameters, described on each schedule class.

    Raises
    ------
    JobSpecError
        If ``name`` is unknown or a parameter is out of range.
    """
    if name not in SCHEDULES:
        raise JobSpecError("optimizer.schedule", f"got {name!r}; expected one of {', '.join(map(repr, SCHEDULES))}")
    return SCHEDULES[name](learning_rate, **hyperparameters)


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

    Parameters
    ----------
    learning_rate : float
        Initial step size, > 0.
    schedule : {"constant", "step", "inverse_scaling", "cosine"}, default="constant"
        How the learning rate changes with the step index; see :func:`build_schedule`.
    step_size : int, default=100
        ``"step"`` schedule: steps between two decays, >= 1.
    gamma : float, default=0.5
        ``"step"`` schedule: decay factor, in (0, 1].
    decay : float, default=0.01
        ``"inverse_scaling"`` schedule: decay per step, >= 0.
    power : float, default=0.5
        ``"inverse_scaling"`` schedule: exponent, >= 0.
    total_steps : int, default=None
        ``"cosine"`` schedule: steps to anneal over, >= 1; required by that schedule.
    min_learning_rate : float, default=0.0
        ``"cosine"`` schedule: final learning rate, in [0, learning_rate].
    clip_norm : float, default=None
        If set, > 0: the maximum Euclidean norm of the gradient. Larger gradients are
        scaled down to it before the update. None disables clipping.
    **hyperparameters
        Parameters of other optimizers. They are stored in ``hyperparameters`` and
        otherwise ignored, so one flat optimizer section of a job spec can configure
        every optimizer.
    """

    name: ClassVar[str]

    def __init__(self, learning_rate: float, schedule: str = "constant", *, step_size: int = 100,
                 gamma: float = 0.5, decay: float = 0.01, power: float = 0.5, total_steps: int | None = None,
                 min_learning_rate: float = 0.0, clip_norm: float | None = None, **hyperparameters):
        schedule_parameters = {
            "step": {"step_size": step_size, "gamma": gamma},
            "inverse_scaling": {"decay": decay, "power": power},
            "cosine": {"total_steps": total_steps, "min_learning_rate": min_learning_rate},
        }.get(schedule, {})
        self.schedule = build_schedule(schedule, learning_rate, **schedule_parameters)
        self.learning_rate = self.schedule.learning_rate
        self.clip_norm = None if clip_norm is None else _check_number(
            "clip_norm", clip_norm, minimum=0.0, exclusive_minimum=True)
        self.hyperparameters = hyperparameters

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
    learning_rate : float
        Initial step size, > 0.
    momentum : float, default=0.9
        Decay ``mu`` of the velocity, in [0, 1).
    **hyperparameters
        Schedule and clipping parameters, as for :class:`Optimizer`.
    """

    name = "momentum"

    def __init__(self, learning_rate: float, momentum: float = 0.9, **hyperparameters):
        super().__init__(learning_rate, **hyperparameters)
        self.momentum = _check_number("momentum", momentum, minimum=0.0, maximum=1.0, exclusive_maximum=True)

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
    documented for PyTorch 2.0.

    Parameters
    ----------
    learning_rate : float
        Initial step size, > 0.
    momentum : float, default=0.9
        Decay ``mu`` of the velocity, in [0, 1).
    **hyperparameters
        Schedule and clipping parameters, as for :class:`Optimizer`.
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
    learning_rate : float
        Initial step size, > 0.
    beta_1 : float, default=0.9
        Decay of the first-moment estimate, in [0, 1).
    beta_2 : float, default=0.999
        Decay of the second-moment estimate, in [0, 1).
    epsilon : float, default=1e-8
        Added to the denominator for numerical stability, > 0.
    **hyperparameters
        Schedule and clipping parameters, as for :class:`Optimizer`.

    Notes
    -----
    The bias correction uses ``step_index``, so the state stays correct only if steps are
    numbered consecutively from 0 for the same state.
    """

    name = "adam"

    def __init__(self, learning_rate: float, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8,
                 **hyperparameters):
        super().__init__(learning_rate, **hyperparameters)
        self.beta_1 = _check_number("beta_1", beta_1, minimum=0.0, maximum=1.0, exclusive_maximum=True)
        self.beta_2 = _check_number("beta_2", beta_2, minimum=0.0, maximum=1.0, exclusive_maximum=True)
        self.epsilon = _check_number("epsilon", epsilon, minimum=0.0, exclusive_minimum=True)

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
    learning_rate : float
        Initial step size, > 0.
    epsilon : float, default=1e-8
        Added to the denominator for numerical stability, > 0.
    initial_accumulator_value : float, default=0.0
        Starting value of every entry of ``G``, >= 0.
    **hyperparameters
        Schedule and clipping parameters, as for :class:`Optimizer`.
    """

    name = "adagrad"

    def __init__(self, learning_rate: float, epsilon: float = 1e-8, initial_accumulator_value: float = 0.0,
                 **hyperparameters):
        super().__init__(learning_rate, **hyperparameters)
        self.epsilon = _check_number("epsilon", epsilon, minimum=0.0, exclusive_minimum=True)
        self.initial_accumulator_value = _check_number("initial_accumulator_value", initial_accumulator_value,
                                                       minimum=0.0)

    def init_state(self, params: np.ndarray) -> OptimizerState:
        return {"sum_of_squares": np.full_like(params, self.initial_accumulator_value, dtype=np.float64)}

    def _update(self, params: np.ndarray, grad: np.ndarray, state: OptimizerState, learning_rate: float,
                step_index: int) -> tuple[np.ndarray, OptimizerState]:
        sum_of_squares = state["sum_of_squares"] + grad * grad
        new_params = params - learning_rate * grad / (np.sqrt(sum_of_squares) + self.epsilon)
        return new_params, {"sum_of_squares": sum_of_squares}


OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in (SGD, Momentum, Nesterov, Adam, Adagrad)}


def build_optimizer(name: str, **hyperparameters) -> Optimizer:
    """Return the optimizer registered under ``name``, configured by ``hyperparameters``.

    Parameters
    ----------
    name : {"sgd", "momentum", "nesterov", "adam", "adagrad"}
    **hyperparameters
        ``learning_rate`` (required), the schedule and clipping parameters of
        :class:`Optimizer` and the optimizer's own parameters. Parameters that belong to
        other optimizers or schedules are ignored.

    Raises
    ------
    JobSpecError
        If ``name`` is unknown, ``learning_rate`` is missing or a value is out of range.
    """
    if name not in OPTIMIZERS:
        raise JobSpecError("optimizer.name", f"got {name!r}; expected one of {', '.join(map(repr, OPTIMIZERS))}")
    if "learning_rate" not in hyperparameters:
        raise JobSpecError("optimizer.learning_rate", "missing required field")
    return OPTIMIZERS[name](**hyperparameters)


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
