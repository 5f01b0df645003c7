"""`baton submit` from a spec file, from options, or both, against a moto server on 127.0.0.1.

GIVEN a jobs queue named for a stage of its own on a moto server that the test starts.
WHEN `baton submit` runs with a file, with spec options, or both.
THEN the queue returns one message whose body is the spec with the options applied.
After a dry run, a malformed option or an invalid spec, the queue stays empty.
"""

from __future__ import annotations

import codecs
import json
import uuid
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner

from shared.cli import main
from shared.config import stack_resource_name
from shared.spec import MAX_SPEC_BYTES, encode_job_message
from shared.spec_overrides import SpecOverrideError, apply_overrides, parse_override

PROJECT_ROOT = Path(__file__).resolve().parents[1]
A9A_SPEC_FILE = PROJECT_ROOT / "examples" / "a9a.json"


@pytest.fixture
def jobs_queue(moto_endpoint):
    """A jobs queue for a new stage; yields the stage, the queue URL and an SQS client."""
    stage = f"cli{uuid.uuid4().hex[:10]}"
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint, region_name="us-east-1")
    queue_url = sqs.create_queue(QueueName=stack_resource_name(stage, "jobs"))["QueueUrl"]
    return {"stage": stage, "url": queue_url, "sqs": sqs,
            "arguments": ["--stage", stage, "--endpoint-url", moto_endpoint]}


def received_bodies(jobs_queue) -> list[str]:
    """Receive every message on the queue and return their bodies as sent."""
    response = jobs_queue["sqs"].receive_message(QueueUrl=jobs_queue["url"], MaxNumberOfMessages=10,
                                                 WaitTimeSeconds=0)
    return [message["Body"] for message in response.get("Messages", [])]


def received_specs(jobs_queue) -> list[dict]:
    """Receive every message on the queue and return their bodies decoded."""
    return [json.loads(body) for body in received_bodies(jobs_queue)]


def submit(*arguments: str):
    return CliRunner().invoke(main, ["submit", *arguments])


def test_flags_only_sends_spec(jobs_queue):
    result = submit("--job-id", "from-flags", "--model", "logistic_regression", "--data", "datasets/a9a/a9a",
                    "--validation-data", "datasets/a9a/a9a.t", "--format", "libsvm", "--optimizer", "adam",
                    "--learning-rate", "0.01", "--n-workers", "8", "--batch-size", "64", "--epochs", "2",
                    *jobs_queue["arguments"])

    assert result.exit_code == 0, result.output
    assert f"job from-flags sent to {jobs_queue['url']}" in result.output
    # This stage has a jobs queue but no table.
    assert "note: could not check whether job id 'from-flags' is taken" in result.output
    assert received_specs(jobs_queue) == [{
        "job_id": "from-flags",
        "model": {"name": "logistic_regression"},
        "data": {"path": "datasets/a9a/a9a", "validation_path": "datasets/a9a/a9a.t", "format": "libsvm"},
        "optimizer": {"name": "adam", "learning_rate": 0.01},
        "training": {"n_workers": 8, "batch_size": 64, "max_epochs": 2.0},
    }]


def test_flags_only_job_trains_locally(tmp_path):
    from shared.local.session import LocalStack
    from tests.conftest import BREAST_CANCER_CSV

    with LocalStack(tmp_path / "efs", concurrency={"worker": 2}) as stack:
        stack.import_data(BREAST_CANCER_CSV, "datasets/breast_cancer.csv")
        result = submit("--stage", "local", "--endpoint-url", stack.endpoint_url, "--job-id", "submitted",
                        "--model", "logistic_regression", "--data", "datasets/breast_cancer.csv", "--format", "csv",
                        "--n-workers", "2", "--batch-size", "16", "--set", "data.skip_rows=1",
                        "--set", "training.max_rounds=3")
        assert result.exit_code == 0, result.output
        record = stack.wait("submitted", timeout_seconds=120)

    assert record.status == "SUCCEEDED", record.error
    assert record.round == 3
    assert record.n_workers == 2


