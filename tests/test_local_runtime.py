"""End to end through the local runtime: moto's server on 127.0.0.1, handlers in their own
processes, EFS as a folder, exactly as `baton run` and `make demo` use them."""

from __future__ import annotations

import http.client
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from shared.cli import main
from shared.local.session import LocalStack, start_moto_server
from shared.reference import train_reference
from shared.spec import parse_job_spec
from shared.state import FAILED, SUCCEEDED
from tests.conftest import A9A_DIR, BREAST_CANCER_CSV, PROJECT_ROOT

EXAMPLE_SPEC = PROJECT_ROOT / "examples" / "a9a.json"


def a9a_spec(job_id: str) -> dict:
    return {
        "job_id": job_id,
        "model": {"name": "logistic_regression", "alpha": 1e-5},
        "optimizer": {"name": "momentum", "learning_rate": 0.5, "momentum": 0.9},
        "data": {"path": "datasets/a9a/a9a", "format": "libsvm", "n_features": 123,
                 "validation_path": "datasets/a9a/a9a.t"},
        "training": {"n_workers": 4, "batch_size": 128, "max_rounds": 15, "seed": 11},
    }


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("local") / "efs"
    with LocalStack(root, retry_delay_seconds=0) as stack:
        stack.import_data(A9A_DIR, "datasets/a9a")
        yield stack


def test_distributed_run_equals_reference(local_stack):
    spec = a9a_spec("runtime-equals-reference")
    local_stack.submit(spec)
    rounds = []
    record = local_stack.wait(spec["job_id"], timeout_seconds=240, on_round=rounds.append)

    assert record.status == SUCCEEDED, record.error
    assert [entry["round"] for entry in rounds] == list(range(1, 16))

    expected, expected_losses = train_reference(parse_job_spec(spec), local_stack.efs_root)
    trained = np.load(local_stack.efs_root / "jobs" / spec["job_id"] / "model" / "params.npy")
    np.testing.assert_array_equal(trained, expected)
    np.testing.assert_allclose([entry["train_loss"] for entry in rounds], expected_losses, rtol=1e-12)


def test_handlers_ran_in_separate_processes(local_stack):
    spec = a9a_spec("runtime-processes")
    spec["training"]["max_rounds"] = 2
    local_stack.submit(spec)
    assert local_stack.wait(spec["job_id"], timeout_seconds=120).status == SUCCEEDED

    runtime = local_stack.runtime
    worker_invocations = runtime.lanes["worker"].invocations
    assert worker_invocations, "no worker invocation was recorded"
    assert all(invocation.outcome == "ok" for invocation in worker_invocations)
    assert (local_stack.efs_root.parent / "logs" / "worker.log").stat().st_size > 0


def test_invalid_job_fails_without_retry(local_stack):
    spec = a9a_spec("runtime-invalid")
    spec["training"]["n_workers"] = 0
    local_stack.submit(spec)
    record = local_stack.wait("runtime-invalid", timeout_seconds=60)

    assert record.status == FAILED
    assert "training.n_workers" in record.error
    starter_invocations = [i for i in local_stack.runtime.lanes["starter"].invocations]
    assert all(invocation.outcome == "ok" for invocation in starter_invocations)


def write_a9a_spec(tmp_path, job_id: str, max_rounds: int):
    """Write a small a9a job spec to a file in ``tmp_path``; return the file's path."""
    spec = a9a_spec(job_id)
    spec["training"]["max_rounds"] = max_rounds
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(spec))
    return spec_file


def test_cli_run_trains_and_reports(tmp_path):
    spec_file = write_a9a_spec(tmp_path, "cli-run", max_rounds=4)

    result = CliRunner().invoke(main, [
        "run", str(spec_file), "--local-dir", str(tmp_path / "baton"),
        "--import", f"{A9A_DIR}:datasets/a9a", "--timeout", "240",
    ])

    assert result.exit_code == 0, result.output
    assert "round     4" in result.output
    assert "round     5" not in result.output
    assert "val acc" in result.output
    assert "job cli-run SUCCEEDED after 4 rounds" in result.output
    assert "(stop reason max_rounds)" in result.output
    assert (tmp_path / "baton" / "efs" / "jobs" / "cli-run" / "model" / "params.npy").is_file()


