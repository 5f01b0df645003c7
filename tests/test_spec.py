"""Job spec fields: registries, lists, class weights and fields that must agree."""

from __future__ import annotations

import json

import pytest

from shared.errors import JobSpecError
from shared.models import MODELS
from shared.optim import OPTIMIZERS, SCHEDULES
from shared.spec import ModelSection, OptimizerSection, TrainingSection, derive_job_id, parse_job_spec
from shared.training import SELECTABLE_TRAINING_MODES, TRAINING_MODES, build_optimizer
from tests.conftest import PROJECT_ROOT


def spec_with(**sections) -> dict:
    raw = {"job_id": "spec-test", "model": {"name": "logistic_regression"}, "data": {"path": "d.csv"}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def choices(section, name):
    return next(field.metadata["choices"] for field in section.__dataclass_fields__.values() if field.name == name)


def test_choices_follow_registries():
    assert set(choices(ModelSection, "name")) == set(MODELS)
    assert set(choices(OptimizerSection, "name")) == set(OPTIMIZERS)
    assert set(choices(OptimizerSection, "schedule")) == set(SCHEDULES)
    assert set(choices(TrainingSection, "mode")) == set(SELECTABLE_TRAINING_MODES)
    assert set(SELECTABLE_TRAINING_MODES) <= set(TRAINING_MODES)


def test_every_field_has_help():
    for section in (ModelSection, OptimizerSection, TrainingSection):
        for field in section.__dataclass_fields__.values():
            assert field.metadata["help"], field.name


EXAMPLE_SPECS = sorted((PROJECT_ROOT / "examples").glob("*.json"))


@pytest.mark.parametrize("path", EXAMPLE_SPECS, ids=[path.name for path in EXAMPLE_SPECS])
def test_example_specs_parse(path):
    from click.testing import CliRunner

    from shared.cli import main

    spec = parse_job_spec(json.loads(path.read_text()))
    # As `baton run` and `baton submit` check a spec file before they start or send anything.
    checked = CliRunner().invoke(main, ["submit", str(path), "--dry-run"])

    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.output)["job_id"] == spec.job_id
    assert not spec.data.path.startswith("s3://"), "baton run reads data only from its EFS folder"
    assert f"`{path.name}`" in (PROJECT_ROOT / "examples" / "README.md").read_text(), "examples/README.md skips it"


def test_example_job_ids_unique():
    job_ids = [json.loads(path.read_text())["job_id"] for path in EXAMPLE_SPECS]

    assert len(set(job_ids)) == len(job_ids), "two examples share a job id, so one's files block the other's run"


def test_hidden_layer_sizes_list():
    spec = parse_job_spec(spec_with(model={"name": "mlp_classifier", "hidden_layer_sizes": [64, 32]}))
    assert spec.model.hidden_layer_sizes == (64, 32)
    assert json.loads(spec.canonical_json())["model"]["hidden_layer_sizes"] == [64, 32]


@pytest.mark.parametrize("value, message", [
    (64, "expected a list"),
    ([64, 0], r"hidden_layer_sizes\[1\]"),
    ([1.5], "expected an integer, got 1.5; write 1 or 2"),
    ([64, 32.0], r"hidden_layer_sizes\[1\]': expected an integer, got 32.0; write 32"),
    ([True], "expected an integer"),
])
def test_hidden_layer_sizes_rejected(value, message):
    with pytest.raises(JobSpecError, match=message):
        parse_job_spec(spec_with(model={"name": "mlp_classifier", "hidden_layer_sizes": value}))


def test_betas_reach_adam():
    spec = parse_job_spec(spec_with(optimizer={"name": "adam", "betas": [0.8, 0.99], "learning_rate": 0.01}))
    optimizer = build_optimizer(spec)
    assert (optimizer.beta_1, optimizer.beta_2) == (0.8, 0.99)
    with pytest.raises(JobSpecError, match="at most 2"):
        parse_job_spec(spec_with(optimizer={"betas": [0.9, 0.9, 0.9]}))
    with pytest.raises(JobSpecError, match="less than 1.0"):
        parse_job_spec(spec_with(optimizer={"betas": [0.9, 1.0]}))


