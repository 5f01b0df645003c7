"""Optimizers over a flat parameter vector, in pure numpy.

An optimizer is stateless code plus a state dictionary of arrays that the aggregator keeps
on EFS between rounds, so a round can be replayed from its checkpoint and give the same
bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

OptimizerState = dict[str, np.ndarray]


class Optimizer(ABC):
    """Base class of Baton's optimizers.

    Parameters
    ----------
    learning_rate : float
        Step size, > 0.
    """

    name: ClassVar[str]

    def __init__(self, learning_rate: float, **hyperparameters):
        self.learning_rate = float(learning_rate)
        self.hyperparameters = hyperparameters

    def init_state(self, params: np.ndarray) -> OptimizerState:
        """Return the state before the first step; empty for plain SGD."""
        return {}

    @abstractmethod
    def step(self, params: np.ndarray, grad: np.ndarray, state: OptimizerState, step_index: int) -> tuple[np.ndarray, OptimizerState]:
        """Return the new parameters and state after one step on ``grad``.

        Parameters
        ----------
        params, grad : ndarray of shape (n_params,)
        state : dict of str to ndarray
            State returned by the previous step or by :meth:`init_state`. Not modified.
        step_index : int
            Zero-based index of this step, for schedules and bias corrections.
        """


class SGD(Optimizer):
    """Plain stochastic gradient descent: ``w <- w - lr * g``."""

    name = "sgd"

    def step(self, params, grad, state, step_index):
        return params - self.learning_rate * grad, {}


class Momentum(Optimizer):
    """Heavy-ball momentum: ``v <- mu * v + g``, ``w <- w - lr * v``.

    Parameters
    ----------
    learning_rate : float
    momentum : float, default=0.9
        Decay ``mu`` of the velocity, in [0, 1).
    """

    name = "momentum"

    def __init__(self, learning_rate: float, momentum: float = 0.9, **hyperparameters):
        super().__init__(learning_rate, **hyperparameters)
        self.momentum = float(momentum)

    def init_state(self, params):
        return {"velocity": np.zeros_like(params)}

    def step(self, params, grad, state, step_index):
        velocity = self.momentum * state["velocity"] + grad
        return params - self.learning_rate * velocity, {"velocity": velocity}


OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in (SGD, Momentum)}
