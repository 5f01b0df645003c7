"""The bad input catalogue: each malformed job fails at once, says why, and touches nothing else.

Every case goes end to end through the starter's Lambda handler on moto's in-process mock:
the handler must report no batch item failure (so SQS does not retry), the job must be
FAILED with a message that names the offending value and the fix, the log line must carry
the job id, and a job already running must be left as it was.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
from pathlib import Path

import boto3
import numpy as np
import pytest
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError
from moto import mock_aws

from functions import starter
from shared.config import Settings
from shared.control import drain_dead_letters, pause_job
from shared.errors import BatonError
from shared.formats.npy import load_npy, read_npz
from shared.handlers import logger as handler_logger
from shared.handlers import get_services, set_services
from shared.local.stack import create_stack, load_stack_definition
from shared.services import Services
from shared.spec import derive_job_id
from tests.reliability_support import A9A_TRAIN, BREAST_CANCER_CSV, write_a9a_subset

# Rows of MNIST pixels divided by 255 in libsvm text. The first row is 4,494 bytes long.
MNIST_WIDE_LIBSVM = Path(__file__).parent / "data" / "mnist_wide.libsvm"

GOOD_CSV = {"path": "datasets/breast_cancer.csv", "format": "csv", "skip_rows": 1}


def spec(job_id: str, data: dict | None = None, **sections) -> dict:
    base = {
        "job_id": job_id,
        "model": {"name": "logistic_regression"},
        "optimizer": {"name": "sgd", "learning_rate": 1e-6},
        "data": data or dict(GOOD_CSV),
        "training": {"n_workers": 2, "batch_size": 32, "max_rounds": 2},
    }
    for name, value in sections.items():
        base[name] = value
    return base


def with_training(job_id: str, **training) -> dict:
    return spec(job_id, training={"n_workers": 2, "batch_size": 32, "max_rounds": 2, **training})


def csv_data(path: str, **extra) -> dict:
    return {"path": path, "format": "csv", **extra}


def libsvm_data(path: str, **extra) -> dict:
    return {"path": path, "format": "libsvm", **extra}


# Over the 64 KiB limit only by its padding, which is not a spec field either.
OVERSIZED_BODY = json.dumps({**spec("too-big"), "padding": "x" * 70_000})

# (case id, message body, job id the failure is recorded under, words the error must contain)
CASES = [
    ("body-not-json", "{not json", None, ["not valid JSON"]),
    ("body-json-array", json.dumps([1, 2]), None, ["expected a JSON object"]),
    ("missing-model", json.dumps({k: v for k, v in spec("no-model").items() if k != "model"}), "no-model", ["model", "missing"]),
    ("missing-data", json.dumps({k: v for k, v in spec("no-data").items() if k != "data"}), "no-data", ["data", "missing"]),
    ("missing-data-path", json.dumps(spec("no-path", data={"format": "csv"})), "no-path", ["data.path", "missing"]),
    ("unknown-top-field", json.dumps({**spec("top-typo"), "trainig": {}}), "top-typo", ["trainig", "unknown"]),
    ("unknown-training-field", json.dumps(with_training("train-typo", n_wrokers=2)), "train-typo", ["n_wrokers", "unknown"]),
    ("workers-wrong-type", json.dumps(with_training("workers-str", n_workers="four")), "workers-str", ["n_workers", "'four'"]),
    ("batch-not-integer", json.dumps(with_training("batch-float", batch_size=1.5)), "batch-float", ["batch_size", "1.5"]),
    ("rate-is-bool", json.dumps(spec("rate-bool", optimizer={"name": "sgd", "learning_rate": True})), "rate-bool",
     ["learning_rate", "got true"]),
    ("rate-zero", json.dumps(spec("rate-zero", optimizer={"name": "sgd", "learning_rate": 0})), "rate-zero",
     ["learning_rate", "greater than 0"]),
    ("workers-zero", json.dumps(with_training("workers-zero", n_workers=0)), "workers-zero", ["n_workers", "at least 1"]),
    ("seed-negative", json.dumps(with_training("seed-negative", seed=-1)), "seed-negative", ["seed", "-1"]),
    ("epochs-zero", json.dumps(with_training("epochs-zero", max_epochs=0)), "epochs-zero", ["max_epochs", "0"]),
    ("validation-fraction-high", json.dumps(spec("fraction-high", data={**GOOD_CSV, "validation_fraction": 0.9})),
     "fraction-high", ["validation_fraction", "0.9"]),
    ("unknown-model", json.dumps(spec("model-unknown", model={"name": "no_such_model"})), "model-unknown",
     ["model.name", "no_such_model"]),
    ("unknown-optimizer", json.dumps(spec("optimizer-unknown", optimizer={"name": "no_such_optimizer"})),
     "optimizer-unknown", ["optimizer.name", "no_such_optimizer"]),
    ("more-workers-than-rows", json.dumps(with_training("too-many-workers", n_workers=1000)), "too-many-workers",
     ["n_workers", "1000", "fewer workers"]),
    ("repeated-key", json.dumps(spec("repeated-key"))[:-1] + ', "job_id": "repeated-key"}', "repeated-key",
     ["'job_id'", "more than once", "keep one"]),
    # 20,000 nested lists fit in 40 KB, within the size limit, but are too deep for Python's decoder.
    ("nested-too-deep", '{"job_id": "deep", "x": ' + "[" * 20_000 + "]" * 20_000 + "}", None,
     ["nests arrays or objects too deeply"]),
    ("oversized-message", OVERSIZED_BODY, "too-big",
     [f"the message body is {len(OVERSIZED_BODY):,} bytes", "over Baton's limit of 65,536 bytes (64 KiB)",
      "compact JSON", "leave out fields that keep their default value"]),
    # An id of another form than the job id rules allow goes under the message's id, which
    # `baton status` accepts, and the error quotes the given one.
    ("job-id-dot-dot", json.dumps(spec("../escape")), None, ["job_id", "'../escape'"]),
    ("job-id-too-long", json.dumps(spec("j" * 65)), None, ["job_id", "64"]),
    ("job-id-with-space", json.dumps(spec("bad id!")), None, ["job_id", "got 'bad id!'", "letters, digits"]),
    # An empty id would put the failure under the bare key JOB#.
    ("job-id-empty", json.dumps(spec("")), None, ["job_id", "is empty", "leave job_id out"]),
    # DynamoDB keys hold at most 2048 bytes.
    ("job-id-beyond-key-limit", json.dumps(spec("j" * 3000)), None, ["job_id", "64"]),
    ("data-path-dot-dot", json.dumps(spec("path-escape", data=csv_data("../outside.csv"))), "path-escape",
     ["data.path", "'..'"]),
    ("data-path-absolute", json.dumps(spec("path-absolute", data=csv_data("/etc/passwd"))), "path-absolute",
     ["data.path", "relative"]),
    ("data-path-nul-byte", json.dumps(spec("path-nul", data=csv_data("datasets/a\x00b.csv"))), "path-nul",
     ["data.path", "NUL byte", "at character 11", "remove it"]),
    ("data-path-backslash", json.dumps(spec("path-backslash", data=csv_data("datasets\\a.csv"))), "path-backslash",
     ["data.path", "separate folders with '/'"]),
    # Linux and EFS allow at most 255 bytes in one file or folder name.
    ("data-path-name-too-long", json.dumps(spec("path-long", data=csv_data("datasets/" + "a" * 300 + ".csv"))),
     "path-long", ["data.path", "name of 304 bytes", "at most 255 bytes", "rename the file"]),
    ("validation-path-name-too-long",
     json.dumps(spec("val-long", data={**GOOD_CSV, "validation_path": "datasets/" + "b" * 256})),
     "val-long", ["data.validation_path", "name of 256 bytes", "at most 255 bytes"]),
    ("validation-path-dot-dot", json.dumps(spec("val-escape", data={**GOOD_CSV, "validation_path": "a/../../b"})),
     "val-escape", ["validation_path", "'..'"]),
    # Each link leads to a file or folder next to the EFS root, outside it.
    ("data-path-link-outside", json.dumps(spec("link-outside", data=libsvm_data("links/passwd"))), "link-outside",
     ["data.path 'links/passwd'", "outside the EFS root", "symbolic link", "copy the file under the EFS root"]),
    ("data-path-folder-link-outside", json.dumps(spec("folder-link", data=csv_data("linked-folder/data.csv"))),
     "folder-link", ["data.path 'linked-folder/data.csv'", "outside the EFS root", "copy the file"]),
    ("validation-path-link-outside", json.dumps(spec("val-link", data={**GOOD_CSV, "validation_path": "links/data.csv"})),
     "val-link", ["data.validation_path 'links/data.csv'", "outside the EFS root", "copy the file"]),
    # jobs/ contains every job's state, so no spec may read another job's files as data.
    ("data-path-in-jobs-folder", json.dumps(spec("reads-jobs", data=csv_data("jobs/other-job/data.csv", skip_rows=1))),
     "reads-jobs", ["'data.path': 'jobs/other-job/data.csv'", "state of every job", "outside jobs/"]),
    ("job-folder-link-outside", json.dumps(spec("linked-job")), "linked-job",
     ["job_id 'linked-job'", "jobs/linked-job", "outside the EFS root", "choose another job_id"]),
    ("job-folder-is-a-file", json.dumps(spec("file-job")), "file-job",
     ["job_id 'file-job'", "'jobs/file-job' on EFS is a file", "move the file away", "baton resume file-job"]),
    ("missing-file", json.dumps(spec("file-missing", data=csv_data("datasets/nope.csv"))), "file-missing",
     ["not found", "nope.csv", "data.path"]),
    ("data-path-folder", json.dumps(spec("path-folder", data=csv_data("datasets"))), "path-folder",
     ["data.path 'datasets' is a folder, not a file", "name one data file"]),
    ("data-path-fifo", json.dumps(spec("path-fifo", data=csv_data("datasets/pipe.csv"))), "path-fifo",
     ["data.path 'datasets/pipe.csv' is not a regular file", "named pipe", "copy the data into a regular file"]),
    ("dangling-link", json.dumps(spec("dangling-link", data=csv_data("datasets/dangling.csv"))), "dangling-link",
     ["not found", "'datasets/dangling.csv' is a symbolic link to a missing file", "data.path"]),
    ("link-loop", json.dumps(spec("link-loop", data=csv_data("datasets/loop-a.csv"))), "link-loop",
     ["not found", "'datasets/loop-a.csv' is a symbolic link", "loop of links"]),
    ("empty-csv", json.dumps(spec("csv-empty", data=csv_data("datasets/empty.csv"))), "csv-empty",
     ["'datasets/empty.csv' has no data rows because it is empty", "copied whole"]),
    ("header-only-csv", json.dumps(spec("csv-header-only", data=csv_data("datasets/header-only.csv", header=True))),
     "csv-header-only", ["'datasets/header-only.csv' has no data rows: it ends at line 1, after the header line "
                         "(line 1)", "copied whole"]),
    ("empty-file", json.dumps(spec("file-empty", data=libsvm_data("datasets/empty.libsvm"))), "file-empty",
     ["empty.libsvm", "no rows"]),
    ("corrupt-libsvm-line", json.dumps(spec("libsvm-corrupt", data=libsvm_data("datasets/corrupt.libsvm"))),
     "libsvm-corrupt", ["line 3", "corrupt.libsvm"]),
    ("libsvm-index-too-high", json.dumps(spec("libsvm-index", data=libsvm_data("datasets/a9a-300", n_features=10))),
     "libsvm-index", ["n_features", "10"]),
    ("target-for-classifier", json.dumps(spec("prices-softmax", model={"name": "softmax_regression"},
                                              data=csv_data("datasets/prices.csv"))), "prices-softmax",
     ["1,200 distinct labels", "... and 1,190 more]", "1,000 classes", "linear_regression"]),
    # The model has no output for a class it never saw, so the job fails instead of scoring those rows as wrong.
    ("validation-class-unseen", json.dumps(spec("unseen-class", model={"name": "softmax_regression"},
                                                data=csv_data("datasets/two-classes.csv",
                                                              validation_path="datasets/three-classes.csv"))),
     "unseen-class", ["label 2.0 in data row 3 of validation file 'datasets/three-classes.csv' is not one of the "
                      "training classes [0.0, 1.0]", "same labels"]),
    ("labels-misfit-model", json.dumps(spec("labels-three", data=csv_data("datasets/three-classes.csv"))),
     "labels-three", ["class"]),
    ("nan-feature", json.dumps(spec("feature-nan", data=csv_data("datasets/nan.csv"))), "feature-nan",
     ["NaN", "row 2"]),
    ("inf-feature-libsvm", json.dumps(spec("feature-inf", data=libsvm_data("datasets/inf.libsvm"))), "feature-inf",
     ["infinite", "row 2"]),
    ("nan-label", json.dumps(spec("label-nan", data=csv_data("datasets/nan-label.csv"))), "label-nan",
     ["'datasets/nan-label.csv'", "NaN or infinite label in data row 3", "fix or remove the rows",
      "data.label_column"]),
    ("inf-label-libsvm", json.dumps(spec("label-inf", data=libsvm_data("datasets/inf-label.libsvm"))), "label-inf",
     ["infinite label in data row 2", "fix or remove the rows"]),
    ("train-validation-mismatch", json.dumps(spec("columns-mismatch", data=csv_data(
        "datasets/four-columns.csv", validation_path="datasets/three-columns.csv"))), "columns-mismatch",
     ["feature columns", "three-columns.csv"]),
    ("csv-label-column-out-of-range", json.dumps(spec("label-column", data={**GOOD_CSV, "label_column": 40})),
     "label-column", ["data.label_column is 40 but 'datasets/breast_cancer.csv' has 31 columns",
                      "an index from 0 to 30, or from -31 to -1 to count from the last column"]),
    ("libsvm-validation-index-too-high", json.dumps(spec("libsvm-validation-index", data=libsvm_data(
        "datasets/a9a-300", n_features=117, validation_path="datasets/a9a.t"))), "libsvm-validation-index",
     ["'datasets/a9a.t' uses feature index 122", "data.n_features is 117"]),
    ("libsvm-index-beyond-int32", json.dumps(spec("libsvm-huge-index", data=libsvm_data("datasets/huge-index.libsvm"))),
     "libsvm-huge-index", ["line 2", "99999999999", "2,147,483,647"]),
    ("libsvm-index-zero", json.dumps(spec("libsvm-zero-index", data=libsvm_data("datasets/zero-index.libsvm"))),
     "libsvm-zero-index", ["line 1", "index 0", "start at 1"]),
    ("libsvm-not-utf8", json.dumps(spec("libsvm-binary", data=libsvm_data("datasets/binary.libsvm"))),
     "libsvm-binary", ["line 2 of 'datasets/binary.libsvm'", "not UTF-8", "byte 2 of the line is b'\\xff'"]),
    ("mlp-beyond-lambda-memory", json.dumps(spec("mlp-huge", model={"name": "mlp_classifier",
                                                                    "hidden_layer_sizes": [100000, 100000, 100000]})),
     "mlp-huge", ["model.hidden_layer_sizes", "parameters", "10,240 MB"]),
    # 36,204,002 parameters fit in Lambda's largest memory, not in the stack's 1,769 MB workers.
    ("mlp-beyond-worker-memory", json.dumps(spec("mlp-wide", model={"name": "mlp_classifier",
                                                                   "hidden_layer_sizes": [6000, 6000]})),
     "mlp-wide", ["model.hidden_layer_sizes", "36,204,002 parameters", "1,769 MB of the stack's worker function",
                  "params.workerMemory in serverless.yml to at least 3465 "]),
    # No bucket is listed in BATON_ALLOWED_S3_BUCKETS here, so every s3:// path is outside them.
    ("s3-uri-outside-buckets", json.dumps(spec("s3-outside", data=csv_data("s3://other-bucket/data.csv"))),
     "s3-outside", ["s3://other-bucket/data.csv", "not allowed", "BATON_ALLOWED_S3_BUCKETS"]),
    ("csv-ragged-row", json.dumps(spec("csv-ragged", data=csv_data("datasets/ragged.csv"))), "csv-ragged",
     ["line 3 of 'datasets/ragged.csv'", "5 columns", "the first row (line 1) has 4", "fix or remove that line"]),
    ("csv-row-without-label-column", json.dumps(spec("csv-short-row", data=csv_data(
        "datasets/short-row.csv", header=True, label_column="label"))), "csv-short-row",
     ["line 4 of 'datasets/short-row.csv'", "3 columns", "no column 4 for the label", "data.label_column"]),
    ("csv-label-name-twice", json.dumps(spec("csv-label-twice", data=csv_data(
        "datasets/label-twice.csv", header=True, label_column="diagnosis"))), "csv-label-twice",
     ["header of 'datasets/label-twice.csv'", "columns 1 and 31 (counting from 1)", "ambiguous",
      "Rename the other columns", "counting from 0 (0 or 30)"]),
    ("csv-validation-header-reordered", json.dumps(spec("csv-header-order", data=csv_data(
        "datasets/named-train.csv", header=True, label_column="diagnosis",
        validation_path="datasets/named-swapped.csv"))), "csv-header-order",
     ["validation file 'datasets/named-swapped.csv'", "training file 'datasets/named-train.csv'",
      "feature column 1, not counting the label column, is 'f1' (column 1) in the validation file but 'f0' "
      "(column 1) in the training file", "reorder the validation file's columns"]),
    ("csv-validation-header-shorter", json.dumps(spec("csv-header-short", data=csv_data(
        "datasets/named-train.csv", header=True, label_column="diagnosis",
        validation_path="datasets/named-short.csv"))), "csv-header-short",
     ["validation file 'datasets/named-short.csv'", "feature column 30", "is missing in the validation file but "
      "'f29' (column 30) in the training file"]),
    ("csv-gzip-ragged-row", json.dumps(spec("csv-gzip-ragged", data=csv_data(
        "datasets/ragged.csv.gz", skip_rows=1, header=True, label_column="x"))), "csv-gzip-ragged",
     ["line 5 of 'datasets/ragged.csv.gz'", "2 columns", "the header has 3"]),
    ("csv-value-not-a-number", json.dumps(spec("csv-text-value", data=csv_data("datasets/text-value.csv"))),
     "csv-text-value", ["line 2 of 'datasets/text-value.csv'", "column 2", "'abc'", "not a number"]),
    ("csv-error-in-later-part", json.dumps(spec("csv-late-error", data=csv_data(
        "datasets/large.csv", skip_rows=1, part_bytes=4096))), "csv-late-error",
     ["line 902 of 'datasets/large.csv'", "column 1", "is empty"]),
    # Blank lines before and after the header: the line numbers still count them.
    ("csv-error-after-blank-lines", json.dumps(spec("csv-blank-lines-error", data=csv_data(
        "datasets/large-blank-lines.csv", header=True, part_bytes=4096))), "csv-blank-lines-error",
     ["line 905 of 'datasets/large-blank-lines.csv'", "column 1", "is empty"]),
    ("libsvm-error-in-later-part", json.dumps(spec("libsvm-late-error", data=libsvm_data(
        "datasets/large.libsvm", part_bytes=4096))), "libsvm-late-error",
     ["malformed libsvm line 700 in 'datasets/large.libsvm'", "'x'", "not a number"]),
    ("nan-in-later-part", json.dumps(spec("late-nan", data=csv_data("datasets/late-nan.csv", part_bytes=4096))),
     "late-nan", ["'datasets/late-nan.csv'", "data row 800"]),
    ("npy-python-objects", json.dumps(spec("npy-objects", data={"path": "datasets/objects.npy", "format": "npy"})),
     "npy-objects", ["'datasets/objects.npy'", "Python objects", "numpy.save"]),
    ("npy-text-values", json.dumps(spec("npy-strings", data={"path": "datasets/strings.npy", "format": "npy"})),
     "npy-strings", ["'datasets/strings.npy'", "dtype <U", "not numbers"]),
    ("npy-structured", json.dumps(spec("npy-records", data={"path": "datasets/records.npy", "format": "npy"})),
     "npy-records", ["'datasets/records.npy'", "a structured dtype of 31 fields (f0 float64, f1 float64, f2 float64, "
                     "...)", "not plain numbers", "structured_to_unstructured"]),
    ("npy-not-an-array", json.dumps(spec("npy-text", data={"path": "datasets/text.npy", "format": "npy"})),
     "npy-text", ["'datasets/text.npy' is text, not a .npy matrix", "set data.format to csv", "numpy.save"]),
    ("npy-truncated", json.dumps(spec("npy-short", data={"path": "datasets/truncated.npy", "format": "npy"})),
     "npy-short", ["'datasets/truncated.npy'", "truncated", "copy or save it again"]),
    ("npy-one-column", json.dumps(spec("npy-vector", data={"path": "datasets/vector.npy", "format": "npy"})),
     "npy-vector", ["'datasets/vector.npy'", "array of shape (10,)", "2-D matrix", "format 'npz' with arrays X and y"]),
    ("npz-without-x-and-y", json.dumps(spec("npz-names", data={"path": "datasets/named.npz", "format": "npz"})),
     "npz-names", ["'datasets/named.npz'", "no array named X or y", "features, labels", "numpy.savez"]),
    ("npz-python-objects", json.dumps(spec("npz-objects", data={"path": "datasets/objects.npz", "format": "npz"})),
     "npz-objects", ["array X in 'datasets/objects.npz'", "Python objects"]),
    ("npz-text-labels", json.dumps(spec("npz-text-labels", data={"path": "datasets/text-labels.npz",
                                                                  "format": "npz"})),
     "npz-text-labels", ["array y in 'datasets/text-labels.npz'", "dtype <U9", "not numbers",
                         "numpy.savez(path, X=features.astype(numpy.float64), y=labels.astype(numpy.float64))"]),
    ("npz-not-a-zip", json.dumps(spec("npz-text", data={"path": "datasets/text.npz", "format": "npz"})),
     "npz-text", ["'datasets/text.npz' is text, not a .npz archive", "set data.format to csv", "numpy.savez"]),
    ("csv-trailing-delimiter", json.dumps(spec("csv-trailing-comma", data=csv_data(
        "datasets/trailing-comma.csv", skip_rows=1))), "csv-trailing-comma",
     ["line 2 of 'datasets/trailing-comma.csv' ends with the delimiter ',', so its last column (32) is empty",
      "remove the delimiter at the end of each line"]),
    ("csv-gz-not-compressed", json.dumps(spec("csv-plain-gz", data=csv_data("datasets/plain.csv.gz"))),
     "csv-plain-gz", ["'datasets/plain.csv.gz'", "could not be decompressed", "not .gz-compressed"]),
    ("csv-bz2-not-compressed", json.dumps(spec("csv-plain-bz2", data=csv_data("datasets/plain.csv.bz2"))),
     "csv-plain-bz2", ["'datasets/plain.csv.bz2'", "could not be decompressed", "not .bz2-compressed"]),
    ("csv-arabic-indic-digits", json.dumps(spec("csv-arabic-digits", data=csv_data("datasets/arabic-digits.csv"))),
     "csv-arabic-digits", ["line 4 of 'datasets/arabic-digits.csv'", "column 1", "'٢٠.٢٩'",
                           "not a number", "ASCII digits"]),
    ("csv-full-width-digits", json.dumps(spec("csv-wide-digits", data=csv_data(
        "datasets/full-width-digits.csv", skip_rows=1))), "csv-wide-digits",
     ["line 3 of 'datasets/full-width-digits.csv'", "column 2", "'７５'", "not a number"]),
    # A 100,000-character token: the message quotes its start and counts the rest.
    ("libsvm-long-token", json.dumps(spec("libsvm-long-token", data=libsvm_data("datasets/long-token.libsvm"))),
     "libsvm-long-token", ["malformed libsvm line 1 in 'datasets/long-token.libsvm': label 'xxxxxxxxxx",
                           "'... (100,000 characters) is not a number"]),
    ("csv-label-name-in-wide-header", json.dumps(spec("csv-wide-header", data=csv_data(
        "datasets/wide-header.csv", header=True, label_column="lable"))), "csv-wide-header",
     ["data.label_column is 'lable' but the header of 'datasets/wide-header.csv' names 3,001 columns "
      "['some_long_feature_name_0', 'some_long_feature_name_1', ", "... and 2,991 more]; use one of those names"]),
    ("npz-read-as-npy", json.dumps(spec("npz-as-npy", data={"path": "datasets/table.npz", "format": "npy"})),
     "npz-as-npy", ["'datasets/table.npz' is a zip archive, as numpy.savez writes a .npz file, not a .npy matrix "
                    "(data.format npy)", "set data.format to npz"]),
    ("npy-read-as-libsvm", json.dumps(spec("npy-as-libsvm", data={"path": "datasets/table.npy"})), "npy-as-libsvm",
     ["'datasets/table.npy' is a NumPy .npy file", "not libsvm text (data.format libsvm, the default)",
      "set data.format to npy"]),
    ("npy-read-as-csv", json.dumps(spec("npy-as-csv", data=csv_data("datasets/table.npy"))), "npy-as-csv",
     ["'datasets/table.npy' is a NumPy .npy file", "not delimited text (data.format csv)", "set data.format to npy"]),
    ("npy-read-as-npz", json.dumps(spec("npy-as-npz", data={"path": "datasets/table.npy", "format": "npz"})),
     "npy-as-npz", ["'datasets/table.npy' is a NumPy .npy file", "not a .npz archive (data.format npz)",
                    "set data.format to npy"]),
    ("gzip-npy-read-as-csv", json.dumps(spec("gzip-npy-as-csv", data=csv_data("datasets/table.npy.gz"))),
     "gzip-npy-as-csv", ["'datasets/table.npy.gz' is a NumPy .npy file", "set data.format to npy"]),
    ("libsvm-read-as-csv", json.dumps(spec("libsvm-as-csv", data=csv_data("datasets/a9a-300"))), "libsvm-as-csv",
     ["'datasets/a9a-300' looks like libsvm text", "not delimited text (data.format csv)",
      "set data.format to libsvm"]),
    ("libsvm-read-as-npy", json.dumps(spec("libsvm-as-npy", data={"path": "datasets/a9a-300", "format": "npy"})),
     "libsvm-as-npy", ["'datasets/a9a-300' looks like libsvm text", "not a .npy matrix (data.format npy)",
                       "set data.format to libsvm"]),
    # The '#' comment line before the rows leaves no row that reads as CSV.
    ("commented-libsvm-read-as-csv", json.dumps(spec("commented-libsvm-as-csv", data=csv_data(
        "datasets/a9a-commented"))), "commented-libsvm-as-csv",
     ["'datasets/a9a-commented' looks like libsvm text", "not delimited text (data.format csv)",
      "set data.format to libsvm"]),
    # Its first row is 4,494 bytes long, so a head of 4,096 bytes would cut it.
    ("wide-libsvm-read-as-npy", json.dumps(spec("wide-libsvm-as-npy", data={
        "path": "datasets/mnist_wide.libsvm", "format": "npy"})), "wide-libsvm-as-npy",
     ["'datasets/mnist_wide.libsvm' looks like libsvm text", "not a .npy matrix (data.format npy)",
      "set data.format to libsvm"]),
    ("libsvm-validation-read-as-csv", json.dumps(spec("libsvm-validation-as-csv", data=csv_data(
        "datasets/breast_cancer.csv", skip_rows=1, validation_path="datasets/a9a.t"))), "libsvm-validation-as-csv",
     ["'datasets/a9a.t' looks like libsvm text", "set data.format to libsvm"]),
    ("csv-validation-without-header", json.dumps(spec("csv-validation-no-header", data=csv_data(
        "datasets/named-train.csv", header=True, label_column="diagnosis",
        validation_path="datasets/named-no-header.csv"))), "csv-validation-no-header",
     ["data.label_column is 'diagnosis' but the header of validation file 'datasets/named-no-header.csv' names 31 "
      "columns", "these are numbers, so the validation file (data.validation_path) seems to have no header line",
      "add a header line like the training file's to the validation file"]),
    ("csv-validation-without-header-by-index", json.dumps(spec("csv-validation-no-header-index", data=csv_data(
        "datasets/named-train.csv", header=True, validation_path="datasets/named-no-header.csv"))),
     "csv-validation-no-header-index",
     ["the header of validation file 'datasets/named-no-header.csv' does not match the header of training file",
      "The validation file's header names [", "seems to have no header line"]),
    ("csv-training-without-header", json.dumps(spec("csv-no-header", data=csv_data(
        "datasets/named-no-header.csv", header=True, label_column="diagnosis"))), "csv-no-header",
     ["the header of 'datasets/named-no-header.csv' names 31 columns", "these are numbers, so the file seems to "
      "have no header line: set data.header false"]),
    ("npz-complex-features", json.dumps(spec("npz-complex", data={"path": "datasets/complex.npz", "format": "npz"})),
     "npz-complex", ["array X in 'datasets/complex.npz' contains complex numbers (dtype complex128)",
                     "numpy.real"]),
    ("npy-label-column-out-of-range", json.dumps(spec("npy-label-column", data={
        "path": "datasets/table.npy", "format": "npy", "label_column": -32})), "npy-label-column",
     ["data.label_column is -32 but 'datasets/table.npy' has 31 columns", "from 0 to 30"]),
    # Whole-number prices: too many labels for any classifier, so the error names the regression models.
    ("prices-for-binary-model", json.dumps(spec("prices-binary", data=csv_data("datasets/prices.csv"))),
     "prices-binary", ["needs exactly 2 distinct labels, found 1,200", "more than the 1,000 classes",
                       "use linear_regression or mlp_regressor"]),
    ("regression-targets-too-large", json.dumps(spec("targets-huge", model={"name": "linear_regression"}, data={
        "path": "datasets/huge-targets.npz", "format": "npz", "standardize_target": True})), "targets-huge",
     ["the regression targets are too large: the largest in magnitude is 2.811e+161, in data row 213 of "
      "'datasets/huge-targets.npz', above the 1e+150 that Baton trains on with data.standardize_target",
      "divide the targets by a power of ten, such as 1e161"]),
    ("regression-targets-too-large-unscaled", json.dumps(spec("targets-large", model={"name": "linear_regression"},
                                                              data={"path": "datasets/large-targets.npz",
                                                                    "format": "npz"})), "targets-large",
     ["the largest in magnitude is 2.811e+121, in data row 213 of 'datasets/large-targets.npz', above the 1e+100 "
      "that Baton trains on without data.standardize_target", "set data.standardize_target true"]),
]

# Phrases of numpy's and Python's own messages, and of the preparation's parts: an error
# that contains one was passed through instead of written for the user.
FOREIGN_PHRASES = ["usecols", "allow_pickle", "pickled", "float64 at row", "could not convert", "invalid literal",
                   "(bytes ", "of the part"]

# The maximum length of a case's error. Values and lists quoted from a data file are cut,
# so that no file makes an error too long to read or to store.
MAX_ERROR_CHARS = 1000

# The first line of the file outside the EFS root: no error may quote it.
OUTSIDE_LINE = "root:x:0:0:root:/root:/bin/bash"

# A different spec under the running job's id: rejected without touching the running job.
CONFLICT_CASE = ("duplicate-job-id", "running-job")


def write_data_files(efs_root):
    datasets = efs_root / "datasets"
    datasets.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BREAST_CANCER_CSV, datasets / "breast_cancer.csv")
    write_a9a_subset(efs_root, 300, "a9a-300")
    (datasets / "empty.libsvm").write_text("")
    (datasets / "corrupt.libsvm").write_text("1 1:0.5 2:1\n-1 3:1\n1 4:x\n")
    (datasets / "huge-index.libsvm").write_text("1 1:0.5\n-1 99999999999:1\n1 2:1\n")
    (datasets / "zero-index.libsvm").write_text("1 0:0.5 2:1\n-1 3:1\n")
    (datasets / "binary.libsvm").write_bytes(b"1 1:0.5\n\x00\xff\xfe\n")
    (datasets / "three-classes.csv").write_text("1,2,0\n2,3,1\n3,4,2\n4,5,0\n5,6,1\n6,7,2\n")
    (datasets / "two-classes.csv").write_text("1,2,0\n2,3,1\n3,4,0\n4,5,1\n5,6,0\n6,7,1\n")
    # A house-price-like target: 1,200 distinct values, each a "class" to a classifier.
    (datasets / "prices.csv").write_text("".join(f"{row % 7},{row % 5},{15000 + 25 * row}\n" for row in range(1200)))
    (datasets / "nan.csv").write_text("1,2,0\nnan,3,1\n3,4,0\n4,5,1\n")
    (datasets / "inf.libsvm").write_text("1 1:0.5\n-1 2:inf\n1 1:1\n-1 2:2\n")
    (datasets / "nan-label.csv").write_text("1,2,0\n2,3,1\n3,4,nan\n4,5,1\n")
    (datasets / "inf-label.libsvm").write_text("1 1:0.5\ninf 2:1\n1 1:1\n-1 2:2\n")
    (datasets / "four-columns.csv").write_text("1,2,3,0\n2,3,4,1\n3,4,5,0\n4,5,6,1\n5,6,7,0\n")
    (datasets / "three-columns.csv").write_text("1,2,0\n2,3,1\n")
    shutil.copyfile(A9A_TRAIN.with_name("a9a.t"), datasets / "a9a.t")
    write_malformed_files(datasets)
    write_named_csv_files(datasets)
    write_breast_cancer_variants(datasets)
    write_format_mixups(datasets)
    os.mkfifo(datasets / "pipe.csv")
    (datasets / "empty.csv").write_text("")
    (datasets / "header-only.csv").write_text("a,b,label\n")
    write_links_outside(efs_root)


def write_links_outside(efs_root):
    """Write files next to the EFS root, and symbolic links under the root that lead to them."""
    outside = efs_root.parent / "outside"
    outside.mkdir()
    (outside / "passwd").write_text(f"{OUTSIDE_LINE}\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n")
    shutil.copyfile(BREAST_CANCER_CSV, outside / "data.csv")
    links = efs_root / "links"
    links.mkdir()
    (links / "passwd").symlink_to(outside / "passwd")
    (links / "data.csv").symlink_to(outside / "data.csv")
    (efs_root / "linked-folder").symlink_to(outside)
    (efs_root / "jobs" / "other-job").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BREAST_CANCER_CSV, efs_root / "jobs" / "other-job" / "data.csv")
    (efs_root / "jobs" / "linked-job").symlink_to(outside, target_is_directory=True)
    (efs_root / "jobs" / "file-job").write_text("not a folder")
    # A link that stays under the root is allowed.
    (efs_root / "datasets" / "alias.csv").symlink_to(efs_root / "datasets" / "breast_cancer.csv")
    # Links under the root that lead nowhere: to a missing file, and round a loop.
    (efs_root / "datasets" / "dangling.csv").symlink_to(efs_root / "datasets" / "gone.csv")
    (efs_root / "datasets" / "loop-a.csv").symlink_to(efs_root / "datasets" / "loop-b.csv")
    (efs_root / "datasets" / "loop-b.csv").symlink_to(efs_root / "datasets" / "loop-a.csv")


def write_malformed_files(datasets):
    """Write the files whose errors used to carry numpy's wording or a part's byte range."""
    (datasets / "ragged.csv").write_text("1,2,3,0\n2,3,4,1\n3,4,5,6,0\n4,5,6,1\n")
    with gzip.open(datasets / "ragged.csv.gz", "wt") as handle:
        handle.write("exported by a tool\nx,y,label\n1,2,0\n2,3,1\n4,1\n")
    (datasets / "short-row.csv").write_text("a,b,c,label\n1,2,3,0\n2,3,4,1\n3,4,5\n4,5,6,1\n")
    (datasets / "text-value.csv").write_text("1,2,0\n2,abc,1\n3,4,0\n")
    # 1,000 rows of 8 to 14 bytes, in parts of 4,096 bytes: every bad line is past the first part.
    rows = [f"{index % 97},{index % 89},{index % 2}" for index in range(1000)]
    csv_lines = ["x,y,label", *rows]
    csv_lines[901] = ",5,1"  # line 902, after the header
    (datasets / "large.csv").write_text("\n".join(csv_lines) + "\n")
    (datasets / "large-blank-lines.csv").write_text("\n\r\n" + "\n".join(csv_lines).replace("\n", "\n  \n", 1) + "\n")
    libsvm_lines = [f"{index % 2} 1:{index % 97} 2:{index % 89}" for index in range(1000)]
    libsvm_lines[699] = "1 1:x 2:3"  # line 700
    (datasets / "large.libsvm").write_text("\n".join(libsvm_lines) + "\n")
    nan_rows = list(rows)
    nan_rows[799] = "nan,1,0"  # data row 800
    (datasets / "late-nan.csv").write_text("\n".join(nan_rows) + "\n")

    table = np.arange(40, dtype=np.float64).reshape(10, 4) % 2
    np.save(datasets / "objects.npy", table.astype(object), allow_pickle=True)
    np.save(datasets / "strings.npy", table.astype(str))
    np.save(datasets / "vector.npy", table[:, 0])
    (datasets / "text.npy").write_text("1,2,0\n2,3,1\n")
    np.save(datasets / "truncated.npy", table)
    whole = (datasets / "truncated.npy").read_bytes()
    (datasets / "truncated.npy").write_bytes(whole[:-40])
    np.savez(datasets / "named.npz", features=table[:, :3], labels=table[:, 3])
    np.savez(datasets / "objects.npz", X=table[:, :3].astype(object), y=table[:, 3], allow_pickle=True)
    (datasets / "text.npz").write_text("1,2,0\n")

    (datasets / "plain.csv.gz").write_text("1,2,0\n2,3,1\n3,4,0\n")
    (datasets / "plain.csv.bz2").write_text("1,2,0\n2,3,1\n3,4,0\n")
    (datasets / "arabic-digits.csv").write_text("1,2,0\n2,3,1\n3,4,0\n\u0662\u0660.\u0662\u0669,5,1\n",
                                                 encoding="utf-8")
    (datasets / "full-width-digits.csv").write_text("a,b,label\n1,2,0\n3,\uff17\uff15,1\n4,5,0\n",
                                                     encoding="utf-8")


def write_breast_cancer_variants(datasets):
    """Write breast_cancer's rows with a trailing comma, as records of a structured .npy, and with text labels."""
    lines = BREAST_CANCER_CSV.read_text().splitlines()
    (datasets / "trailing-comma.csv").write_text("".join(f"{line},\n" for line in lines))
    table = np.loadtxt(BREAST_CANCER_CSV, delimiter=",", skiprows=1)
    np.save(datasets / "records.npy", np.rec.fromarrays(table.T))
    names = np.where(table[:, -1] == 1, "benign", "malignant")
    np.savez(datasets / "text-labels.npz", X=table[:, :-1], y=names)


