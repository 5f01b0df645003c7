"""Turning a finished job's model into a fitted scikit-learn estimator.

A job ends with ``model/params.npy`` and ``model/model.json`` on EFS, next to the job's
``spec.json`` and ``data/manifest.json`` (and ``data/standardize.npz`` when the data was
standardised). scikit-learn is too large for the Lambda package, so the estimator is
built where the CLI runs, from those files:

=====================  ==============================================================
Baton model            scikit-learn estimator
=====================  ==============================================================
logistic_regression    ``LogisticRegression``
softmax_regression     ``LogisticRegression`` (multinomial)
linear_svm             ``LinearSVC`` for an L2 penalty, else ``SGDClassifier``
linear_regression      ``Ridge``, ``Lasso`` or ``ElasticNet``, after ``model.penalty``
mlp_classifier         ``MLPClassifier``
mlp_regressor          ``MLPRegressor``
kmeans                 ``KMeans``
=====================  ==============================================================

The fitted attributes are set from Baton's parameters, and the hyperparameters are set
so that refitting the estimator minimises the same objective, class weights included
(``MLPClassifier`` has no ``class_weight``, so its refit weighs every class alike). When the data was
standardised, the estimator is a ``Pipeline`` whose first step is a ``StandardScaler``
holding the training statistics, so it takes raw features, as Baton's prediction does.
A job that trained on standardised targets (``data.standardize_target``) stored its final
parameters in the targets' own units, so its estimator predicts in those units and needs
no step for the targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared import models
from shared.efs import EfsStore
from shared.errors import BatonError, DamagedFileError, DataError, JobSpecError
from shared.models import Model
from shared.monitor import damaged_spec_remedy
from shared.spec import JobSpec, parse_job_spec
from shared.standardization import standardize_rows
from shared.target_scaling import target_scaling
from shared.training import build_model, class_weights, manifest_problem


class ExportError(BatonError):
    """A job's model files are missing or cannot be turned into an estimator."""


@dataclass
class TrainedModel:
    """A finished job's model as stored on EFS."""

    spec: JobSpec
    manifest: dict
    model: Model
    params: np.ndarray
    scaling: tuple[np.ndarray | None, np.ndarray] | None

    @property
    def classes(self) -> np.ndarray | None:
        classes = self.manifest.get("classes")
        return None if classes is None else np.asarray(classes)

    @property
    def n_training_rows(self) -> int:
        return int(sum(self.manifest["shard_rows"]))

    def predict(self, X) -> np.ndarray:
        """Return Baton's predictions for raw feature rows: class labels, values or cluster indices."""
        if self.scaling is not None:
            X = standardize_rows(X, *self.scaling)
        predicted = self.model.predict(self.params, X)
        if self.model.task not in ("binary", "multiclass"):
            return predicted
        classes = self.classes
        assert classes is not None  # the manifest of a classifier's job lists its classes
        return classes[predicted]


def load_trained_model(efs_root: str | Path, job_id: str) -> TrainedModel:
    """Read a finished job's spec, manifest, scaling statistics and final parameters.

    Raises
    ------
    ExportError
        If the job folder or its final model is missing.
    DamagedFileError
        If a file that the estimator is built from was changed after the job wrote it, so
        that it is unreadable, not JSON or .npy, misses a field, or has values that do not
        fit the job's model.
    """
    store = EfsStore(efs_root)
    params_path = store.model_dir(job_id) / "params.npy"
    if not store.job_dir(job_id).is_dir():
        raise ExportError(f"no job folder {store.job_dir(job_id)}; check the job id and --local-dir or --efs-root")
    # model.json is written after the parameters when the job succeeds, so alone it means params.npy was removed.
    if not params_path.exists() and not (store.model_dir(job_id) / "model.json").exists():
        raise ExportError(f"job {job_id} has no final model at {params_path}: a job writes it only when it succeeds. "
                          f"`baton status {job_id}` with the stack's --stage (and --endpoint-url for the stack of a "
                          "running `baton run`) shows whether it is still running (export it once it has "
                          "succeeded), failed or was cancelled")

    spec = _read_spec(store, job_id)
    manifest = _read_manifest(store, job_id)
    model = build_model(spec, manifest)
    _check_classes(store, job_id, manifest, model)
    params = _read_final_params(store, job_id, model, manifest)
    return TrainedModel(spec, manifest, model, params, _read_scaling(store, job_id, manifest, model.n_features))