@pytest.mark.parametrize("value", ["balanced", {"1": 3.0, "-1": 0.5}, {"cat": 1.0, "1": 2.0}, None])
def test_class_weight_accepted(value):
    assert parse_job_spec(spec_with(model={"class_weight": value})).model.class_weight == value


@pytest.mark.parametrize("value", ["heavy", {"1": -1}, {"1": "x"}, {}, [1, 2]])
def test_class_weight_rejected(value):
    with pytest.raises(JobSpecError, match="model.class_weight"):
        parse_job_spec(spec_with(model={"class_weight": value}))


@pytest.mark.parametrize("value, first, second", [
    ({"1": 3.0, "1.0": 7.0}, "1", "1.0"),
    ({"0": 1.0, "2": 1.0, "0.0": 5.0}, "0", "0.0"),
    ({"1": 1.0, "1e0": 2.0}, "1", "1e0"),
])
def test_class_weight_same_class_twice_rejected(value, first, second):
    with pytest.raises(JobSpecError, match=f"labels '{first}' and '{second}' name the same class"):
        parse_job_spec(spec_with(model={"class_weight": value}))


@pytest.mark.parametrize("sections, field", [
    ({"model": {"name": "kmeans"}, "training": {"mode": "model_average"}, "data": {"stratify": False}},
     "training.mode"),
    ({"training": {"local_steps": 4}}, "training.local_steps"),
    ({"training": {"local_epoch": True}}, "training.local_epoch"),
    ({"training": {"local_steps": 4, "local_epoch": True}}, "training.local_steps"),
    ({"model": {"name": "linear_regression", "class_weight": "balanced"}}, "model.class_weight"),
    ({"model": {"name": "linear_regression"}, "training": {"target_validation_accuracy": 0.9}},
     "training.target_validation_accuracy"),
    ({"model": {"name": "linear_regression"}, "data": {"stratify": True}}, "data.stratify"),
    ({"optimizer": {"schedule": "cosine"}}, "optimizer.total_steps"),
    ({"optimizer": {"learning_rate": 0.1, "min_learning_rate": 0.5}}, "optimizer.min_learning_rate"),
    ({"data": {"label_column": "target"}}, "data.label_column"),
    ({"data": {"format": "parquet"}}, "data.format"),
    ({"data": {"header": "yes"}}, "data.header"),
    ({"training": {"mode": "async"}}, "training.mode"),
])
def test_invalid_combinations(sections, field):
    with pytest.raises(JobSpecError) as raised:
        parse_job_spec(spec_with(**sections))
    assert raised.value.field == field


@pytest.mark.parametrize("model, kind", [
    ("logistic_regression", "a classifier, whose labels are classes"),
    ("mlp_classifier", "a classifier, whose labels are classes"),
    ("kmeans", "a clustering model, which reads no labels"),
])
def test_standardize_target_rejected_without_regression(model, kind):
    with pytest.raises(JobSpecError) as raised:
        parse_job_spec(spec_with(model={"name": model}, data={"standardize_target": True, "stratify": False}))

    assert raised.value.field == "data.standardize_target"
    assert f"model '{model}' is {kind}, so it has no regression targets to standardise" in str(raised.value)
    assert "set it to false or remove it" in str(raised.value)


@pytest.mark.parametrize("model", ["linear_regression", "mlp_regressor"])
def test_standardize_target_accepted_for_regression(model):
    spec = parse_job_spec(spec_with(model={"name": model}, data={"standardize_target": True}))

    assert spec.data.standardize_target is True
    assert parse_job_spec(spec_with(model={"name": model})).data.standardize_target is False