def write_format_mixups(datasets):
    """Write breast_cancer as .npy and .npz files, files of unusual values, and a header too long to quote."""
    table = np.loadtxt(BREAST_CANCER_CSV, delimiter=",", skiprows=1)
    np.save(datasets / "table.npy", table)
    with gzip.open(datasets / "table.npy.gz", "wb") as handle:
        handle.write((datasets / "table.npy").read_bytes())
    np.savez(datasets / "table.npz", X=table[:, :-1], y=table[:, -1])
    np.savez(datasets / "complex.npz", X=table[:, :-1] + 1j, y=table[:, -1])
    # The first column, a radius of at most 28.11 in row 213, as a regression target.
    np.savez(datasets / "huge-targets.npz", X=table[:, 1:-1], y=table[:, 0] * 1e160)
    np.savez(datasets / "large-targets.npz", X=table[:, 1:-1], y=table[:, 0] * 1e120)
    (datasets / "long-token.libsvm").write_text("x" * 100_000 + " 1:0.5\n1 1:1\n")
    # libsvm files that open with a '#' comment line, or with a row of 4,494 bytes.
    (datasets / "a9a-commented").write_text("# a9a (UCI Adult), 300 rows\n" + (datasets / "a9a-300").read_text())
    shutil.copyfile(MNIST_WIDE_LIBSVM, datasets / "mnist_wide.libsvm")
    header = ",".join(f"some_long_feature_name_{index}" for index in range(3000)) + ",label\n"
    rows = "".join(",".join(["0.5"] * 3000) + f",{label}\n" for label in (0, 1, 0))
    (datasets / "wide-header.csv").write_text(header + rows)