# The remedy when a job's files cannot be repaired.
RETRAIN_REMEDY = ("train the job again: send its spec under a new job id, or for a local job, once its "
                  "`baton run` has ended, run it again with `baton run --fresh`")
# Remedy for a damaged data/manifest.json or data/standardize.npz.
PREPARED_DATA_REMEDY = f"the data preparation writes it, so {RETRAIN_REMEDY}, which prepares the data again"


def _read_spec(store: EfsStore, job_id: str) -> JobSpec:
    path = store.spec_path(job_id)
    remedy = damaged_spec_remedy(job_id)
    try:
        return parse_job_spec(store.read_json_object(path, remedy))
    except JobSpecError as error:
        raise store.damaged_file_error(path, f"is not a valid job spec ({error})", remedy) from None


def _read_manifest(store: EfsStore, job_id: str) -> dict:
    path = store.data_dir(job_id) / "manifest.json"
    manifest = store.read_json_object(path, PREPARED_DATA_REMEDY)
    problem = manifest_problem(manifest)
    if problem is not None:
        raise store.damaged_file_error(path, problem, PREPARED_DATA_REMEDY)
    return manifest


def _check_classes(store: EfsStore, job_id: str, manifest: dict, model: Model) -> None:
    """Raise :class:`DamagedFileError` unless the manifest has classes exactly when ``model`` is a classifier."""
    path = store.data_dir(job_id) / "manifest.json"
    classes = manifest["classes"]
    if model.task not in ("binary", "multiclass"):
        if classes is not None:
            raise store.damaged_file_error(path, f'has "classes", but model {model.name} is not a classifier, so '
                                                 'its data has none', PREPARED_DATA_REMEDY)
        return
    if classes is None:
        raise store.damaged_file_error(path, f'has "classes": null, but model {model.name} is a classifier',
                                       PREPARED_DATA_REMEDY)
    try:
        model.check_classes(np.asarray(classes))
    except DataError as error:
        raise store.damaged_file_error(path, f'has "classes" that do not fit the job\'s model ({error})',
                                       PREPARED_DATA_REMEDY) from None


def _final_params_remedy(store: EfsStore, job_id: str, n_params: int) -> str:
    """Return the remedy for a damaged model/params.npy: where the same parameters are, or training again."""
    rounds_dir = store.job_dir(job_id) / "rounds"
    saved_rounds = []
    if rounds_dir.is_dir():
        saved_rounds = [int(entry.name) for entry in rounds_dir.iterdir()
                        if entry.name.isdigit() and (entry / "state.npz").is_file()]
    if saved_rounds:
        # A job's final parameters are the state it stored for the round after its last one.
        state_path = store.state_path(job_id, max(saved_rounds))
        try:
            fits = store.read_arrays(state_path)["params"].shape == (n_params,)
        except (OSError, ValueError, KeyError, EOFError):
            fits = False
        if fits:
            return (f'the "params" array of {state_path.relative_to(store.root)} contains the same parameters, so '
                    f"save that array over it with numpy.save, or {RETRAIN_REMEDY}")
    return RETRAIN_REMEDY