def test_flags_only_names_job(jobs_queue):
    result = submit("--model", "kmeans", "--data", "datasets/blobs.npz", "--format", "npz",
                    *jobs_queue["arguments"])

    assert result.exit_code == 0, result.output
    [spec] = received_specs(jobs_queue)
    assert spec["job_id"].startswith("job-")
    assert spec["job_id"].removeprefix("job-").isdigit()
    assert f"job {spec['job_id']} sent" in result.output


def test_file_with_overrides(jobs_queue):
    result = submit(str(A9A_SPEC_FILE), "--n-workers", "2", "--set", "training.n_workers=8",
                    "--set", "optimizer.name=adam", "--set", "data.path=datasets/a9a/a9a.copy",
                    "--set", "model.alpha=0", "--set", "training.max_rounds=40", "--set", "data.n_features=null",
                    "--set", 'job_id="a9a-overridden"', *jobs_queue["arguments"])

    assert result.exit_code == 0, result.output
    [spec] = received_specs(jobs_queue)
    expected = json.loads(A9A_SPEC_FILE.read_text())
    expected["job_id"] = "a9a-overridden"
    expected["training"].update(n_workers=8, max_rounds=40)
    expected["optimizer"]["name"] = "adam"
    expected["data"].update(path="datasets/a9a/a9a.copy", n_features=None)
    expected["model"]["alpha"] = 0
    assert spec == expected


def test_file_without_job_id_named(jobs_queue, tmp_path):
    spec = json.loads(A9A_SPEC_FILE.read_text())
    del spec["job_id"]
    spec_file = tmp_path / "my spec.json"
    spec_file.write_text(json.dumps(spec))

    result = submit(str(spec_file), *jobs_queue["arguments"])

    assert result.exit_code == 0, result.output
    [sent] = received_specs(jobs_queue)
    assert sent["job_id"].startswith("my-spec-")
    assert {key: value for key, value in sent.items() if key != "job_id"} == spec


def test_queue_url_option(jobs_queue):
    other_url = jobs_queue["sqs"].create_queue(QueueName=f"other-{uuid.uuid4().hex[:10]}")["QueueUrl"]

    result = submit(str(A9A_SPEC_FILE), "--queue-url", other_url, *jobs_queue["arguments"])

    assert result.exit_code == 0, result.output
    assert f"sent to {other_url}" in result.output
    assert received_specs(jobs_queue) == []
    other = jobs_queue["sqs"].receive_message(QueueUrl=other_url, WaitTimeSeconds=0)["Messages"]
    assert json.loads(other[0]["Body"]) == json.loads(A9A_SPEC_FILE.read_text())


def test_dry_run_prints_and_sends_nothing(jobs_queue):
    result = submit(str(A9A_SPEC_FILE), "--dry-run", "--epochs", "1", *jobs_queue["arguments"])

    assert result.exit_code == 0, result.output
    expected = json.loads(A9A_SPEC_FILE.read_text())
    expected["training"]["max_epochs"] = 1.0
    assert json.loads(result.output) == expected
    assert received_specs(jobs_queue) == []


def test_dry_run_needs_no_stack():
    result = submit("--dry-run", "--job-id", "offline", "--model", "linear_regression", "--data", "train.csv",
                    "--format", "csv", "--endpoint-url", "http://127.0.0.1:9")

    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"job_id": "offline", "model": {"name": "linear_regression"},
                                         "data": {"path": "train.csv", "format": "csv"}}


@pytest.mark.parametrize("arguments, words", [
    (["--set", "training.n_workers"], "the '=' is missing"),
    (["--set", "=8"], "the key before '=' is empty"),
    (["--set", "training..n_workers=8"], "the key has an empty part"),
    (["--set", "training.n_workers.count=8"], "training.n_workers is 4, not an object"),
    (["--set", "data=[1]", "--set", "data.path=x"], "data is [1], not an object"),
])
def test_bad_override_sends_nothing(jobs_queue, arguments, words):
    result = submit(str(A9A_SPEC_FILE), *arguments, *jobs_queue["arguments"])

    assert result.exit_code == 2, result.output
    assert "Invalid value for '--set'" in result.output
    assert words in result.output
    assert "Traceback" not in result.output
    assert received_specs(jobs_queue) == []