def test_npy_structured_error_is_short(tmp_path):
    write_breast_cancer_variants(tmp_path)

    with pytest.raises(BatonError) as raised:
        load_npy(tmp_path / "records.npy", "datasets/records.npy")
    assert "f3" not in str(raised.value), "the error lists every field of the dtype"


def test_npz_text_labels_advise_savez(tmp_path):
    write_breast_cancer_variants(tmp_path)

    with pytest.raises(BatonError) as raised:
        read_npz(tmp_path / "text-labels.npz", "datasets/text-labels.npz")
    assert "numpy.save(" not in str(raised.value), "the advice for a .npz names numpy.save"


def write_named_csv_files(datasets):
    """Write breast_cancer's rows as CSV files whose headers name the columns, with faults in the headers."""
    table = np.loadtxt(BREAST_CANCER_CSV, delimiter=",", skiprows=1)
    features, labels = table[:, :-1], table[:, -1]
    names = [f"f{index}" for index in range(features.shape[1])]

    def write(name: str, header: list[str], columns: np.ndarray) -> None:
        np.savetxt(datasets / name, columns, delimiter=",", header=",".join(header), comments="", fmt="%.6g")

    write("label-twice.csv", ["diagnosis", *names[:-1], "diagnosis"], np.column_stack([labels, features]))
    write("named-train.csv", [*names, "diagnosis"], table[:400])
    # The same columns, with the first two features swapped in the header and in the rows.
    swapped = [1, 0, *range(2, table.shape[1])]
    write("named-swapped.csv", [names[1], names[0], *names[2:], "diagnosis"], table[400:, swapped])
    write("named-short.csv", [*names[:-1], "diagnosis"], np.column_stack([features[400:, :-1], labels[400:]]))
    np.savetxt(datasets / "named-no-header.csv", table[400:], delimiter=",", fmt="%.6g")


