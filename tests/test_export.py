"""Export: a job's final model as a fitted scikit-learn estimator that predicts as Baton does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import joblib
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import mean_squared_error, r2_score

from shared.cli import main
from shared.export import load_trained_model
from shared.formats.delimited import read_csv
from shared.state import SUCCEEDED
from tests.baton_jobs import (breast_cancer_spec, california_housing, california_spec, run_job, write_csv,
                              write_diabetes)
from tests.conftest import BREAST_CANCER_CSV, PROJECT_ROOT

EXPORT_CASES = {
    "logistic": ({"name": "logistic_regression", "class_weight": "balanced"}, {}, "LogisticRegression"),
    "logistic-l1": ({"name": "logistic_regression", "penalty": "elasticnet", "l1_method": "proximal"}, {},
                    "LogisticRegression"),
    "softmax": ({"name": "softmax_regression"}, {}, "LogisticRegression"),
    "svm": ({"name": "linear_svm", "loss": "squared_hinge", "class_weight": {"1": 2.0}}, {}, "LinearSVC"),
    "svm-l1": ({"name": "linear_svm", "penalty": "l1"}, {}, "SGDClassifier"),
    "ridge": ({"name": "linear_regression", "alpha": 1e-3}, {"stratify": False}, "Ridge"),
    "lasso": ({"name": "linear_regression", "penalty": "l1", "alpha": 1e-3}, {"stratify": False}, "Lasso"),
    "mlp": ({"name": "mlp_classifier", "hidden_layer_sizes": [6, 4], "activation": "tanh"}, {}, "MLPClassifier"),
    "mlp-regressor": ({"name": "mlp_regressor", "hidden_layer_sizes": [5]}, {"stratify": False}, "MLPRegressor"),
    "kmeans": ({"name": "kmeans", "n_clusters": 3}, {"stratify": False}, "KMeans"),
}

# Run in a new interpreter, so the estimator is read back from the file alone.
PREDICT_SCRIPT = """
import json, sys, joblib, numpy as np
X = np.load(sys.argv[1])
paths = json.loads(sys.argv[2])
out = {name: joblib.load(path).predict(X).tolist() for name, path in paths.items()}
print(json.dumps(out))
"""


def test_exported_estimators_predict_like_baton(inprocess_stack, efs_root, tmp_path):
    X_raw, _ = read_csv(efs_root / "datasets" / "breast_cancer.csv", skip_rows=1)
    X_test = np.asarray(X_raw[::3], dtype=np.float64)
    np.save(tmp_path / "X.npy", X_test)

    paths, expected, names = {}, {}, {}
    for case, (model, data, _) in EXPORT_CASES.items():
        # The network regressor diverges at the other cases' learning rate of 0.5.
        optimizer = {"learning_rate": 0.1} if case == "mlp-regressor" else None
        spec = breast_cancer_spec(f"export-{case}", model=model, optimizer=optimizer, data=data,
                                  training={"max_rounds": 8})
        record = run_job(inprocess_stack, spec)
        assert record.status == SUCCEEDED, (case, record.error)

        output = tmp_path / f"{case}.joblib"
        result = CliRunner().invoke(main, ["export", spec["job_id"], "--efs-root", str(efs_root),
                                           "--output", str(output)])
        assert result.exit_code == 0, result.output
        assert result.stdout == f"{output}\n", "export prints the path it wrote, as fetch and plot do"
        assert "contains a fitted Pipeline(StandardScaler, " in result.stderr, case
        names[case] = type(joblib.load(output)).__name__
        paths[case] = str(output)
        expected[case] = load_trained_model(efs_root, spec["job_id"]).predict(X_test)
        # fetch checks the whole model folder of every kind of model before copying it.
        fetched = CliRunner().invoke(main, ["fetch", spec["job_id"], "--efs-root", str(efs_root), "--output",
                                            str(tmp_path / f"fetched-{case}")])
        assert fetched.exit_code == 0, (case, fetched.output)
        assert (tmp_path / f"fetched-{case}" / "model" / "params.npy").is_file(), case

    completed = subprocess.run([sys.executable, "-c", PREDICT_SCRIPT, str(tmp_path / "X.npy"), json.dumps(paths)],
                               capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
    predicted = json.loads(completed.stdout)

    for case, (_, _, estimator_name) in EXPORT_CASES.items():
        assert names[case] == "Pipeline", case  # the data was standardised
        pipeline_model = __import__("joblib").load(paths[case]).named_steps["model"]
        assert type(pipeline_model).__name__ == estimator_name, case
        if case in ("ridge", "lasso", "mlp-regressor"):
            np.testing.assert_allclose(predicted[case], expected[case], rtol=1e-9, err_msg=case)
        else:
            np.testing.assert_array_equal(predicted[case], expected[case], err_msg=case)

    # The class weights Baton trained with travel with the estimator.
    logistic = __import__("joblib").load(paths["logistic"]).named_steps["model"]
    assert set(logistic.class_weight) == {0, 1}
    # "balanced" gives the rarer class 0 (212 of 569 rows) a weight above 1.
    assert logistic.class_weight[0] > 1.0 > logistic.class_weight[1], logistic.class_weight
    svm = __import__("joblib").load(paths["svm"]).named_steps["model"]
    assert svm.class_weight == {0: 1.0, 1: 2.0}


def test_model_folder_stands_alone(inprocess_stack, efs_root):
    spec = breast_cancer_spec("self-contained", training={"max_rounds": 3})
    assert run_job(inprocess_stack, spec).status == SUCCEEDED
    model_dir = efs_root / "jobs" / "self-contained" / "model"

    description = json.loads((model_dir / "model.json").read_text())
    statistics = np.load(model_dir / "standardize.npz")

    assert description["standardized"] is True
    assert description["stop_reason"] == "max_rounds"
    trained = load_trained_model(efs_root, "self-contained")
    np.testing.assert_array_equal(statistics["mean"], trained.scaling[0])
    np.testing.assert_array_equal(statistics["scale"], trained.scaling[1])
    assert bool(statistics["centered"]) is True


def test_export_of_unknown_job_fails(tmp_path):
    result = CliRunner().invoke(main, ["export", "nope", "--efs-root", str(tmp_path), "--output",
                                       str(tmp_path / "m.joblib")])

    assert result.exit_code != 0
    assert "no job folder" in result.output


def test_export_of_job_without_model_says_why(tmp_path):
    (tmp_path / "jobs" / "unfinished").mkdir(parents=True)

    result = CliRunner().invoke(main, ["export", "unfinished", "--efs-root", str(tmp_path), "--output",
                                       str(tmp_path / "m.joblib")])

    assert result.exit_code == 1
    assert "job unfinished has no final model" in result.output
    assert "a job writes it only when it succeeds" in result.output
    assert "`baton status unfinished`" in result.output
    assert not (tmp_path / "m.joblib").exists()


@pytest.mark.parametrize("name", ["plot.png", "model", "model.joblib.txt"])
def test_export_rejects_other_extension(tmp_path, name):
    output = tmp_path / name
    output.write_bytes(b"\x89PNG existing file")

    result = CliRunner().invoke(main, ["export", "any-job", "--efs-root", str(tmp_path), "--output", str(output)])

    assert result.exit_code == 1, result.output
    assert result.output == (f"Error: --output {output}: baton export writes a joblib file; give the file a "
                             ".joblib, .pkl or .pickle extension. Nothing was written\n")
    assert output.read_bytes() == b"\x89PNG existing file"


@pytest.mark.parametrize("name", ["m.pkl", "m.PICKLE"])
def test_export_accepts_pickle_extensions(tmp_path, name):
    # The job does not exist, so passing the extension check shows as the missing job's error.
    result = CliRunner().invoke(main, ["export", "any-job", "--efs-root", str(tmp_path), "--output",
                                       str(tmp_path / name)])

    assert result.exit_code == 1, result.output
    assert "no job folder" in result.output
    assert "extension" not in result.output


@pytest.mark.parametrize("damaged, content, remedy", [
    ("spec.json", "{not json", "replace it with the job's spec: while the job's stack runs, `baton fetch damaged`"),
    ("spec.json", "\xff", "replace it with the job's spec"),
    ("data/manifest.json", "[]", "the data preparation writes it, so train the job again: send its spec under a new job id"),
    ("data/manifest.json", None, "the data preparation writes it"),
], ids=["spec-not-json", "spec-not-utf8", "manifest-not-object", "manifest-missing"])
def test_export_names_damaged_file(tmp_path, damaged, content, remedy):
    job_dir = tmp_path / "jobs" / "damaged"
    (job_dir / "model").mkdir(parents=True)
    (job_dir / "data").mkdir()
    np.save(job_dir / "model" / "params.npy", np.zeros(31))
    (job_dir / "spec.json").write_text(json.dumps(breast_cancer_spec("damaged")))
    (job_dir / "data" / "manifest.json").write_text("{}")
    if content is None:
        (job_dir / damaged).unlink()
    else:
        (job_dir / damaged).write_bytes(content.encode("latin-1"))

    result = CliRunner().invoke(main, ["export", "damaged", "--efs-root", str(tmp_path), "--output",
                                       str(tmp_path / "m.joblib")])

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith(f"Error: jobs/damaged/{damaged} in the EFS folder {tmp_path} ")
    assert remedy in result.output
    assert not (tmp_path / "m.joblib").exists()


# A finished job on breast_cancer.csv (30 features, standardised), which tests copy and damage.
FINISHED_JOB = "damaged-files"
N_PARAMS = 31
# Its final parameters are the state stored for round index 2, after its last round.
FINAL_STATE = f"jobs/{FINISHED_JOB}/rounds/2/state.npz"


@pytest.fixture(scope="module")
def finished_root(tmp_path_factory):
    """Return an EFS folder containing FINISHED_JOB, run once for the module."""
    from moto import mock_aws

    from tests.inprocess import InProcessStack

    root = tmp_path_factory.mktemp("finished") / "efs"
    (root / "datasets").mkdir(parents=True)
    shutil.copyfile(BREAST_CANCER_CSV, root / "datasets" / "breast_cancer.csv")
    with mock_aws():
        stack = InProcessStack(root)
        try:
            record = run_job(stack, breast_cancer_spec(FINISHED_JOB, training={"max_rounds": 2}))
        finally:
            stack.close()
    assert record.status == SUCCEEDED, record.error
    return root


def copy_finished_job(finished_root, tmp_path):
    """Return an EFS folder containing a copy of FINISHED_JOB's files, which a test may damage."""
    root = tmp_path / "efs"
    shutil.copytree(finished_root / "jobs" / FINISHED_JOB, root / "jobs" / FINISHED_JOB)
    return root