def test_shortcut_into_non_object_names_option(jobs_queue, tmp_path):
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps({"model": {"name": "kmeans"}, "data": "datasets/blobs.npz"}))

    result = submit(str(spec_file), "--format", "npz", *jobs_queue["arguments"])

    assert result.exit_code == 2, result.output
    assert "Invalid value for '--format'" in result.output
    assert "data is \"datasets/blobs.npz\", not an object" in result.output
    assert received_specs(jobs_queue) == []


@pytest.mark.parametrize("arguments, words", [
    ([str(A9A_SPEC_FILE), "--n-workers", "0"],
     ["'training.n_workers': got 0; must be at least 1", "change the value of --n-workers or drop that option"]),
    ([str(A9A_SPEC_FILE), "--set", "optimizer.learning_rate=fast"],
     ["'optimizer.learning_rate': expected a number, got 'fast'",
      "change the value of --set optimizer.learning_rate or drop that option"]),
    ([str(A9A_SPEC_FILE), "--set", "training.n_worker=8"],
     ["'training.n_worker': unknown field; valid fields are n_workers",
      "correct the field name in --set training.n_worker or drop that option"]),
    ([str(A9A_SPEC_FILE), "--set", "model.hidden_layer_sizes=[64, 0]"],
     ["'model.hidden_layer_sizes[1]': got 0", "change the value of --set model.hidden_layer_sizes"]),
    (["--data", "datasets/a9a/a9a"],
     ["'model': missing required section", "pass --model NAME or --set model.name=VALUE"]),
    (["--model", "logistic_regression"],
     ["'data': missing required section", "pass --data PATH or --set data.path=VALUE"]),
    (["--model", "logistic_regression", "--data", "../outside"], ["'..' is not allowed"]),
    ([str(A9A_SPEC_FILE), "--set", "training.n_workers=2.0", "--set", "training.seed=7.0"],
     ["'training.n_workers': expected an integer, got 2.0; write 2", "--set training.n_workers or drop"]),
    ([str(A9A_SPEC_FILE), "--n-workers", "4.0"], ["'training.n_workers': expected an integer, got 4.0; write 4"]),
    ([str(A9A_SPEC_FILE), "--set", "training.seed=1e30"], ["'training.seed': got 1e30; must be at most 4294967295"]),
    ([str(A9A_SPEC_FILE), "--set", "training.n_workers=1e300"],
     ["'training.n_workers': got 1e300; must be at most 1000"]),
    ([str(A9A_SPEC_FILE), "--set", "training.max_epochs=Infinity"],
     ["'training.max_epochs': got Infinity; must be at most 10000", "--set training.max_epochs or drop"]),
    ([str(A9A_SPEC_FILE), "--learning-rate", "inf"], ["'optimizer.learning_rate': got inf; must be at most 1000.0"]),
    ([str(A9A_SPEC_FILE), "--set", "training.n_workers=" + "1" * 5000],
     ["'training.n_workers': got 11111111111111111111... (5000 digits); must be at most 1000"]),
    (["--model", "kmeans", "--data", "datasets/x", "--set", "training.n_workers.x=1"], ["'training.n_workers': expected an integer, got {\"x\": 1}"]),
    ([str(A9A_SPEC_FILE), "--set", "model=1"], ["'model': expected an object, got 1"]),
    (["--model", "kmeans", "--data", "jobs/other/x"],
     ["'data.path': 'jobs/other/x' names a file in jobs/", "outside jobs/", "change the value of --data"]),
    ([str(A9A_SPEC_FILE), "--validation-data", "jobs/other/x"], ["'data.validation_path': 'jobs/other/x' names"]),
    ([str(A9A_SPEC_FILE), "--set", "data.validation_path=null", "--set", "data.validation_fraction=0",
      "--set", "training.target_validation_loss=0.3"],
     ["'training.target_validation_loss': stops on the validation rows, but there are none",
      "change the value of --set training.target_validation_loss"]),
], ids=["workers-zero", "rate-word", "unknown-field", "list-element", "no-model", "no-data", "dot-dot",
        "set-whole-floats", "option-whole-float", "seed-exponent", "workers-exponent", "epochs-infinity",
        "rate-inf", "workers-5000-digits", "into-integer", "section-number", "data-in-jobs",
        "validation-data-in-jobs", "target-without-validation"])