@pytest.fixture
def stack(tmp_path):
    efs_root = tmp_path / "efs"
    write_data_files(efs_root)
    with mock_aws():
        definition = load_stack_definition(stage="test")
        sqs = boto3.client("sqs", region_name="us-east-1")
        dynamodb = boto3.client("dynamodb", region_name="us-east-1")
        create_stack(definition, sqs, dynamodb)
        services = Services(definition.settings(str(efs_root)), dynamodb=dynamodb, sqs=sqs)
        set_services(services)
        try:
            yield services
        finally:
            set_services(None)


def deliver(body: str, message_id: str) -> dict:
    """Run the starter on one message, then on the continuations it queues; return the first response."""
    response = invoke_starter(body, message_id)
    services = get_services()
    url = services.queues.url(services.settings.jobs_queue_name)
    while True:
        messages = services.queues.client.receive_message(QueueUrl=url, MaxNumberOfMessages=1).get("Messages", [])
        if not messages:
            return response
        services.queues.client.delete_message(QueueUrl=url, ReceiptHandle=messages[0]["ReceiptHandle"])
        assert invoke_starter(messages[0]["Body"], messages[0]["MessageId"])["batchItemFailures"] == []


def invoke_starter(body: str, message_id: str, receive_count: int = 1) -> dict:
    event = {"Records": [{
        "messageId": message_id, "receiptHandle": "handle", "body": body,
        "attributes": {"ApproximateReceiveCount": str(receive_count), "SentTimestamp": "0", "SenderId": "test",
                       "ApproximateFirstReceiveTimestamp": "0"},
        "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:baton-test-jobs", "awsRegion": "us-east-1",
    }]}
    return starter.handler(event, None)