def test_cli_run_rejects_invalid_spec_file(tmp_path):
    spec = a9a_spec("cli-invalid")
    spec["optimizer"]["learning_rate"] = -1
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(spec))

    result = CliRunner().invoke(main, ["run", str(spec_file), "--local-dir", str(tmp_path / "baton")])

    assert result.exit_code != 0
    assert "optimizer.learning_rate" in result.output
    shutil.rmtree(tmp_path / "baton", ignore_errors=True)


def test_cli_run_applies_overrides(tmp_path):
    spec_file = write_a9a_spec(tmp_path, "cli-run-file", max_rounds=15)

    result = CliRunner().invoke(main, [
        "run", str(spec_file), "--local-dir", str(tmp_path / "baton"), "--import", f"{A9A_DIR}:datasets/a9a",
        "--timeout", "240", "--job-id", "cli-run-overrides", "--n-workers", "2", "--set", "training.max_rounds=3",
    ])

    assert result.exit_code == 0, result.output
    assert "job cli-run-overrides sent with 2 workers" in result.output
    assert "job cli-run-overrides SUCCEEDED after 3 rounds" in result.output
    stored = json.loads((tmp_path / "baton" / "efs" / "jobs" / "cli-run-overrides" / "spec.json").read_text())
    assert stored["training"]["n_workers"] == 2
    assert stored["training"]["max_rounds"] == 3
    assert not (tmp_path / "baton" / "efs" / "jobs" / "cli-run-file").exists()


@pytest.mark.parametrize("arguments, words", [
    (["--set", "training.max_rounds"], "Invalid value for '--set'"),
    (["--n-workers", "0"], "change the value of --n-workers or drop that option"),
])
def test_cli_run_rejects_bad_override(tmp_path, arguments, words):
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(a9a_spec("cli-bad-override")))

    result = CliRunner().invoke(main, ["run", str(spec_file), "--local-dir", str(tmp_path / "baton"), *arguments])

    assert result.exit_code != 0
    assert words in result.output
    assert not (tmp_path / "baton").exists()


@pytest.mark.parametrize("file_name, max_rounds, expected_lines", [
    ("nameless.json", 2, ["job nameless-", "SUCCEEDED after 2 rounds"]),
    ("my spec (copy).json", 1, ["job my-spec-copy-"]),
])
def test_cli_run_names_job_without_id(tmp_path, file_name, max_rounds, expected_lines):
    spec = a9a_spec("unused")
    del spec["job_id"]
    spec["training"]["max_rounds"] = max_rounds
    spec_file = tmp_path / file_name
    spec_file.write_text(json.dumps(spec))

    result = CliRunner().invoke(main, [
        "run", str(spec_file), "--local-dir", str(tmp_path / "baton"),
        "--import", f"{A9A_DIR}:datasets/a9a", "--timeout", "240",
    ])

    assert result.exit_code == 0, result.output
    for line in expected_lines:
        assert line in result.output


@pytest.mark.parametrize("mapping, words", [
    (f"{A9A_DIR}:../outside", "'..' is not allowed"),
    (f"{A9A_DIR}:/etc/baton", "relative to the EFS root"),
    ("/no/such/folder:datasets/x", "does not exist"),
    ("/no/such:folder:datasets/x", "source '/no/such:folder' does not exist (in '/no/such:folder:datasets/x', the "
                                   "last ':' separates SOURCE from DEST)"),
    (":datasets/x", "neither part empty"),
    (f"{A9A_DIR}:datasets/{'x' * 256}", "at most 255 bytes in one name"),
])
def test_cli_run_rejects_bad_import(tmp_path, mapping, words):
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(a9a_spec("bad-import")))

    result = CliRunner().invoke(main, ["run", str(spec_file), "--local-dir", str(tmp_path / "baton"),
                                       "--import", mapping])

    assert result.exit_code != 0
    assert words in result.output
    assert not (tmp_path / "outside").exists()