def test_invalid_spec_sends_nothing(jobs_queue, arguments, words):
    result = submit(*arguments, *jobs_queue["arguments"])

    assert result.exit_code == 1, result.output
    assert "invalid job spec field" in result.output
    for word in words:
        assert word in result.output
    assert "Nothing was sent." in result.output
    assert received_specs(jobs_queue) == []


@pytest.mark.parametrize("arguments, option", [
    (["--set", "model.hidden_layer_sizes=[10]"], "--set model.hidden_layer_sizes"),
    (["--set", "training.n_workers=0"], "--set training.n_workers"),
    (["--n-workers", "0"], "--n-workers"),
    (["--set", "training.n_workers=0", "--n-workers", "4"], "--set training.n_workers"),
    (["--set", 'training={"n_workers": 0}'], "--set training"),
], ids=["set-field", "set-range", "shortcut", "set-after-shortcut", "set-section"])
def test_spec_error_names_option_not_file(arguments, option):
    result = submit(str(A9A_SPEC_FILE), "--dry-run", *arguments)

    assert result.exit_code == 1, result.output
    assert f"To fix it, change the value of {option} or drop that option." in result.output
    assert f"edit {A9A_SPEC_FILE}" not in result.output


def test_spec_error_from_file_names_file(tmp_path):
    spec_file = tmp_path / "job.json"
    spec_file.write_text('{"model": {"name": "kmeans"}, "data": {"path": "d.npz", "format": "npz"}, '
                         '"training": {"n_workers": 0}}')

    result = submit(str(spec_file), "--dry-run", "--batch-size", "8")

    assert result.exit_code == 1, result.output
    assert f"To fix it, edit {spec_file} or pass --n-workers N or --set training.n_workers=VALUE." in result.output


def test_field_of_other_model_names_choosing_option():
    result = submit(str(A9A_SPEC_FILE), "--dry-run", "--model", "kmeans")

    assert result.exit_code == 1, result.output
    assert "'model.alpha': does not apply to model 'kmeans'" in result.output
    assert f"To fix it, remove model.alpha from {A9A_SPEC_FILE}, or drop --model, which chose that model." \
        in result.output


@pytest.mark.parametrize("command", ["run", "submit"])
def test_no_spec_file_or_options_explained(command, tmp_path):
    local_dir = ["--local-dir", str(tmp_path / "baton")] if command == "run" else []

    result = CliRunner().invoke(main, [command, *local_dir])

    assert result.exit_code == 2, result.output
    assert "missing SPEC_FILE and spec options" in result.output
    assert f"`baton {command} examples/a9a.json`" in result.output
    assert "missing required section" not in result.output
    assert not (tmp_path / "baton").exists()


def test_invalid_spec_message_is_short(jobs_queue):
    result = submit(str(A9A_SPEC_FILE), "--set", "training.n_workers=" + "1" * 5000, *jobs_queue["arguments"])

    assert result.exit_code == 1, result.output
    assert len(result.output) < 400


def test_number_option_not_a_number():
    result = submit("--dry-run", "--model", "kmeans", "--data", "datasets/x", "--n-workers", "four")

    assert result.exit_code == 2, result.output
    assert "Invalid value for '--n-workers': 'four' is not a number" in result.output