def change_json(path, **fields):
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def drop_spec_section(path, section):
    spec = json.loads(path.read_text())
    del spec[section]
    path.write_text(json.dumps(spec))


def change_arrays(path, **arrays):
    with np.load(path) as archive:
        stored = {name: archive[name] for name in archive.files}
    np.savez(path, **{**stored, **arrays})


PREPARE_AGAIN = ("the data preparation writes it, so train the job again: send its spec under a new job id, or for a "
                 "local job, once its `baton run` has ended, run it again with `baton run --fresh`")
COPY_SCALING = (f"the job copied it to jobs/{FINISHED_JOB}/model/standardize.npz when it succeeded, so copy that file "
                "over it")
COPY_STATE = f'the "params" array of {FINAL_STATE} contains the same parameters, so save that array over it'
SPEC_REMEDY = f"replace it with the job's spec: while the job's stack runs, `baton fetch {FINISHED_JOB}`"

# Each case: the damaged file, how it is damaged, the problem the error must name, and its remedy.
DAMAGE_CASES = {
    "manifest-empty": ("data/manifest.json", lambda path: path.write_text("{}"),
                       'has no "n_features" field (a positive integer)', PREPARE_AGAIN),
    "manifest-shard-rows": ("data/manifest.json", lambda path: change_json(path, shard_rows="abc"),
                            'has "shard_rows": "abc", but it must be a list of row counts', PREPARE_AGAIN),
    "manifest-class-counts": ("data/manifest.json", lambda path: change_json(path, class_counts=[3]),
                              'has "class_counts": [3], but it must contain one row count for each of the 2 labels',
                              PREPARE_AGAIN),
    "manifest-no-classes": ("data/manifest.json", lambda path: change_json(path, classes=None, class_counts=None),
                            'has "classes": null, but model logistic_regression is a classifier', PREPARE_AGAIN),
    "manifest-target-scale": ("data/manifest.json", lambda path: change_json(path, target_scale=0),
                              'has "target_scale": 0, but it must be null or a finite number above 0', PREPARE_AGAIN),
    "scaling-junk": ("data/standardize.npz", lambda path: path.write_bytes(b"not an archive"),
                     "is not an .npz archive: it does not start with b'PK'", COPY_SCALING),
    "scaling-missing": ("data/standardize.npz", lambda path: path.unlink(),
                        "is missing, but data/manifest.json records that the data was standardised", COPY_SCALING),
    "scaling-zero": ("data/standardize.npz", lambda path: change_arrays(path, scale=np.zeros(30)),
                     'contains values in its "scale" array that are not positive', COPY_SCALING),
    "scaling-shape": ("data/standardize.npz", lambda path: change_arrays(path, mean=np.zeros(4)),
                      'contains a "mean" array of float64 values and shape (4,), but the job has 30 features',
                      COPY_SCALING),
    "params-strings": ("model/params.npy", lambda path: np.save(path, np.full(N_PARAMS, "abc")),
                       "contains an array of <U3 values, but a job writes its parameters as floating-point numbers",
                       COPY_STATE),
    "params-nan": ("model/params.npy", lambda path: np.save(path, np.full(N_PARAMS, np.nan)),
                   f"contains {N_PARAMS} of {N_PARAMS} parameters that are not finite (NaN or infinite)", COPY_STATE),
    "params-shape": ("model/params.npy", lambda path: np.save(path, np.zeros(5)),
                     f"contains an array of shape (5,), but the model that spec.json and data/manifest.json describe "
                     f"has {N_PARAMS} parameters", f"if one of those two files was changed, restore it; otherwise "
                                                   f"{COPY_STATE}"),
    "params-missing": ("model/params.npy", lambda path: path.unlink(),
                       "is missing, although model/model.json shows that the job succeeded", COPY_STATE),

    "params-truncated": ("model/params.npy", lambda path: path.write_bytes(path.read_bytes()[:-8]),
                         "is not a valid .npy array (ValueError: Failed to read all data", COPY_STATE),
    "params-header-only": ("model/params.npy", lambda path: path.write_bytes(b"\x93NUMPY"),
                           "is not a valid .npy array (", COPY_STATE),
    "params-empty": ("model/params.npy", lambda path: path.write_bytes(b""), "is empty", COPY_STATE),
    "spec-no-model": ("spec.json", lambda path: drop_spec_section(path, "model"),
                      "is not a valid job spec (invalid job spec field 'model': missing required section)",
                      SPEC_REMEDY),
}