def _read_final_params(store: EfsStore, job_id: str, model: Model, manifest: dict) -> np.ndarray:
    path = store.model_dir(job_id) / "params.npy"
    # With standardised targets the round states hold the scaled problem's parameters,
    # not the final model's, so only training again restores the file.
    scaled = target_scaling(manifest) is not None
    remedy = RETRAIN_REMEDY if scaled else _final_params_remedy(store, job_id, model.n_params)
    if not path.exists():
        raise store.damaged_file_error(path, "is missing, although model/model.json shows that the job "
                                             "succeeded", remedy)
    params = store.read_npy_checked(path, remedy)
    if params.dtype.kind != "f":
        raise store.damaged_file_error(path, f"contains an array of {params.dtype} values, but a job writes its "
                                             "parameters as floating-point numbers", remedy)
    if params.shape != (model.n_params,):
        # The model's size comes from spec.json and data/manifest.json, so a change to either shows here.
        raise store.damaged_file_error(path, f"contains an array of shape {params.shape}, but the model that "
                                             f"spec.json and data/manifest.json describe has {model.n_params} "
                                             "parameters", f"if one of those two files was changed, restore it; "
                                                           f"otherwise {remedy}")
    not_finite = int(np.count_nonzero(~np.isfinite(params)))
    if not_finite:
        raise store.damaged_file_error(path, f"contains {not_finite} of {params.size} parameters that are not finite "
                                             "(NaN or infinite), which a job that succeeded never writes", remedy)
    return params


# Arrays of data/standardize.npz: the training mean and scale of each feature, and whether
# the data was centred (sparse data is only scaled, and its "mean" is zeros).
SCALING_ARRAYS = ("mean", "scale", "centered")


def _read_scaling(store: EfsStore, job_id: str, manifest: dict,
                  n_features: int) -> tuple[np.ndarray | None, np.ndarray] | None:
    """Return the ``(mean, scale)`` the job's data was standardised with, or None if it was not.

    ``mean`` is None when the data was only scaled, not centred.
    """
    path = store.data_dir(job_id) / "standardize.npz"
    copy_path = store.model_dir(job_id) / "standardize.npz"
    remedy = PREPARED_DATA_REMEDY
    if copy_path.is_file() and _scaling_problem(store, copy_path, n_features) is None:
        remedy = (f"the job copied it to {copy_path.relative_to(store.root)} when it succeeded, so copy that file "
                  f"over it, or {RETRAIN_REMEDY}")
    if not manifest["standardized"]:
        # A stray file, such as one an earlier job of this id left, does not count.
        return None
    if not path.exists():
        raise store.damaged_file_error(path, "is missing, but data/manifest.json records that the data was "
                                             "standardised", remedy)
    return _read_scaling_file(store, path, n_features, remedy)


def _scaling_problem(store: EfsStore, path: Path, n_features: int) -> DamagedFileError | None:
    """Return the error :func:`_read_scaling_file` would raise for ``path``, or None if the file is valid."""
    try:
        _read_scaling_file(store, path, n_features, "")
    except DamagedFileError as error:
        return error
    return None


def _read_scaling_file(store: EfsStore, path: Path, n_features: int,
                       remedy: str) -> tuple[np.ndarray | None, np.ndarray]:
    """Read and check a ``standardize.npz`` of ``n_features`` features; ``remedy`` ends its errors."""
    arrays = store.read_arrays_checked(path, remedy)
    for name in SCALING_ARRAYS:
        if name not in arrays:
            raise store.damaged_file_error(path, f'has no "{name}" array', remedy)
    for name in ("mean", "scale"):
        values = arrays[name]
        if values.dtype.kind != "f" or values.shape != (n_features,):
            raise store.damaged_file_error(path, f'contains a "{name}" array of {values.dtype} values and shape '
                                                 f"{values.shape}, but the job has {n_features} features, so it must "
                                                 f"be floating-point of shape ({n_features},)", remedy)
        if not np.isfinite(values).all():
            raise store.damaged_file_error(path, f'contains values in its "{name}" array that are not finite',
                                           remedy)
    if not (arrays["scale"] > 0).all():
        raise store.damaged_file_error(path, 'contains values in its "scale" array that are not positive', remedy)
    centered = arrays["centered"]
    if centered.dtype != np.bool_ or centered.shape != ():
        raise store.damaged_file_error(path, f'contains a "centered" array of {centered.dtype} values and shape '
                                             f"{centered.shape}, but it must be one boolean", remedy)
    return (arrays["mean"] if bool(centered) else None), arrays["scale"]