def test_number_options_sent_as_numbers(jobs_queue):
    result = submit("--dry-run", "--model", "kmeans", "--data", "datasets/x", "--n-workers", "8",
                    "--learning-rate", "0.5", "--epochs", "2", "--batch-size", " 64 ")

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["training"] == {"n_workers": 8, "batch_size": 64, "max_epochs": 2}
    assert json.loads(result.output)["optimizer"] == {"learning_rate": 0.5}


@pytest.mark.parametrize("n_workers, words", [
    ("2.0", "'training.n_workers': expected an integer, got 2.0; write 2"),
    ("1" * 5000, "'training.n_workers': got 11111111111111111111... (5000 digits); must be at most 1000"),
], ids=["whole-float", "5000-digits"])
def test_spec_file_number_shown_as_typed(jobs_queue, tmp_path, n_workers, words):
    spec_file = tmp_path / "job.json"
    spec_file.write_text('{"model": {"name": "kmeans"}, "data": {"path": "d.npz", "format": "npz"}, '
                         f'"training": {{"n_workers": {n_workers}}}}}')

    result = submit(str(spec_file), *jobs_queue["arguments"])

    assert result.exit_code == 1, result.output
    assert words in result.output
    assert f"edit {spec_file} or pass --n-workers N" in result.output
    assert "set_int_max_str_digits" not in result.output
    assert received_specs(jobs_queue) == []


def test_run_rejects_spec_as_submit_does(tmp_path):
    result = CliRunner().invoke(main, ["run", "--local-dir", str(tmp_path / "baton"), "--model", "kmeans",
                                       "--data", "datasets/x", "--set", "training.n_workers=2.0"])

    assert result.exit_code == 1, result.output
    assert "'training.n_workers': expected an integer, got 2.0; write 2" in result.output
    assert "Nothing was sent." in result.output
    assert not (tmp_path / "baton").exists()


@pytest.mark.parametrize("content, words", [
    (b"{", ["job.json is not a valid JSON file"]),
    (b"[1, 2]", ["contains a JSON list, but a job spec is a JSON object"]),
    (b"\xff\xfe{\x00}\x00", ["job.json is not UTF-8 text (it starts with a UTF-16 byte order mark)",
                              "byte 1 is b'\\xff'", "save the spec file as UTF-8"]),
    ('{"job_id": "caf\u00e9"}'.encode("latin-1"), ["job.json is not UTF-8 text: byte 16 is b'\\xe9'",
                                                    "save the spec file as UTF-8"]),
    (b'{"optimizer": {"learning_rate": 0.1, "name": "sgd", "learning_rate": 10}}',
     ["job.json: invalid job spec field 'optimizer.learning_rate'", "more than once", "keep one"]),
    (b'{\n  // the model\n  "model": {"name": "kmeans"}\n}',
     ["job.json is not a valid JSON file", "seems to contain comments, which JSON does not allow"]),
    (b'{"model": {"name": "kmeans"},\n "data": {"path": "s3://b/x"},}',
     ["job.json is not a valid JSON file", "seems to contain a comma after the last item, which JSON does not allow"]),
], ids=["truncated-json", "json-list", "utf-16", "latin-1", "repeated-key", "comment", "trailing-comma"])
def test_unreadable_file_sends_nothing(jobs_queue, tmp_path, content, words):
    spec_file = tmp_path / "job.json"
    spec_file.write_bytes(content)

    result = submit(str(spec_file), *jobs_queue["arguments"])

    assert result.exit_code == 1, result.output
    for word in words:
        assert word in result.output
    assert "Traceback" not in result.output
    assert received_specs(jobs_queue) == []


def test_file_with_byte_order_mark_sent(jobs_queue, tmp_path):
    spec_file = tmp_path / "job.json"
    spec_file.write_bytes(codecs.BOM_UTF8 + A9A_SPEC_FILE.read_bytes())

    result = submit(str(spec_file), *jobs_queue["arguments"])

    assert result.exit_code == 0, result.output
    assert received_specs(jobs_queue) == [json.loads(A9A_SPEC_FILE.read_text())]


