"""A data file that changes during its preparation, or after it, fails the job instead of mixing rows.

GIVEN a job whose CSV source is cut into many parts (small ``data.part_bytes``), or a job
whose shards are already prepared on EFS.
WHEN the file is rewritten or replaced between two preparation steps, or before the same
spec runs again on a new state table (as a second `baton run` without --fresh does).
THEN the job is FAILED, without a retry, with a message that names the file and the fix.
An unchanged file is prepared once and reused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from shared import shards
from shared.cli import main
from shared.efs import EfsStore
from shared.errors import DataError
from shared.state import FAILED, SUCCEEDED
from tests.baton_jobs import breast_cancer_spec, final_params, forget_job, run_job
from tests.conftest import BREAST_CANCER_CSV

SOURCE = "datasets/large.csv"


def write_large_csv(path: Path, flip_labels: bool = False) -> None:
    """Write 1,000 rows of 8 to 14 bytes under a header; ``flip_labels`` keeps every byte count."""
    rows = [f"{index % 97},{index % 89},{(index + flip_labels) % 2}" for index in range(1000)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x,y,label\n" + "\n".join(rows) + "\n")


def large_spec(job_id: str) -> dict:
    return breast_cancer_spec(job_id, data={"path": SOURCE, "skip_rows": 1, "part_bytes": 4096},
                              training={"n_workers": 2, "max_rounds": 2})


def replace_keeping_size_and_time(path: Path) -> None:
    """Put a different file of the same size and modification time at ``path``, with os.replace."""
    status = path.stat()
    replacement = path.with_name(path.name + ".new")
    write_large_csv(replacement, flip_labels=True)
    assert replacement.stat().st_size == status.st_size
    os.utime(replacement, ns=(status.st_atime_ns, status.st_mtime_ns))
    os.replace(replacement, path)


def append_row(path: Path) -> None:
    with open(path, "a") as handle:
        handle.write("1,2,1\n")


@pytest.mark.parametrize("change, words", [
    (replace_keeping_size_and_time, ["another file replaced it"]),
    (append_row, ["its size changed from"]),
], ids=["replaced-same-size-and-time", "appended-in-place"])
def test_source_changed_between_steps_fails_job(inprocess_stack, efs_root, change, words):
    write_large_csv(efs_root / SOURCE)
    inprocess_stack.submit(large_spec("changed-midway"))
    # The layout step and the first two parse steps, each in its own invocation.
    for _ in range(3):
        assert not inprocess_stack.step("JobsQueue").failed

    change(efs_root / SOURCE)
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("changed-midway")
    assert record.status == FAILED
    assert f"data file '{SOURCE}' (data.path) changed while job 'changed-midway' was preparing" in record.error
    for word in words:
        assert word in record.error
    assert "new job_id" in record.error
    assert "baton run --fresh" in record.error
    assert not any(delivery.failed for delivery in inprocess_stack.deliveries), "a changed file is not retried"
    assert not (efs_root / "jobs" / "changed-midway" / "data" / "manifest.json").exists()


def test_validation_file_changed_between_steps_fails_job(inprocess_stack, efs_root):
    write_large_csv(efs_root / SOURCE)
    write_large_csv(efs_root / "datasets" / "held-out.csv")
    spec = large_spec("validation-changed")
    spec["data"]["validation_path"] = "datasets/held-out.csv"
    inprocess_stack.submit(spec)
    assert not inprocess_stack.step("JobsQueue").failed

    append_row(efs_root / "datasets" / "held-out.csv")
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("validation-changed")
    assert record.status == FAILED
    assert "'datasets/held-out.csv' (data.validation_path) changed while" in record.error


def test_unchanged_source_reuses_shards(inprocess_stack, efs_root):
    spec = breast_cancer_spec("rerun-same")
    assert run_job(inprocess_stack, spec).status == SUCCEEDED
    first = final_params(efs_root, "rerun-same")
    forget_job(inprocess_stack, "rerun-same")

    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    assert (final_params(efs_root, "rerun-same") == first).all()


def test_rerun_sets_earlier_run_aside(inprocess_stack, efs_root):
    spec = breast_cancer_spec("rerun-aside")
    assert run_job(inprocess_stack, spec).status == SUCCEEDED
    job_dir = efs_root / "jobs" / "rerun-aside"
    first_metrics = sorted(path.name for path in (job_dir / "metrics").iterdir())
    first = final_params(efs_root, "rerun-aside")
    forget_job(inprocess_stack, "rerun-aside")
    # Without the run record, as an earlier version of Baton left its files, the finished
    # run cannot be tied to the data, so the job is trained again.
    (job_dir / "run.json").unlink()
    inprocess_stack.submit(spec)

    # The starter's delivery alone: it prepares and starts round 0, and no round is aggregated yet.
    inprocess_stack.step("JobsQueue")

    earlier = job_dir / "earlier-runs" / "1"
    assert not (job_dir / "metrics").exists()
    assert not (job_dir / "model").exists()
    assert sorted(path.name for path in (job_dir / "rounds").iterdir()) == ["0"]
    assert sorted(path.name for path in (earlier / "metrics").iterdir()) == first_metrics
    assert (np.load(earlier / "model" / "params.npy") == first).all()
    inprocess_stack.run()
    assert inprocess_stack.services.state.get_job("rerun-aside").status == SUCCEEDED
    assert (final_params(efs_root, "rerun-aside") == first).all()


def test_earlier_runs_file_fails_rerun(inprocess_stack, efs_root):
    spec = breast_cancer_spec("rerun-blocked")
    assert run_job(inprocess_stack, spec).status == SUCCEEDED
    forget_job(inprocess_stack, "rerun-blocked")
    (efs_root / "jobs" / "rerun-blocked" / "run.json").unlink()
    (efs_root / "jobs" / "rerun-blocked" / "earlier-runs").write_text("not a folder")

    record = run_job(inprocess_stack, spec)

    assert record.status == FAILED
    assert "'jobs/rerun-blocked/earlier-runs' is a file or a link" in record.error
    assert "`baton resume rerun-blocked`" in record.error
    assert (efs_root / "jobs" / "rerun-blocked" / "model" / "params.npy").is_file()


def test_changed_source_not_reused(inprocess_stack, efs_root):
    spec = breast_cancer_spec("rerun-changed")
    assert run_job(inprocess_stack, spec).status == SUCCEEDED
    forget_job(inprocess_stack, "rerun-changed")
    path = efs_root / "datasets" / "breast_cancer.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))

    record = run_job(inprocess_stack, spec)

    assert record.status == FAILED
    assert ("data file 'datasets/breast_cancer.csv' (data.path) changed after job 'rerun-changed' prepared its "
            "shards") in record.error
    assert "its size changed from" in record.error
    assert "new job_id" in record.error
    assert "baton run --fresh" in record.error


def test_deleted_shard_prepared_again_on_rerun(inprocess_stack, efs_root):
    # The source is unchanged, so the rerun prepares the shards again and reuses the model.
    spec = breast_cancer_spec("rerun-deleted-shard")
    assert run_job(inprocess_stack, spec).status == SUCCEEDED
    first = final_params(efs_root, "rerun-deleted-shard")
    forget_job(inprocess_stack, "rerun-deleted-shard")
    shutil.rmtree(efs_root / "jobs" / "rerun-deleted-shard" / "data" / "shard-1")

    record = run_job(inprocess_stack, spec)

    assert record.status == SUCCEEDED, record.error
    assert record.first_round == record.round
    assert (efs_root / "jobs" / "rerun-deleted-shard" / "data" / "shard-1" / "y.npy").is_file()
    assert final_params(efs_root, "rerun-deleted-shard").tobytes() == first.tobytes()


def test_deleted_shard_with_changed_source_fails_rerun(inprocess_stack, efs_root):
    spec = breast_cancer_spec("rerun-both-changed")
    assert run_job(inprocess_stack, spec).status == SUCCEEDED
    forget_job(inprocess_stack, "rerun-both-changed")
    shutil.rmtree(efs_root / "jobs" / "rerun-both-changed" / "data" / "shard-1")
    append_row(efs_root / "datasets" / "breast_cancer.csv")

    record = run_job(inprocess_stack, spec)

    assert record.status == FAILED
    assert "changed after job 'rerun-both-changed' prepared its shards" in record.error
    assert not (efs_root / "jobs" / "rerun-both-changed" / "data" / "shard-1").exists()


def test_shard_deleted_mid_job_fails_once(inprocess_stack, efs_root):
    inprocess_stack.submit(breast_cancer_spec("deleted-shard"))
    inprocess_stack.step("JobsQueue")
    shutil.rmtree(efs_root / "jobs" / "deleted-shard" / "data" / "shard-1")

    inprocess_stack.run()

    assert_failed_once(inprocess_stack, "deleted-shard",
                       ["prepared shard file 'jobs/deleted-shard/data/shard-1/y.npy' is missing"], repair="shards")


def assert_failed_once(stack, job_id: str, words: list[str], repair: str | None = None) -> None:
    """Assert that the job failed with every one of ``words`` in its error, and no delivery was retried.

    The error names the fix: `baton resume` when the job has a ``repair`` pending, else a new job_id.
    """
    record = stack.services.state.get_job(job_id)
    assert record.status == FAILED
    for word in words:
        assert word in record.error
    assert record.repair == repair
    if repair is None:
        assert "new job_id" in record.error
    else:
        assert f"run `baton resume {job_id}`" in record.error
    assert not any(delivery.failed for delivery in stack.deliveries), "a permanent error is not retried"


def truncate(path: Path, keep_bytes: int) -> None:
    path.write_bytes(path.read_bytes()[:keep_bytes])


def drop_last_label(path: Path) -> None:
    labels = np.load(path)
    np.save(path, labels[:-1])


def set_label_seven(path: Path) -> None:
    labels = np.load(path)
    labels[0] = 7
    np.save(path, labels)


def transpose_matrix(path: Path) -> None:
    np.save(path, np.load(path).T.copy())


@pytest.mark.parametrize("file_name, damage, words", [
    ("y.npy", lambda path: truncate(path, 0), ["y.npy' is damaged (EOFError"]),
    ("X.npy", lambda path: truncate(path, 300), ["X.npy' is damaged (ValueError"]),
    ("y.npy", drop_last_label, ["y.npy' holds labels of shape", "where the manifest records"]),
    ("X.npy", transpose_matrix, ["X.npy' holds a matrix of shape", "features"]),
    ("y.npy", set_label_seven, ["y.npy' holds class codes from 0 to 7, but the job has 2 classes"]),
], ids=["empty-labels", "truncated-matrix", "short-labels", "transposed-matrix", "label-out-of-range"])
def test_damaged_shard_fails_once(inprocess_stack, efs_root, file_name, damage, words):
    inprocess_stack.submit(breast_cancer_spec("damaged-shard"))
    inprocess_stack.step("JobsQueue")
    damage(efs_root / "jobs" / "damaged-shard" / "data" / "shard-1" / file_name)

    inprocess_stack.run()

    assert_failed_once(inprocess_stack, "damaged-shard",
                       [f"prepared shard file 'jobs/damaged-shard/data/shard-1/{file_name}",
                        "changed after the job's preparation", *words], repair="shards")


@pytest.mark.parametrize("indices, indptr, words", [
    ([0, 1, 2, 3], [0, 3, 1, 4], "X-indptr.npy' holds row pointers that do not start at 0 and rise row by row"),
    ([0, 1, 2, 3], [1, 2, 3, 4], "X-indptr.npy' holds row pointers that do not start at 0"),
], ids=["pointers-fall", "pointers-offset"])
def test_sparse_shard_values_checked(tmp_path, indices, indptr, words):
    store = EfsStore(tmp_path)
    folder = tmp_path / "shard"
    folder.mkdir()
    np.save(folder / "y.npy", np.array([0, 1, 0]))
    np.save(folder / "X-data.npy", np.ones(4, dtype=np.float32))
    np.save(folder / "X-indices.npy", np.array(indices, dtype=np.int32))
    np.save(folder / "X-indptr.npy", np.array(indptr, dtype=np.int64))
    manifest = {"sparse": True, "n_features": 8, "classes": [-1.0, 1.0]}

    with pytest.raises(DataError, match="prepared shard file 'shard/" + words.replace("(", "\\(").replace(")", "\\)")):
        shards._read_matrix(store, folder, manifest, rows=3)


def test_damaged_sparse_shard_named(tmp_path):
    store = EfsStore(tmp_path)
    folder = tmp_path / "shard"
    folder.mkdir()
    np.save(folder / "y.npy", np.zeros(3))
    np.save(folder / "X-data.npy", np.ones(4, dtype=np.float32))
    np.save(folder / "X-indices.npy", np.arange(4, dtype=np.int32))
    # The row pointers end at 5 values, but the shard stores 4.
    np.save(folder / "X-indptr.npy", np.array([0, 1, 3, 5], dtype=np.int64))
    manifest = {"sparse": True, "n_features": 8}

    with pytest.raises(DataError, match=r"prepared shard file 'shard/X-indptr.npy' does not fit its shard: "
                                        r"row pointers of shape \(4,\), values of shape \(4,\)"):
        shards._read_matrix(store, folder, manifest, rows=3)


def test_cli_rerun_checks_changed_file(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copyfile(BREAST_CANCER_CSV, data_dir / "train.csv")
    spec = breast_cancer_spec("cli-rerun", data={"path": "datasets/mine/train.csv"},
                              training={"n_workers": 2, "max_rounds": 2})
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(spec))
    local_dir = tmp_path / "baton"
    arguments = ["run", str(spec_file), "--local-dir", str(local_dir), "--import", f"{data_dir}:datasets/mine",
                 "--timeout", "240"]
    params = local_dir / "efs" / "jobs" / "cli-rerun" / "model" / "params.npy"

    first = CliRunner().invoke(main, arguments)
    assert first.exit_code == 0, first.output
    first_params = params.read_bytes()

    again = CliRunner().invoke(main, arguments)
    assert again.exit_code == 0, again.output
    assert params.read_bytes() == first_params

    lines = (data_dir / "train.csv").read_text().splitlines(keepends=True)
    (data_dir / "train.csv").write_text("".join(lines[:-40]))
    changed = CliRunner().invoke(main, arguments)
    assert changed.exit_code == 1, changed.output
    assert "data file 'datasets/mine/train.csv' (data.path) changed after job 'cli-rerun'" in changed.output
    assert "baton run --fresh" in changed.output

    fresh = CliRunner().invoke(main, [*arguments, "--fresh"])
    assert fresh.exit_code == 0, fresh.output
    assert params.read_bytes() != first_params


def test_interrupted_preparation_continues_on_new_table(inprocess_stack, efs_root):
    # The first stack stops after three preparation steps; its queued step message is lost
    # with it. The same spec sent to a new state table carries the preparation on.
    write_large_csv(efs_root / SOURCE)
    inprocess_stack.submit(large_spec("interrupted"))
    for _ in range(3):
        assert not inprocess_stack.step("JobsQueue").failed
    inprocess_stack.sqs.purge_queue(QueueUrl=inprocess_stack.queue_urls["JobsQueue"])
    forget_job(inprocess_stack, "interrupted")

    record = run_job(inprocess_stack, large_spec("interrupted"))

    assert record.status == SUCCEEDED, record.error
    write_large_csv(efs_root / "datasets" / "clean.csv")
    clean = large_spec("clean")
    clean["data"]["path"] = "datasets/clean.csv"
    assert run_job(inprocess_stack, clean).status == SUCCEEDED
    assert final_params(efs_root, "interrupted").tobytes() == final_params(efs_root, "clean").tobytes()


def test_damaged_round_state_fails_once(inprocess_stack, efs_root):
    inprocess_stack.submit(breast_cancer_spec("damaged-state"))
    inprocess_stack.step("JobsQueue")
    state_path = efs_root / "jobs" / "damaged-state" / "rounds" / "0" / "state.npz"
    truncate(state_path, 100)

    inprocess_stack.run()

    assert_failed_once(inprocess_stack, "damaged-state",
                       ["round state file 'jobs/damaged-state/rounds/0/state.npz' is damaged (BadZipFile"],
                       repair="round_state")


@pytest.mark.parametrize("file_name, repair", [("data/manifest.json", "shards"), ("spec.json", None)])
def test_damaged_job_file_fails_once(inprocess_stack, efs_root, file_name, repair):
    inprocess_stack.submit(breast_cancer_spec("damaged-file"))
    inprocess_stack.step("JobsQueue")
    (efs_root / "jobs" / "damaged-file" / file_name).write_text("{")

    inprocess_stack.run()

    assert_failed_once(inprocess_stack, "damaged-file",
                       [f"'jobs/damaged-file/{file_name}' is damaged (JSONDecodeError"], repair=repair)


@pytest.mark.parametrize("content, words", [
    ("{}", 'has no "n_features" field'),
    ("[1, 2]", "contains a JSON list, not the object a data manifest is"),
], ids=["empty-object", "list"])
def test_invalid_manifest_fails_once(inprocess_stack, efs_root, content, words):
    inprocess_stack.submit(breast_cancer_spec("invalid-manifest"))
    inprocess_stack.step("JobsQueue")
    (efs_root / "jobs" / "invalid-manifest" / "data" / "manifest.json").write_text(content)

    inprocess_stack.run()

    assert_failed_once(inprocess_stack, "invalid-manifest",
                       [f"data manifest 'jobs/invalid-manifest/data/manifest.json' {words}"], repair="shards")


def write_sparse_shard(folder: Path, indices: list[int]) -> None:
    """Write a three-row sparse shard of four values with column ``indices``."""
    folder.mkdir()
    np.save(folder / "y.npy", np.array([0, 1, 0]))
    np.save(folder / "X-data.npy", np.ones(4, dtype=np.float32))
    np.save(folder / "X-indices.npy", np.array(indices, dtype=np.int32))
    np.save(folder / "X-indptr.npy", np.array([0, 1, 3, 4], dtype=np.int64))


@pytest.mark.parametrize("bad_index", [8, 2**31 - 1, -1], ids=["width", "largest", "negative"])
@pytest.mark.parametrize("selection", [np.array([1]), np.array([0, 2]), slice(1, 3)],
                         ids=["one-row", "gathered", "slice"])
def test_column_index_checked_on_read(tmp_path, bad_index, selection):
    store = EfsStore(tmp_path)
    write_sparse_shard(tmp_path / "shard", [0, 1, 2, 3])
    write_sparse_shard(tmp_path / "damaged", [0, 1, bad_index, bad_index])
    manifest = {"sparse": True, "n_features": 8, "classes": [-1.0, 1.0]}
    intact = shards._read_matrix(store, tmp_path / "shard", manifest, rows=3)
    damaged = shards._read_matrix(store, tmp_path / "damaged", manifest, rows=3)

    assert intact.rows(selection, dtype=np.float64).dtype == np.float64
    with pytest.raises(DataError, match=r"prepared shard file 'damaged/X-indices.npy' contains a column index "
                                        r"outside 0 to 7: .*changed after the job's preparation"):
        damaged.rows(selection)


@pytest.mark.parametrize("folder", ["shard-1", "validation"])
def test_damaged_column_index_fails_job(inprocess_stack, efs_root, folder):
    job_id = "damaged-columns"
    spec = {"job_id": job_id, "model": {"name": "logistic_regression"},
            "data": {"path": "datasets/a9a/a9a", "format": "libsvm", "n_features": 123},
            "training": {"n_workers": 2, "batch_size": 64, "max_rounds": 3, "seed": 3}}
    inprocess_stack.submit(spec)
    inprocess_stack.step("JobsQueue")
    indices_file = efs_root / "jobs" / job_id / "data" / folder / "X-indices.npy"
    status = indices_file.stat()
    indices = np.load(indices_file)
    indices[::7] = 5000
    np.save(indices_file, indices)
    # Rewritten in place at the same size, with its modification time put back, the file
    # keeps the identity that a manifest without inode change times (an earlier release's)
    # records. So the indices are checked as they are read.
    os.utime(indices_file, ns=(status.st_atime_ns, status.st_mtime_ns))
    manifest_path = efs_root / "jobs" / job_id / "data" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for identity in manifest["shard_files"].values():
        del identity["ctime_ns"]
    manifest_path.write_text(json.dumps(manifest))

    inprocess_stack.run()

    assert_failed_once(inprocess_stack, job_id,
                       [f"prepared shard file 'jobs/{job_id}/data/{folder}/X-indices.npy' contains a column index "
                        "outside 0 to 122"], repair="shards")


def test_validation_fraction_rounding_to_no_rows_fails(inprocess_stack):
    # 0.0005 of breast_cancer's 569 rows rounds to no validation row.
    spec = breast_cancer_spec("no-validation-rows", data={"validation_fraction": 0.0005},
                              training={"target_validation_loss": 0.1})

    record = run_job(inprocess_stack, spec)

    assert record.status == FAILED
    assert ("data.validation_fraction 0.0005 of 569 rows gives no validation rows, but "
            "training.target_validation_loss stops on them; raise data.validation_fraction to at least 0.0018") \
        in record.error
