"""Copies of finished models in the stack's models bucket, and fetch and export from it.

The handlers run in-process against moto's mock, which serves S3 as well as SQS and
DynamoDB, with EFS as a temporary folder.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import boto3
import numpy as np
import pytest

from shared import control
from shared.config import Settings
from shared.errors import BatonError
from shared.export import export_estimator, load_trained_model
from shared.handlers import set_services
from shared.model_bucket import BUNDLE_FILES, ModelBucketError, download_model, model_uri
from shared.monitor import download_finished_model, fetch_job
from shared.services import Services
from shared.state import FAILED, SUCCEEDED
from tests.baton_jobs import breast_cancer_spec, forget_job, run_job

BUCKET = "baton-test-models"
JOB_ID = "copied-model"


@pytest.fixture
def bucket_stack(inprocess_stack):
    """The in-process stack with MODELS_BUCKET set; the bucket itself is left to each test."""
    stack = inprocess_stack
    stack.settings = replace(stack.settings, models_bucket=BUCKET)
    stack.s3 = boto3.client("s3", region_name="us-east-1")
    stack.services = Services(stack.settings, dynamodb=stack.dynamodb, sqs=stack.sqs, s3=stack.s3)
    set_services(stack.services)
    return stack


def bundle_keys(s3, job_id: str) -> set[str]:
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"jobs/{job_id}/").get("Contents", [])
    return {entry["Key"] for entry in listed}


def test_finished_job_copies_model_to_bucket(bucket_stack, efs_root):
    bucket_stack.s3.create_bucket(Bucket=BUCKET)

    record = run_job(bucket_stack, breast_cancer_spec(JOB_ID))

    assert record.status == SUCCEEDED, record.error
    assert record.attributes["model_uri"] == f"s3://{BUCKET}/jobs/{JOB_ID}/"
    # Standardised data: every file of the bundle exists.
    assert bundle_keys(bucket_stack.s3, JOB_ID) == {f"jobs/{JOB_ID}/{name}" for name in (*BUNDLE_FILES, "bundle.json")}
    params = bucket_stack.s3.get_object(Bucket=BUCKET, Key=f"jobs/{JOB_ID}/model/params.npy")["Body"].read()
    assert params == (efs_root / "jobs" / JOB_ID / "model" / "params.npy").read_bytes()


def test_fetch_downloads_model_from_bucket(bucket_stack, efs_root, tmp_path):
    bucket_stack.s3.create_bucket(Bucket=BUCKET)
    run_job(bucket_stack, breast_cancer_spec(JOB_ID))

    result = fetch_job(bucket_stack.services.state, JOB_ID, tmp_path / "fetched", s3_client=bucket_stack.s3)

    model_dir = efs_root / "jobs" / JOB_ID / "model"
    for name in ("params.npy", "model.json", "standardize.npz"):
        assert (tmp_path / "fetched" / "model" / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert result.notes == []


def test_bucket_export_predicts_like_efs(bucket_stack, efs_root, tmp_path):
    bucket_stack.s3.create_bucket(Bucket=BUCKET)
    run_job(bucket_stack, breast_cancer_spec(JOB_ID))
    downloaded = tmp_path / "downloaded"

    download_finished_model(bucket_stack.services.state, bucket_stack.s3, JOB_ID, downloaded)
    from_bucket, _ = export_estimator(downloaded, JOB_ID, tmp_path / "bucket.joblib")
    from_efs, _ = export_estimator(efs_root, JOB_ID, tmp_path / "efs.joblib")

    rows = np.loadtxt(efs_root / "datasets" / "breast_cancer.csv", delimiter=",", skiprows=1)[:, :-1]
    np.testing.assert_array_equal(from_bucket.predict(rows), from_efs.predict(rows))
    np.testing.assert_array_equal(from_bucket.predict(rows), load_trained_model(efs_root, JOB_ID).predict(rows))


def test_missing_bucket_fails_then_resumes(bucket_stack):
    record = run_job(bucket_stack, breast_cancer_spec(JOB_ID))

    assert record.status == FAILED
    assert f"s3://{BUCKET}/jobs/{JOB_ID}/" in record.error
    assert "NoSuchBucket" in record.error
    assert f"`baton resume {JOB_ID}`" in record.error
    # A permanent error: the aggregate message was handled once, not retried.
    failed = [delivery for delivery in bucket_stack.deliveries if delivery.queue == "AggregateQueue" and delivery.failed]
    assert failed == []

    bucket_stack.s3.create_bucket(Bucket=BUCKET)
    control.resume_job(bucket_stack.services.state, bucket_stack.services.queues, JOB_ID)
    bucket_stack.run()

    record = bucket_stack.services.state.get_job(JOB_ID)
    assert record.status == SUCCEEDED, record.error
    assert record.attributes["model_uri"] == model_uri(BUCKET, JOB_ID)
    assert f"jobs/{JOB_ID}/model/params.npy" in bundle_keys(bucket_stack.s3, JOB_ID)


def test_download_names_deleted_object(bucket_stack, tmp_path):
    bucket_stack.s3.create_bucket(Bucket=BUCKET)
    run_job(bucket_stack, breast_cancer_spec(JOB_ID))
    bucket_stack.s3.delete_object(Bucket=BUCKET, Key=f"jobs/{JOB_ID}/model/params.npy")

    with pytest.raises(ModelBucketError, match="has no model/params.npy; the object was deleted"):
        download_model(bucket_stack.s3, model_uri(BUCKET, JOB_ID), JOB_ID, tmp_path)


def test_fetch_saves_metrics_when_download_fails(bucket_stack, tmp_path):
    bucket_stack.s3.create_bucket(Bucket=BUCKET)
    run_job(bucket_stack, breast_cancer_spec(JOB_ID))
    bucket_stack.s3.delete_object(Bucket=BUCKET, Key=f"jobs/{JOB_ID}/model/model.json")
    output = tmp_path / "fetched"

    with pytest.raises(ModelBucketError, match="has no model/model.json") as raised:
        fetch_job(bucket_stack.services.state, JOB_ID, output, s3_client=bucket_stack.s3)

    assert f"The summary, spec and metrics were saved in {output}" in str(raised.value)
    assert (output / "metrics.csv").is_file()
    assert (output / "job.json").is_file()
    assert not (output / "model").exists()


def test_rerun_with_other_spec_reads_its_own_bundle(bucket_stack, efs_root, tmp_path):
    # The first job of this id standardised its data. The second, sent after the first's
    # folder and items were deleted, does not, so the first one's statistics stay out.
    bucket_stack.s3.create_bucket(Bucket=BUCKET)
    run_job(bucket_stack, breast_cancer_spec(JOB_ID))
    forget_job(bucket_stack, JOB_ID)
    shutil.rmtree(efs_root / "jobs" / JOB_ID)
    plain = breast_cancer_spec(JOB_ID, data={"standardize": False})
    assert run_job(bucket_stack, plain).status == SUCCEEDED
    downloaded = tmp_path / "downloaded"

    download_finished_model(bucket_stack.services.state, bucket_stack.s3, JOB_ID, downloaded)

    assert not (downloaded / "jobs" / JOB_ID / "data" / "standardize.npz").exists()
    assert not (downloaded / "jobs" / JOB_ID / "model" / "standardize.npz").exists()
    rows = np.loadtxt(efs_root / "datasets" / "breast_cancer.csv", delimiter=",", skiprows=1)[:, :-1]
    from_bucket, _ = export_estimator(downloaded, JOB_ID, tmp_path / "bucket.joblib")
    np.testing.assert_array_equal(from_bucket.predict(rows), load_trained_model(efs_root, JOB_ID).predict(rows))


def test_fetch_names_bucket_copy_of_damaged_file(bucket_stack, tmp_path):
    bucket_stack.s3.create_bucket(Bucket=BUCKET)
    run_job(bucket_stack, breast_cancer_spec(JOB_ID))
    bucket_stack.s3.put_object(Bucket=BUCKET, Key=f"jobs/{JOB_ID}/model/params.npy", Body=b"garbage")

    with pytest.raises(ModelBucketError) as raised:
        fetch_job(bucket_stack.services.state, JOB_ID, tmp_path / "fetched", s3_client=bucket_stack.s3)

    message = str(raised.value)
    assert message.startswith(f"jobs/{JOB_ID}/model/params.npy of the copy in s3://{BUCKET}/jobs/{JOB_ID}/ ")
    assert "it was changed in the bucket after the job wrote it" in message
    assert "baton-model-" not in message


def test_download_rejects_uri_of_other_job(bucket_stack, tmp_path):
    with pytest.raises(ModelBucketError, match="which is not s3://<bucket>/jobs/copied-model/"):
        download_model(bucket_stack.s3, model_uri(BUCKET, "another-job"), JOB_ID, tmp_path)


def test_export_without_bucket_copy_explains(inprocess_stack, tmp_path):
    run_job(inprocess_stack, breast_cancer_spec(JOB_ID))
    s3 = boto3.client("s3", region_name="us-east-1")

    with pytest.raises(BatonError, match="copied its model to no S3 bucket") as raised:
        download_finished_model(inprocess_stack.services.state, s3, JOB_ID, tmp_path)
    assert "params.modelsBucket" in str(raised.value)


def test_fetch_without_bucket_copy_notes_why(inprocess_stack, tmp_path):
    run_job(inprocess_stack, breast_cancer_spec(JOB_ID))
    s3 = boto3.client("s3", region_name="us-east-1")

    result = fetch_job(inprocess_stack.services.state, JOB_ID, tmp_path / "fetched", s3_client=s3)

    assert not (tmp_path / "fetched" / "model").exists()
    assert any("params.modelsBucket in serverless.yml is empty" in note for note in result.notes)


@pytest.mark.parametrize("name", ["Baton_Models", "ab", "-leading-hyphen", "a" * 64])
def test_invalid_bucket_name_rejected(name):
    with pytest.raises(BatonError, match=f"invalid MODELS_BUCKET '{name}'"):
        Settings.from_env({"MODELS_BUCKET": name})