def test_missing_queue_names_stage(moto_endpoint):
    result = submit(str(A9A_SPEC_FILE), "--stage", f"absent{uuid.uuid4().hex[:8]}", "--endpoint-url", moto_endpoint)

    assert result.exit_code == 1, result.output
    assert "check --stage" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("text, expected", [
    ("training.n_workers=8", ("training.n_workers", 8)),
    ("optimizer.learning_rate=0.5", ("optimizer.learning_rate", 0.5)),
    ("data.standardize=true", ("data.standardize", True)),
    ("training.max_rounds=null", ("training.max_rounds", None)),
    ("model.hidden_layer_sizes=[64, 32]", ("model.hidden_layer_sizes", [64, 32])),
    ('job_id="8"', ("job_id", "8")),
    ("optimizer.name=adam", ("optimizer.name", "adam")),
    ("data.path=datasets/a9a/a9a", ("data.path", "datasets/a9a/a9a")),
    ("data.path=s3://bucket/key=value", ("data.path", "s3://bucket/key=value")),
    ("data.delimiter= ", ("data.delimiter", " ")),
    (" training.seed =3", ("training.seed", 3)),
    (" model . name =x", ("model.name", "x")),
    ("data.path=", ("data.path", "")),
])
def test_parse_override_values(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["training.n_workers", "=8", " =8"])
def test_parse_override_rejects_malformed(text):
    with pytest.raises(SpecOverrideError) as caught:
        parse_override(text)
    assert caught.value.key == text


def test_apply_overrides_copies_and_creates_sections():
    spec = {"model": {"name": "kmeans"}, "data": {"path": "a.npz"}}

    result = apply_overrides(spec, [("training.n_workers", 2), ("data.format", "npz"), ("training.n_workers", 3),
                                    ("job_id", "copied")])

    assert result == {"job_id": "copied", "model": {"name": "kmeans"}, "data": {"path": "a.npz", "format": "npz"},
                      "training": {"n_workers": 3}}
    assert spec == {"model": {"name": "kmeans"}, "data": {"path": "a.npz"}}


def test_apply_overrides_copies_values():
    sizes = [64, 32]

    result = apply_overrides({}, [("model.hidden_layer_sizes", sizes)])
    sizes.append(16)

    assert result == {"model": {"hidden_layer_sizes": [64, 32]}}


@pytest.mark.parametrize("spec, key, words", [
    ({"training": {"n_workers": 4}}, "training.n_workers.count", "training.n_workers is 4, not an object"),
    ({"model": {"class_weight": None}}, "model.class_weight.1", "model.class_weight is null, not an object"),
    ({"data": "a.csv"}, "data.path", "data is \"a.csv\", not an object"),
    ({}, "training..seed", "the key has an empty part"),
    ({}, "", "the key has an empty part"),
])
def test_apply_overrides_rejects_bad_key(spec, key, words):
    with pytest.raises(SpecOverrideError) as caught:
        apply_overrides(spec, [(key, 1)])
    assert caught.value.key == key
    assert words in caught.value.problem


@pytest.fixture
def stage_with_table(moto_endpoint):
    """A stage of its own with the stack's queues and table on the moto server."""
    from shared.local.stack import create_stack, load_stack_definition
    from shared.monitor import make_state_store

    stage = f"tbl{uuid.uuid4().hex[:10]}"
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint, region_name="us-east-1")
    dynamodb = boto3.client("dynamodb", endpoint_url=moto_endpoint, region_name="us-east-1")
    urls = create_stack(load_stack_definition(stage=stage), sqs, dynamodb)
    return {"state": make_state_store(stage, endpoint_url=moto_endpoint, region="us-east-1"),
            "jobs_queue": {"sqs": sqs, "url": urls["JobsQueue"]},
            "arguments": ["--stage", stage, "--endpoint-url", moto_endpoint]}