@pytest.mark.parametrize("model, field", [
    ({"name": "logistic_regression", "hidden_layer_sizes": [64]}, "model.hidden_layer_sizes"),
    ({"name": "kmeans", "alpha": 0.01}, "model.alpha"),
    ({"name": "mlp_classifier", "penalty": "l1"}, "model.penalty"),
    ({"name": "linear_regression", "loss": "squared_hinge"}, "model.loss"),
])
def test_field_of_another_model_rejected(model, field):
    with pytest.raises(JobSpecError) as raised:
        parse_job_spec(spec_with(model=model, data={"stratify": False}))

    assert raised.value.field == field
    assert f"does not apply to model '{model['name']}', which reads" in str(raised.value)


def test_field_at_default_accepted_for_any_model():
    # A field written out at its default changes nothing, so it is not an error.
    spec = parse_job_spec(spec_with(model={"name": "kmeans", "alpha": 0.0, "penalty": "l2"},
                                    data={"stratify": False}))

    assert spec.model.name == "kmeans"


def test_models_read_their_own_fields():
    assert set(MODELS["linear_svm"].spec_fields()) == {"alpha", "loss", "penalty", "l1_ratio", "l1_method",
                                                       "class_weight"}
    assert MODELS["kmeans"].spec_fields() == ("n_clusters",)
    assert "class_weight" not in MODELS["mlp_regressor"].spec_fields()


def test_defaults_filled():
    spec = parse_job_spec(spec_with())
    assert spec.training.mode == "gradient_average"
    assert spec.data.stratify is None
    assert spec.optimizer.betas == (0.9, 0.999)
    assert spec.model.class_weight is None


NO_VALIDATION_ROWS = {"path": "d.csv", "validation_fraction": 0}


@pytest.mark.parametrize("training, field", [
    ({"target_validation_loss": 0.3}, "training.target_validation_loss"),
    ({"target_validation_accuracy": 0.9}, "training.target_validation_accuracy"),
    ({"early_stopping_patience": 5}, "training.early_stopping_patience"),
])
def test_validation_stop_without_rows_rejected(training, field):
    with pytest.raises(JobSpecError) as raised:
        parse_job_spec(spec_with(data=NO_VALIDATION_ROWS, training=training))

    assert raised.value.field == field
    assert "data.validation_fraction is 0 and data.validation_path is null" in raised.value.problem
    assert f"or remove {field}" in raised.value.problem


@pytest.mark.parametrize("data", [
    {"validation_fraction": 0, "validation_path": "held_out.csv"},
    {"validation_fraction": 0.05},
])
def test_validation_stop_with_rows_accepted(data):
    spec = parse_job_spec(spec_with(data=data, training={"early_stopping_patience": 5}))

    assert spec.training.early_stopping_patience == 5


def test_no_validation_rows_without_stop_accepted():
    spec = parse_job_spec(spec_with(data=NO_VALIDATION_ROWS))

    assert spec.data.validation_fraction == 0


@pytest.mark.parametrize("field, path", [
    ("path", "jobs/other/x"),
    ("path", "./jobs/other/data.csv"),
    ("path", "jobs"),
    ("validation_path", "jobs/other/held_out.csv"),
])
def test_data_path_in_jobs_rejected(field, path):
    with pytest.raises(JobSpecError) as raised:
        parse_job_spec(spec_with(data={field: path}))

    assert raised.value.field == f"data.{field}"
    assert f"{path!r} names a file in jobs/, where Baton keeps the state of every job" in raised.value.problem
    assert "copy the data to a folder outside jobs/" in raised.value.problem


@pytest.mark.parametrize("path", ["jobs-archive/x.csv", "datasets/jobs/x.csv", "s3://bucket/jobs/x.csv"])
def test_data_path_beside_jobs_accepted(path):
    assert parse_job_spec(spec_with(data={"path": path})).data.path == path


def test_derived_job_id_is_valid_job_id():
    message_id = "5dd08062-2efd-4b22-9c8e-3a7f1c2b9d10"

    job_id = derive_job_id(message_id)

    assert job_id == "job-5dd08062-2efd-4b22"
    raw = spec_with()
    del raw["job_id"]
    assert parse_job_spec(raw, default_job_id=job_id).job_id == job_id