def start_running_job(services: Services) -> None:
    response = deliver(json.dumps(spec("running-job")), "11111111-2222-3333-4444-555555555555")
    assert response["batchItemFailures"] == []
    assert services.state.get_job("running-job").status == "RUNNING"


@pytest.fixture
def handler_log():
    """The handlers' JSON log lines, as Lambda would send them to CloudWatch."""
    stream = io.StringIO()
    capture = logging.StreamHandler(stream)
    capture.setFormatter(handler_logger.registered_formatter)
    std_logger = logging.getLogger(handler_logger.name)
    std_logger.addHandler(capture)
    try:
        yield stream
    finally:
        std_logger.removeHandler(capture)


def log_lines(captured: str) -> list[dict]:
    lines = []
    for line in captured.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


@pytest.mark.parametrize("body,job_id,words", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_fails_job_once(stack, handler_log, body, job_id, words):
    start_running_job(stack)
    message_id = "abcdef01-2345-6789-abcd-ef0123456789"
    expected_job_id = job_id or derive_job_id(message_id)

    response = deliver(body, message_id)

    assert response["batchItemFailures"] == [], "a bad input must not be retried"
    record = stack.state.get_job(expected_job_id)
    assert record is not None, f"no job item for {expected_job_id!r}"
    assert record.status == "FAILED"
    for word in words:
        assert word in record.error
    for phrase in FOREIGN_PHRASES:
        assert phrase not in record.error
    assert len(record.error) <= MAX_ERROR_CHARS, "a quoted value or list in the error is not cut short"
    assert stack.settings.efs_root not in record.error, "name the file as the spec gives it"
    assert "root:x" not in record.error, "an error quoted a file outside the EFS root"
    failures = [line for line in log_lines(handler_log.getvalue()) if line.get("message") == "job failed"]
    assert failures and failures[-1].get("job_id") == expected_job_id
    running = stack.state.get_job("running-job")
    assert running.status == "RUNNING"
    assert running.error is None
    assert stack.state.get_job("") is None, "no job item under the bare key JOB#"


def test_conflicting_job_id_leaves_running_job(stack):
    start_running_job(stack)
    message_id = "fedcba98-7654-3210-fedc-ba9876543210"
    conflicting = with_training("running-job", n_workers=3)

    response = deliver(json.dumps(conflicting), message_id)

    assert response["batchItemFailures"] == []
    rejected = stack.state.get_job(derive_job_id(message_id))
    assert rejected.status == "FAILED"
    assert "running-job" in rejected.error
    assert "new job_id" in rejected.error
    assert "baton resume" not in rejected.error, "resume does not apply to a RUNNING job"
    running = stack.state.get_job("running-job")
    assert running.status == "RUNNING"
    assert running.n_workers == 2


def test_link_under_root_is_read(stack):
    response = deliver(json.dumps(spec("alias-job", data=csv_data("datasets/alias.csv", skip_rows=1))),
                       "01234567-89ab-cdef-0123-456789abcdef")

    assert response["batchItemFailures"] == []
    record = stack.state.get_job("alias-job")
    assert record.status == "RUNNING", record.error


def test_data_roots_limit_data_paths(stack):
    stack.store.data_roots = ("teams/vision", "datasets")
    allowed = deliver(json.dumps(spec("in-roots")), "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9")
    stack.store.data_roots = ("teams/vision",)
    rejected = deliver(json.dumps(spec("out-of-roots")), "f9e8d7c6-b5a4-9382-7160-5f4e3d2c1b0a")

    assert allowed["batchItemFailures"] == []
    assert stack.state.get_job("in-roots").status == "RUNNING"
    assert rejected["batchItemFailures"] == []
    record = stack.state.get_job("out-of-roots")
    assert record.status == "FAILED"
    assert "data.path 'datasets/breast_cancer.csv' is outside the folders this stack reads data from" in record.error
    assert "(teams/vision, set by ALLOWED_DATA_ROOTS)" in record.error
    assert "allowedDataRoots stage parameter" in record.error


@pytest.mark.parametrize("target, roots, words", [
    ("jobs/other-job", (), "names a file in jobs/"),
    ("teams/audio", ("datasets/linked", "teams/vision"), "is outside the folders this stack reads data from"),
], ids=["into-jobs", "out-of-roots"])
def test_linked_data_path_names_target(stack, target, roots, words):
    root = Path(stack.settings.efs_root)
    (root / target).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "datasets" / "breast_cancer.csv", root / target / "breast_cancer.csv")
    (root / "datasets" / "linked").symlink_to(root / target)
    stack.store.data_roots = roots
    linked = spec("linked-data", data=csv_data("datasets/linked/breast_cancer.csv", skip_rows=1))

    response = deliver(json.dumps(linked), "5a5a5a5a-6b6b-7c7c-8d8d-9e9e9e9e9e9e")

    assert response["batchItemFailures"] == []
    record = stack.state.get_job("linked-data")
    assert record.status == "FAILED"
    assert (f"data.path 'datasets/linked/breast_cancer.csv' (a symbolic link on the way leads to "
            f"'{target}/breast_cancer.csv') {words}") in record.error