def check_model_folder(efs_root: str | Path, job_id: str) -> None:
    """Raise :class:`DamagedFileError` naming the first file of a finished job's model folder that is damaged.

    Checks what :func:`load_trained_model` reads, then ``model/model.json`` and the copy
    ``model/standardize.npz``, which let the model folder alone describe and predict.
    """
    trained = load_trained_model(efs_root, job_id)
    store = EfsStore(efs_root)
    model_dir = store.model_dir(job_id)
    store.read_json_object(model_dir / "model.json", f"the job writes it when it succeeds, so {RETRAIN_REMEDY}")
    copy_path = model_dir / "standardize.npz"
    data_path = store.data_dir(job_id) / "standardize.npz"
    remedy = f"copy {data_path.relative_to(store.root)}, of which it is a copy, over it, or {RETRAIN_REMEDY}"
    if trained.scaling is None:
        return
    if not copy_path.exists():
        raise store.damaged_file_error(copy_path, "is missing, but the job's data was standardised", remedy)
    _read_scaling_file(store, copy_path, trained.model.n_features, remedy)


def build_estimator(trained: TrainedModel):
    """Return a fitted scikit-learn estimator that predicts as ``trained`` does."""
    builders = {
        "logistic_regression": _logistic_regression,
        "softmax_regression": _softmax_regression,
        "linear_svm": _linear_svm,
        "linear_regression": _linear_regression,
        "mlp_classifier": _mlp,
        "mlp_regressor": _mlp,
        "kmeans": _kmeans,
    }
    estimator = builders[trained.spec.model.name](trained)
    estimator.n_features_in_ = trained.model.n_features
    classes = trained.classes
    weights = class_weights(trained.spec, trained.manifest) if classes is not None else None
    if classes is not None and weights is not None and "class_weight" in estimator.get_params():
        # The weights Baton trained with, by label, so a refit weighs each class the same way.
        estimator.set_params(class_weight={label.item(): float(weight) for label, weight in zip(classes, weights)})
    if trained.scaling is None:
        return estimator

    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    mean, scale = trained.scaling
    scaler = StandardScaler(with_mean=mean is not None)
    scaler.mean_ = mean
    scaler.scale_ = scale
    scaler.var_ = scale ** 2
    scaler.n_features_in_ = trained.model.n_features
    scaler.n_samples_seen_ = trained.n_training_rows
    return Pipeline([("standardize", scaler), ("model", estimator)])


def _inverse_regularisation(trained: TrainedModel) -> float:
    """Return scikit-learn's ``C``: Baton's mean loss plus ``alpha`` penalty equals C = 1 / (alpha * n)."""
    alpha = trained.spec.model.alpha
    return np.inf if alpha == 0 else 1.0 / (alpha * trained.n_training_rows)


def _l1_share(trained: TrainedModel) -> float:
    section = trained.spec.model
    return {"l2": 0.0, "l1": 1.0, "elasticnet": section.l1_ratio}[section.penalty]


def _set_linear(estimator, trained: TrainedModel, coef: np.ndarray, intercept: np.ndarray):
    estimator.coef_ = np.ascontiguousarray(coef, dtype=np.float64)
    estimator.intercept_ = np.asarray(intercept, dtype=np.float64)
    if trained.classes is not None:
        estimator.classes_ = trained.classes
    return estimator


def _logistic_regression(trained: TrainedModel):
    from sklearn.linear_model import LogisticRegression

    share = _l1_share(trained)
    estimator = LogisticRegression(C=_inverse_regularisation(trained), l1_ratio=share,
                                   solver="saga" if share > 0 else "lbfgs", max_iter=1000)
    return _set_linear(estimator, trained, trained.params[:-1][np.newaxis, :], trained.params[-1:])