def test_import_source_with_colon(tmp_path):
    from shared.cli_run import _import_local_data

    source = tmp_path / "runs:2026" / "rows.csv"
    source.parent.mkdir()
    source.write_text("1,0\n")
    efs_root = tmp_path / "efs"

    _import_local_data(LocalStack(efs_root), (f"{source}:datasets/rows.csv",))

    assert (efs_root / "datasets" / "rows.csv").read_text() == "1,0\n"


def test_import_replaces_link_at_destination(tmp_path):
    outside = tmp_path / "outside.csv"
    outside.write_text("kept\n")
    efs_root = tmp_path / "efs"
    (efs_root / "datasets").mkdir(parents=True)
    (efs_root / "datasets" / "breast_cancer.csv").symlink_to(outside)

    target = LocalStack(efs_root).import_data(BREAST_CANCER_CSV, "datasets/breast_cancer.csv")

    assert not target.is_symlink()
    assert target.read_bytes() == BREAST_CANCER_CSV.read_bytes()
    assert outside.read_text() == "kept\n", "the import wrote through the link"


def test_import_replaces_hard_link_at_destination(tmp_path):
    original = tmp_path / "original.csv"
    shutil.copy2(BREAST_CANCER_CSV, original)
    efs_root = tmp_path / "efs"
    (efs_root / "datasets").mkdir(parents=True)
    os.link(original, efs_root / "datasets" / "data.csv")

    target = LocalStack(efs_root).import_data(A9A_DIR / "a9a.t", "datasets/data.csv")

    assert target.read_bytes() == (A9A_DIR / "a9a.t").read_bytes()
    assert original.read_bytes() == BREAST_CANCER_CSV.read_bytes(), "the import wrote through the hard link"


def test_import_replaces_hard_links_in_folder(tmp_path):
    # A folder staged as bench/accuracy.py --stage-into stages one: hard links to the originals.
    originals, other = tmp_path / "originals", tmp_path / "other"
    originals.mkdir()
    other.mkdir()
    for name in ("a9a", "a9a.t"):
        shutil.copy2(A9A_DIR / name, originals / name)
        shutil.copy2(BREAST_CANCER_CSV, other / name)
    staged = tmp_path / "efs" / "datasets" / "a9a"
    staged.mkdir(parents=True)
    for name in ("a9a", "a9a.t"):
        os.link(originals / name, staged / name)

    LocalStack(tmp_path / "efs").import_data(other, "datasets/a9a")

    for name in ("a9a", "a9a.t"):
        assert (staged / name).read_bytes() == BREAST_CANCER_CSV.read_bytes()
        assert (originals / name).read_bytes() == (A9A_DIR / name).read_bytes(), f"{name} was written through"