def test_unreadable_data_file_fails_once(stack, monkeypatch):
    # The tests may run as root, who reads any file, so the permission check returns that
    # the file is unreadable, as it does for the functions' user when its mode is 000.
    unreadable = Path(stack.settings.efs_root) / "datasets" / "breast_cancer.csv"
    real_access = os.access
    monkeypatch.setattr("shared.formats.files.os.access",
                        lambda path, mode: False if Path(path) == unreadable else real_access(path, mode))

    response = deliver(json.dumps(spec("unreadable")), "3c3c3c3c-4d4d-5e5e-6f6f-707070707070")

    assert response["batchItemFailures"] == []
    record = stack.state.get_job("unreadable")
    assert record.status == "FAILED"
    assert "data.path 'datasets/breast_cancer.csv' cannot be read by the functions' user (uid" in record.error
    assert "permission denied; make the file readable by that user" in record.error
    assert stack.settings.efs_root not in record.error


def test_data_roots_setting_parsed():
    settings = Settings.from_env(environ={"ALLOWED_DATA_ROOTS": " datasets/ , teams/vision,, "})

    assert settings.data_roots() == ("datasets", "teams/vision")
    assert Settings.from_env(environ={}).data_roots() == ()


@pytest.mark.parametrize("value", ["/mnt/efs/datasets", "datasets,../secrets", "teams//vision", "./datasets", "jobs"])
def test_data_roots_setting_rejected(value):
    settings = Settings.from_env(environ={"ALLOWED_DATA_ROOTS": value})

    with pytest.raises(BatonError, match="in ALLOWED_DATA_ROOTS .*(relative to the EFS root|never read as data)"):
        settings.data_roots()


