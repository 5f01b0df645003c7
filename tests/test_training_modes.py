"""Training modes: gradient averaging, model averaging and k-means statistics.

Each mode run through the real handlers must equal a naive one-process loop of the same
algorithm, give the same weights whatever order worker results arrive in, and stop with a
clear message when training diverges.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import scipy.sparse as sp

from shared.control import JobControlError, resume_job
from shared.efs import EfsStore, encode_arrays
from shared.errors import DIVERGED_WORDS, DivergenceError
from shared.models import get_model_class
from shared.sampling import batch_indices, initial_params_rng, rounds_per_epoch
from shared.shards import load_shard, load_training_sample, load_validation
from shared.spec import parse_job_spec
from shared.state import FAILED, SUCCEEDED
from shared.training import (
    KMEANS_INIT_SAMPLE_ROWS, GradientAveraging, ModelAveraging, StatisticsMode, StoppingState, build_model,
    build_optimizer, check_stopping, class_weights, get_training_mode)
from tests.test_models import DATASETS_DIR
from tests.baton_jobs import (breast_cancer_spec, california_housing, california_spec, final_params, run_job,
                              run_job_with_shuffled_tasks, write_csv, write_diabetes)

MODE_SPECS = {
    "gradient_average": {"model": {"class_weight": "balanced", "penalty": "l1", "l1_method": "proximal"},
                         "optimizer": {"name": "momentum", "learning_rate": 0.2}},
    "model_average": {"model": {"name": "softmax_regression", "class_weight": {"1": 2.0}},
                      "optimizer": {"name": "adam", "learning_rate": 0.05, "schedule": "step", "step_size": 4},
                      "training": {"mode": "model_average", "local_steps": 3}},
    "model_average_epoch": {"model": {"name": "mlp_classifier", "hidden_layer_sizes": [8], "alpha": 1e-4},
                            "optimizer": {"name": "nesterov", "learning_rate": 0.05, "clip_norm": 5.0},
                            "training": {"mode": "model_average", "local_epoch": True, "max_rounds": 3}},
    "statistics": {"model": {"name": "kmeans", "n_clusters": 4}, "data": {"stratify": False},
                   "training": {"max_epochs": 5}},
    # The 0/1 labels as regression targets, standardised: mean 0.63, scale 0.48.
    "standardized_target": {"model": {"name": "mlp_regressor", "hidden_layer_sizes": [4]},
                            "optimizer": {"name": "momentum", "learning_rate": 0.1},
                            "data": {"standardize_target": True, "stratify": False},
                            "training": {"mode": "model_average", "local_steps": 2}},
}


def mode_spec(job_id: str, case: str) -> dict:
    overrides = MODE_SPECS[case]
    return breast_cancer_spec(job_id, overrides.get("model"), overrides.get("optimizer"), overrides.get("data"),
                              overrides.get("training"))


def load_job_inputs(efs_root, raw_spec):
    """Return the spec, manifest, model and prepared shards of a finished job."""
    spec = parse_job_spec(raw_spec)
    store = EfsStore(efs_root)
    manifest = store.read_json(store.data_dir(spec.job_id) / "manifest.json")
    shards = [load_shard(store, spec.job_id, manifest, worker) for worker in range(spec.training.n_workers)]
    return spec, manifest, build_model(spec, manifest), shards


def reference_training(efs_root, raw_spec) -> np.ndarray:
    """Train with plain loops over the prepared shards, sharing no code with the training modes."""
    spec, manifest, model, shards = load_job_inputs(efs_root, raw_spec)
    training = spec.training
    optimizer = build_optimizer(spec)
    weights = class_weights(spec, manifest)
    per_epoch = rounds_per_epoch(manifest["shard_rows"], training.batch_size)
    target_mean, target_scale = manifest.get("target_mean"), manifest.get("target_scale")

    def batch_loss_grad(params, shard, rows):
        X, y = np.asarray(shard.X[rows].toarray() if sp.issparse(shard.X) else shard.X[rows], dtype=np.float64), \
            np.asarray(shard.y[rows])
        sample_weight = None if weights is None else weights[y]
        targets = y if target_scale is None else (y - target_mean) / target_scale
        return model.loss_grad(params, X, targets, sample_weight)

    def in_target_units(params):
        # Trained on standardised targets: the output layer maps back to the targets' units.
        return params if target_scale is None else model.rescaled_output_params(params, target_scale, target_mean)

    if model.training_mode == "statistics":
        store = EfsStore(efs_root)
        sample = load_training_sample(store, spec.job_id, manifest, KMEANS_INIT_SAMPLE_ROWS)
        params = model.init_params_from_data(sample, initial_params_rng(training.seed))
        X_all = np.concatenate([np.asarray(shard.X, dtype=np.float64) for shard in shards])
        for _ in range(int(np.ceil(training.max_epochs))):
            centroids = params.reshape(model.n_clusters, -1)
            nearest = np.argmin(((X_all[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2), axis=1)
            updated = centroids.copy()
            for cluster in range(model.n_clusters):
                if np.any(nearest == cluster):
                    updated[cluster] = X_all[nearest == cluster].mean(axis=0)
            params = updated.ravel()
        return params

    params = model.init_params(initial_params_rng(training.seed))
    if model.task == "regression" and target_scale is None:
        # The output bias starts at the training targets' mean, which standardised targets have at 0.
        params[-1] = np.mean(np.concatenate([np.asarray(shard.y, dtype=np.float64) for shard in shards]))
    if training.mode == "gradient_average":
        state = optimizer.init_state(params)
        rounds = min(training.max_rounds, int(np.ceil(training.max_epochs * per_epoch)))
        for round_index in range(rounds):
            grad_sum, n_rows = np.zeros_like(params), 0
            for worker, shard in enumerate(shards):
                rows = batch_indices(training.seed, round_index, worker, shard.n_rows, per_epoch, training.batch_size)
                if len(rows):
                    grad_sum += batch_loss_grad(params, shard, rows)[1]
                    n_rows += len(rows)
            grad = grad_sum / n_rows + model.penalty_grad(params)[1]
            params, state = optimizer.step(params, grad, state, round_index)
            params = model.proximal(params, optimizer.learning_rate_at(round_index))
        return in_target_units(params)

    steps = per_epoch if training.local_epoch else training.local_steps
    rounds = min(training.max_rounds, int(np.ceil(np.ceil(training.max_epochs * per_epoch) / steps)))
    for round_index in range(rounds):
        weighted_sum, n_rows = np.zeros_like(params), 0
        for worker, shard in enumerate(shards):
            local, state, worker_rows = params.copy(), optimizer.init_state(params), 0
            for step in range(steps):
                global_step = round_index * steps + step
                rows = batch_indices(training.seed, global_step, worker, shard.n_rows, per_epoch,
                                     training.batch_size)
                if not len(rows):
                    continue
                grad = batch_loss_grad(local, shard, rows)[1] / len(rows) + model.penalty_grad(local)[1]
                local, state = optimizer.step(local, grad, state, step, schedule_index=global_step)
                local = model.proximal(local, optimizer.learning_rate_at(global_step))
                worker_rows += len(rows)
            weighted_sum += worker_rows * local
            n_rows += worker_rows
        params = weighted_sum / n_rows
    return in_target_units(params)


@pytest.mark.parametrize("case", sorted(MODE_SPECS))
def test_mode_matches_reference(inprocess_stack, efs_root, case):
    spec = mode_spec(f"ref-{case.replace('_', '-')}", case)
    record = run_job(inprocess_stack, spec)
    assert record.status == SUCCEEDED, record.error

    expected = reference_training(efs_root, spec)
    np.testing.assert_allclose(final_params(efs_root, spec["job_id"]), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["gradient_average", "model_average", "statistics", "standardized_target"])
def test_result_order_keeps_weights(inprocess_stack, efs_root, case):
    in_order = mode_spec(f"order-{case.replace('_', '-')}", case)
    shuffled = {**mode_spec(f"shuffled-{case.replace('_', '-')}", case)}

    assert run_job(inprocess_stack, in_order).status == SUCCEEDED
    assert run_job_with_shuffled_tasks(inprocess_stack, shuffled, seed=5).status == SUCCEEDED
    np.testing.assert_array_equal(final_params(efs_root, in_order["job_id"]),
                                  final_params(efs_root, shuffled["job_id"]))


@pytest.mark.parametrize("case", ["gradient_average", "model_average"])
def test_diverging_rate_fails_job(inprocess_stack, case):
    spec = breast_cancer_spec(
        f"diverge-{case.replace('_', '-')}", model={"name": "linear_regression", "alpha": 0.0},
        optimizer={"name": "sgd", "learning_rate": 50.0}, data={"standardize": False},
        training={"max_rounds": 400, **({"mode": case, "local_steps": 4} if case == "model_average" else {})})

    record = run_job(inprocess_stack, spec)

    assert record.status == FAILED
    assert "lower optimizer.learning_rate" in record.error
    # The error names the round after the last one with metrics, counting from 1 as the
    # metrics records, `baton watch` and `baton status` do.
    recorded = [entry["round"] for entry in inprocess_stack.services.state.list_round_metrics(spec["job_id"])]
    diverged = len(recorded) + 1
    assert recorded == list(range(1, diverged))
    assert f"diverged in round {diverged}:" in record.error
    assert record.round == len(recorded)
    services = inprocess_stack.services
    with pytest.raises(JobControlError, match="failed because training diverged, and a resume would take the same "
                                              "steps again"):
        resume_job(services.state, services.queues, spec["job_id"])
    assert services.state.get_job(spec["job_id"]).status == FAILED


def test_overflowing_validation_loss_fails_job(inprocess_stack, efs_root):
    source = DATASETS_DIR / "california_housing" / "537_houses.tsv.gz"
    if not source.is_file():
        pytest.skip(f"california_housing data set not found at {source}; set BATON_DATASETS_DIR")
    (efs_root / "datasets" / "california_housing").mkdir()
    shutil.copyfile(source, efs_root / "datasets" / "california_housing" / source.name)
    # House values in dollars, unscaled: the network's outputs grow round by round until the
    # validation loss overflows, while the weights stay below the divergence bound.
    spec = {"job_id": "mlp-overflow", "model": {"name": "mlp_regressor", "hidden_layer_sizes": [16, 16]},
            "optimizer": {"name": "momentum", "learning_rate": 0.001, "momentum": 0.9},
            "data": {"path": f"datasets/california_housing/{source.name}", "format": "csv", "delimiter": "\t",
                     "header": True, "label_column": "target", "validation_fraction": 0.2, "standardize": True},
            "training": {"n_workers": 4, "batch_size": 128, "max_rounds": 40, "seed": 7}}

    record = run_job(inprocess_stack, spec)

    assert record.status == FAILED
    assert "validation_loss became inf while the training loss was" in record.error
    assert "lower optimizer.learning_rate" in record.error
    recorded = inprocess_stack.services.state.list_round_metrics(spec["job_id"])
    assert all(np.isfinite(entry["validation_loss"]) for entry in recorded)
    assert f"diverged in round {len(recorded) + 1}:" in record.error


@pytest.mark.parametrize("model", [
    {"name": "linear_regression", "alpha": 1e-4},
    {"name": "mlp_regressor", "hidden_layer_sizes": [8], "activation": "tanh"},
])
def test_regression_starts_at_target_mean(inprocess_stack, efs_root, model):
    # Targets near 1e9: Adam moves the output bias by about its learning rate per round, so
    # from 0 it would stay near 0 for as many rounds as any job runs.
    rng = np.random.default_rng(3)
    X = rng.standard_normal((600, 3))
    y = 1e9 + X @ np.array([10.0, -20.0, 5.0]) + rng.standard_normal(600)
    np.savetxt(efs_root / "datasets" / "offset.csv", np.column_stack([X, y]), delimiter=",", fmt="%.10g")
    spec = {"job_id": "offset", "model": model, "optimizer": {"name": "adam", "learning_rate": 0.5},
            "data": {"path": "datasets/offset.csv", "format": "csv", "validation_fraction": 0.2,
                     "standardize": True},
            "training": {"n_workers": 2, "batch_size": 64, "max_epochs": 50, "seed": 5}}

    inprocess_stack.submit(spec)
    inprocess_stack.step("JobsQueue")
    store = EfsStore(efs_root)
    start = store.read_arrays(store.state_path("offset", 0))["params"]
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("offset")
    manifest = store.read_json(store.data_dir("offset") / "manifest.json")
    training_y = np.concatenate([np.asarray(load_shard(store, "offset", manifest, worker).y)
                                 for worker in range(2)])
    assert record.status == SUCCEEDED, record.error
    assert manifest["target_mean"] == pytest.approx(training_y.mean(), rel=1e-15)
    assert start[-1] == manifest["target_mean"]
    assert inprocess_stack.services.state.list_round_metrics("offset")[-1]["validation_r2"] > 0.9


def start_diabetes_job(stack, efs_root, job_id: str, **data) -> tuple[EfsStore, dict, np.ndarray]:
    """Prepare a linear regression job on diabetes and write its round 0; return the store, manifest and start."""
    spec = {"job_id": job_id, "model": {"name": "linear_regression"},
            "data": {"path": write_diabetes(efs_root), "format": "npz", "validation_fraction": 0.2,
                     "standardize": True, **data},
            "training": {"n_workers": 2, "batch_size": 16, "max_rounds": 3, "seed": 5}}
    stack.submit(spec)
    stack.step("JobsQueue")
    store = EfsStore(efs_root)
    manifest = store.read_json(store.data_dir(job_id) / "manifest.json")
    return store, manifest, store.read_arrays(store.state_path(job_id, 0))["params"]


def test_standardize_target_statistics_and_start(inprocess_stack, efs_root):
    store, manifest, start = start_diabetes_job(inprocess_stack, efs_root, "diabetes-scaled",
                                                standardize_target=True)
    training_y = np.concatenate([np.asarray(load_shard(store, "diabetes-scaled", manifest, worker).y)
                                 for worker in range(2)])
    validation_y = np.asarray(load_validation(store, "diabetes-scaled", manifest).y)

    # The statistics of the training shards only, and the shards keep the targets as read.
    assert len(training_y) == 354
    assert manifest["target_mean"] == pytest.approx(training_y.mean(), rel=1e-15)
    assert manifest["target_scale"] == pytest.approx(training_y.std(), rel=1e-12)
    assert manifest["target_scale"] != pytest.approx(np.concatenate([training_y, validation_y]).std(), rel=1e-6)
    assert training_y.min() >= 25.0
    # In the scaled units the targets' mean is 0, where the bias starts.
    np.testing.assert_array_equal(start, np.zeros(11))


def test_constant_target_scale_is_one(inprocess_stack, efs_root):
    path = write_diabetes(efs_root, target=250_000.0)
    spec = {"job_id": "constant-target", "model": {"name": "linear_regression"},
            "data": {"path": path, "format": "npz", "standardize": True, "standardize_target": True},
            "training": {"n_workers": 2, "batch_size": 16, "max_rounds": 5, "seed": 5}}

    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    store = EfsStore(efs_root)
    manifest = store.read_json(store.data_dir("constant-target") / "manifest.json")
    assert manifest["target_mean"] == 250_000.0
    assert manifest["target_scale"] == 1.0
    # Centred, the constant target is 0, so the weights stay 0 and the bias is the constant.
    np.testing.assert_array_equal(final_params(efs_root, "constant-target"), [0.0] * 10 + [250_000.0])


def test_target_scale_absent_without_switch(inprocess_stack, efs_root):
    _, manifest, start = start_diabetes_job(inprocess_stack, efs_root, "diabetes-plain")

    assert manifest["target_scale"] is None
    assert start[-1] == manifest["target_mean"]


# Jobs that learn little or diverge on california_housing's targets times 1e6 without
# data.standardize_target.
UNIT_CASES = {
    # Adam moves a weight by about its learning rate per step, far too little for weights near 1e11.
    "linear-adam": ({"name": "linear_regression"}, {"name": "adam"}),
    # The network's outputs, and with them its gradients, grow round by round until they overflow.
    "mlp-momentum": ({"name": "mlp_regressor", "hidden_layer_sizes": [16]}, {"name": "momentum"}),
}


@pytest.mark.parametrize("case", sorted(UNIT_CASES))
def test_standardize_target_ignores_units(inprocess_stack, efs_root, case):
    model, optimizer = UNIT_CASES[case]
    records, metrics = {}, {}
    for factor, standardize_target in [(1.0, True), (1e6, True), (1e6, False), (1e-6, False)]:
        names, table = california_housing(target_factor=factor)
        path = write_csv(efs_root, f"datasets/california-{factor:g}.csv", names, table)
        job_id = f"{case}-{factor:g}-{'scaled' if standardize_target else 'plain'}".replace("+", "")
        spec = california_spec(job_id, path, model, optimizer, data={"standardize_target": standardize_target})
        records[factor, standardize_target] = run_job(inprocess_stack, spec)
        recorded = inprocess_stack.services.state.list_round_metrics(job_id)
        metrics[factor, standardize_target] = recorded[-1] if recorded else None

    for key in [(1.0, True), (1e6, True)]:
        assert records[key].status == SUCCEEDED, (key, records[key].error)
    original_r2 = metrics[1.0, True]["validation_r2"]
    assert original_r2 > 0.6
    assert metrics[1e6, True]["validation_r2"] == pytest.approx(original_r2, abs=0.01)
    # The metrics are in the targets' units, so the squared errors grow by 1e12.
    assert metrics[1e6, True]["validation_loss"] == pytest.approx(1e12 * metrics[1.0, True]["validation_loss"],
                                                                  rel=1e-9)
    assert metrics[1e6, True]["train_loss"] == pytest.approx(1e12 * metrics[1.0, True]["train_loss"], rel=1e-9)

    unscaled = records[1e6, False]
    if case == "linear-adam":
        assert unscaled.status == SUCCEEDED, unscaled.error
        assert metrics[1e6, False]["validation_r2"] < 0.1
    else:
        assert unscaled.status == FAILED
        assert "diverged in round" in unscaled.error
    # Targets in millions of dollars (standard deviation 0.115) train, but less far in the same rounds.
    assert records[1e-6, False].status == SUCCEEDED, records[1e-6, False].error
    assert metrics[1e-6, False]["validation_r2"] < original_r2 - 0.05


def test_scaled_targets_near_limit_train(inprocess_stack, efs_root):
    # Targets up to about 5e145, below the 1e150 that the preparation accepts with
    # data.standardize_target: the job trains as on the targets in dollars.
    names, table = california_housing(target_factor=1e140)
    path = write_csv(efs_root, "datasets/california-1e140.csv", names, table)
    spec = california_spec("near-limit", path, {"name": "linear_regression"}, {"name": "momentum"},
                           data={"standardize_target": True})

    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    metrics = inprocess_stack.services.state.list_round_metrics("near-limit")[-1]
    assert metrics["validation_r2"] > 0.6


# Linear jobs whose optimum and path do not change with data.standardize_target.
EQUIVALENT_CASES = {
    "ridge": ({"name": "linear_regression", "alpha": 0.01}, {"name": "momentum", "learning_rate": 0.05}, {}),
    # Plain steps, so that soft-thresholding leaves exact zeros within the job's rounds.
    "lasso": ({"name": "linear_regression", "alpha": 4.0, "penalty": "l1", "l1_method": "proximal"},
              {"name": "sgd", "learning_rate": 0.1}, {}),
    "elasticnet-model-average": ({"name": "linear_regression", "alpha": 0.1, "penalty": "elasticnet",
                                  "l1_ratio": 0.5}, {"name": "nesterov", "learning_rate": 0.05},
                                 {"mode": "model_average", "local_steps": 3}),
}


@pytest.mark.parametrize("case", sorted(EQUIVALENT_CASES))
def test_standardize_target_keeps_linear_weights(inprocess_stack, efs_root, case):
    # Standardised targets divide the weights by the scale, the squared error and the L2
    # term by its square, and the L1 coefficient by the scale. Gradient steps of a fixed
    # learning rate then take the same path in the targets' units, so both jobs end at
    # the same weights whether they have reached the optimum or not.
    model, optimizer, training = EQUIVALENT_CASES[case]
    path = write_diabetes(efs_root)
    weights, metrics = {}, {}
    for standardize_target in (False, True):
        job_id = f"{case}-{'scaled' if standardize_target else 'plain'}"
        spec = {"job_id": job_id, "model": model, "optimizer": optimizer,
                "data": {"path": path, "format": "npz", "validation_fraction": 0.2, "standardize": True,
                         "standardize_target": standardize_target},
                "training": {"n_workers": 2, "batch_size": 16, "max_rounds": 40, "seed": 5, **training}}
        assert run_job(inprocess_stack, spec).status == SUCCEEDED, case
        weights[standardize_target] = final_params(efs_root, job_id)
        metrics[standardize_target] = inprocess_stack.services.state.list_round_metrics(job_id)

    np.testing.assert_allclose(weights[True], weights[False], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(weights[True] == 0.0, weights[False] == 0.0)
    if case == "lasso":
        assert np.count_nonzero(weights[True][:-1] == 0.0) > 0
    for name in ("train_loss", "validation_loss", "validation_r2"):
        np.testing.assert_allclose([entry[name] for entry in metrics[True]],
                                   [entry[name] for entry in metrics[False]], rtol=1e-9, err_msg=name)


def test_mode_chosen_by_spec_and_model():
    spec = parse_job_spec(breast_cancer_spec("modes", training={"mode": "model_average", "local_steps": 2}))
    manifest = {"n_features": 3, "classes": [0.0, 1.0], "shard_rows": [100, 99, 99]}

    assert isinstance(get_training_mode(spec, build_model(spec, manifest)), ModelAveraging)
    kmeans_spec = parse_job_spec(breast_cancer_spec("kmeans", model={"name": "kmeans"}, data={"stratify": False}))
    assert isinstance(get_training_mode(kmeans_spec, build_model(kmeans_spec, manifest)), StatisticsMode)
    plain = parse_job_spec(breast_cancer_spec("plain"))
    assert isinstance(get_training_mode(plain, build_model(plain, manifest)), GradientAveraging)


def test_model_average_round_count():
    raw = breast_cancer_spec("rounds", training={"mode": "model_average", "local_steps": 3, "max_rounds": None,
                                                "max_epochs": 2, "batch_size": 10})
    spec = parse_job_spec(raw)
    manifest = {"n_features": 3, "classes": [0.0, 1.0], "shard_rows": [100, 99, 99]}
    mode = get_training_mode(spec, build_model(spec, manifest))

    # 10 batches per epoch, 20 batches in all, 3 per round.
    assert mode.total_rounds(spec, manifest) == 7
    assert mode.epochs_after_round(spec, manifest, 0) == pytest.approx(0.3)


@pytest.mark.parametrize("case", ["gradient_average", "model_average", "statistics", "standardized_target"])
def test_saved_progress_gives_same_bytes(efs_root, inprocess_stack, case):
    spec_dict = mode_spec(f"resume-{case.replace('_', '-')}", case)
    spec_dict["training"]["max_rounds"] = 1
    assert run_job(inprocess_stack, spec_dict).status == SUCCEEDED
    spec, manifest, model, shards = load_job_inputs(efs_root, spec_dict)
    mode = get_training_mode(spec, model)
    params = model.init_params(np.random.default_rng(1))

    straight = mode.worker_result(spec, manifest, model, params, shards[0], 2, 0)

    # Save and reload the progress between every step, as a continuation would.
    progress, done = mode.begin(spec, manifest, model, params, shards[0], 2, 0), False
    while not done:
        progress, done = mode.advance(spec, manifest, model, params, shards[0], 2, 0, progress)
        with np.load(io.BytesIO(encode_arrays(progress))) as archive:
            progress = {name: archive[name] for name in archive.files}
    assert encode_arrays(mode.finish(progress)) == encode_arrays(straight)


@pytest.mark.parametrize("name", ["logistic_regression", "softmax_regression", "linear_svm", "mlp_classifier"])
def test_huge_scores_keep_loss_finite(name):
    model = get_model_class(name)(n_features=2, n_classes=2, hidden_layer_sizes=(4,))
    params = np.full(model.n_params, 1e6)
    X = np.array([[1e6, -1e6], [-1e6, 1e6], [3e5, 2e5]])
    y = np.array([0, 1, 1])

    loss, grad = model.loss_grad(params, X, y)

    assert np.isfinite(loss)
    assert np.all(np.isfinite(grad))


def test_model_average_reports_overflow():
    spec = parse_job_spec(breast_cancer_spec("overflow", training={"mode": "model_average", "local_steps": 2}))
    model = build_model(spec, {"n_features": 2, "classes": [0.0, 1.0]})
    results = [{"params": np.array([np.inf, 0.0, 0.0]), "loss_sum": np.float64(1.0), "n_samples": np.int64(4)}]

    # Round index 7 is the eighth round.
    with pytest.raises(DivergenceError, match="diverged in round 8"):
        ModelAveraging().combine(spec, model, build_optimizer(spec), np.zeros(3), {}, results, 7)


@pytest.mark.parametrize("round_index, hinted", [(0, True), (7, False)])
def test_divergence_hint_in_first_round(round_index, hinted):
    spec = parse_job_spec(breast_cancer_spec("overflow", training={"mode": "model_average", "local_steps": 2}))
    model = build_model(spec, {"n_features": 2, "classes": [0.0, 1.0]})
    results = [{"params": np.zeros(3), "loss_sum": np.float64(np.inf), "n_samples": np.int64(4)}]

    with pytest.raises(DivergenceError) as raised:
        ModelAveraging().combine(spec, model, build_optimizer(spec), np.zeros(3), {}, results, round_index)

    assert "lower optimizer.learning_rate" in str(raised.value)
    assert ("as this is round 1, also check for huge values in the features or labels" in str(raised.value)) == hinted


@pytest.mark.parametrize("model, data, target_hint", [
    ({"name": "mlp_regressor", "hidden_layer_sizes": [4]}, {}, True),
    ({"name": "linear_regression", "alpha": 0.0}, {"standardize_target": True}, False),
    ({"name": "logistic_regression", "alpha": 1e-4}, {}, False),
])
def test_divergence_remedy_names_target_scaling(model, data, target_hint):
    spec = parse_job_spec(breast_cancer_spec("overflow", model=model, data=data,
                                             training={"mode": "model_average", "local_steps": 2}))
    built = build_model(spec, {"n_features": 2, "classes": None if "regress" in model["name"] else [0.0, 1.0]})
    params = np.zeros(built.n_params)
    results = [{"params": params, "loss_sum": np.float64(np.inf), "n_samples": np.int64(4)}]

    with pytest.raises(DivergenceError) as raised:
        ModelAveraging().combine(spec, built, build_optimizer(spec), params, {}, results, 7)

    message = str(raised.value)
    assert message.startswith(DIVERGED_WORDS)
    assert ("; set data.standardize_target to true, which the spec leaves false" in message) == target_hint
    if target_hint:
        assert message.index("standardize_target") < message.index("lower optimizer.learning_rate")
    assert "new job_id (--job-id), or with `baton run --fresh`" in message


@pytest.mark.parametrize("metrics, target_hint", [
    ({"train_loss": 1.0, "validation_loss": np.inf, "validation_r2": -np.inf}, True),
    ({"train_loss": 1.0, "validation_loss": np.inf, "validation_accuracy": 0.5}, False),
])
def test_validation_divergence_remedy(metrics, target_hint):
    from shared.training import check_validation_finite

    with pytest.raises(DivergenceError) as raised:
        check_validation_finite(4, metrics)

    message = str(raised.value)
    assert message.startswith(f"{DIVERGED_WORDS} 5: validation_loss became inf")
    assert ("unless the spec sets data.standardize_target, set it to true" in message) == target_hint
    assert "lower optimizer.learning_rate" in message
    assert "`baton run --fresh`" in message


@pytest.mark.parametrize("standardize_target, target_hint", [(False, True), (True, False)])
def test_validation_divergence_reads_spec(standardize_target, target_hint):
    from shared.training import check_validation_finite

    spec = parse_job_spec(breast_cancer_spec("overflow", model={"name": "linear_regression", "penalty": "l2"},
                                             data={"standardize_target": standardize_target}))
    metrics = {"train_loss": 1.0, "validation_loss": np.inf, "validation_r2": -np.inf}

    with pytest.raises(DivergenceError) as raised:
        check_validation_finite(4, metrics, spec)

    message = str(raised.value)
    assert ("set data.standardize_target to true, which the spec leaves false" in message) == target_hint
    assert "unless the spec sets data.standardize_target" not in message
    assert "lower optimizer.learning_rate" in message


def test_stopping_rules():
    spec = parse_job_spec(breast_cancer_spec("stops", training={"target_validation_accuracy": 0.9,
                                                                 "early_stopping_patience": 2}))
    state = StoppingState()

    state, reason = check_stopping(spec, {"round": 1, "validation_loss": 0.5, "validation_accuracy": 0.8}, state)
    assert reason is None
    state, reason = check_stopping(spec, {"round": 2, "validation_loss": 0.6, "validation_accuracy": 0.8}, state)
    assert reason is None
    state, reason = check_stopping(spec, {"round": 3, "validation_loss": 0.7, "validation_accuracy": 0.8}, state)
    assert reason == "early_stopping"
    assert state == StoppingState.from_dict({"best_validation_loss": 0.5, "best_round": 1})
    _, reason = check_stopping(spec, {"round": 4, "validation_loss": 0.4, "validation_accuracy": 0.95}, state)
    assert reason == "target_accuracy"


@pytest.mark.parametrize("model", [{"name": "linear_regression", "penalty": "l2"}, {"name": "kmeans", "n_clusters": 3}])
def test_validation_chunks_give_whole_metrics(inprocess_stack, efs_root, model, monkeypatch):
    # breast_cancer keeps 20 % of its 569 rows for validation, so chunks of 25 rows split it in 5.
    data = {"validation_fraction": 0.2}
    spec = breast_cancer_spec("whole", model=model, data=data, training={"max_rounds": 3})
    assert run_job(inprocess_stack, spec).status == SUCCEEDED
    monkeypatch.setattr("shared.aggregation.VALIDATION_CHUNK_ROWS", 25)
    spec = breast_cancer_spec("chunked", model=model, data=data, training={"max_rounds": 3})
    assert run_job(inprocess_stack, spec).status == SUCCEEDED

    whole = inprocess_stack.services.state.list_round_metrics("whole")
    chunked = inprocess_stack.services.state.list_round_metrics("chunked")
    names = ["validation_r2", "validation_mse", "validation_loss"] if model["name"] != "kmeans" else \
        ["validation_inertia", "validation_loss"]
    for whole_round, chunked_round in zip(whole, chunked):
        for name in names:
            assert chunked_round[name] == pytest.approx(whole_round[name], rel=1e-12), name
