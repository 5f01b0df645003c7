"""Tests of the optimizers, learning-rate schedules and gradient clipping.

Each optimizer is compared with a naive reference that updates one coordinate at a time
with Python floats, written from the update rule in the optimizer's docstring.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from shared.errors import JobSpecError
from shared.optim import (
    OPTIMIZERS,
    SCHEDULES,
    Adam,
    build_optimizer,
    build_schedule,
    clip_by_global_norm,
)
from shared.spec import OptimizerSection, parse_job_spec

N_STEPS = 6


def random_gradients(n_steps: int = N_STEPS, n_params: int = 5, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n_params) * (index + 1) for index in range(n_steps)]


# Naive references: one coordinate at a time, Python floats only.


def reference_sgd(params, gradients, learning_rate):
    params = [float(value) for value in params]
    for grad in gradients:
        params = [w - learning_rate * g for w, g in zip(params, grad)]
    return params


def reference_momentum(params, gradients, learning_rate, momentum, nesterov=False):
    params = [float(value) for value in params]
    velocity = [0.0] * len(params)
    for grad in gradients:
        for i, g in enumerate(grad):
            velocity[i] = momentum * velocity[i] + g
            direction = g + momentum * velocity[i] if nesterov else velocity[i]
            params[i] -= learning_rate * direction
    return params


def reference_adam(params, gradients, learning_rate, beta_1, beta_2, epsilon):
    params = [float(value) for value in params]
    first = [0.0] * len(params)
    second = [0.0] * len(params)
    for t, grad in enumerate(gradients, start=1):
        for i, g in enumerate(grad):
            first[i] = beta_1 * first[i] + (1 - beta_1) * g
            second[i] = beta_2 * second[i] + (1 - beta_2) * g * g
            first_unbiased = first[i] / (1 - beta_1 ** t)
            second_unbiased = second[i] / (1 - beta_2 ** t)
            params[i] -= learning_rate * first_unbiased / (math.sqrt(second_unbiased) + epsilon)
    return params


def reference_adagrad(params, gradients, learning_rate, epsilon, initial_accumulator_value):
    params = [float(value) for value in params]
    accumulator = [initial_accumulator_value] * len(params)
    for grad in gradients:
        for i, g in enumerate(grad):
            accumulator[i] += g * g
            params[i] -= learning_rate * g / (math.sqrt(accumulator[i]) + epsilon)
    return params


def run_optimizer(optimizer, params, gradients):
    state = optimizer.init_state(params)
    for step_index, grad in enumerate(gradients):
        params, state = optimizer.step(params, grad, state, step_index)
    return params, state


@pytest.mark.parametrize("optimizer, reference", [
    (build_optimizer("sgd", learning_rate=0.1), lambda p, g: reference_sgd(p, g, 0.1)),
    (build_optimizer("momentum", learning_rate=0.05, momentum=0.9), lambda p, g: reference_momentum(p, g, 0.05, 0.9)),
    (build_optimizer("momentum", learning_rate=0.05, momentum=0.0), lambda p, g: reference_sgd(p, g, 0.05)),
    (build_optimizer("nesterov", learning_rate=0.05, momentum=0.8),
     lambda p, g: reference_momentum(p, g, 0.05, 0.8, nesterov=True)),
    (build_optimizer("adam", learning_rate=0.01), lambda p, g: reference_adam(p, g, 0.01, 0.9, 0.999, 1e-8)),
    (build_optimizer("adam", learning_rate=0.3, beta_1=0.5, beta_2=0.7, epsilon=1e-3),
     lambda p, g: reference_adam(p, g, 0.3, 0.5, 0.7, 1e-3)),
    (build_optimizer("adagrad", learning_rate=0.2), lambda p, g: reference_adagrad(p, g, 0.2, 1e-8, 0.0)),
    (build_optimizer("adagrad", learning_rate=0.2, epsilon=1e-4, initial_accumulator_value=0.5),
     lambda p, g: reference_adagrad(p, g, 0.2, 1e-4, 0.5)),
], ids=["sgd", "momentum", "momentum-zero", "nesterov", "adam", "adam-custom", "adagrad", "adagrad-custom"])
def test_optimizer_matches_naive_reference(optimizer, reference):
    params = np.linspace(-1.0, 1.0, 5)
    gradients = random_gradients()

    result, _ = run_optimizer(optimizer, params, gradients)

    np.testing.assert_allclose(result, reference(params, gradients), rtol=1e-12, atol=1e-14)


def test_first_adam_step_moves_by_learning_rate():
    # After one step the bias-corrected ratio m / sqrt(v) is sign(g), whatever the scale of g.
    optimizer = build_optimizer("adam", learning_rate=0.01, epsilon=1e-12)
    params = np.zeros(3)

    result, _ = optimizer.step(params, np.array([1e-3, -50.0, 7.0]), optimizer.init_state(params), 0)

    np.testing.assert_allclose(result, [-0.01, 0.01, -0.01], rtol=1e-6)


def test_nesterov_differs_from_momentum():
    params = np.zeros(2)
    gradients = random_gradients(n_params=2)

    nesterov, _ = run_optimizer(build_optimizer("nesterov", learning_rate=0.1, momentum=0.9), params, gradients)
    momentum, _ = run_optimizer(build_optimizer("momentum", learning_rate=0.1, momentum=0.9), params, gradients)

    assert not np.allclose(nesterov, momentum)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_minimises_quadratic(name):
    # f(w) = 0.5 * w' A w - b' w has its minimum at A^-1 b.
    A = np.diag([1.0, 4.0, 10.0])
    b = np.array([1.0, -2.0, 3.0])
    learning_rate = {"sgd": 0.09, "momentum": 0.02, "nesterov": 0.02, "adam": 0.05, "adagrad": 0.5}[name]
    optimizer = build_optimizer(name, learning_rate=learning_rate)

    params = np.zeros(3)
    state = optimizer.init_state(params)
    for step_index in range(3000):
        params, state = optimizer.step(params, A @ params - b, state, step_index)

    np.testing.assert_allclose(params, np.linalg.solve(A, b), atol=1e-3)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_leaves_inputs_unchanged(name):
    optimizer = build_optimizer(name, learning_rate=0.1)
    params = np.arange(4.0)
    grad = np.ones(4)
    _, state = run_optimizer(optimizer, params, random_gradients(n_params=4))
    params_before, grad_before = params.copy(), grad.copy()
    state_before = {key: value.copy() for key, value in state.items()}

    optimizer.step(params, grad, state, N_STEPS)

    np.testing.assert_array_equal(params, params_before)
    np.testing.assert_array_equal(grad, grad_before)
    for key, value in state.items():
        np.testing.assert_array_equal(value, state_before[key])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_roundtrips_through_savez(name):
    optimizer = build_optimizer(name, learning_rate=0.05, schedule="cosine", total_steps=10, clip_norm=3.0)
    gradients = random_gradients(n_steps=8)
    params = np.linspace(-1.0, 1.0, 5)
    uninterrupted, _ = run_optimizer(optimizer, params, gradients)

    # Run half the steps, store the state as the aggregator does, reload it and finish.
    state = optimizer.init_state(params)
    for step_index in range(4):
        params, state = optimizer.step(params, gradients[step_index], state, step_index)
    buffer = io.BytesIO()
    np.savez(buffer, params=params, **state)
    buffer.seek(0)
    with np.load(buffer) as stored:
        params = stored["params"]
        state = {key: stored[key] for key in stored.files if key != "params"}
    for step_index in range(4, 8):
        params, state = optimizer.step(params, gradients[step_index], state, step_index)

    np.testing.assert_array_equal(params, uninterrupted)
    for value in state.values():
        assert isinstance(value, np.ndarray)
        assert value.dtype == np.float64


# Learning-rate schedules.


@pytest.mark.parametrize("name, hyperparameters, expected_by_step", [
    ("constant", {}, {0: 0.1, 1: 0.1, 1000: 0.1}),
    ("step", {"step_size": 3, "gamma": 0.5}, {0: 0.1, 2: 0.1, 3: 0.05, 5: 0.05, 6: 0.025, 10: 0.0125}),
    ("inverse_scaling", {"decay": 0.5, "power": 2.0}, {0: 0.1, 2: 0.025, 6: 0.00625}),
    ("inverse_scaling", {"decay": 1.0, "power": 0.5}, {0: 0.1, 3: 0.05, 15: 0.025}),
    # (1 + step)^1000 leaves the float range after step 1: the rate has decayed to 0.
    ("inverse_scaling", {"decay": 1.0, "power": 1000.0}, {0: 0.1, 1: 0.1 / 2.0**1000, 2: 0.0, 10**6: 0.0}),
    ("cosine", {"total_steps": 10, "min_learning_rate": 0.01}, {0: 0.1, 5: 0.055, 10: 0.01, 15: 0.01, 1000: 0.01}),
    ("cosine", {"total_steps": 4}, {0: 0.1, 1: 0.1 * (1 + math.cos(math.pi / 4)) / 2, 2: 0.05, 4: 0.0, 6: 0.0}),
])
def test_schedule_values_at_steps(name, hyperparameters, expected_by_step):
    schedule = build_schedule(name, 0.1, **hyperparameters)

    for step_index, expected in expected_by_step.items():
        assert schedule(step_index) == pytest.approx(expected, rel=1e-12, abs=1e-15), step_index


def test_optimizer_step_uses_schedule():
    optimizer = build_optimizer("sgd", learning_rate=1.0, schedule="step", step_size=2, gamma=0.1)
    params = np.zeros(1)
    grad = np.ones(1)

    after_step_1, _ = optimizer.step(params, grad, {}, step_index=1)
    after_step_2, _ = optimizer.step(params, grad, {}, step_index=2)

    np.testing.assert_allclose(after_step_1, [-1.0])
    np.testing.assert_allclose(after_step_2, [-0.1])
    assert optimizer.learning_rate_at(4) == pytest.approx(0.01)


def test_cosine_needs_total_steps():
    with pytest.raises(JobSpecError) as raised:
        build_optimizer("adam", learning_rate=0.01, schedule="cosine")

    assert raised.value.field == "optimizer.total_steps"


def test_registries_list_every_name():
    assert set(OPTIMIZERS) == {"sgd", "momentum", "nesterov", "adam", "adagrad"}
    assert set(SCHEDULES) == {"constant", "step", "inverse_scaling", "cosine"}
    for name, optimizer_class in OPTIMIZERS.items():
        assert optimizer_class.name == name
    for name, schedule_class in SCHEDULES.items():
        assert schedule_class.name == name


# Gradient clipping.


def test_clip_scales_long_gradient_to_norm():
    clipped = clip_by_global_norm(np.array([3.0, 4.0]), clip_norm=1.0)

    np.testing.assert_allclose(clipped, [0.6, 0.8])
    assert np.linalg.norm(clipped) == pytest.approx(1.0)


def test_clip_keeps_short_gradient():
    grad = np.array([0.3, -0.4])

    np.testing.assert_array_equal(clip_by_global_norm(grad, clip_norm=1.0), grad)
    np.testing.assert_array_equal(clip_by_global_norm(grad, clip_norm=0.5), grad)
    np.testing.assert_array_equal(clip_by_global_norm(grad * 1e6, clip_norm=None), grad * 1e6)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_clips_before_update(name):
    clipped_optimizer = build_optimizer(name, learning_rate=0.1, clip_norm=2.0)
    plain_optimizer = build_optimizer(name, learning_rate=0.1)
    params = np.ones(2)
    long_grad = np.array([30.0, -40.0])

    clipped, _ = clipped_optimizer.step(params, long_grad, clipped_optimizer.init_state(params), 0)
    expected, _ = plain_optimizer.step(params, np.array([1.2, -1.6]), plain_optimizer.init_state(params), 0)

    np.testing.assert_allclose(clipped, expected, rtol=1e-12)


# Building from a job spec.


def test_build_optimizer_from_spec_section():
    section = {"name": "adam", "learning_rate": 0.01, "schedule": "cosine", "total_steps": 100,
               "min_learning_rate": 0.001, "beta_1": 0.8, "clip_norm": 5.0,
               # Fields of other optimizers and schedules, as a flat spec section carries them.
               "momentum": 0.9, "step_size": 10, "gamma": 0.5, "decay": 0.1, "power": 1.0}

    optimizer = build_optimizer(**section)

    assert isinstance(optimizer, Adam)
    assert optimizer.beta_1 == 0.8
    assert optimizer.clip_norm == 5.0
    assert optimizer.learning_rate_at(0) == pytest.approx(0.01)
    assert optimizer.learning_rate_at(100) == pytest.approx(0.001)


@pytest.mark.parametrize("hyperparameters, field", [
    ({"name": "rmsprop", "learning_rate": 0.1}, "optimizer.name"),
    ({"name": "sgd"}, "optimizer.learning_rate"),
    ({"name": "sgd", "learning_rate": 0.0}, "optimizer.learning_rate"),
    ({"name": "sgd", "learning_rate": float("nan")}, "optimizer.learning_rate"),
    ({"name": "sgd", "learning_rate": 0.1, "schedule": "exponential"}, "optimizer.schedule"),
    ({"name": "sgd", "learning_rate": 0.1, "schedule": "step", "step_size": 0}, "optimizer.step_size"),
    ({"name": "sgd", "learning_rate": 0.1, "schedule": "step", "gamma": 1.5}, "optimizer.gamma"),
    ({"name": "sgd", "learning_rate": 0.1, "schedule": "inverse_scaling", "power": -1.0}, "optimizer.power"),
    ({"name": "sgd", "learning_rate": 0.1, "schedule": "cosine", "total_steps": 10, "min_learning_rate": 0.2},
     "optimizer.min_learning_rate"),
    ({"name": "sgd", "learning_rate": 0.1, "clip_norm": 0.0}, "optimizer.clip_norm"),
    ({"name": "momentum", "learning_rate": 0.1, "momentum": 1.0}, "optimizer.momentum"),
    ({"name": "nesterov", "learning_rate": 0.1, "momentum": -0.1}, "optimizer.momentum"),
    ({"name": "adam", "learning_rate": 0.1, "beta_2": 1.0}, "optimizer.beta_2"),
    ({"name": "adam", "learning_rate": 0.1, "epsilon": 0.0}, "optimizer.epsilon"),
    ({"name": "adagrad", "learning_rate": 0.1, "initial_accumulator_value": -1.0},
     "optimizer.initial_accumulator_value"),
])
def test_invalid_hyperparameters_name_field(hyperparameters, field):
    with pytest.raises(JobSpecError) as raised:
        build_optimizer(**hyperparameters)

    assert raised.value.field == field


# Defaults and valid ranges, which come from the job spec's optimizer section.


def test_left_out_parameters_take_spec_defaults():
    section = OptimizerSection()

    momentum = build_optimizer("momentum", learning_rate=0.1)
    adam = build_optimizer("adam", learning_rate=0.1)
    adagrad = build_optimizer("adagrad", learning_rate=0.1)
    step = build_schedule("step", 0.1)
    inverse_scaling = build_schedule("inverse_scaling", 0.1)
    cosine = build_schedule("cosine", 0.1, total_steps=10)

    assert momentum.momentum == section.momentum
    assert momentum.clip_norm == section.clip_norm
    assert (adam.beta_1, adam.beta_2) == section.betas
    assert adam.epsilon == section.epsilon
    assert adagrad.epsilon == section.epsilon
    assert adagrad.initial_accumulator_value == section.initial_accumulator_value
    assert (step.step_size, step.gamma) == (section.step_size, section.gamma)
    assert (inverse_scaling.decay, inverse_scaling.power) == (section.decay, section.power)
    assert cosine.min_learning_rate == section.min_learning_rate
    assert isinstance(build_optimizer("sgd", learning_rate=0.1).schedule, SCHEDULES[section.schedule])


@pytest.mark.parametrize("section, valid", [
    ({"name": "momentum", "learning_rate": 0.1, "momentum": 0.999}, True),
    ({"name": "momentum", "learning_rate": 0.1, "momentum": 0.9995}, False),
    ({"name": "sgd", "learning_rate": 1000.0}, True),
    ({"name": "sgd", "learning_rate": 1000.5}, False),
    ({"name": "sgd", "learning_rate": 0.1, "schedule": "step", "gamma": 1.0}, True),
    ({"name": "sgd", "learning_rate": 0.1, "schedule": "step", "gamma": 0.0}, False),
    ({"name": "sgd", "learning_rate": 0.1, "schedule": "step", "step_size": 2.0}, False),
    ({"name": "adam", "learning_rate": 0.1, "epsilon": 1e-300}, True),
    ({"name": "adagrad", "learning_rate": 0.1, "epsilon": 0.0}, False),
    ({"name": "sgd", "learning_rate": 0.1, "clip_norm": 1e-9}, True),
    ({"name": "sgd", "learning_rate": 0.1, "schedule": "cosine", "total_steps": 0}, False),
], ids=["momentum-max", "momentum-above-max", "rate-max", "rate-above-max", "gamma-1", "gamma-0",
        "step-size-float", "epsilon-tiny", "epsilon-0", "clip-tiny", "total-steps-0"])
def test_ranges_match_job_spec(section, valid):
    spec = {"job_id": "ranges", "model": {"name": "logistic_regression"}, "data": {"path": "datasets/a9a/a9a"},
            "optimizer": section}
    try:
        parse_job_spec(spec)
        spec_accepts = True
    except JobSpecError:
        spec_accepts = False
    try:
        build_optimizer(**section)
        optimizer_accepts = True
    except JobSpecError:
        optimizer_accepts = False

    assert spec_accepts is valid
    assert optimizer_accepts is valid


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_shapes_match_initial_state(name):
    from shared.optim import state_arrays
    from shared.round_files import state_shapes

    optimizer = build_optimizer(name, learning_rate=0.1)
    initial = state_arrays(optimizer.init_state(np.zeros(7)))

    assert state_shapes(7, optimizer) == {"params": (7,), **{key: value.shape for key, value in initial.items()}}