@pytest.mark.parametrize("value", [",", " , ,"])
def test_data_roots_without_folder_rejected(value):
    settings = Settings.from_env(environ={"ALLOWED_DATA_ROOTS": value})

    with pytest.raises(BatonError, match="invalid ALLOWED_DATA_ROOTS .*: it names no folder"):
        settings.data_roots()
    assert Settings.from_env(environ={"ALLOWED_DATA_ROOTS": "  "}).data_roots() == ()


def test_outside_file_left_untouched(stack):
    outside = Path(stack.settings.efs_root).parent / "outside"
    before = {path.name: path.read_bytes() for path in outside.iterdir()}

    deliver(json.dumps(spec("linked-job")), "76543210-fedc-ba98-7654-3210fedcba98")

    assert stack.state.get_job("linked-job").status == "FAILED"
    after = {path.name: path.read_bytes() for path in outside.iterdir()}
    assert after == before, "the starter wrote through the job folder's link"


@pytest.mark.parametrize("job_id", ["", "j" * 3000, "bad id!"], ids=["empty", "beyond-key-limit", "space"])
def test_dead_lettered_job_without_usable_id(stack, job_id):
    # The watchdog names the job as the starter does: after the message id, which SQS keeps.
    url = stack.queues.url(f"{stack.settings.jobs_queue_name}-dlq")
    message_id = stack.queues.client.send_message(QueueUrl=url, MessageBody=json.dumps(spec(job_id)))["MessageId"]

    assert drain_dead_letters(stack) == 1

    record = stack.state.get_job(derive_job_id(message_id))
    assert record is not None
    assert record.status == "FAILED"
    assert "dead-letter queue" in record.error
    assert stack.state.get_job("") is None
    assert stack.state.list_jobs() == [record]


def test_conflict_with_paused_job_names_resume(stack):
    start_running_job(stack)
    pause_job(stack.state, "running-job")
    message_id = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"

    response = deliver(json.dumps(with_training("running-job", n_workers=3)), message_id)

    assert response["batchItemFailures"] == []
    rejected = stack.state.get_job(derive_job_id(message_id))
    assert rejected.status == "FAILED"
    assert "new job_id" in rejected.error
    assert "`baton resume running-job` would continue that job with its own spec" in rejected.error
    assert "resend" not in rejected.error
    assert stack.state.get_job("running-job").status == "PAUSED"


def test_same_spec_resent_leaves_paused_job(stack):
    start_running_job(stack)
    pause_job(stack.state, "running-job")

    response = deliver(json.dumps(spec("running-job")), "99999999-8888-7777-6666-555555555555")

    assert response["batchItemFailures"] == []
    record = stack.state.get_job("running-job")
    assert record.status == "PAUSED"
    assert record.round == 0


def test_catalogue_has_at_least_25_cases():
    names = [case[0] for case in CASES]
    assert len(names) >= 25
    assert len(set(names)) == len(names), "two bad-input cases share a name"


@pytest.mark.parametrize("body", [
    json.dumps(spec("running-job", optimizer={"name": "sgd", "learning_rate": -1})),
    json.dumps(spec("running-job", data=csv_data("datasets/nope.csv"))),
], ids=["invalid-spec", "missing-file"])
def test_bad_spec_spares_existing_job(stack, body):
    # A job id names one job: a bad message that reuses it must not end the job running under it.
    start_running_job(stack)
    message_id = "13579bdf-2468-ace0-1357-9bdf2468ace0"

    response = deliver(body, message_id)

    assert response["batchItemFailures"] == []
    rejected = stack.state.get_job(derive_job_id(message_id))
    assert rejected is not None and rejected.status == "FAILED"
    assert "running-job" in rejected.error
    running = stack.state.get_job("running-job")
    assert running.status == "RUNNING"
    assert running.error is None


def test_fixed_spec_reuses_rejected_id(stack):
    rejected = spec("fixed-later", optimizer={"name": "sgd", "learning_rate": -1})
    deliver(json.dumps(rejected), "2468ace0-1357-9bdf-2468-ace013579bdf")
    assert stack.state.get_job("fixed-later").status == "FAILED"

    response = deliver(json.dumps(spec("fixed-later")), "0eca8642-fdb9-7531-0eca-8642fdb97531")

    assert response["batchItemFailures"] == []
    record = stack.state.get_job("fixed-later")
    assert record.status == "RUNNING"
    assert record.fingerprint
    assert record.error is None