@pytest.mark.parametrize("case", DAMAGE_CASES)
def test_export_names_damaged_job_file(finished_root, tmp_path, case):
    name, damage, problem, remedy = DAMAGE_CASES[case]
    root = copy_finished_job(finished_root, tmp_path)
    damage(root / "jobs" / FINISHED_JOB / name)
    output = tmp_path / "m.joblib"

    result = CliRunner().invoke(main, ["export", FINISHED_JOB, "--efs-root", str(root), "--output", str(output)])

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith(f"Error: jobs/{FINISHED_JOB}/{name} in the EFS folder {root} {problem}"), \
        result.output
    assert f"; {remedy}" in result.output
    assert not output.exists()


def test_changed_manifest_named_with_params(finished_root, tmp_path):
    root = copy_finished_job(finished_root, tmp_path)
    change_json(root / "jobs" / FINISHED_JOB / "data" / "manifest.json", n_features=10)

    result = CliRunner().invoke(main, ["export", FINISHED_JOB, "--efs-root", str(root), "--output",
                                       str(tmp_path / "m.joblib")])

    assert result.exit_code == 1, result.output
    assert (f"jobs/{FINISHED_JOB}/model/params.npy in the EFS folder {root} contains an array of shape (31,), but "
            "the model that spec.json and data/manifest.json describe has 11 parameters; if one of those two files "
            "was changed, restore it; otherwise train the job again") in result.output
    # The final round state has 31 parameters too, so it is not offered as a fix.
    assert "state.npz" not in result.output