def test_import_same_file_again(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(A9A_DIR, source)
    staged = tmp_path / "efs" / "datasets" / "a9a"
    staged.mkdir(parents=True)
    for name in ("a9a", "a9a.t"):
        os.link(source / name, staged / name)
    stack = LocalStack(tmp_path / "efs")

    stack.import_data(source / "a9a", "datasets/a9a/a9a")
    stack.import_data(source, "datasets/a9a")

    for name in ("a9a", "a9a.t"):
        assert (staged / name).samefile(source / name)
        assert (source / name).read_bytes() == (A9A_DIR / name).read_bytes()


def test_import_keeps_identity_of_unchanged_copy(tmp_path):
    source = tmp_path / "data.csv"
    shutil.copy2(BREAST_CANCER_CSV, source)
    stack = LocalStack(tmp_path / "efs")
    target = stack.import_data(source, "datasets/data.csv")
    first_inode = target.stat().st_ino

    stack.import_data(source, "datasets/data.csv")
    assert target.stat().st_ino == first_inode, "an unchanged file was copied again"

    # A touched source, with the same bytes, keeps the copy and its identity too.
    os.utime(source, (source.stat().st_atime + 60, source.stat().st_mtime + 60))
    stack.import_data(source, "datasets/data.csv")
    assert target.stat().st_ino == first_inode, "a touched, unchanged file was copied again"

    with source.open("a") as stream:
        stream.write("\n")
    stack.import_data(source, "datasets/data.csv")
    assert target.stat().st_ino != first_inode, "a changed file was written into the old copy"
    assert target.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("source_is_folder", [True, False])
def test_import_rejects_file_folder_mismatch(tmp_path, source_is_folder):
    efs_root = tmp_path / "efs"
    target = efs_root / "datasets" / "a9a"
    if source_is_folder:
        target.parent.mkdir(parents=True)
        target.write_text("1,0\n")
    else:
        target.mkdir(parents=True)
    source = A9A_DIR if source_is_folder else A9A_DIR / "a9a"

    with pytest.raises(ValueError, match="but destination 'datasets/a9a' is a"):
        LocalStack(efs_root).import_data(source, "datasets/a9a")
    assert target.is_file() == source_is_folder


def efs_and_outside(tmp_path: Path) -> tuple[Path, Path]:
    """Make an EFS folder and an empty folder beside it, outside it."""
    efs_root, outside = tmp_path / "efs", tmp_path / "outside"
    efs_root.mkdir()
    outside.mkdir()
    return efs_root, outside


def test_import_rejects_linked_folder(tmp_path):
    efs_root, outside = efs_and_outside(tmp_path)
    (efs_root / "datasets").symlink_to(outside)

    with pytest.raises(ValueError, match="'datasets/breast_cancer.csv' leads outside the EFS folder"):
        LocalStack(efs_root).import_data(BREAST_CANCER_CSV, "datasets/breast_cancer.csv")
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("roots, words", [
    ("teams", "data.path 'datasets/a9a/a9a' is outside the folders this stack reads data from (teams"),
    ("/datasets", "invalid folder '/datasets' in ALLOWED_DATA_ROOTS"),
    (",", "invalid ALLOWED_DATA_ROOTS ',': it names no folder"),
])
def test_cli_run_passes_allowed_data_roots(tmp_path, roots, words):
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(a9a_spec("rooted")))

    result = CliRunner(env={"ALLOWED_DATA_ROOTS": roots}).invoke(main, [
        "run", str(spec_file), "--local-dir", str(tmp_path / "baton"), "--import", f"{A9A_DIR}:datasets/a9a",
        "--timeout", "120"])

    assert result.exit_code == 1, result.output
    assert words in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("destination", ["jobs/other/data/shard-1/y.npy", "jobs", "datasets/linked/other/spec.json"])
def test_import_rejects_jobs_folder(tmp_path, destination):
    efs_root = tmp_path / "efs"
    (efs_root / "jobs" / "other").mkdir(parents=True)
    (efs_root / "jobs" / "other" / "spec.json").write_text("{}")
    (efs_root / "datasets").mkdir()
    (efs_root / "datasets" / "linked").symlink_to(efs_root / "jobs")

    with pytest.raises(ValueError, match="is in jobs/, where Baton keeps the state of every job"):
        LocalStack(efs_root).import_data(BREAST_CANCER_CSV, destination)
    assert (efs_root / "jobs" / "other" / "spec.json").read_text() == "{}"
    assert not (efs_root / "jobs" / "other" / "data").exists()


def test_import_rejects_link_back_to_local_folder(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "rows.csv").write_text("1,0\n")
    local_dir = tmp_path / "local"
    (local_dir / "efs").mkdir(parents=True)
    (source / "loop").symlink_to(local_dir)

    with pytest.raises(ValueError, match="a link to .* which contains the destination"):
        LocalStack(local_dir / "efs").import_data(source, "datasets/copy")
    assert not (local_dir / "efs" / "datasets" / "copy" / "loop").exists()


def test_import_checks_links_before_making_folders(tmp_path):
    efs_root, outside = efs_and_outside(tmp_path)
    (efs_root / "out").symlink_to(outside)
    (efs_root / "dangling").symlink_to(efs_root / "nowhere")

    with pytest.raises(ValueError, match="leads outside the EFS folder"):
        LocalStack(efs_root).import_data(BREAST_CANCER_CSV, "out/a/b/data.csv")
    with pytest.raises(ValueError, match="a file or a link that leads nowhere is on the way"):
        LocalStack(efs_root).import_data(BREAST_CANCER_CSV, "dangling/data.csv")
    assert list(outside.iterdir()) == []