def _softmax_regression(trained: TrainedModel):
    from sklearn.linear_model import LogisticRegression

    share = _l1_share(trained)
    estimator = LogisticRegression(C=_inverse_regularisation(trained), l1_ratio=share,
                                   solver="saga" if share > 0 else "lbfgs", max_iter=1000)
    model = trained.model
    assert isinstance(model, models.SoftmaxRegression)  # the builder is chosen by the model's name
    weights, biases = model.unpack(trained.params)
    if weights.shape[1] == 2:
        # scikit-learn keeps one score for two classes; the softmax of two scores only
        # depends on their difference.
        return _set_linear(estimator, trained, (weights[:, 1] - weights[:, 0])[np.newaxis, :],
                           biases[1:] - biases[:1])
    return _set_linear(estimator, trained, weights.T, biases)


def _linear_svm(trained: TrainedModel):
    section = trained.spec.model
    if section.penalty == "l2":
        from sklearn.svm import LinearSVC

        estimator = LinearSVC(C=_inverse_regularisation(trained), loss=section.loss)
    else:
        from sklearn.linear_model import SGDClassifier

        estimator = SGDClassifier(loss=section.loss, penalty=section.penalty, alpha=section.alpha,
                                  l1_ratio=section.l1_ratio)
    return _set_linear(estimator, trained, trained.params[:-1][np.newaxis, :], trained.params[-1:])


def _linear_regression(trained: TrainedModel):
    from sklearn.linear_model import ElasticNet, Lasso, Ridge

    section = trained.spec.model
    if section.penalty == "l1":
        estimator = Lasso(alpha=section.alpha)
    elif section.penalty == "elasticnet":
        estimator = ElasticNet(alpha=section.alpha, l1_ratio=section.l1_ratio)
    else:
        # Baton's objective is the mean half squared error; Ridge's is the summed squared error.
        estimator = Ridge(alpha=section.alpha * trained.n_training_rows)
    return _set_linear(estimator, trained, trained.params[:-1], trained.params[-1])


def _mlp(trained: TrainedModel):
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.preprocessing import LabelBinarizer

    section = trained.spec.model
    model = trained.model
    assert isinstance(model, (models.MLPClassifier, models.MLPRegressor))  # the builder is chosen by the model's name
    layers = [(weights.copy(), biases.copy()) for weights, biases in model.unpack(trained.params)]
    # scikit-learn divides its L2 term by the row count; Baton does not.
    options = {"hidden_layer_sizes": tuple(section.hidden_layer_sizes), "activation": section.activation,
               "alpha": section.alpha * trained.n_training_rows}

    if trained.model.task == "regression":
        estimator = MLPRegressor(**options)
        estimator.out_activation_ = "identity"
    else:
        classes = trained.classes
        assert classes is not None  # the manifest of a classifier's job lists its classes
        estimator = MLPClassifier(**options)
        estimator.classes_ = classes
        estimator._label_binarizer = LabelBinarizer().fit(classes)
        if len(classes) == 2:
            weights, biases = layers[-1]
            layers[-1] = ((weights[:, 1] - weights[:, 0])[:, np.newaxis], biases[1:] - biases[:1])
            estimator.out_activation_ = "logistic"
        else:
            estimator.out_activation_ = "softmax"

    estimator.coefs_ = [weights for weights, _ in layers]
    estimator.intercepts_ = [biases for _, biases in layers]
    estimator.n_layers_ = len(layers) + 1
    estimator.n_outputs_ = layers[-1][0].shape[1]
    return estimator


def _kmeans(trained: TrainedModel):
    from sklearn.cluster import KMeans

    model = trained.model
    assert isinstance(model, models.KMeans)  # the builder is chosen by the model's name
    estimator = KMeans(n_clusters=trained.spec.model.n_clusters, n_init=1)
    estimator.cluster_centers_ = model.centroids(trained.params).copy()
    estimator._n_threads = 1
    return estimator


def export_estimator(efs_root: str | Path, job_id: str, output: str | Path) -> tuple[object, Path]:
    """Build the estimator of ``job_id`` and save it with joblib at ``output``; return both."""
    import joblib

    estimator = build_estimator(load_trained_model(efs_root, job_id))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, output)
    return estimator, output
