"""`baton list/status/watch/fetch/plot` on a job running in the local stack.

The local stack is moto's server on 127.0.0.1 with the handlers in subprocesses, so the
commands read DynamoDB through an endpoint exactly as they would read AWS.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from shared.cli import main
from shared.errors import DIVERGED_WORDS

JOB_ID = "watched"
N_ROUNDS = 8
MODELS_BUCKET = "baton-local-models"


def breast_cancer_spec() -> dict:
    return {
        "job_id": JOB_ID,
        "model": {"name": "logistic_regression", "alpha": 1e-4},
        "optimizer": {"name": "momentum", "learning_rate": 0.1, "momentum": 0.9},
        "data": {"path": "datasets/breast_cancer.csv", "format": "csv", "skip_rows": 1, "validation_fraction": 0.2,
                 "standardize": True},
        "training": {"n_workers": 2, "batch_size": 16, "max_rounds": N_ROUNDS, "seed": 11},
    }


def png_size(path) -> tuple[int, int]:
    """Return (width, height) from a PNG file's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    assert header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """Run one job in the local stack while `baton watch` follows it; yield what watch saw."""
    from shared.local.session import LocalStack
    from tests.conftest import BREAST_CANCER_CSV

    efs_root = tmp_path_factory.mktemp("local") / "efs"
    with LocalStack(efs_root, concurrency={"worker": 2}, extra_environment={"MODELS_BUCKET": MODELS_BUCKET}) as stack:
        # The aggregator copies each finished model to this bucket on moto's server.
        stack.client("s3").create_bucket(Bucket=MODELS_BUCKET)
        stack.import_data(BREAST_CANCER_CSV, "datasets/breast_cancer.csv")
        stack.submit(breast_cancer_spec())
        arguments = ["--stage", "local", "--endpoint-url", stack.endpoint_url]
        watched = CliRunner().invoke(main, ["watch", JOB_ID, *arguments, "--interval", "0.2", "--timeout", "300"])
        yield {"stack": stack, "arguments": arguments, "watched": watched, "efs_root": efs_root}


def test_watch_follows_job_to_success(finished_job):
    watched = finished_job["watched"]
    assert watched.exit_code == 0, watched.output
    assert f"job {JOB_ID} SUCCEEDED after {N_ROUNDS} rounds" in watched.output
    assert "stop reason max_rounds" in watched.output
    # The line-per-round output (CliRunner is no terminal): the rounds done and the fields.
    assert f"{N_ROUNDS}/{N_ROUNDS}" in watched.output
    for field in ("epoch=", "train_loss=", "accuracy=", "s/round=", "left=0", "cost=$"):
        assert field in watched.output, field
    assert " loss=" not in watched.output, "the bar labels the training loss as loss, the validation loss's key"


def test_plot_writes_png_of_requested_size(finished_job, tmp_path):
    output = tmp_path / "curves.png"
    result = CliRunner().invoke(main, ["plot", JOB_ID, *finished_job["arguments"], "--output", str(output),
                                       "--width", "8", "--height", "5", "--dpi", "50"])
    assert result.exit_code == 0, result.output
    assert output.is_file()
    assert png_size(output) == (400, 250)