def test_standardize_target_damaged_params_remedy(inprocess_stack, efs_root, tmp_path):
    spec = {"job_id": "scaled-damaged", "model": {"name": "linear_regression"},
            "data": {"path": write_diabetes(efs_root), "format": "npz", "standardize_target": True},
            "training": {"n_workers": 2, "batch_size": 16, "max_rounds": 2}}
    assert run_job(inprocess_stack, spec).status == SUCCEEDED
    np.save(efs_root / "jobs" / "scaled-damaged" / "model" / "params.npy", np.full(11, np.nan))

    result = CliRunner().invoke(main, ["export", "scaled-damaged", "--efs-root", str(efs_root), "--output",
                                       str(tmp_path / "m.joblib")])

    assert result.exit_code == 1, result.output
    assert "contains 11 of 11 parameters that are not finite (NaN or infinite), which a job that succeeded never " \
           "writes; train the job again" in result.output
    # The round states contain the parameters of the standardised targets, not the final model's.
    assert "state.npz" not in result.output


def test_export_remedies_restore_model(finished_root, tmp_path):
    root = copy_finished_job(finished_root, tmp_path)
    job_dir = root / "jobs" / FINISHED_JOB
    X_raw, _ = read_csv(BREAST_CANCER_CSV, skip_rows=1)
    X = np.asarray(X_raw, dtype=np.float64)
    expected = load_trained_model(finished_root, FINISHED_JOB).predict(X)
    np.save(job_dir / "model" / "params.npy", np.full(N_PARAMS, np.nan))
    (job_dir / "data" / "standardize.npz").write_bytes(b"not an archive")

    # What the two errors advise: the params array of the final round state, and the model folder's copy.
    with np.load(root / FINAL_STATE) as state:
        np.save(job_dir / "model" / "params.npy", state["params"])
    shutil.copyfile(job_dir / "model" / "standardize.npz", job_dir / "data" / "standardize.npz")

    predicted = load_trained_model(root, FINISHED_JOB).predict(X)
    np.testing.assert_array_equal(predicted, expected)