def test_import_rejects_folder_holding_destination(tmp_path):
    # A project folder whose local folder sits inside it, as .baton sits in a checkout.
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "rows.csv").write_text("1,0\n")
    efs_root = project / ".baton" / "efs"
    efs_root.mkdir(parents=True)

    with pytest.raises(ValueError, match="contains the destination .* so the copy would copy itself over and over"):
        LocalStack(efs_root).import_data(project, "datasets/project")
    assert not (efs_root / "datasets" / "project").exists()


def test_import_rejects_named_pipe(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    efs_root = tmp_path / "efs"

    with pytest.raises(ValueError, match="is a named pipe, not a file or folder .* write the data to a file first"):
        LocalStack(efs_root).import_data(pipe, "datasets/data.csv")
    assert not (efs_root / "datasets" / "data.csv").exists()


@pytest.mark.parametrize("make_entry, words", [
    (lambda folder: os.mkfifo(folder / "pipe"), "contains '.*pipe', a named pipe, which cannot be copied"),
    (lambda folder: (folder / "self").symlink_to(folder), "contains a symbolic link loop at '.*self'"),
    (lambda folder: (folder / "inner" / "up").symlink_to(".."), "contains a symbolic link loop at '.*up'"),
    (lambda folder: (folder / "gone").symlink_to(folder / "missing"), "'.*gone', a symbolic link to a missing file"),
])
def test_import_rejects_folder_it_cannot_copy(tmp_path, make_entry, words):
    source = tmp_path / "source"
    (source / "inner").mkdir(parents=True)
    (source / "rows.csv").write_text("1,0\n")
    make_entry(source)
    efs_root = tmp_path / "efs"

    with pytest.raises(ValueError, match=words):
        LocalStack(efs_root).import_data(source, "datasets/copy")
    assert not (efs_root / "datasets" / "copy").exists()


def test_failed_folder_import_leaves_nothing(tmp_path, monkeypatch):
    from shared.local import session

    source = tmp_path / "source"
    source.mkdir()
    for name in ("a.csv", "b.csv"):
        (source / name).write_text("1,0\n")
    real_replace = session._replace_file

    def fail_on_second(file_source, target):
        if str(file_source).endswith("b.csv"):
            raise PermissionError(13, "Permission denied", str(file_source))
        return real_replace(file_source, target)

    monkeypatch.setattr(session, "_replace_file", fail_on_second)
    efs_root = tmp_path / "efs"

    with pytest.raises(ValueError, match="cannot copy import source .*b.csv.*Permission denied"):
        LocalStack(efs_root).import_data(source, "datasets/copy")
    assert list((efs_root / "datasets").iterdir()) == []


def test_cli_run_rejects_piped_import(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(a9a_spec("piped")))

    result = CliRunner().invoke(main, ["run", str(spec_file), "--local-dir", str(tmp_path / "baton"),
                                       "--import", f"{pipe}:datasets/a9a/a9a"])

    assert result.exit_code != 0
    assert "is a named pipe" in result.output
    assert "Traceback" not in result.output


def test_cli_status_explains_missing_table(local_stack):
    result = CliRunner().invoke(main, ["status", "any-job", "--stage", "nosuchstage",
                                       "--endpoint-url", local_stack.endpoint_url, "--region", "us-east-1"])

    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "--stage local" in result.output
    assert "(table baton-nosuchstage-state for --stage 'nosuchstage')" in result.output


def test_cli_submit_names_missing_queue_url(local_stack):
    queue_url = f"{local_stack.endpoint_url}/123456789012/nonexistent"

    result = CliRunner().invoke(main, ["submit", str(EXAMPLE_SPEC), "--queue-url", queue_url,
                                       "--endpoint-url", local_stack.endpoint_url, "--region", "us-east-1"])

    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert f"(queue {queue_url} given by --queue-url); check --queue-url and --region" in result.output
    assert "baton-dev-jobs" not in result.output


@pytest.mark.parametrize("option, value, words", [
    ("--endpoint-url", "notaurl", "is not an http:// or https:// URL"),
    ("--endpoint-url", "", "is not an http:// or https:// URL"),
    ("--endpoint-url", "ftp://127.0.0.1:1", "is not an http:// or https:// URL"),
    ("--endpoint-url", "http://127.0.0.1:99999", "is not a valid URL (Port out of range"),
    ("--endpoint-url", "http://127.0.0.1:abc", "is not a valid URL"),
    ("--endpoint-url", "http://[::1", "is not a valid URL (Invalid IPv6 URL)"),
    ("--endpoint-url", "http://127.0.0.1:0", "is not a valid URL (its port is 0"),
    ("--endpoint-url", "http://127.0.0.1:", "is not a valid URL (its port is empty"),
    ("--region", "ü", "is not an AWS region name"),
    ("--stage", "", "is not a stage name"),
    ("--stage", "ü", "is not a stage name"),
])
def test_cli_rejects_bad_stack_option(option, value, words):
    result = CliRunner().invoke(main, ["status", "any-job", option, value])

    assert result.exit_code == 2
    assert words in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["status", "any-job"], ["list"], ["pause", "any-job"], ["resume", "any-job"],
                                     ["cancel", "any-job"], ["submit", str(EXAMPLE_SPEC)]])
