"""Copies of finished models in an S3 bucket, for users outside the stack's VPC.

EFS is reachable only from inside the stack's VPC. A stack may therefore have a models
bucket (``params.modelsBucket`` in serverless.yml, ``MODELS_BUCKET`` in the functions'
environment). The aggregator that finishes a job then copies the files that ``baton
export`` reads to ``s3://<bucket>/jobs/<job_id>/``, under their names on EFS, before it
marks the job SUCCEEDED. The job item records that prefix as ``model_uri``, and ``baton
fetch`` and ``baton export`` download it into a folder laid out like EFS.

=========================  =========================================================
key under the prefix        content
=========================  =========================================================
``spec.json``               the job spec
``data/manifest.json``      the data manifest: features, classes, shard sizes
``data/standardize.npz``    the training statistics, when the data was standardised
``model/params.npy``        the final parameters
``model/model.json``        the model's description, rounds and final metrics
``model/standardize.npz``   the model's own copy of the statistics
``bundle.json``             the list of the files above that this bundle has, written last
=========================  =========================================================

A job id sent again with another spec, after its table and EFS folder were deleted,
writes its bundle over the earlier one's. The earlier bundle may have had a file the new
one lacks, such as the statistics of standardised data, so readers take only the files
that ``bundle.json`` lists.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from shared.efs import EfsStore
from shared.errors import PermanentError

logger = logging.getLogger(__name__)

# Files under jobs/<job_id>/ that the bundle holds, and which of them every bundle has.
BUNDLE_FILES = ("spec.json", "data/manifest.json", "data/standardize.npz", "model/params.npy", "model/model.json",
                "model/standardize.npz")
REQUIRED_FILES = ("spec.json", "data/manifest.json", "model/params.npy", "model/model.json")
BUNDLE_LISTING = "bundle.json"
MODEL_URI_PATTERN = re.compile(r"^s3://([^/]+)/(jobs/[^/]+/)$")
# S3 error codes that a retry cannot fix: the bucket, the credentials or the permission is
# wrong. S3 returns 404 for a request on a missing bucket that names no object.
ACCESS_ERROR_CODES = ("403", "AccessDenied", "404", "NoSuchBucket", "AllAccessDisabled", "InvalidAccessKeyId",
                      "SignatureDoesNotMatch")


class ModelBucketError(PermanentError):
    """The models bucket cannot be written or read: it is missing, or a role lacks a permission."""


def model_uri(bucket: str, job_id: str) -> str:
    """Return the S3 prefix of ``job_id``'s model bundle in ``bucket``."""
    return f"s3://{bucket}/jobs/{job_id}/"


def _error_code(error: BaseException | None) -> str:
    """Return the S3 error code of ``error``, or of the client error that boto3's transfer wrapped."""
    while error is not None:
        code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
        if code:
            return code
        error = error.__cause__ or error.__context__
    return ""


def upload_model(s3_client, bucket: str, store: EfsStore, job_id: str) -> str:
    """Copy ``job_id``'s model bundle from EFS to ``bucket``; return its ``s3://`` prefix.

    Each file is one upload of the whole file, so a retry after a crash writes the same
    objects again, and no reader sees a half-written one. The caller records the prefix
    on the job only after this returns.

    Parameters
    ----------
    s3_client : botocore S3 client
    bucket : str
    store : EfsStore
        The EFS root that contains the job's folder.
    job_id : str

    Returns
    -------
    str
        ``s3://<bucket>/jobs/<job_id>/``.

    Raises
    ------
    ModelBucketError
        If S3 denies the write or the bucket does not exist. Other S3 errors, such as
        throttling, are raised as they are, so that the message is retried.
    """
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError

    job_dir = store.job_dir(job_id)
    names = [name for name in BUNDLE_FILES if (job_dir / name).is_file()]
    listing = json.dumps({"files": names}).encode()
    uploaded = 0
    for name in [*names, BUNDLE_LISTING]:
        key = f"jobs/{job_id}/{name}"
        try:
            if name == BUNDLE_LISTING:
                s3_client.put_object(Bucket=bucket, Key=key, Body=listing)
            else:
                s3_client.upload_file(str(job_dir / name), bucket, key)
        except (ClientError, S3UploadFailedError) as error:
            code = _error_code(error)
            if code not in ACCESS_ERROR_CODES:
                raise
            raise ModelBucketError(
                f"could not copy the final model of job {job_id} to s3://{bucket}/{key} ({code}): check that "
                f"MODELS_BUCKET ('{bucket}') names the bucket the stack created from params.modelsBucket and that "
                f"the roles of the aggregator and the starter may write it. The model is on EFS under "
                f"jobs/{job_id}/model/; after the fix, `baton resume {job_id}` finishes the job again and copies "
                "it") from None
        uploaded += len(listing) if name == BUNDLE_LISTING else (job_dir / name).stat().st_size
    logger.info("model copied to S3", extra={"job_id": job_id, "model_uri": model_uri(bucket, job_id),
                                              "bytes": uploaded})
    return model_uri(bucket, job_id)