def a9a_spec_as_sent(job_id: str) -> dict:
    from shared.spec import parse_job_spec

    spec = json.loads(A9A_SPEC_FILE.read_text())
    spec["job_id"] = job_id
    return parse_job_spec(spec)


@pytest.mark.parametrize("status, extra, words", [
    ("RUNNING", [], ["job taken already exists with this spec (status RUNNING)", "`baton status taken{stack}`"]),
    ("PAUSED", [], ["already exists with this spec (status PAUSED)", "`baton resume taken{stack}`"]),
    ("RUNNING", ["--learning-rate", "0.01"], ["job id 'taken' is already used by a job with a different spec",
                                              "choose a new one with --job-id"]),
    ("PAUSED", ["--learning-rate", "0.01"], ["different spec (status PAUSED)",
                                             "`baton resume taken{stack}` would continue that job with its own spec"]),
], ids=["same-spec", "same-spec-paused", "different-spec", "different-spec-paused"])
def test_taken_job_id_sends_nothing(stage_with_table, status, extra, words):
    from shared.control import pause_job

    state = stage_with_table["state"]
    existing = a9a_spec_as_sent("taken")
    state.create_job("taken", existing.fingerprint(), existing.canonical_json(), existing.training.n_workers)
    state.start_job("taken", 10)
    if status == "PAUSED":
        pause_job(state, "taken")

    result = submit(str(A9A_SPEC_FILE), "--job-id", "taken", *extra, *stage_with_table["arguments"])

    assert result.exit_code == 1, result.output
    # Suggested commands carry the options that reach the same stack.
    stack = " " + " ".join(stage_with_table["arguments"])
    for word in words:
        assert word.format(stack=stack) in result.output
    assert "Nothing was sent." in result.output
    assert received_specs(stage_with_table["jobs_queue"]) == []


def test_rejected_job_id_sent_again(stage_with_table):
    # A job id that only records a rejected spec is free for a valid one.
    stage_with_table["state"].fail_job("fixed", "invalid job spec field 'optimizer.learning_rate': ...")

    result = submit(str(A9A_SPEC_FILE), "--job-id", "fixed", *stage_with_table["arguments"])

    assert result.exit_code == 0, result.output
    assert [spec["job_id"] for spec in received_specs(stage_with_table["jobs_queue"])] == ["fixed"]


def test_queue_url_names_table_to_check(stage_with_table, moto_endpoint):
    # The table checked is the one of the queue's stage, not of --stage.
    existing = a9a_spec_as_sent("taken")
    stage_with_table["state"].create_job("taken", existing.fingerprint(), existing.canonical_json(), 4)
    queue_url = stage_with_table["jobs_queue"]["url"]

    result = submit(str(A9A_SPEC_FILE), "--job-id", "taken", "--stage", "elsewhere", "--queue-url", queue_url,
                    "--endpoint-url", moto_endpoint)

    assert result.exit_code == 1, result.output
    assert "job taken already exists with this spec" in result.output
    assert received_specs(stage_with_table["jobs_queue"]) == []


def test_queue_url_of_other_name_not_checked(moto_endpoint):
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint, region_name="us-east-1")
    queue_url = sqs.create_queue(QueueName=f"my-jobs-{uuid.uuid4().hex[:8]}")["QueueUrl"]

    result = submit(str(A9A_SPEC_FILE), "--job-id", "unchecked", "--queue-url", queue_url, "--endpoint-url", moto_endpoint)

    assert result.exit_code == 0, result.output
    assert "note: --queue-url names no baton-<stage>-jobs queue" in result.output
    assert [spec["job_id"] for spec in received_specs({"sqs": sqs, "url": queue_url})] == ["unchecked"]