def test_export_without_scaling_is_plain_estimator(inprocess_stack, efs_root, tmp_path):
    spec = breast_cancer_spec("plain-export", data={"standardize": False}, optimizer={"learning_rate": 1e-6},
                              training={"max_rounds": 3})
    assert run_job(inprocess_stack, spec).status == SUCCEEDED

    result = CliRunner().invoke(main, ["export", "plain-export", "--efs-root", str(efs_root), "--output",
                                       str(tmp_path / "plain.joblib")])
    fetched = CliRunner().invoke(main, ["fetch", "plain-export", "--efs-root", str(efs_root), "--output",
                                        str(tmp_path / "fetched")])

    assert result.exit_code == 0, result.output
    assert result.stdout == f"{tmp_path / 'plain.joblib'}\n"
    assert "contains a fitted LogisticRegression; load it with joblib.load" in result.stderr
    assert type(joblib.load(tmp_path / "plain.joblib")).__name__ == "LogisticRegression"
    assert fetched.exit_code == 0, fetched.output
    assert not (tmp_path / "fetched" / "model" / "standardize.npz").exists()
    model_dir = efs_root / "jobs" / "plain-export" / "model"
    assert json.loads((model_dir / "model.json").read_text())["standardized"] is False
    assert not (model_dir / "standardize.npz").exists()