def test_fetch_saves_metrics_and_model(finished_job, tmp_path):
    output = tmp_path / "fetched"
    result = CliRunner().invoke(main, ["fetch", JOB_ID, *finished_job["arguments"], "--output", str(output),
                                       "--efs-root", str(finished_job["efs_root"])])
    assert result.exit_code == 0, result.output
    lines = (output / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == list(range(1, N_ROUNDS + 1))
    assert (output / "metrics.csv").read_text().startswith("round,")
    assert json.loads((output / "job.json").read_text())["status"] == "SUCCEEDED"
    assert json.loads((output / "spec.json").read_text())["job_id"] == JOB_ID
    assert (output / "model" / "params.npy").is_file()


def test_fetch_without_efs_downloads_model(finished_job, tmp_path):
    output = tmp_path / "out"

    result = CliRunner().invoke(main, ["fetch", JOB_ID, *finished_job["arguments"], "--output", str(output)])

    assert result.exit_code == 0, result.output
    model_dir = finished_job["efs_root"] / "jobs" / JOB_ID / "model"
    for name in ("params.npy", "model.json", "standardize.npz"):
        assert (output / "model" / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert "model not copied" not in result.output


def test_stack_export_matches_efs_export(finished_job, tmp_path):
    import joblib

    from_stack = CliRunner().invoke(main, ["export", JOB_ID, *finished_job["arguments"], "--output",
                                           str(tmp_path / "stack.joblib")])
    from_efs = CliRunner().invoke(main, ["export", JOB_ID, "--efs-root", str(finished_job["efs_root"]), "--output",
                                         str(tmp_path / "efs.joblib")])

    assert from_stack.exit_code == 0, from_stack.output
    assert from_efs.exit_code == 0, from_efs.output
    rows = np.loadtxt(finished_job["efs_root"] / "datasets" / "breast_cancer.csv", delimiter=",", skiprows=1)[:, :-1]
    np.testing.assert_array_equal(joblib.load(tmp_path / "stack.joblib").predict(rows),
                                  joblib.load(tmp_path / "efs.joblib").predict(rows))


def test_export_rejects_stack_with_efs_root(finished_job, tmp_path):
    result = CliRunner().invoke(main, ["export", JOB_ID, *finished_job["arguments"], "--efs-root",
                                       str(finished_job["efs_root"]), "--output", str(tmp_path / "model.joblib")])

    assert result.exit_code == 1
    assert "give either --efs-root or --local-dir" in result.output
    assert not (tmp_path / "model.joblib").exists()


def test_cancel_help_says_rerun_goes_on():
    result = CliRunner().invoke(main, ["cancel", "--help"])
    text = " ".join(result.output.split())

    assert result.exit_code == 0, result.output
    assert "A cancelled job cannot be resumed" in text
    assert "for good" not in text
    assert "running the same spec again with `baton run` is a new submission" in text
    assert "the job goes on from its files on EFS" in text
    assert "`baton run --fresh` trains it from round 0" in text


def test_local_export_hint_names_efs_root(finished_job, tmp_path):
    state = finished_job["stack"].state
    state.create_job("no-bucket-copy", "a" * 64, "{}", 2)
    state.start_job("no-bucket-copy", 1)
    state.finish_job("no-bucket-copy", 0, {"stop_reason": "max_rounds"})
    output = tmp_path / "model.joblib"

    result = CliRunner().invoke(main, ["export", "no-bucket-copy", *finished_job["arguments"], "--output", str(output)])

    assert result.exit_code == 1, result.output
    assert f"`baton export no-bucket-copy --efs-root <local folder>/efs --output {output}`" in result.output
    assert "DataSync" not in result.output
    assert not output.exists()


def test_hints_carry_stack_options(finished_job, tmp_path):
    from shared.control import pause_job

    state = finished_job["stack"].state
    arguments = finished_job["arguments"]
    stack = " ".join(arguments)
    state.create_job("paused-hints", "9" * 64, "{}", 2)
    state.start_job("paused-hints", 5)
    pause_job(state, "paused-hints")
    state.create_job("failed-hints", "8" * 64, "{}", 2)
    state.start_job("failed-hints", 5)
    state.fail_job("failed-hints", "worker failed; fix the cause, then run `baton resume failed-hints`")
    state.create_job("diverged-hints", "7" * 64, "{}", 2)
    state.start_job("diverged-hints", 5)
    state.fail_job("diverged-hints", f"round 2: {DIVERGED_WORDS} (training loss nan)")

    exported = CliRunner().invoke(main, ["export", "paused-hints", *arguments, "--output", str(tmp_path / "m.joblib")])
    status_result = CliRunner().invoke(main, ["status", "failed-hints", *arguments])
    fetched = CliRunner().invoke(main, ["fetch", "failed-hints", *arguments, "--output", str(tmp_path / "fetched")])
    watched = CliRunner().invoke(main, ["watch", "failed-hints", *arguments, "--interval", "0.2"])
    resumed = CliRunner().invoke(main, ["resume", "diverged-hints", *arguments])

    assert exported.exit_code == 1, exported.output
    assert f"`baton status paused-hints {stack}` shows where it is" in exported.output
    assert status_result.exit_code == 0, status_result.output
    assert f"`baton resume failed-hints {stack}`" in status_result.output
    assert fetched.exit_code == 0, fetched.output
    assert f"`baton status failed-hints {stack}`" in fetched.output
    assert f"run `baton resume failed-hints {stack}`" in fetched.output
    assert watched.exit_code == 1, watched.output
    assert f"`baton resume failed-hints {stack}`" in watched.output
    assert resumed.exit_code == 1, resumed.output
    assert f"`baton status diverged-hints {stack}` shows it" in resumed.output


def bucket_not_allowed_error(tmp_path) -> str:
    """Return the error that the preparation raises for a data path in a bucket that is not allowed."""
    from shared.errors import DataError
    from shared.preparation import copy_from_s3

    with pytest.raises(DataError) as raised:
        copy_from_s3("s3://mybucket/a9a", tmp_path / "a9a", environ={})
    return str(raised.value)


def test_bucket_remedy_for_deployed_stack(tmp_path):
    from shared.monitor import bucket_not_allowed_remedy

    remedy = bucket_not_allowed_remedy(bucket_not_allowed_error(tmp_path), "s3test", local_stack=False)

    assert "BATON_ALLOWED_S3_BUCKETS is the dataBucket stage parameter" in remedy
    assert 'deploy again with --param "dataBucket=<bucket>"' in remedy
    assert "`baton resume s3test` prepares the job again" in remedy
    assert bucket_not_allowed_remedy("data file not found: 'a9a'", "s3test", local_stack=False) == ""


def test_status_names_local_fix_for_s3_bucket(finished_job, tmp_path):
    state = finished_job["stack"].state
    state.create_job("s3-bucket", "6" * 64, "{}", 2)
    state.fail_job("s3-bucket", bucket_not_allowed_error(tmp_path))

    status_result = CliRunner().invoke(main, ["status", "s3-bucket", *finished_job["arguments"]])
    watched = CliRunner().invoke(main, ["watch", "s3-bucket", *finished_job["arguments"], "--interval", "0.2"])

    assert status_result.exit_code == 0, status_result.output
    for output in (status_result.output, watched.output):
        assert "which is not allowed; add it to BATON_ALLOWED_S3_BUCKETS (allowed now: none). The local stack of " \
               "baton run allows no bucket" in output
        assert "--import FILE:datasets/NAME --data datasets/NAME" in output
        assert "dataBucket" not in output


@pytest.mark.parametrize("text, expected", [
    ("`baton status j1` shows it", "`baton status j1 --stage local` shows it"),
    ("run `baton resume j1`, then `baton fetch j1`",
     "run `baton resume j1 --stage local`, then `baton fetch j1 --stage local`"),
    ("`baton resume j1 --stage other` continues it", "`baton resume j1 --stage other` continues it"),
    ("`baton export j1 --efs-root .baton/efs --output m.joblib`",
     "`baton export j1 --efs-root .baton/efs --output m.joblib`"),
    ("`baton run spec.json --local-dir .baton` goes on", "`baton run spec.json --local-dir .baton` goes on"),
    ("`baton fetch` and `baton plot` read EFS", "`baton fetch` and `baton plot` read EFS"),
], ids=["status", "two-commands", "aimed-already", "efs-root", "run", "no-arguments"])
def test_with_stack_options(text, expected):
    from shared.cli_stack import with_stack_options

    assert with_stack_options(text, " --stage local") == expected
    assert with_stack_options(text, "") == text


def test_fetch_unfinished_job_skips_model(finished_job, tmp_path):
    # A job without a model: this one fails on its missing data file, and a running job
    # takes the same path. Its metrics are saved and the missing model is a note.
    stack = finished_job["stack"]
    spec = {**breast_cancer_spec(), "job_id": "no-model", "data": {"path": "datasets/missing.csv", "format": "csv"}}
    stack.submit(spec)
    assert stack.wait("no-model", timeout_seconds=120).status == "FAILED"
    output = tmp_path / "fetched"

    result = CliRunner().invoke(main, ["fetch", "no-model", *finished_job["arguments"], "--output", str(output),
                                       "--efs-root", str(finished_job["efs_root"])])

    assert result.exit_code == 0, result.output
    assert json.loads((output / "job.json").read_text())["status"] == "FAILED"
    assert (output / "metrics.csv").is_file()
    assert "no model: job 'no-model' FAILED, and a job writes its model only when it succeeds" in result.stderr
    assert f"`baton resume no-model {' '.join(finished_job['arguments'])}`" in result.stderr
    assert not (output / "model").exists()

    without_efs = CliRunner().invoke(main, ["fetch", "no-model", *finished_job["arguments"], "--output",
                                            str(tmp_path / "again")])
    assert without_efs.exit_code == 0, without_efs.output
    assert "no model: job 'no-model' FAILED" in without_efs.stderr
    assert "pass --efs-root" not in without_efs.stderr


def cancel_finished_job(stack, job_id: str) -> None:
    """Mark a finished job CANCELLED at its last round, as a cancel during the last aggregation leaves it."""
    stack.client("dynamodb").update_item(
        TableName=stack.settings.state_table_name, Key={"pk": {"S": f"JOB#{job_id}"}, "sk": {"S": "JOB"}},
        UpdateExpression="SET #status = :cancelled, #round = :round",
        ExpressionAttributeNames={"#status": "status", "#round": "round"},
        ExpressionAttributeValues={":cancelled": {"S": "CANCELLED"}, ":round": {"N": str(N_ROUNDS - 1)}})


def test_fetch_copies_model_of_late_cancel(finished_job, tmp_path):
    # A cancel that lands while the last round is aggregated leaves the job CANCELLED with
    # its model written. Here the job finishes first and is marked CANCELLED afterwards.
    stack, efs_root = finished_job["stack"], finished_job["efs_root"]
    stack.submit({**breast_cancer_spec(), "job_id": "late-cancel"})
    assert stack.wait("late-cancel", timeout_seconds=120).status == "SUCCEEDED"
    cancel_finished_job(stack, "late-cancel")
    output = tmp_path / "fetched"

    result = CliRunner().invoke(main, ["fetch", "late-cancel", *finished_job["arguments"], "--output", str(output),
                                       "--efs-root", str(efs_root)])

    assert result.exit_code == 0, result.output
    assert (output / "model" / "params.npy").is_file()
    assert "was CANCELLED while its last round was aggregated" in result.stderr


def test_watch_of_cancelled_job_says_so(finished_job):
    stack = finished_job["stack"]
    stack.submit({**breast_cancer_spec(), "job_id": "watched-cancel"})
    assert stack.wait("watched-cancel", timeout_seconds=120).status == "SUCCEEDED"
    cancel_finished_job(stack, "watched-cancel")

    result = CliRunner().invoke(main, ["watch", "watched-cancel", *finished_job["arguments"]])

    assert result.exit_code == 1
    assert f"job watched-cancel was cancelled after {N_ROUNDS - 1} rounds" in result.output
    assert "no error recorded" not in result.output


def test_fetch_skips_earlier_runs_model_of_cancelled_job(finished_job, tmp_path):
    # The model folder predates the spec file, as an earlier run's does until the new run
    # starts round 0 and sets it aside.
    stack, efs_root = finished_job["stack"], finished_job["efs_root"]
    stack.submit({**breast_cancer_spec(), "job_id": "early-cancel"})
    assert stack.wait("early-cancel", timeout_seconds=120).status == "SUCCEEDED"
    cancel_finished_job(stack, "early-cancel")
    later = time.time() + 3600
    os.utime(efs_root / "jobs" / "early-cancel" / "spec.json", (later, later))
    output = tmp_path / "fetched"

    result = CliRunner().invoke(main, ["fetch", "early-cancel", *finished_job["arguments"], "--output",
                                       str(output), "--efs-root", str(efs_root)])

    assert result.exit_code == 0, result.output
    assert not (output / "model").exists()
    assert "no model: job 'early-cancel' was CANCELLED" in result.stderr

    from_efs = CliRunner().invoke(main, ["fetch", "early-cancel", "--efs-root", str(efs_root), "--output",
                                         str(tmp_path / "from-efs")])

    assert from_efs.exit_code == 0, from_efs.output
    assert not (tmp_path / "from-efs" / "model").exists()
    assert "is older than the job's spec.json" in from_efs.stderr


def test_fetch_rejects_wrong_efs_root(finished_job, tmp_path):
    result = CliRunner().invoke(main, ["fetch", JOB_ID, *finished_job["arguments"], "--output", str(tmp_path / "out"),
                                       "--efs-root", str(tmp_path)])

    assert result.exit_code == 1
    assert f"job '{JOB_ID}' SUCCEEDED but" in result.output
    assert "check --efs-root" in result.output
    assert "Traceback" not in result.output


def test_fetch_from_efs_folder_alone(finished_job, tmp_path, monkeypatch):
    # An endpoint with no listener: the command must not read the table at all.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    from_table = tmp_path / "from-table"
    CliRunner().invoke(main, ["fetch", JOB_ID, *finished_job["arguments"], "--output", str(from_table)])
    output = tmp_path / "from-efs"

    result = CliRunner().invoke(main, ["fetch", JOB_ID, "--efs-root", str(finished_job["efs_root"]),
                                       "--output", str(output)])

    assert result.exit_code == 0, result.output
    rounds = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [entry["round"] for entry in rounds] == list(range(1, N_ROUNDS + 1))
    table_rounds = [json.loads(line) for line in (from_table / "metrics.jsonl").read_text().splitlines()]
    assert [entry["train_loss"] for entry in rounds] == [entry["train_loss"] for entry in table_rounds]
    assert json.loads((output / "spec.json").read_text())["job_id"] == JOB_ID
    assert (output / "model" / "params.npy").is_file()
    assert not (output / "job.json").exists()
    assert "job.json not written" in result.stderr


def test_fetch_from_efs_names_missing_job(finished_job, tmp_path):
    result = CliRunner().invoke(main, ["fetch", "no-such-job", "--efs-root", str(finished_job["efs_root"]),
                                       "--output", str(tmp_path / "out")])

    assert result.exit_code == 1
    assert "no job 'no-such-job'" in result.output
    assert "spec.json does not exist" in result.output


def test_plot_from_efs_folder_alone(finished_job, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    output = tmp_path / "curves.png"

    result = CliRunner().invoke(main, ["plot", JOB_ID, "--efs-root", str(finished_job["efs_root"]),
                                       "--output", str(output), "--width", "8", "--height", "5", "--dpi", "50"])

    assert result.exit_code == 0, result.output
    assert png_size(output) == (400, 250)


def copy_job_files(finished_job, tmp_path):
    """Return an EFS folder containing a copy of the finished job's files, which a test may damage."""
    efs_root = tmp_path / "efs"
    shutil.copytree(finished_job["efs_root"] / "jobs" / JOB_ID, efs_root / "jobs" / JOB_ID)
    return efs_root


@pytest.mark.parametrize("content, problem", [
    ("x\n", "is not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    ("[5]", "does not contain a JSON object"),
    ('{"epoch": 1.0}', 'has no integer "round" field'),
    ('{"round": 7, "train_loss": 0.5}', 'contains "round": 7, but the metrics file of round 5 must contain "round": 5'),
    ('{"round": 5}', 'has no "train_loss" field'),
    ('{"round": 5, "train_loss": "abc"}', 'contains "train_loss": "abc", which is not a finite number'),
    ('{"round": 5, "train_loss": NaN}', 'contains "train_loss": NaN, which is not a finite number'),
    ('{"round": 5, "train_loss": 0.5, "aggregate_seconds": Infinity}',
     'contains "aggregate_seconds": Infinity, which is not a finite number'),
], ids=["not-json", "not-object", "no-round", "other-round", "no-loss", "loss-not-number", "loss-nan",
        "seconds-infinite"])
@pytest.mark.parametrize("command", ["plot", "fetch"])
def test_damaged_metrics_file_named(finished_job, tmp_path, command, content, problem):
    efs_root = copy_job_files(finished_job, tmp_path)
    (efs_root / "jobs" / JOB_ID / "metrics" / "5.json").write_text(content)
    output = tmp_path / ("p.png" if command == "plot" else "fetched")

    result = CliRunner().invoke(main, [command, JOB_ID, "--efs-root", str(efs_root), "--output", str(output)])

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.output == (f"Error: jobs/{JOB_ID}/metrics/5.json in the EFS folder {efs_root} {problem}; move it "
                             f"out of jobs/{JOB_ID}/metrics to leave round 5 out, then run the command again\n")
    assert not output.exists()


@pytest.mark.parametrize("command", ["plot", "fetch"])
def test_spec_folder_named(finished_job, tmp_path, command):
    efs_root = copy_job_files(finished_job, tmp_path)
    spec_path = efs_root / "jobs" / JOB_ID / "spec.json"
    spec_path.unlink()
    spec_path.mkdir()
    output = tmp_path / ("p.png" if command == "plot" else "fetched")

    result = CliRunner().invoke(main, [command, JOB_ID, "--efs-root", str(efs_root), "--output", str(output)])

    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: jobs/{JOB_ID}/spec.json in the EFS folder {efs_root} is not a file; ")
    assert not output.exists()


@pytest.mark.parametrize("table", [False, True], ids=["efs-alone", "with-table"])
def test_fetch_checks_model_before_writing(finished_job, tmp_path, table):
    efs_root = copy_job_files(finished_job, tmp_path)
    params = efs_root / "jobs" / JOB_ID / "model" / "params.npy"
    params.write_bytes(params.read_bytes()[:90])
    output = tmp_path / "fetched"
    stack = finished_job["arguments"] if table else []

    result = CliRunner().invoke(main, ["fetch", JOB_ID, *stack, "--efs-root", str(efs_root), "--output", str(output)])

    assert result.exit_code == 1, result.output
    assert f"Error: jobs/{JOB_ID}/model/params.npy in the EFS folder {efs_root} is not a valid .npy array" \
        in result.output
    assert not output.exists()


@pytest.mark.parametrize("name, damage, problem", [
    ("model/model.json", lambda path: path.write_text("{"), "is not valid JSON"),
    ("model/standardize.npz", lambda path: path.write_bytes(b"junk"), "is not an .npz archive"),
    ("model/standardize.npz", lambda path: path.unlink(), "is missing, but the job's data was standardised"),
], ids=["model-json", "scaling-copy-junk", "scaling-copy-missing"])
def test_fetch_checks_model_folder(finished_job, tmp_path, name, damage, problem):
    efs_root = copy_job_files(finished_job, tmp_path)
    damage(efs_root / "jobs" / JOB_ID / name)
    output = tmp_path / "fetched"

    result = CliRunner().invoke(main, ["fetch", JOB_ID, "--efs-root", str(efs_root), "--output", str(output)])

    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: jobs/{JOB_ID}/{name} in the EFS folder {efs_root} {problem}")
    if name == "model/standardize.npz":
        assert f"copy jobs/{JOB_ID}/data/standardize.npz, of which it is a copy, over it" in result.output
    assert not output.exists()


def test_fetch_note_for_diverged_job():
    from shared.monitor import _no_model_note

    diverged = _no_model_note("steep", "FAILED", "training diverged in round 4: the loss or a weight became NaN, ...")
    missing = _no_model_note("typo", "FAILED", "data file not found: 'datasets/x.csv'; check data.path")

    assert "because training diverged, and a resume would take the same steps again" in diverged
    assert "baton resume" not in diverged
    assert "run `baton resume typo`" in missing


def test_fetch_names_damaged_spec(finished_job, tmp_path):
    efs_root = copy_job_files(finished_job, tmp_path)
    (efs_root / "jobs" / JOB_ID / "spec.json").write_text('{"job_id": ')

    result = CliRunner().invoke(main, ["fetch", JOB_ID, "--efs-root", str(efs_root), "--output",
                                       str(tmp_path / "fetched")])

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith(f"Error: jobs/{JOB_ID}/spec.json in the EFS folder {efs_root} is not valid JSON (")
    assert f"replace it with the job's spec: while the job's stack runs, `baton fetch {JOB_ID}`" in result.output


def plotted_figure(rounds):
    """Return the axes of the figure `baton plot` draws for ``rounds``, drawn so that their ticks are set."""
    import matplotlib.pyplot as plt

    from shared.monitor import job_figure

    figure = job_figure(rounds, "job")
    figure.canvas.draw()
    axes = figure.axes
    plt.close(figure)
    return axes


@pytest.mark.parametrize("command, module, words", [
    (["export", JOB_ID, "--output", "m.joblib"], "sklearn", "baton export needs scikit-learn"),
    (["export", JOB_ID, "--output", "m.joblib"], "joblib", "baton export needs joblib"),
    (["plot", JOB_ID, "--output", "curves.png"], "matplotlib", "baton plot needs matplotlib"),
])
def test_missing_optional_package_names_extra(tmp_path, monkeypatch, command, module, words):
    from shared.cli import OPTIONAL_PACKAGES

    monkeypatch.chdir(tmp_path)
    # None in sys.modules makes an import of the module fail, as when it is not installed.
    monkeypatch.setitem(sys.modules, module, None)

    result = CliRunner().invoke(main, [*command, "--efs-root", str(tmp_path)])

    extra = OPTIONAL_PACKAGES[module][1]
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {words}, which is not installed")
    assert f"install the '{extra}' extra with `pip install -e '.[{extra}]'`" in result.output
    assert "Traceback" not in result.output


def test_optional_packages_in_their_extras():
    import tomllib

    from shared.cli import OPTIONAL_PACKAGES
    from tests.conftest import PROJECT_ROOT

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lambda_requirements = [line for line in (PROJECT_ROOT / "requirements-lambda.txt").read_text().splitlines()
                           if line.strip() and not line.startswith("#")]
    extras = project["optional-dependencies"]
    for package, extra in OPTIONAL_PACKAGES.values():
        assert any(requirement.startswith(f"{package}>=") for requirement in extras[extra]), (package, extra)
        for requirement in project["dependencies"] + lambda_requirements:
            assert not requirement.startswith(package), requirement
    assert "baton[export,plot]" in extras["dev"], "the tests need both extras"


def test_plot_round_axis_has_whole_numbers():
    rounds = [{"round": number, "train_loss": 1.0 / number, "round_seconds": 3.0} for number in (1, 2, 3)]

    axes = plotted_figure(rounds)

    for round_axes in (axes[0], axes[2]):
        assert round_axes.get_xlabel() == "round"
        ticks = [tick for tick in round_axes.get_xticks() if 1 <= tick <= 3]
        assert ticks, "the round axis has no ticks within its rounds"
        assert all(float(tick).is_integer() for tick in ticks), ticks


def test_plot_time_axis_says_pauses_left_out():
    rounds = [{"round": 1, "train_loss": 0.5, "round_seconds": 3.0}]

    axes = plotted_figure(rounds)

    assert axes[1].get_xlabel() == "training time (s), pauses left out"
    assert axes[3].get_xlabel() == "training time (s), pauses left out"


def test_plot_kmeans_shows_validation_inertia():
    rounds = [{"round": number, "train_loss": 9.0 - number, "validation_loss": 9.5 - number,
               "validation_inertia": 950.0 - 100 * number, "round_seconds": 1.0} for number in (1, 2)]

    axes = plotted_figure(rounds)

    for metric_axes in (axes[2], axes[3]):
        assert len(metric_axes.lines) == 1
        assert list(metric_axes.lines[0].get_ydata()) == [850.0, 750.0]
        assert not metric_axes.texts, "the panel says there is no validation metric"
    assert axes[2].get_ylabel() == "validation inertia"


def test_plot_output_folder_created_or_named(finished_job, tmp_path):
    efs = ["--efs-root", str(finished_job["efs_root"])]
    nested = tmp_path / "new" / "folder" / "curves.png"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    created = CliRunner().invoke(main, ["plot", JOB_ID, *efs, "--output", str(nested), "--dpi", "30"])
    blocked = CliRunner().invoke(main, ["plot", JOB_ID, *efs, "--output", str(blocker / "curves.png"), "--dpi", "30"])

    assert created.exit_code == 0, created.output
    assert png_size(nested)[0] > 0
    assert blocked.exit_code == 1
    assert f"cannot write to {blocker / 'curves.png'}: {blocker} is a file, not a folder" in blocked.output
    assert "choose another --output" in blocked.output
    assert "Traceback" not in blocked.output


def test_plot_refuses_other_format(finished_job, tmp_path):
    output = tmp_path / "curves.pdf"

    result = CliRunner().invoke(main, ["plot", JOB_ID, "--efs-root", str(finished_job["efs_root"]),
                                       "--output", str(output)])

    assert result.exit_code == 1
    assert "baton plot writes a PNG image; give the file a .png extension" in result.output
    assert not output.exists()


@pytest.mark.parametrize("command, output, words", [
    ("plot", "", "--output '' names no file; give one such as curves.png"),
    ("plot", "out/..", "--output 'out/..' names no file"),
    ("export", "", "--output '' names no file; give one such as model.joblib"),
    ("export", "{file}/model.joblib", "cannot write to {file}/model.joblib: {file} is a file, not a folder"),
    ("fetch", "", "--output '' names no folder; give one such as fetched/"),
    ("fetch", "{file}/sub", "cannot write to {file}/sub: {file} is a file, not a folder"),
])
def test_output_option_checked_first(tmp_path, command, output, words):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # The output is checked before the stack is read, so this unreachable endpoint is never called.
    stack = ["--stage", "local", "--endpoint-url", "http://127.0.0.1:9"] if command != "export" else []

    result = CliRunner().invoke(main, [command, JOB_ID, *stack, "--output", output.format(file=blocker)])

    assert result.exit_code == 1, result.output
    assert words.format(file=blocker) in result.output
    assert "cannot reach" not in result.output
    assert "Traceback" not in result.output
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no file can be created")
@pytest.mark.parametrize("command, output", [
    ("fetch", "/proc/baton-fetched"), ("fetch", "/proc/baton-fetched/sub"), ("export", "/proc/baton-model.joblib"),
])
def test_unwritable_output_named(finished_job, command, output):
    result = CliRunner().invoke(main, [command, JOB_ID, "--efs-root", str(finished_job["efs_root"]),
                                       "--output", output])

    assert result.exit_code == 1, result.output
    assert f"cannot write {output.removesuffix('/sub')}: No such file or directory; choose another --output" \
        in result.output
    assert "Traceback" not in result.output


def test_list_and_status_show_job(finished_job):
    listed = CliRunner().invoke(main, ["list", *finished_job["arguments"]])
    assert listed.exit_code == 0, listed.output
    assert JOB_ID in listed.output
    assert f"{N_ROUNDS}/{N_ROUNDS}" in listed.output

    status_result = CliRunner().invoke(main, ["status", JOB_ID, *finished_job["arguments"]])
    assert status_result.exit_code == 0, status_result.output
    assert f"job {JOB_ID}: SUCCEEDED, {N_ROUNDS} of {N_ROUNDS} rounds done" in status_result.output
    assert "cost_usd" in status_result.output

    as_json = CliRunner().invoke(main, ["status", JOB_ID, *finished_job["arguments"], "--json"])
    assert json.loads(as_json.output)["cost_usd"] > 0


def test_status_of_job_failed_in_preparation(finished_job):
    state = finished_job["stack"].state
    state.create_job("failed-early", "e" * 64, json.dumps({"model": {"name": "kmeans"}}), 2)
    state.fail_job("failed-early", "data file 'datasets/none.csv' not found")

    status_result = CliRunner().invoke(main, ["status", "failed-early", *finished_job["arguments"]])

    assert status_result.exit_code == 0, status_result.output
    assert "job failed-early: FAILED, no rounds done, 2 workers" in status_result.output
    assert "0 of 0 rounds" not in status_result.output


def test_status_formats_large_loss_and_cost(finished_job):
    state = finished_job["stack"].state
    state.create_job("regression", "d" * 64, json.dumps({"model": {"name": "linear_regression"}}), 2)
    state.start_job("regression", 10)
    state.advance_round("regression", 0, {"epoch": 0.25, "train_loss": 2018483233.99856, "validation_loss": 1359.25,
                                          "validation_r2": 0.54, "cost_usd": 1.84157e-05})

    status_result = CliRunner().invoke(main, ["status", "regression", *finished_job["arguments"]])
    listed = CliRunner().invoke(main, ["list", *finished_job["arguments"]])
    # The module's other tests expect no RUNNING job in the table.
    state.finish_job("regression", 1, {})

    assert status_result.exit_code == 0, status_result.output
    assert "train_loss           2.0185e+09 (half the mean squared error)" in status_result.output
    assert "validation_loss      1359.25000 (half the mean squared error)" in status_result.output
    assert "validation_r2        0.54000" in status_result.output
    assert "epoch                0.250" in status_result.output
    assert "cost_usd             0.000018" in status_result.output
    assert "e-05" not in status_result.output
    regression_row = next(line for line in listed.output.splitlines() if line.startswith("regression "))
    assert " 0.000018 " in regression_row


def test_status_shows_rounds_rerun(finished_job):
    state = finished_job["stack"].state
    state.create_job("rewound", "f" * 64, json.dumps({"model": {"name": "logistic_regression"}}), 2)
    state.start_job("rewound", 10, first_round=4)
    state.fail_job("rewound", "round state file 'jobs/rewound/rounds/4/state.npz' is missing", repair="round_state")
    attempt = state.begin_repair("rewound", "round_state", new_preparation=False)
    assert attempt == 1
    assert state.end_repair("rewound", "round_state", attempt, 4, 2)

    status_result = CliRunner().invoke(main, ["status", "rewound", *finished_job["arguments"]])
    plain = CliRunner().invoke(main, ["status", JOB_ID, *finished_job["arguments"]])
    # The module's other tests expect no RUNNING job in the table.
    state.finish_job("rewound", 2, {})

    assert status_result.exit_code == 0, status_result.output
    assert "job rewound: RUNNING, 2 of 10 rounds done" in status_result.output
    assert "rounds_rerun         2 (trained again after a resume went back" in status_result.output
    assert "rounds_rerun" not in plain.output


def test_status_of_classifier_has_no_loss_note(finished_job):
    status_result = CliRunner().invoke(main, ["status", JOB_ID, *finished_job["arguments"]])

    assert status_result.exit_code == 0, status_result.output
    assert "train_loss" in status_result.output
    assert "mean squared error" not in status_result.output


def test_status_needs_no_aws_settings_locally(finished_job, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    status_result = CliRunner().invoke(main, ["status", JOB_ID, *finished_job["arguments"]])

    assert status_result.exit_code == 0, status_result.output
    assert f"job {JOB_ID}: SUCCEEDED" in status_result.output


def test_status_of_unknown_job_fails(finished_job):
    result = CliRunner().invoke(main, ["status", "no-such-job", *finished_job["arguments"]])
    assert result.exit_code == 1
    assert "no job 'no-such-job' in table baton-local-state" in result.output


def test_list_filters_by_status(finished_job):
    succeeded = CliRunner().invoke(main, ["list", *finished_job["arguments"], "--status", "succeeded"])
    assert succeeded.exit_code == 0, succeeded.output
    assert JOB_ID in succeeded.output

    running = CliRunner().invoke(main, ["list", *finished_job["arguments"], "--status", "RUNNING"])
    assert running.exit_code == 0, running.output
    assert "no jobs" in running.output


def test_list_rejects_unknown_status(finished_job):
    result = CliRunner().invoke(main, ["list", *finished_job["arguments"], "--status", "DONE"])
    assert result.exit_code == 2
    assert "'DONE' is not one of" in result.output


def test_watch_line_cost_is_rounds_own():
    from shared.monitor import progress_postfix
    from shared.state import JobRecord

    record = JobRecord(job_id=JOB_ID, status="RUNNING", round=3, n_workers=2, total_rounds=10, fingerprint="",
                       spec_json="{}", error=None, attributes={"cost_usd": 0.003})
    rounds = [{"round": 1, "total_cost_usd": 0.001}, {"round": 2, "total_cost_usd": 0.002},
              {"round": 3, "total_cost_usd": 0.003}]

    assert progress_postfix(record, rounds[:2])["cost"] == "$0.002000"
    assert progress_postfix(record, rounds)["cost"] == "$0.003000"
    assert progress_postfix(record, [])["cost"] == "$0.003000"


def test_watch_counts_rounds_from_one(finished_job):
    from shared.monitor import progress_postfix

    store = finished_job["stack"].state
    record = store.get_job(JOB_ID)
    postfix = progress_postfix(record, store.list_round_metrics(JOB_ID))
    assert postfix["round"] == str(N_ROUNDS)
    assert postfix["left"] == "0"


def test_watch_labels_training_loss(finished_job):
    from shared.monitor import progress_postfix

    store = finished_job["stack"].state
    rounds = store.list_round_metrics(JOB_ID)
    postfix = progress_postfix(store.get_job(JOB_ID), rounds)
    assert postfix["train_loss"] == f"{rounds[-1]['train_loss']:.4g}"
    assert "loss" not in postfix


def test_round_numbers_agree_everywhere(finished_job, tmp_path):
    """Round n is round n in `watch`, the run output, the fetched CSV and the metrics files."""
    import csv

    from shared.monitor import format_round

    output = tmp_path / "fetched"
    fetched = CliRunner().invoke(main, ["fetch", JOB_ID, *finished_job["arguments"], "--output", str(output)])
    assert fetched.exit_code == 0, fetched.output
    with open(output / "metrics.csv", newline="", encoding="utf-8") as handle:
        csv_rounds = [int(row["round"]) for row in csv.DictReader(handle)]
    assert csv_rounds == list(range(1, N_ROUNDS + 1))

    metrics_dir = finished_job["efs_root"] / "jobs" / JOB_ID / "metrics"
    assert sorted(int(path.stem) for path in metrics_dir.glob("*.json")) == csv_rounds
    for number in csv_rounds:
        on_efs = json.loads((metrics_dir / f"{number}.json").read_text())
        assert on_efs["round"] == number
    first = json.loads((metrics_dir / "1.json").read_text())
    assert format_round(first).startswith("round     1  ")

    status_result = CliRunner().invoke(main, ["status", JOB_ID, *finished_job["arguments"]])
    assert f"{csv_rounds[-1]} of {N_ROUNDS} rounds done" in status_result.output


def test_huge_losses_in_scientific_notation():
    from shared.monitor import format_round, loss_text

    line = format_round({"round": 4, "epoch": 0.5, "train_loss": 8.3e106, "validation_loss": 1.0927809935e133,
                         "validation_r2": -2.39e203})

    assert "train loss 8.3000e+106  val loss 1.0928e+133  val r2 -2.390e+203" in line
    assert loss_text(999999.99996, 4) == "1.000e+06"
    assert loss_text(0.32395, 5) == "0.32395"
    assert loss_text(1.0927809935e133, 4) == "1.093e+133"


@pytest.mark.parametrize("module", ["cli_run", "cli_stack", "cli_spec", "monitor"])
def test_cli_helpers_never_import_cli(module):
    # shared.cli imports these modules, so an import back, even inside a function, would be a cycle.
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[1] / "shared" / f"{module}.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)

    assert imported, f"no imports found in shared/{module}.py"
    assert "shared.cli" not in imported


def test_watch_says_it_waits_for_job(finished_job):
    import io

    from shared.monitor import JobNotFoundError, watch_job

    stream = io.StringIO()
    with pytest.raises(JobNotFoundError, match="no job 'not-sent-yet'"):
        watch_job(finished_job["stack"].state, "not-sent-yet", stream=stream, wait_for_job_seconds=0.0,
                  sleep=lambda seconds: None)

    assert "waiting up to 0 s for job 'not-sent-yet' to appear in table" in stream.getvalue()


def test_watch_timeout_bounds_wait_for_job(finished_job):
    started = time.monotonic()

    result = CliRunner().invoke(main, ["watch", "not-sent-yet", *finished_job["arguments"], "--interval", "0.2",
                                       "--timeout", "1"])

    assert result.exit_code == 1
    assert "no job 'not-sent-yet'" in result.output
    assert "after 1 s" in result.output
    assert time.monotonic() - started < 30, "the 60 s wait for the job ignored --timeout"


def test_watch_notes_paused_job_once(finished_job):
    import io

    from shared.control import cancel_job, pause_job
    from shared.monitor import watch_job

    state = finished_job["stack"].state
    state.create_job("paused-watch", "f" * 64, "{}", 2)
    state.start_job("paused-watch", 3)
    pause_job(state, "paused-watch")
    polls = []

    def sleep(seconds):
        # Stay paused for two polls, then cancel, so watch returns.
        polls.append(seconds)
        if len(polls) == 3:
            cancel_job(state, "paused-watch")

    stream = io.StringIO()
    record = watch_job(state, "paused-watch", stream=stream, sleep=sleep)

    assert record.status == "CANCELLED"
    assert stream.getvalue().count("job 'paused-watch' is PAUSED") == 1
    assert "`baton resume paused-watch` continues it" in stream.getvalue()


class TerminalStream(io.StringIO):
    """A text stream that reports itself as a terminal, as the live bar needs."""

    def isatty(self) -> bool:
        return True


def watch_growing_job(state, job_id: str, stream, rounds: int = 3, **options):
    """Watch a job whose rounds the table gains one per poll, until it succeeds; return the final record."""
    from shared.monitor import watch_job

    state.create_job(job_id, "c" * 64, "{}", 2)
    state.start_job(job_id, rounds)

    def sleep(seconds):
        record = state.get_job(job_id)
        state.put_round_metrics(job_id, record.round, {"round": record.round + 1, "epoch": 0.5 * (record.round + 1),
                                                       "train_loss": 0.7, "round_seconds": 2.0})
        if record.round + 1 == rounds:
            state.finish_job(job_id, record.round, {"stop_reason": "max_rounds"})
        else:
            state.advance_round(job_id, record.round, {"train_loss": 0.7})

    return watch_job(state, job_id, stream=stream, sleep=sleep, **options)


def test_watch_writes_lines_when_not_terminal(finished_job):
    stream = io.StringIO()

    record = watch_growing_job(finished_job["stack"].state, "watched-lines", stream)

    assert record.status == "SUCCEEDED"
    assert "\r" not in stream.getvalue()
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"watched-lines: {count}/3 rounds" for count in range(4)]
    assert "round=3" in lines[-1]
    assert "status=SUCCEEDED" in lines[-1]


def test_watch_catch_up_lines_omit_status(finished_job):
    from shared.monitor import watch_job

    state = finished_job["stack"].state
    state.create_job("caught-up", "d" * 64, "{}", 2)
    state.start_job("caught-up", 4)

    def finish_all_rounds(seconds):
        # The job runs its last 3 rounds and succeeds between two polls.
        for index in range(1, 4):
            state.put_round_metrics("caught-up", index, {"round": index + 1, "epoch": 1.0, "train_loss": 0.5})
            if index == 3:
                state.finish_job("caught-up", index, {"stop_reason": "max_rounds"})
            else:
                state.advance_round("caught-up", index, {"train_loss": 0.5})

    state.put_round_metrics("caught-up", 0, {"round": 1, "epoch": 0.25, "train_loss": 0.7})
    state.advance_round("caught-up", 0, {"train_loss": 0.7})
    stream = io.StringIO()

    watch_job(state, "caught-up", stream=stream, sleep=finish_all_rounds)

    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"caught-up: {count}/4 rounds" for count in range(1, 5)]
    assert "status=RUNNING" in lines[0]
    assert all("status=" not in line for line in lines[1:3]), "an earlier round shows the final status"
    assert "status=SUCCEEDED" in lines[3]


def test_watch_draws_bar_on_terminal(finished_job, monkeypatch):
    # A StringIO has no terminal size, so COLUMNS gives it one.
    monkeypatch.setenv("COLUMNS", "80")
    stream = TerminalStream()

    watch_growing_job(finished_job["stack"].state, "watched-bar", stream)

    assert "\r" in stream.getvalue()
    assert "3/3" in stream.getvalue()


def open_terminal(columns: int):
    """Open a pseudo-terminal that reports ``columns`` columns; return its controller fd and a stream on it."""
    import fcntl
    import pty
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    # Without output processing, the controller reads "\n" as written, not as "\r\n".
    attributes = termios.tcgetattr(terminal)
    attributes[1] &= ~termios.OPOST
    termios.tcsetattr(terminal, termios.TCSANOW, attributes)
    return controller, open(terminal, "w", encoding="utf-8")


def read_terminal(controller: int) -> str:
    """Return what was written to the pseudo-terminal of ``controller`` so far."""
    import select

    chunks = []
    while select.select([controller], [], [], 0.2)[0]:
        try:
            chunk = os.read(controller, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8")


def watch_on_terminal(finished_job, job_id: str, columns: int) -> str:
    """Watch a growing job on a pseudo-terminal of ``columns`` columns; return what the terminal showed."""
    controller, stream = open_terminal(columns)
    try:
        watch_growing_job(finished_job["stack"].state, job_id, stream)
        stream.flush()
        return read_terminal(controller)
    finally:
        stream.close()
        os.close(controller)


def drawn_lines(output: str) -> list[str]:
    """Return each line a terminal showed in turn: the text between carriage returns and newlines."""
    return [line.rstrip(" ") for line in output.replace("\n", "\r").split("\r") if line.strip()]


def test_watch_bar_fits_80_column_terminal(finished_job, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    output = watch_on_terminal(finished_job, "watched-80-columns", 80)

    assert "\r" in output, "a terminal of 80 columns got no live bar"
    lines = drawn_lines(output)
    assert all(len(line) <= 79 for line in lines), max(lines, key=len)
    assert lines[-1].startswith("|"), "the bar has room at 80 columns when the fields are short"
    for text in ("3/3", "SUCCEEDED", "epoch 1.50", "train 0.7", "2.00 s/round", "$0.000000"):
        assert text in lines[-1], text
    assert "round=" not in output, "the bar repeats the rounds done"


def test_watch_wide_terminal_draws_tqdm_bar(finished_job, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    output = watch_on_terminal(finished_job, "watched-wide", 120)

    lines = drawn_lines(output)
    assert all(len(line) <= 119 for line in lines), max(lines, key=len)
    assert lines[-1].startswith("watched-wide: |█"), lines[-1]
    assert "3/3 SUCCEEDED" in lines[-1]
    # tqdm's elapsed time and rate count from the start of watch, so the bar leaves them out.
    for text in ("it/s", "s/it", "00:00"):
        assert text not in output, text


def test_watch_zero_column_terminal_writes_lines(finished_job, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    output = watch_on_terminal(finished_job, "watched-0-columns", 0)

    assert "\r" not in output
    lines = output.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"watched-0-columns: {count}/3 rounds" for count in range(4)]


def a9a_like_progress(status: str = "RUNNING"):
    """Return a job record and the rounds of a job 197 rounds into 320, with an a9a job's figures."""
    from shared.state import JobRecord

    record = JobRecord(job_id="a9a-logistic", status=status, round=197, n_workers=4, total_rounds=320,
                       fingerprint="", spec_json="{}", error=None, attributes={"cost_usd": 0.012345})
    rounds = [{"round": index + 1, "epoch": (index + 1) / 32, "train_loss": 0.33117, "validation_loss": 0.32395,
               "validation_accuracy": 0.85124, "round_seconds": 0.15, "total_cost_usd": 0.012345}
              for index in range(197)]
    return record, rounds


# Every field that users watch for, as the bar writes them for a9a_like_progress().
BAR_FIELDS = ("197/320", "epoch 6.16", "train 0.3312", "val acc 0.8512", "0.15 s/round", "eta 0:18", "$0.012345")


def test_bar_line_fits_every_field_at_80():
    from shared.monitor import progress_bar_line

    record, rounds = a9a_like_progress()

    line = progress_bar_line("a9a-logistic", record, rounds, 80)

    assert len(line) <= 79, line
    for text in BAR_FIELDS:
        assert text in line, text
    assert "round=" not in line


def test_bar_line_wide_adds_bar_and_job_id():
    from shared.monitor import progress_bar_line

    record, rounds = a9a_like_progress()

    line = progress_bar_line("a9a-logistic", record, rounds, 120)

    assert len(line) == 119, line
    assert line.startswith("a9a-logistic: |█")
    for text in BAR_FIELDS:
        assert text in line, text
    for text in ("%", "it/s", "s/it", "00:00"):
        assert text not in line, text


def test_bar_line_ascii_bar():
    from shared.monitor import progress_bar_line

    record, rounds = a9a_like_progress()

    line = progress_bar_line("a9a-logistic", record, rounds, 100, ascii_cells=True)

    bar = line.split("|")[1]
    # tqdm's ASCII cells: "#" for a full cell, and a digit for the tenths of the partly filled one.
    assert set(bar) <= set(" 123456789#"), bar
    assert {"#", " "} <= set(bar), bar
    assert bar.count("#") == len(bar) * 197 // 320


@pytest.mark.parametrize("columns, kept, left_out", [
    (60, ("197/320", "train 0.3312", "val acc 0.8512", "eta 0:18", "$0.012345"), ("s/round", "epoch")),
    (50, ("197/320", "train 0.3312", "val acc 0.8512", "eta 0:18"), ("$", "epoch")),
    (30, ("197/320", "train 0.3312"), ("val acc", "eta")),
    (12, ("197/320",), ("train",)),
])
def test_bar_line_narrow_terminal_drops_fields(columns, kept, left_out):
    from shared.monitor import progress_bar_line

    record, rounds = a9a_like_progress()

    line = progress_bar_line("a9a-logistic", record, rounds, columns)

    assert len(line) <= columns - 1, line
    for text in kept:
        assert text in line, text
    for text in left_out:
        assert text not in line, text


def test_bar_line_keeps_status_and_cuts_at_width():
    from shared.monitor import progress_bar_line

    record, rounds = a9a_like_progress("PAUSED")

    assert progress_bar_line("a9a-logistic", record, rounds, 20) == "197/320 PAUSED"
    assert progress_bar_line("a9a-logistic", record, rounds, 6) == "197/3"
    assert progress_bar_line("a9a-logistic", record, rounds, 1) == "1"


def test_watch_pause_note_names_stack(finished_job):
    from shared.control import cancel_job, pause_job
    from shared.monitor import watch_job

    state = finished_job["stack"].state
    state.create_job("paused-stack", "b" * 64, "{}", 2)
    state.start_job("paused-stack", 3)
    pause_job(state, "paused-stack")
    stream = io.StringIO()

    watch_job(state, "paused-stack", stream=stream, sleep=lambda seconds: cancel_job(state, "paused-stack"),
              stack_arguments=" --stage local --endpoint-url http://127.0.0.1:5")

    assert "`baton resume paused-stack --stage local --endpoint-url http://127.0.0.1:5` continues it" \
        in stream.getvalue()


def test_watch_estimate_uses_round_times():
    from shared.monitor import format_duration, progress_postfix
    from shared.state import JobRecord

    rounds = [{"round": index + 1, "round_seconds": seconds} for index, seconds in enumerate([90.0, 30.0, 30.0])]

    def record(status: str) -> JobRecord:
        return JobRecord(job_id=JOB_ID, status=status, round=3, n_workers=2, total_rounds=103, fingerprint="",
                         spec_json="{}", error=None, attributes={"cost_usd": 0.5})

    # 50 s per round over the last rounds, 100 rounds left.
    assert progress_postfix(record("RUNNING"), rounds)["eta"] == "1:23:20"
    # A paused job makes no progress, so it has no time left to estimate.
    assert "eta" not in progress_postfix(record("PAUSED"), rounds)
    assert "eta" not in progress_postfix(record("CANCELLED"), rounds)
    assert format_duration(59.6) == "1:00"
    assert format_duration(3600) == "1:00:00"


@pytest.fixture
def no_aws_region(tmp_path, monkeypatch):
    """A working folder with no AWS region in the environment or in an AWS config file."""
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("command, after_run", [
    (["status", "demo-job"], "`baton fetch demo-job --efs-root .baton/efs` and `baton plot demo-job --efs-root "
                             ".baton/efs` read the job's files"),
    (["fetch", "demo-job"], "pass --efs-root .baton/efs alone"),
    (["plot", "demo-job"], "pass --efs-root .baton/efs alone"),
    (["list"], "`baton fetch JOB_ID --efs-root .baton/efs` reads a job's files"),
])
def test_missing_region_names_local_folder(no_aws_region, command, after_run):
    (no_aws_region / ".baton" / "efs" / "jobs" / "demo-job").mkdir(parents=True)

    result = CliRunner().invoke(main, command)

    assert result.exit_code == 1
    assert f"without --stage or --endpoint-url `baton {command[0]}` reads the stack of stage 'dev'" in result.output
    assert "pass --stage local --endpoint-url URL, with the URL it prints" in result.output
    assert f"once it has ended, {after_run}" in result.output
    assert "For a stack on AWS, pass --region or set AWS_DEFAULT_REGION" in result.output


@pytest.mark.parametrize("command", [["status", "other-job"], ["status", "demo-job", "--stage", "prod"]])
def test_missing_region_without_local_job(no_aws_region, command):
    # The local folder contains another job, or the command aims at a named stage.
    (no_aws_region / ".baton" / "efs" / "jobs" / "demo-job").mkdir(parents=True)

    result = CliRunner().invoke(main, command)

    assert result.exit_code == 1
    assert "Error: no AWS region is configured; pass --region or set AWS_DEFAULT_REGION" in result.output
    assert "--stage local" not in result.output