def _listed_files(body: bytes) -> list[str] | None:
    """Return the file names a ``bundle.json`` lists, or None if it is not one Baton wrote."""
    try:
        files = json.loads(body)["files"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, list) or not all(name in BUNDLE_FILES for name in files):
        return None
    return files


def download_model(s3_client, uri: str, job_id: str, efs_root: Path) -> Path:
    """Download the model bundle at ``uri`` into ``efs_root/jobs/<job_id>/``; return that folder.

    ``efs_root`` then reads like the stack's EFS for ``baton export`` and the checks of
    ``baton fetch``.

    Parameters
    ----------
    s3_client : botocore S3 client
    uri : str
        The job item's ``model_uri``.
    job_id : str
    efs_root : Path
        An empty folder to download into.

    Returns
    -------
    Path
        ``efs_root/jobs/<job_id>``.

    Raises
    ------
    ModelBucketError
        If ``uri`` is not a bundle prefix of ``job_id``, S3 denies the read, or a
        required file of the bundle is missing.
    """
    from botocore.exceptions import ClientError

    match = MODEL_URI_PATTERN.match(uri)
    if match is None or match.group(2) != f"jobs/{job_id}/":
        raise ModelBucketError(f"job {job_id} records model_uri {uri!r}, which is not s3://<bucket>/jobs/{job_id}/; "
                               "the job item was changed by something other than Baton")
    bucket, prefix = match.groups()
    job_dir = EfsStore(efs_root).job_dir(job_id)
    deleted = (f"the object was deleted after the job wrote it. The model is still on EFS under "
               f"jobs/{job_id}/model/ unless that was deleted too")
    try:
        try:
            body = s3_client.get_object(Bucket=bucket, Key=prefix + BUNDLE_LISTING)["Body"].read()
        except ClientError as error:
            if _error_code(error) in ("NoSuchKey", "404"):
                raise ModelBucketError(f"the model of job {job_id} in {uri} has no {BUNDLE_LISTING}; {deleted}") \
                    from None
            raise
        names = _listed_files(body)
        if names is None or not set(REQUIRED_FILES) <= set(names):
            raise ModelBucketError(f"{uri}{BUNDLE_LISTING} does not list the files of a model bundle, so it was "
                                   "changed after the job wrote it. The model is still on EFS under "
                                   f"jobs/{job_id}/model/ unless that was deleted too")
        for name in names:
            target = job_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                s3_client.download_file(bucket, prefix + name, str(target))
            except ClientError as error:
                if _error_code(error) in ("NoSuchKey", "404"):
                    raise ModelBucketError(f"the model of job {job_id} in {uri} has no {name}; {deleted}") from None
                raise
    except ClientError as error:
        code = _error_code(error)
        if code == "NoSuchBucket":
            raise ModelBucketError(f"could not read the model of job {job_id} from {uri}: the bucket '{bucket}' does "
                                   "not exist (any more). The model is still on EFS under "
                                   f"jobs/{job_id}/model/ unless that was deleted too") from None
        if code in ACCESS_ERROR_CODES:
            raise ModelBucketError(f"could not read the model of job {job_id} from {uri} ({code}): check that your "
                                   "credentials may call s3:GetObject on the bucket's objects, and the --region of "
                                   "the stack") from None
        raise ModelBucketError(f"could not read the model of job {job_id} from {uri}: S3 returned {code or error}; "
                               "try again in a moment") from None
    return job_dir