@pytest.mark.parametrize("receive_count", [1, 5], ids=["retried", "last-receive"])
def test_retried_conflict_spares_running_job(stack, monkeypatch, tmp_path, receive_count):
    # A transient error before the conflict is found (here an injected one) must not
    # record its error on, or fail, the job whose id the message reuses.
    start_running_job(stack)
    rule = {"step": "starter.validated", "kind": "raise", "job_id": "running-job", "times": 10}
    monkeypatch.setenv("BATON_FAULTS_ENABLED", "true")
    monkeypatch.setenv("BATON_FAULTS", json.dumps([rule]))
    monkeypatch.setenv("BATON_FAULTS_DIR", str(tmp_path / "faults"))
    message_id = "5a5a5a5a-6b6b-7c7c-8d8d-9e9e9e9e9e9e"

    # A batch whose every record failed makes Powertools raise, so Lambda retries it whole.
    with pytest.raises(BatchProcessingError, match="injected fault at starter.validated"):
        invoke_starter(json.dumps(with_training("running-job", n_workers=3)), message_id, receive_count)

    running = stack.state.get_job("running-job")
    assert running.status == "RUNNING"
    assert running.error is None
    assert "last_error" not in running.attributes
    rejected = stack.state.get_job(derive_job_id(message_id))
    if receive_count == 5:
        assert rejected.status == "FAILED"
        assert "starter failed 5 times" in rejected.error
    else:
        assert rejected is None


def test_dead_lettered_conflict_spares_running_job(stack):
    start_running_job(stack)
    url = stack.queues.url(f"{stack.settings.jobs_queue_name}-dlq")
    body = json.dumps(with_training("running-job", n_workers=3))
    message_id = stack.queues.client.send_message(QueueUrl=url, MessageBody=body)["MessageId"]

    assert drain_dead_letters(stack) == 1

    assert stack.state.get_job("running-job").status == "RUNNING"
    assert stack.state.get_job(derive_job_id(message_id)).status == "FAILED"


def test_nested_dead_letter_drained(stack):
    # A body too deep to decode must not stop the drain, or every later watchdog run.
    url = stack.queues.url(f"{stack.settings.jobs_queue_name}-dlq")
    stack.queues.client.send_message(QueueUrl=url, MessageBody='{"job_id": "deep", "x": ' + "[" * 20_000 + "]" * 20_000 + "}")
    message_id = stack.queues.client.send_message(QueueUrl=url, MessageBody=json.dumps(spec("next-in-line")))["MessageId"]

    assert drain_dead_letters(stack) == 2

    assert stack.state.get_job("next-in-line").status == "FAILED"
    assert message_id in stack.state.get_job("next-in-line").error


def test_retried_preparation_step_fails_own_job(stack, monkeypatch, tmp_path):
    # A preparation step message names its own job, not a spec: its last failure fails that job.
    rule = {"step": "starter.prepared", "kind": "raise", "job_id": "stepped", "times": 1}
    monkeypatch.setenv("BATON_FAULTS_ENABLED", "true")
    monkeypatch.setenv("BATON_FAULTS", json.dumps([rule]))
    monkeypatch.setenv("BATON_FAULTS_DIR", str(tmp_path / "faults"))
    stepped = spec("stepped", data={**GOOD_CSV, "part_bytes": 16384})
    assert invoke_starter(json.dumps(stepped), "0a0a0a0a-1b1b-2c2c-3d3d-4e4e4e4e4e4e")["batchItemFailures"] == []
    url = stack.queues.url(stack.settings.jobs_queue_name)

    failed_message_id = None
    while failed_message_id is None:
        message = stack.queues.client.receive_message(QueueUrl=url, MaxNumberOfMessages=1)["Messages"][0]
        assert '"prepare"' in message["Body"]
        stack.queues.client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        try:
            invoke_starter(message["Body"], message["MessageId"], receive_count=5)
        except BatchProcessingError:
            failed_message_id = message["MessageId"]

    record = stack.state.get_job("stepped")
    assert record.status == "FAILED"
    assert f"starter failed 5 times on message {failed_message_id}" in record.error
    assert stack.state.get_job(derive_job_id(failed_message_id)) is None


def test_redelivered_job_message_records_silent_receive(stack):
    start_running_job(stack)
    message_id = "11111111-2222-3333-4444-555555555555"

    # The same job message again, on its second receive: the first ended with no error stored.
    response = invoke_starter(json.dumps(spec("running-job")), message_id, receive_count=2)

    assert response["batchItemFailures"] == []
    last_error = stack.state.get_job("running-job").attributes["last_error"]
    assert last_error["function"] == "starter"
    assert last_error["message_id"] == message_id
    assert last_error["receive_count"] == 1
    assert "a larger starterTimeout stage parameter" in last_error["error"]


def test_redelivered_conflict_spares_running_job(stack):
    start_running_job(stack)
    message_id = "2b2b2b2b-3c3c-4d4d-5e5e-6f6f6f6f6f6f"

    response = invoke_starter(json.dumps(with_training("running-job", n_workers=3)), message_id, receive_count=2)

    assert response["batchItemFailures"] == []
    assert "last_error" not in stack.state.get_job("running-job").attributes
    assert stack.state.get_job(derive_job_id(message_id)).status == "FAILED"


def test_overlong_path_is_permanent(tmp_path):
    from shared.formats.files import check_data_file

    # Each name is within the 255-byte limit, but the whole path is beyond Linux's 4,096.
    long_path = tmp_path.joinpath(*["d" * 250] * 20, "data.csv")

    with pytest.raises(BatonError, match="data.validation_path '.*' is too long for the file system.*at most 255"):
        check_data_file(long_path, "x/data.csv", "data.validation_path")


def test_long_s3_key_gets_short_copy_name(tmp_path):
    from shared.efs import EfsStore
    from shared.preparation import PreparationFiles

    files = PreparationFiles(EfsStore(tmp_path), "long-key")
    uri = "s3://bucket/data/" + "k" * 300 + ".csv.gz"

    copy = files.source_copy("validation", uri)

    assert len(copy.name.encode()) <= 255
    assert copy.name.endswith(".csv.gz")
    assert files.source_copy("train", "s3://bucket/a.csv").name == "train-a.csv"


def _csv_rows(n_rows: int) -> list[str]:
    return [f"{row}.5,{row % 3}.25,{row % 2}" for row in range(n_rows)]


@pytest.mark.parametrize("name, text, delimiter, words", [
    # The first row's count must include the empty last column that numpy.loadtxt reads.
    ("tabs.csv", "".join(line.replace(",", "\t") + "\t\n" for line in _csv_rows(6)), "\t",
     ["line 1 of 'tabs.csv' ends with the delimiter '\\t', so its last column (4) is empty"]),
    ("spaces.csv", "".join(line.replace(",", " ") + " \n" for line in _csv_rows(6)), " ",
     ["line 1 of 'spaces.csv' ends with the delimiter ' ', so its last column (4) is empty"]),
    # Old Mac line ends: CR alone ends a line in the check as in numpy.loadtxt.
    ("cr.csv", "\r".join(_csv_rows(8)[:5] + ["1.5,oops,1"] + _csv_rows(3)) + "\r", ",",
     ["line 6 of 'cr.csv', column 2 is 'oops', which is not a number"]),
    ("thousands.csv", "\n".join(_csv_rows(3) + ['"1,001.5",2,1'] + _csv_rows(2)) + "\n", ",",
     ["line 4 of 'thousands.csv', column 1 is '\"1,001.5\"', which is not a number",
      "(remove the thousands separator ',')"]),
])
def test_csv_error_names_real_problem(tmp_path, name, text, delimiter, words):
    from shared.formats.delimited import read_csv

    path = tmp_path / name
    path.write_bytes(text.encode())

    with pytest.raises(BatonError) as raised:
        read_csv(path, delimiter=delimiter, source=name)
    for word in words:
        assert word in str(raised.value)
    assert "columns but the first row" not in str(raised.value)


def test_csv_quoted_numbers_still_read(tmp_path):
    from shared.formats.delimited import read_csv

    path = tmp_path / "quoted.csv"
    path.write_text('"1.5","2",1\n"3","4.25",0\n')

    X, y = read_csv(path)

    assert X.tolist() == [[1.5, 2.0], [3.0, 4.25]]
    assert y.tolist() == [1.0, 0.0]