def test_cli_local_stage_needs_endpoint(monkeypatch, command):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)

    result = CliRunner().invoke(main, [*command, "--stage", "local", "--region", "us-east-1"])

    assert result.exit_code == 2, result.output
    assert "--stage local names the stack that `baton run` serves on this machine, so give its --endpoint-url" \
        in result.output
    assert "cannot reach" not in result.output


def test_cli_status_explains_unreachable_endpoint():
    # Port 9 (discard) on the loopback interface has no listener here.
    result = CliRunner().invoke(main, ["status", "any-job", "--stage", "local",
                                       "--endpoint-url", "http://127.0.0.1:9", "--region", "us-east-1"])

    assert result.exit_code != 0
    assert "cannot reach" in result.output
    assert "baton run" in result.output


def test_sigterm_stops_local_stack(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    spec = a9a_spec("sigterm")
    spec["training"]["max_rounds"] = 100000
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(spec))
    local_dir = tmp_path / "baton"
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "run", str(spec_file), "--local-dir", str(local_dir),
         "--import", f"{A9A_DIR}:datasets/a9a"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics_dir = local_dir / "efs" / "jobs" / "sigterm" / "metrics"
        deadline = time.monotonic() + 120
        while not (metrics_dir.is_dir() and any(metrics_dir.iterdir())):
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the job never finished a round"
            time.sleep(0.2)
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        assert children, "baton run started no child processes"

        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    time.sleep(1)
    survivors = [child for child in children
                 if os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z"]
    for child in survivors:
        # End what the failed shutdown left behind, so a failing test leaks nothing.
        os.kill(int(child), signal.SIGKILL)
    assert survivors == []


def test_moto_server_keeps_connections_open(tmp_path):
    server, endpoint = start_moto_server(tmp_path / "moto.log")
    host, port = endpoint.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {
        "Content-Type": "application/x-amz-json-1.0",
        "X-Amz-Target": "DynamoDB_20120810.ListTables",
        "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/dynamodb/aws4_request, "
                         "SignedHeaders=host, Signature=0",
    }
    sockets = []
    try:
        for _ in range(3):
            connection.request("POST", "/", body="{}", headers=headers)
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200, body
            assert json.loads(body) == {"TableNames": []}
            sockets.append(connection.sock)
    finally:
        connection.close()
        server.terminate()
        server.wait(timeout=10)

    # http.client drops its socket when the server closes the connection, and opens a new one.
    assert sockets[0] is not None
    assert sockets[1] is sockets[0]
    assert sockets[2] is sockets[0]


def test_cli_run_fresh_keeps_files_outside_efs(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "kept").mkdir(parents=True)
    (elsewhere / "kept" / "model.npy").write_bytes(b"trained")
    (tmp_path / "baton" / "efs").mkdir(parents=True)
    (tmp_path / "baton" / "efs" / "jobs").symlink_to(elsewhere)

    result = CliRunner().invoke(main, ["run", "--local-dir", str(tmp_path / "baton"), "--fresh", "--job-id", "kept", "--model", "logistic_regression",
                                       "--data", "datasets/a9a/a9a", "--set", "data.n_features=123"])

    assert result.exit_code != 0
    assert "--fresh did not delete" in result.output
    assert (elsewhere / "kept" / "model.npy").read_bytes() == b"trained"


@pytest.mark.parametrize("name", ["efs", "logs"])
def test_cli_run_rejects_file_for_folder(tmp_path, name):
    (tmp_path / "baton").mkdir()
    (tmp_path / "baton" / name).write_text("not a folder")

    result = CliRunner().invoke(main, ["run", "--local-dir", str(tmp_path / "baton"), "examples/a9a.json"])

    assert result.exit_code == 1
    assert f"{tmp_path / 'baton' / name} is a file, but baton run keeps the local stack's {name} folder there" \
        in result.output
    assert "Traceback" not in result.output


def test_cli_run_accepts_null_training_section(tmp_path):
    # A null section validates like a missing one, so `run` must not trip over it either.
    result = CliRunner().invoke(main, [
        "run", "--local-dir", str(tmp_path / "baton"), "--job-id", "null-training", "--model", "logistic_regression", "--timeout", "120",
        "--data", "datasets/missing.csv", "--format", "csv", "--set", "training=null",
    ])

    assert "AttributeError" not in repr(result.exception)
    assert "data file not found: 'datasets/missing.csv'" in result.output


@pytest.mark.parametrize("command", ["fetch", "plot", "export"])
def test_cli_rejects_job_id_outside_rule(tmp_path, command):
    arguments = [command, "../../elsewhere/jobs/other", "--efs-root", str(tmp_path)]
    if command == "export":
        arguments += ["--output", str(tmp_path / "model.joblib")]
    result = CliRunner().invoke(main, arguments)

    assert result.exit_code == 2
    assert "is not a job id" in result.output


@pytest.mark.parametrize("container_code, wait_seconds, expected", [
    # The container has closed its socket but exits only half a second later.
    ("import time; time.sleep(0.5); raise SystemExit(7)", 30, "exited with code 7 during an invocation"),
    ("import time; time.sleep(60)", 0.3, "closed its connection and had not exited 0.3 s later"),
], ids=["exits-late", "never-exits"])
def test_crash_log_waits_for_exit(tmp_path, caplog, monkeypatch, container_code, wait_seconds, expected):
    import logging
    import socket
    import subprocess
    import sys
    from multiprocessing.connection import Connection

    from shared.local import runtime as runtime_module
    from shared.local.runtime import Container, FunctionLanes, LocalRuntime
    from shared.local.stack import FunctionDefinition

    monkeypatch.setattr(runtime_module, "CONTAINER_EXIT_WAIT_SECONDS", wait_seconds)
    definition = FunctionDefinition(name="crashing", handler="unused.handler", timeout_seconds=60, memory_mb=128,
                                    queue_logical_id="CrashingQueue", batch_size=1, max_concurrency=1)
    runtime = LocalRuntime({}, {}, None, {}, tmp_path / "logs")
    lanes = FunctionLanes(definition, "http://127.0.0.1:9/123456789012/crashing", 1)
    runtime_end, container_end = socket.socketpair()
    container_end.close()
    process = subprocess.Popen([sys.executable, "-c", container_code])
    container = Container(process, Connection(runtime_end.detach()))
    message = {"MessageId": "message-1", "ReceiptHandle": "receipt-1", "Body": "{}"}
    try:
        with caplog.at_level(logging.WARNING, logger="shared.local.runtime"):
            outcome, failed_ids = runtime._invoke(container, lanes, [message], timeout=30)
    finally:
        process.kill()
        process.wait(timeout=30)
        container.connection.close()

    assert outcome == "crashed"
    assert failed_ids == {"message-1"}
    lines = [record.getMessage() for record in caplog.records if record.name == "shared.local.runtime"]
    assert len(lines) == 1, lines
    assert f"crashing container (pid {process.pid}) {expected}" in lines[0]
    assert "None" not in lines[0]