def test_queue_url_of_other_name_checks_given_stage(stage_with_table, moto_endpoint):
    existing = a9a_spec_as_sent("taken")
    stage_with_table["state"].create_job("taken", existing.fingerprint(), existing.canonical_json(), 4)
    sqs = stage_with_table["jobs_queue"]["sqs"]
    queue_url = sqs.create_queue(QueueName=f"my-jobs-{uuid.uuid4().hex[:8]}")["QueueUrl"]

    # stage_with_table's arguments name its stage explicitly.
    result = submit(str(A9A_SPEC_FILE), "--job-id", "taken", "--queue-url", queue_url, *stage_with_table["arguments"])

    assert result.exit_code == 1, result.output
    assert "job taken already exists with this spec" in result.output
    assert received_specs({"sqs": sqs, "url": queue_url}) == []


def test_dead_letter_queue_url_refused(stage_with_table):
    sqs = stage_with_table["jobs_queue"]["sqs"]
    dlq_url = stage_with_table["jobs_queue"]["url"] + "-dlq"

    result = submit(str(A9A_SPEC_FILE), "--job-id", "to-dlq", "--queue-url", dlq_url, *stage_with_table["arguments"])

    assert result.exit_code == 1, result.output
    assert "is a dead-letter queue; send the job to the jobs queue" in result.output
    assert received_specs({"sqs": sqs, "url": dlq_url}) == []


def many_class_spec(classes: int) -> dict:
    """Return a valid spec whose class_weight names ``classes`` labels, 11 bytes each as compact JSON."""
    weights = {str(label): 1.5 for label in range(1000, 1000 + classes)}
    return {"job_id": "many-classes", "model": {"name": "softmax_regression", "class_weight": weights},
            "data": {"path": "datasets/a9a/a9a"}}


def test_compact_spec_file_sent_within_limit(jobs_queue, tmp_path):
    # About 60 KB as compact JSON, but over 64 KiB with json.dumps's default spaces.
    spec = many_class_spec(5500)
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(spec, separators=(",", ":")))
    assert spec_file.stat().st_size <= MAX_SPEC_BYTES < len(json.dumps(spec))

    result = submit(str(spec_file), *jobs_queue["arguments"])

    assert result.exit_code == 0, result.output
    bodies = received_bodies(jobs_queue)
    assert len(bodies) == 1
    assert len(bodies[0].encode()) == spec_file.stat().st_size
    assert json.loads(bodies[0]) == spec


def test_oversized_spec_names_sent_size_and_field(jobs_queue, tmp_path):
    spec = many_class_spec(9000)
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(spec, indent=4))
    sent_bytes = len(json.dumps(spec, separators=(",", ":")).encode())
    weights_bytes = len(json.dumps(spec["model"]["class_weight"], separators=(",", ":")).encode())

    result = submit(str(spec_file), *jobs_queue["arguments"])

    assert result.exit_code == 1, result.output
    assert f"the job message is {sent_bytes:,} bytes, over Baton's limit of 65,536 bytes (64 KiB)" in result.output
    assert f"can differ from the {spec_file.stat().st_size:,} bytes of {spec_file}" in result.output
    assert f"Its largest field is model.class_weight at {weights_bytes:,} bytes" in result.output
    assert "leave out fields that keep their default value" in result.output
    assert "Nothing was sent." in result.output
    assert received_specs(jobs_queue) == []


def test_oversized_options_only_spec_names_field():
    weights = json.dumps({str(label): 1 for label in range(12_000)})

    result = submit("--dry-run", "--model", "softmax_regression", "--data", "datasets/a9a/a9a",
                    "--set", f"model.class_weight={weights}")

    assert result.exit_code == 1, result.output
    assert "over Baton's limit of 65,536 bytes" in result.output
    assert "Its largest field is model.class_weight" in result.output
    assert "can differ from" not in result.output


def test_job_message_encoding_keeps_utf8():
    spec = {"data": {"path": "données/\uffff\ud800.csv"}}

    body = encode_job_message(spec)

    assert body == '{"data":{"path":"données/\\uffff\\ud800.csv"}}'
    assert json.loads(body) == spec
    assert len(body.encode()) == len(body) + 1