def test_multiclass_export_predicts_like_baton(inprocess_stack, efs_root, tmp_path):
    rng = np.random.default_rng(4)
    centres = rng.normal(scale=3.0, size=(3, 5))
    labels = rng.integers(3, size=300)
    X = centres[labels] + rng.normal(size=(300, 5))
    np.savetxt(efs_root / "datasets" / "three.csv", np.column_stack([X, labels * 2 + 1]), delimiter=",")
    X_test = X[::4]
    np.save(tmp_path / "X.npy", X_test)

    paths, expected = {}, {}
    for name, model in {"softmax": {"name": "softmax_regression"},
                        "mlp": {"name": "mlp_classifier", "hidden_layer_sizes": [7]}}.items():
        spec = breast_cancer_spec(f"three-{name}", model=model, data={"path": "datasets/three.csv", "skip_rows": 0},
                                  training={"max_rounds": 10})
        assert run_job(inprocess_stack, spec).status == SUCCEEDED
        paths[name] = str(tmp_path / f"{name}.joblib")
        result = CliRunner().invoke(main, ["export", spec["job_id"], "--efs-root", str(efs_root), "--output",
                                           paths[name]])
        assert result.exit_code == 0, result.output
        expected[name] = load_trained_model(efs_root, spec["job_id"]).predict(X_test)

    completed = subprocess.run([sys.executable, "-c", PREDICT_SCRIPT, str(tmp_path / "X.npy"), json.dumps(paths)],
                               capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
    predicted = json.loads(completed.stdout)

    for name in paths:
        assert set(expected[name]) <= {1.0, 3.0, 5.0}
        np.testing.assert_array_equal(predicted[name], expected[name], err_msg=name)


def test_standardize_target_export(inprocess_stack, efs_root, tmp_path):
    # House values times 1e6 (standard deviation about 1.15e11), trained on standardised
    # targets, with every fifth row in a separate validation file.
    names, table = california_housing(target_factor=1e6)
    held_out = np.arange(len(table)) % 5 == 0
    train_path = write_csv(efs_root, "datasets/california/train.csv", names, table[~held_out])
    test_path = write_csv(efs_root, "datasets/california/test.csv", names, table[held_out])
    target = names.index("target")
    X_test, y_test = np.delete(table[held_out], target, axis=1), table[held_out, target]
    np.save(tmp_path / "X.npy", X_test)

    cases = {"ridge": ({"name": "linear_regression", "alpha": 1e-4}, "Ridge"),
             "lasso": ({"name": "linear_regression", "alpha": 1e-4, "penalty": "l1"}, "Lasso"),
             "mlp-regressor": ({"name": "mlp_regressor", "hidden_layer_sizes": [8], "alpha": 1e-4},
                               "MLPRegressor")}
    paths, expected, final = {}, {}, {}
    for case, (model, _) in cases.items():
        job_id = f"target-{case}"
        spec = california_spec(job_id, train_path, model, data={"validation_path": test_path,
                                                                "standardize_target": True})
        record = run_job(inprocess_stack, spec)
        assert record.status == SUCCEEDED, (case, record.error)
        paths[case] = str(tmp_path / f"{case}.joblib")
        result = CliRunner().invoke(main, ["export", job_id, "--efs-root", str(efs_root), "--output", paths[case]])
        assert result.exit_code == 0, result.output
        expected[case] = load_trained_model(efs_root, job_id).predict(X_test)
        final[case] = json.loads((efs_root / "jobs" / job_id / "model" / "model.json").read_text())["final_metrics"]

    completed = subprocess.run([sys.executable, "-c", PREDICT_SCRIPT, str(tmp_path / "X.npy"), json.dumps(paths)],
                               capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
    predicted = json.loads(completed.stdout)

    for case, (_, estimator_name) in cases.items():
        assert type(joblib.load(paths[case]).named_steps["model"]).__name__ == estimator_name, case
        np.testing.assert_allclose(predicted[case], expected[case], rtol=1e-9, err_msg=case)
        # In the targets' units: scikit-learn's metrics on the original targets are the job's.
        # The shards keep features as float32, hence the tolerance.
        assert r2_score(y_test, predicted[case]) == pytest.approx(final[case]["validation_r2"], rel=1e-6), case
        assert r2_score(y_test, predicted[case]) > 0.55, case
        assert mean_squared_error(y_test, predicted[case]) == pytest.approx(final[case]["validation_mse"],
                                                                            rel=1e-6), case
