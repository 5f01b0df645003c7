"""Preparing a job's data in bounded steps, so no invocation reads or holds a whole large source.

A source is cut into parts: byte ranges of an uncompressed text file, aligned to line
boundaries, or row ranges of a ``.npy`` matrix, each about ``data.part_bytes`` long. A
compressed file or a ``.npz`` archive cannot be entered in the middle and is one part.
The steps, in order, each write their output atomically under ``jobs/<id>/prepare/``:

==========  =====================================================================
layout      copy ``s3://`` sources onto EFS, read CSV headers, cut the parts
parse p     parse part p into arrays (float32 features, float64 labels)
split       read every part's labels (and row lengths, for sparse data); pick the
            classes, assign each row to a shard or the validation rows; compute the
            training targets' mean (and scale, for ``data.standardize_target``);
            create the shard files at their final size under temporary names
stats b     ``data.standardize`` only: add training rows ``b*65536 ...`` to the
            running mean and variance (one file per block, so a retry cannot count
            a block twice)
distribute  write part p's rows, standardised, into their places in the shard files
finalize    rename the shard files, write the scaling statistics and, last, the
            manifest, whose presence means the data is ready
==========  =====================================================================

When the parts of all sources contain at most ``data.part_bytes`` together, every step runs
in the invocation that received the job, so a small data set costs no extra invocations.
Otherwise each step runs in its own invocation: the starter sends itself a message
``{"job_id", "prepare": {"step", "index"}}`` for the next step before it records the
step as done in ``prepare/progress.json``. A message for a step before the recorded one
is a duplicate and is dropped; one for a later step arrived before the record and is
retried. Every step computes the same bytes whenever it runs, so the shards are
identical however the steps are spread over invocations.

The layout step records each source file's identity (:mod:`shared.source_files`). Every
later step, and a start that finds the manifest already written, checks it first, so a
file changed mid-preparation or since fails the job rather than mixing rows of two
versions.

Limitations
-----------
The split step holds every row's label, shard and position in memory (about 24 bytes a
row). A compressed text file, a ``.npz`` archive and an ``s3://`` download are read
whole by one invocation; store large sources uncompressed on EFS.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from shared import efs, source_files
from shared.efs import EfsStore, read_job_json
from shared.errors import DamagedShardError, DataError, InvalidMessageError
from shared.formats.delimited import CsvLayout, check_same_features, parse_csv_text, read_csv_layout
from shared.formats.files import (COMPRESSED_SUFFIXES, check_data_file, check_finite, check_text_format,
                                  decode_text, open_binary, read_error, read_text_bytes)
from shared.formats.libsvm import parse_libsvm_text
from shared.formats.npy import load_npy_table, read_npy_rows, read_npz
from shared.sampling import split_rows
from shared.shards import VALIDATION, check_shards_intact, record_shard_files, shard_folder
from shared.spec import S3_URI_PATTERN, VALIDATION_STOP_FIELDS, JobSpec
from shared.standardization import standardization_scale, standardize_rows
from shared.target_scaling import MAX_SCALED_TARGET_MAGNITUDE
from shared.training import MAX_WEIGHT_MAGNITUDE

logger = logging.getLogger(__name__)

STEP_ORDER = ("layout", "parse", "split", "stats", "distribute", "finalize")
# Rows per block of the standardisation statistics. Fixed, so that the sums do not
# depend on how the source was cut into parts.
STATS_BLOCK_ROWS = 65536
ALLOWED_S3_BUCKETS_VARIABLE = "BATON_ALLOWED_S3_BUCKETS"
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True, order=True)
class PreparationStep:
    """One step of a preparation: its position in :data:`STEP_ORDER` and its part or block index."""

    order: int
    index: int = 0

    @classmethod
    def named(cls, kind: str, index: int = 0) -> "PreparationStep":
        return cls(STEP_ORDER.index(kind), index)

    @property
    def kind(self) -> str:
        return STEP_ORDER[self.order]

    def to_message(self, job_id: str) -> dict:
        return {"job_id": job_id, "prepare": {"step": self.kind, "index": self.index}}

    @classmethod
    def from_message(cls, message: dict) -> "PreparationStep":
        step = message.get("prepare")
        if not isinstance(step, dict) or step.get("step") not in STEP_ORDER or not isinstance(step.get("index"), int):
            raise InvalidMessageError(f"malformed preparation message {message!r}; expected "
                                      "{'job_id': ..., 'prepare': {'step': <name>, 'index': <int>}}; dropped")
        return cls.named(step["step"], step["index"])

    def __str__(self) -> str:
        return f"{self.kind} {self.index}"


@dataclass
class PreparationOutcome:
    """What a call to :func:`run_preparation` achieved: the manifest, or the step to run next elsewhere."""

    manifest: dict | None = None
    next_step: PreparationStep | None = None


class PreparationFiles:
    """Paths of one job's preparation files under ``jobs/<id>/prepare/``."""

    def __init__(self, store: EfsStore, job_id: str):
        self.store = store
        self.job_id = job_id
        self.root = store.job_dir(job_id) / "prepare"

    @property
    def progress(self) -> Path:
        return self.root / "progress.json"

    @property
    def layout(self) -> Path:
        return self.root / "layout.json"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def split_arrays(self) -> Path:
        return self.root / "split.npz"

    @property
    def manifest(self) -> Path:
        return self.store.data_dir(self.job_id) / "manifest.json"

    def part(self, index: int) -> Path:
        return self.root / "parts" / str(index)

    def stats(self, block: int) -> Path:
        return self.root / "stats" / f"{block}.npz"

    def source_copy(self, role: str, uri: str) -> Path:
        """Return the path that the ``s3://`` object ``uri`` is copied to.

        An S3 key's last part may be longer than the 255 bytes a file name may have, so a
        long one is replaced by a hash of the URI, keeping the suffixes (such as
        ``.csv.gz``) that the readers go by.
        """
        name = f"{role}-{uri.rsplit('/', 1)[-1]}"
        if len(name.encode("utf-8", "surrogatepass")) > 255:
            suffixes = "".join(suffix for suffix in Path(name).suffixes[-2:] if len(suffix) <= 16)
            name = f"{role}-{hashlib.sha256(uri.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}{suffixes}"
        return self.root / "sources" / name


# Driver --------------------------------------------------------------------------------


def run_preparation(store: EfsStore, spec: JobSpec, model, step: PreparationStep | None,
                    one_step_per_invocation: bool = True, s3_client=None,
                    continue_saved: bool = False, rebuild_damaged_shards: bool = False) -> PreparationOutcome:
    """Run preparation steps from ``step`` (None: from the start, for a new job message).

    Parameters
    ----------
    store : EfsStore
    spec : JobSpec
    model : Model
        Checks and encodes the labels; its size is irrelevant.
    step : PreparationStep or None
        The step a continuation message names, or None for the job message itself.
    one_step_per_invocation : bool, default=True
        When the parts contain more than ``data.part_bytes`` together, stop after each step
        and return the next one, for the caller to send. False runs every step here.
    s3_client : botocore S3 client, optional
        Used to copy ``s3://`` sources; built on first use.
    continue_saved : bool, default=False
        With ``step`` None, carry on from the step recorded on EFS instead of dropping the
        job message. For a job whose state item is new, so that no step message of the
        recorded progress can still be queued.
    rebuild_damaged_shards : bool, default=False
        With ``step`` None, prepare the data again when the shards of an earlier
        preparation are missing or replaced, and its sources are unchanged. For a job
        whose state item is new, so that none of its workers has the shards open.

    Returns
    -------
    PreparationOutcome
        With ``manifest`` once the data is ready, else with ``next_step``.

    Raises
    ------
    DataError
        If the data is missing, malformed or does not fit the spec.
    StaleStepError
        If ``step`` is already done, or not yet due.
    """
    files = PreparationFiles(store, spec.job_id)
    if files.manifest.exists():
        try:
            return PreparationOutcome(manifest=_reusable_manifest(files, spec, s3_client))
        except DamagedShardError as error:
            if not (rebuild_damaged_shards and step is None):
                raise
            # The sources passed their check, so the steps write the same shards again, and
            # the rounds of the earlier run go on from them.
            logger.warning("prepared shards are damaged; preparing the data again",
                           extra={"job_id": spec.job_id, "error": str(error)})
            _remove_prepared_data(files, keep_source_copies=True)

    recorded = _read_progress(files)
    if step is None:
        if files.progress.exists() and not continue_saved:
            raise StaleStepError(f"the preparation of job {spec.job_id} continues in its own messages "
                                 f"(next step {recorded}); dropping a redelivered job message")
        step = recorded
    elif step < recorded:
        raise StaleStepError(f"preparation step {step} of job {spec.job_id} is done; dropping a duplicate")
    elif step > recorded:
        # The invocation that runs a step sends the next one before it records it, so only
        # that next step can arrive ahead of the record. Baton sends no step beyond it.
        if step != _step_after(files, spec, recorded):
            raise InvalidMessageError(f"preparation step {step} of job {spec.job_id} is beyond the next step after "
                                      f"{recorded}, the step due; dropped")
        raise RuntimeError(f"preparation step {step} of job {spec.job_id} arrived before step {recorded} was "
                           "recorded; retrying")

    while True:
        if files.manifest.exists():
            # A twin delivery of the job message finished the preparation meanwhile. Going
            # on would write its shard files again, under other inodes than the manifest records.
            return PreparationOutcome(manifest=_reusable_manifest(files, spec, s3_client))
        _run_step(files, spec, model, step, s3_client)
        following = _next_step(files, spec, step)
        if following is None:
            manifest = store.read_json(files.manifest)
            shutil.rmtree(files.root / "parts", ignore_errors=True)
            return PreparationOutcome(manifest=manifest)
        if one_step_per_invocation and _exceeds_one_part(store.read_json(files.layout)["parts"], spec.data.part_bytes):
            return PreparationOutcome(next_step=following)
        # No progress is recorded inside one invocation: a redelivery starts over, and
        # every step writes the same bytes again.
        step = following


def _reusable_manifest(files: PreparationFiles, spec: JobSpec, s3_client) -> dict:
    """Return the manifest of data prepared earlier, once its sources and shard files are checked.

    Raises
    ------
    DataError
        If a source changed since its shards were prepared (:func:`shared.source_files.check_reusable`),
        or a shard file is missing or replaced (:class:`~shared.errors.DamagedShardError`).
    """
    # NOTE: data prepared before sources were recorded has none in its layout, so its
    # shards are reused unchecked.
    source_files.check_reusable(_recorded_sources(files), spec.job_id, lambda uri: s3_object_etag(uri, s3_client))
    manifest = read_job_json(files.store, files.manifest)
    check_shards_intact(files.store, spec.job_id, manifest)
    return manifest


def prepare_data(store: EfsStore, spec: JobSpec, model, s3_client=None) -> dict:
    """Read the job's data, split it into shards and store them on EFS, all in this process.

    Runs every step of the preparation in order. The starter instead runs one step per
    invocation when the sources contain more than ``data.part_bytes`` together. A repeated
    call returns the existing manifest without reading the source again, once it has
    checked that no source changed since (:func:`shared.source_files.check_reusable`).

    Returns
    -------
    manifest : dict
        ``n_features``, ``classes``, ``class_counts``, ``sparse``, ``shard_rows`` (one
        count per worker), ``validation_rows`` and ``standardized``.
    """
    outcome = run_preparation(store, spec, model, step=None, one_step_per_invocation=False, s3_client=s3_client)
    return outcome.manifest


def recorded_sources(store: EfsStore, job_id: str) -> list[dict]:
    """Return the source records of the job's layout step, or an empty list without a layout."""
    return _recorded_sources(PreparationFiles(store, job_id))


def _recorded_sources(files: PreparationFiles) -> list[dict]:
    """Return the source records of the layout step, which stay after the preparation ends."""
    if not files.layout.exists():
        return []
    return files.store.read_json(files.layout).get("sources", [])


def data_identity(store: EfsStore, job_id: str) -> str:
    """Return a SHA-256 that changes when the job's prepared data could differ.

    It covers the data manifest and the identity of each source file that the layout step
    recorded: size, modification time, inode, and an ``s3://`` object's ETag. Each file is
    named by its path in the spec, not on EFS, so moving the EFS root keeps the identity.
    Counts alone, as in the manifest, miss a file edited to the same shape. The identities
    of the shard files (``shard_files``) are left out, because shards prepared again from
    the same source are the same data in new files.
    """
    files = PreparationFiles(store, job_id)
    sources = [{key: value for key, value in record.items() if key != "path"} for record in _recorded_sources(files)]
    manifest = store.read_json(files.manifest)
    manifest.pop("shard_files", None)
    # Encoded as EfsStore.write_json writes, so a manifest without shard_files (one written
    # before they were recorded) hashes to its file's bytes, as earlier releases hashed it.
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True, indent=1).encode())
    digest.update(json.dumps(sources, sort_keys=True).encode())
    return digest.hexdigest()


def _exceeds_one_part(parts: list[dict], part_bytes: int) -> bool:
    """Return whether ``parts`` contain more than ``part_bytes`` together.

    A whole part (a compressed file or a ``.npz`` archive) counts as ``part_bytes``,
    because its uncompressed size is unknown until it is read, and so does a part from a
    layout written before parts recorded their size.
    """
    return sum(part.get("bytes", part_bytes) for part in parts) > part_bytes


def begin_attempt(store: EfsStore, job_id: str, attempt: int, keep_source_copies: bool = False) -> None:
    """Start preparation attempt ``attempt`` of a resumed job: remove the earlier attempt's files once.

    The attempt is recorded in ``jobs/<id>/preparation-attempt.json`` after the removal, so
    a redelivered job message of the same attempt keeps the progress it finds. Attempt 0,
    a job never resumed, has nothing to remove. ``keep_source_copies`` keeps the copies of
    ``s3://`` sources (``prepare/sources/``), whose ETags the caller has checked, so that
    the layout step records the same identities as before.
    """
    marker = store.job_dir(job_id) / "preparation-attempt.json"
    recorded = store.read_json(marker)["attempt"] if marker.exists() else 0
    if attempt <= recorded:
        return
    # NOTE: two deliveries of one resume's message that both pass this check remove files
    # twice, and the second removal can break the preparation the first one started.
    _remove_prepared_data(PreparationFiles(store, job_id), keep_source_copies)
    store.write_json(marker, {"attempt": attempt})
    logger.info("preparation starts again", extra={"job_id": job_id, "attempt": attempt})


def _remove_prepared_data(files: PreparationFiles, keep_source_copies: bool) -> None:
    """Remove the job's ``prepare/`` and ``data/`` folders; with ``keep_source_copies``, not ``prepare/sources/``."""
    if keep_source_copies and files.root.is_dir():
        for entry in files.root.iterdir():
            if entry.name == "sources":
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    else:
        shutil.rmtree(files.root, ignore_errors=True)
    shutil.rmtree(files.store.data_dir(files.job_id), ignore_errors=True)


def record_sent(store: EfsStore, job_id: str, step: PreparationStep) -> None:
    """Record that the message for ``step`` was sent, so earlier steps' duplicates are dropped."""
    _record_progress(PreparationFiles(store, job_id), step)


class StaleStepError(Exception):
    """A preparation message names a step that is already done."""


def _read_progress(files: PreparationFiles) -> PreparationStep:
    if not files.progress.exists():
        return PreparationStep.named("layout")
    saved = files.store.read_json(files.progress)
    return PreparationStep(saved["order"], saved["index"])


def _record_progress(files: PreparationFiles, step: PreparationStep) -> None:
    files.store.write_json(files.progress, {"order": step.order, "index": step.index, "step": step.kind})


def _step_after(files: PreparationFiles, spec: JobSpec, step: PreparationStep) -> PreparationStep | None:
    """Return the step that follows ``step``, or None if it is the last or its files are not written yet."""
    if step.kind == "layout":
        return PreparationStep.named("parse", 0)
    try:
        return _next_step(files, spec, step)
    except FileNotFoundError:
        return None


def _next_step(files: PreparationFiles, spec: JobSpec, step: PreparationStep) -> PreparationStep | None:
    n_parts = len(files.store.read_json(files.layout)["parts"])
    kind = step.kind
    if kind == "layout":
        return PreparationStep.named("parse", 0)
    if kind == "parse":
        return PreparationStep.named("parse", step.index + 1) if step.index + 1 < n_parts \
            else PreparationStep.named("split")
    if kind in ("split", "stats"):
        n_blocks = files.store.read_json(files.split)["n_stats_blocks"]
        following = 0 if kind == "split" else step.index + 1
        return PreparationStep.named("stats", following) if following < n_blocks \
            else PreparationStep.named("distribute", 0)
    if kind == "distribute":
        return PreparationStep.named("distribute", step.index + 1) if step.index + 1 < n_parts \
            else PreparationStep.named("finalize")
    return None


def _run_step(files: PreparationFiles, spec: JobSpec, model, step: PreparationStep, s3_client) -> None:
    logger.info("preparation step", extra={"job_id": spec.job_id, "step": step.kind, "index": step.index})
    if step.kind != "layout":
        # One stat call per source: a file changed during the previous step fails the job
        # here, before this step combines its rows with the earlier ones.
        source_files.check_unchanged(_recorded_sources(files), spec.job_id)
    if step.kind == "layout":
        _layout(files, spec, s3_client)
    elif step.kind == "parse":
        _parse(files, spec, step.index)
    elif step.kind == "split":
        _split(files, spec, model)
    elif step.kind == "stats":
        _stats(files, step.index)
    elif step.kind == "distribute":
        _distribute(files, spec, step.index)
    else:
        _finalize(files, spec)


# Layout --------------------------------------------------------------------------------


def allowed_s3_buckets(environ=None) -> set[str]:
    """Return the buckets named in ``BATON_ALLOWED_S3_BUCKETS`` (comma-separated); empty allows none."""
    raw = (os.environ if environ is None else environ).get(ALLOWED_S3_BUCKETS_VARIABLE, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def copy_from_s3(uri: str, target: Path, s3_client=None, environ=None) -> Path:
    """Copy the object at ``uri`` to ``target`` through a temporary file and a rename.

    The copy is one GET request, so its bytes come from one version of the object even if
    the object is overwritten meanwhile. That version's ETag is written next to it
    (:func:`copied_etag`), and a copy that has one is reused.

    Raises
    ------
    DataError
        If the bucket is not allowed, or the object is missing or not readable.
    """
    bucket, key = S3_URI_PATTERN.match(uri).groups()
    allowed = allowed_s3_buckets(environ)
    if bucket not in allowed:
        raise DataError(f"data path {uri} is in bucket '{bucket}', which is not allowed; add it to "
                        f"{ALLOWED_S3_BUCKETS_VARIABLE} (allowed now: {sorted(allowed) or 'none'})")
    if target.exists() and copied_etag(target) is not None:
        return target
    s3_client = s3_client or _default_s3_client()

    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        with _s3_errors(uri):
            response = s3_client.get_object(Bucket=bucket, Key=key)
            with open(temporary, "wb") as handle:
                shutil.copyfileobj(response["Body"], handle, 1 << 20)
                handle.flush()
                if efs.FSYNC:
                    os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()
    # Written after the rename, so a crash in between leaves a copy without an ETag,
    # which the next attempt copies again.
    _etag_path(target).write_text(response["ETag"])
    logger.info("copied data from S3", extra={"uri": uri, "bytes": target.stat().st_size, "etag": response["ETag"]})
    return target


def copied_etag(target: Path) -> str | None:
    """Return the ETag of the object that :func:`copy_from_s3` copied to ``target``, or None."""
    path = _etag_path(target)
    return path.read_text() if path.exists() else None


def s3_object_etag(uri: str, s3_client=None) -> str | None:
    """Return the current ETag of the object at ``uri``, or None if it does not exist.

    A HeadObject request, which the functions' ``s3:GetObject`` permission allows.
    """
    from botocore.exceptions import ClientError

    bucket, key = S3_URI_PATTERN.match(uri).groups()
    try:
        with _s3_errors(uri, missing_ok=True):
            return (s3_client or _default_s3_client()).head_object(Bucket=bucket, Key=key)["ETag"]
    except ClientError:
        return None


def _etag_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.etag")


def _default_s3_client():
    import boto3

    return boto3.client("s3")


@contextlib.contextmanager
def _s3_errors(uri: str, missing_ok: bool = False):
    """Turn S3's missing-object and access errors into a DataError; with ``missing_ok``, re-raise a 404."""
    from botocore.exceptions import ClientError

    try:
        yield
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if missing_ok and code in ("404", "NoSuchKey"):
            raise
        if code in ("404", "NoSuchKey", "NoSuchBucket", "403", "AccessDenied"):
            raise DataError(f"cannot read {uri}: {code}; check the URI and that the functions' role may read "
                            "the object") from error
        raise


def _source_path(files: PreparationFiles, role: str, path: str, s3_client) -> Path:
    if path.startswith("s3://"):
        return copy_from_s3(path, files.source_copy(role, path), s3_client)
    return files.store.resolve_data_path(path, "data.path" if role == "train" else "data.validation_path")


def _layout(files: PreparationFiles, spec: JobSpec, s3_client) -> None:
    sources = [("train", spec.data.path)]
    if spec.data.validation_path is not None:
        sources.append(("validation", spec.data.validation_path))

    parts, records, local_paths = [], [], {}
    for role, path in sources:
        local = local_paths[role] = _source_path(files, role, path, s3_client)
        check_data_file(local, path, source_files.FIELDS[role])
        # Recorded before the file is read, so a change while the parts are cut is caught
        # by the next step's check.
        etag = copied_etag(local) if path.startswith("s3://") else None
        records.append(source_files.source_record(role, path, local, etag))
        parts.extend(_cut_parts(spec, role, local, source=path))
    if spec.data.format == "csv" and spec.data.header and "validation" in local_paths:
        headers = [_csv_header(spec, local_paths[role], path) for role, path in sources]
        check_same_features(*headers, spec.data.label_column, spec.data.path, spec.data.validation_path)
    files.store.write_json(files.layout, {"parts": parts, "sources": records})


def _cut_parts(spec: JobSpec, role: str, path: Path, source: str | None = None) -> list[dict]:
    """Return the parts of one source, in row order.

    ``source`` is the path as the spec gives it, for error messages; ``path`` when None.
    """
    data = spec.data
    source = source or str(path)
    base = {"role": role, "path": str(path), "source": source}
    compressed = path.suffix in COMPRESSED_SUFFIXES

    if data.format == "npz":
        return [{**base, "kind": "whole"}]
    if data.format == "npy":
        n_rows, n_columns = load_npy_table(path, source).shape
        rows_per_part = max(1, data.part_bytes // max(1, n_columns * 8))
        return [{**base, "kind": "rows", "start": start, "stop": min(start + rows_per_part, n_rows),
                 "bytes": (min(start + rows_per_part, n_rows) - start) * n_columns * 8}
                for start in range(0, max(n_rows, 1), rows_per_part)]

    check_text_format(path, source, data.format)
    csv_layout = _csv_layout(spec, path, source, validation=role == "validation") if data.format == "csv" else {}
    if compressed:
        return [{**base, **csv_layout, "kind": "whole"}]
    data_start = csv_layout.get("data_start", 0)
    size = path.stat().st_size
    n_parts = max(1, math.ceil((size - data_start) / data.part_bytes))
    bounds = [data_start + index * data.part_bytes for index in range(n_parts)] + [size]
    return [{**base, **csv_layout, "kind": "text", "start": bounds[index], "stop": bounds[index + 1],
             "bytes": bounds[index + 1] - bounds[index]}
            for index in range(n_parts)]


def _csv_layout(spec: JobSpec, path: Path, source: str, validation: bool = False) -> dict:
    """Return where the data rows of a CSV file start, its column count and its label column index.

    ``data_start`` is a byte offset, used for uncompressed files; ``skip_lines`` is the
    number of lines before the data, blank lines included, used for compressed ones and
    for line numbers. ``validation`` True names the file as the validation file in messages.
    """
    layout = _read_csv_layout(spec, path, source, validation)
    data_start = 0 if path.suffix in COMPRESSED_SUFFIXES else layout.data_start
    return {"data_start": data_start, "skip_lines": layout.skip_lines, "n_columns": layout.n_columns,
            "label_index": layout.label_index}


def _read_csv_layout(spec: JobSpec, path: Path, source: str, validation: bool = False) -> CsvLayout:
    data = spec.data
    try:
        with open_binary(path, source) as handle:
            return read_csv_layout(handle, source, data.skip_rows, data.header, data.delimiter, data.label_column,
                                   validation)
    except (OSError, EOFError) as error:
        raise read_error(path, source, error) from None


def _csv_header(spec: JobSpec, path: Path, source: str) -> list[str]:
    """Return the column names in the header line of a CSV file that :func:`_csv_layout` has checked."""
    return _read_csv_layout(spec, path, source).names


# Parse ---------------------------------------------------------------------------------


def _read_text_range(path: Path, start: int, stop: int, data_start: int) -> bytes:
    """Return the lines whose first byte lies in ``[start, stop)``."""
    with open(path, "rb") as handle:
        if start > data_start:
            # The line holding byte start - 1 belongs to the previous part.
            handle.seek(start - 1)
            handle.readline()
        else:
            handle.seek(start)
        first = handle.tell()
        handle.seek(max(stop - 1, first))
        if stop > first:
            handle.readline()
        last = handle.tell() if stop > first else first
        handle.seek(first)
        return handle.read(last - first)


class PartRows(NamedTuple):
    """The rows parsed from one part, and the number of text lines it spans (0 for binary formats)."""

    X: object
    y: np.ndarray
    n_lines: int


def _skip_lines(raw: bytes, count: int) -> bytes:
    """Return ``raw`` without its first ``count`` lines."""
    position = 0
    for _ in range(count):
        position = raw.find(b"\n", position) + 1
        if position == 0:
            return b""
    return raw[position:]


def read_part(spec: JobSpec, part: dict, first_line_number: int | None = None) -> PartRows:
    """Parse one part: CSR as wide as its highest index for libsvm, else dense.

    ``first_line_number`` is the line of the source file that the part starts on, for
    error messages. None means the line after the skipped ones, where the first part starts.
    """
    path = Path(part["path"])
    data = spec.data
    source = part.get("source", part["path"])

    if data.format == "npz":
        return PartRows(*read_npz(path, source), n_lines=0)
    if data.format == "npy":
        return PartRows(*read_npy_rows(path, data.label_column, part["start"], part["stop"], source), n_lines=0)

    skipped = part.get("skip_lines", 0)
    if first_line_number is None:
        first_line_number = skipped + 1
    if part["kind"] == "text":
        raw = _read_text_range(path, part["start"], part["stop"], part.get("data_start", 0))
    else:
        raw = _skip_lines(read_text_bytes(path, source), skipped)
    text = decode_text(raw, source, first_line_number)
    n_lines = raw.count(b"\n")

    if data.format == "libsvm":
        X, y = parse_libsvm_text(text, source, first_line_number)
        return PartRows(X, y, n_lines)
    reference = "the header" if data.header else f"the first row (line {skipped + 1})"
    X, y = parse_csv_text(text, data.delimiter, part["label_index"], part["n_columns"], source,
                          first_line_number, reference)
    return PartRows(X, y, n_lines)


def _parse(files: PreparationFiles, spec: JobSpec, index: int) -> None:
    parts = files.store.read_json(files.layout)["parts"]
    part = parts[index]
    # Where this part starts in its source file, from the previous part's record, so that
    # messages give positions in the file rather than in the part.
    first_line, first_row = part.get("skip_lines", 0) + 1, 0
    if index > 0 and parts[index - 1]["role"] == part["role"]:
        previous = files.store.read_json(files.part(index - 1) / "meta.json")
        # NOTE: a part parsed before these positions were recorded has none, and its
        # successor's messages then count from the part's start.
        first_line = previous.get("first_line", 1) + previous.get("n_lines", 0)
        first_row = previous.get("first_row", 0) + previous["n_rows"]
    X, y, n_lines = read_part(spec, part, first_line)
    check_finite(X, y, part.get("source", part["path"]), first_row)

    folder = files.part(index)
    store = files.store
    if sp.issparse(X):
        store.write_npy(folder / "X-data.npy", X.data.astype(np.float32))
        store.write_npy(folder / "X-indices.npy", X.indices.astype(np.int32))
        store.write_npy(folder / "X-indptr.npy", X.indptr.astype(np.int64))
    else:
        store.write_npy(folder / "X.npy", np.ascontiguousarray(X, dtype=np.float32))
    store.write_npy(folder / "y.npy", y)
    store.write_json(folder / "meta.json", {"n_rows": int(X.shape[0]), "width": int(X.shape[1]),
                                            "sparse": bool(sp.issparse(X)), "first_line": first_line,
                                            "n_lines": n_lines, "first_row": first_row})


def _load_part(files: PreparationFiles, index: int, n_features: int | None = None):
    folder = files.part(index)
    store = files.store
    meta = store.read_json(folder / "meta.json")
    y = store.read_npy(folder / "y.npy", mmap=False)
    if meta["sparse"]:
        X = sp.csr_matrix((store.read_npy(folder / "X-data.npy"), store.read_npy(folder / "X-indices.npy"),
                           store.read_npy(folder / "X-indptr.npy")),
                          shape=(meta["n_rows"], n_features or meta["width"]))
    else:
        X = store.read_npy(folder / "X.npy")
    return X, y


# Split ---------------------------------------------------------------------------------


def _split(files: PreparationFiles, spec: JobSpec, model) -> None:
    store = files.store
    parts = store.read_json(files.layout)["parts"]
    metas = [store.read_json(files.part(index) / "meta.json") for index in range(len(parts))]
    is_train = np.array([part["role"] == "train" for part in parts])
    rows_per_part = np.array([meta["n_rows"] for meta in metas], dtype=np.int64)
    n_train = int(rows_per_part[is_train].sum())
    n_total = int(rows_per_part.sum())
    if n_train == 0:
        raise DataError(f"data file '{spec.data.path}' has no rows; check that it is the right file and not empty")
    if spec.data.validation_path is not None and n_total == n_train:
        raise DataError(f"validation file '{spec.data.validation_path}' has no rows; check data.validation_path")

    sparse = metas[0]["sparse"]
    n_features = _check_widths(spec, parts, metas)
    y_raw = np.concatenate([store.read_npy(files.part(index) / "y.npy", mmap=False) for index in range(len(parts))])

    classes = None
    if model.task in ("binary", "multiclass"):
        classes = np.unique(y_raw[:n_train])
        model.check_classes(classes)
    if spec.data.validation_path is None:
        y = model.encode_targets(y_raw, classes)
    else:
        # Encoded apart, so that a label the training rows lack is named with its row in the validation file.
        y = np.concatenate([model.encode_targets(y_raw[:n_train], classes),
                            model.encode_targets(y_raw[n_train:], classes,
                                                 f"validation file '{spec.data.validation_path}'")])
    if model.task == "regression":
        _check_target_magnitude(spec, y, n_train)

    n_workers = spec.training.n_workers
    validation_rows = 0 if spec.data.validation_path is not None \
        else int(round(spec.data.validation_fraction * n_train))
    stop_fields = [name for name in VALIDATION_STOP_FIELDS if getattr(spec.training, name) is not None]
    if spec.data.validation_path is None and validation_rows == 0 and stop_fields:
        # The spec check catches a fraction of 0, and a small one can round to no rows.
        raise DataError(f"data.validation_fraction {spec.data.validation_fraction:g} of {n_train:,} rows gives "
                        f"no validation rows, but training.{stop_fields[0]} stops on them; raise "
                        f"data.validation_fraction to at least {1 / n_train:.2g}, give data.validation_path, or "
                        f"remove training.{stop_fields[0]}")
    if n_train - validation_rows < n_workers:
        raise DataError(f"training.n_workers is {n_workers} but only {n_train - validation_rows} training rows "
                        "remain; use fewer workers or more data")
    stratify = spec.data.stratify if spec.data.stratify is not None else classes is not None
    shards, validation = split_rows(n_train, n_workers, validation_rows, spec.training.seed,
                                    labels=y[:n_train] if stratify else None)

    # Destination n_workers is the validation set; rows of a validation file all go there.
    destination = np.full(n_total, n_workers, dtype=np.int32)
    for worker, rows in enumerate(shards):
        destination[rows] = worker
    position = np.zeros(n_total, dtype=np.int64)
    offset = np.zeros(n_total, dtype=np.int64)
    row_nnz = np.concatenate([np.diff(store.read_npy(files.part(index) / "X-indptr.npy", mmap=False))
                              for index in range(len(parts))]) if sparse else None
    destination_rows, destination_nnz = [], []
    for target in range(n_workers + 1):
        members = np.flatnonzero(destination == target)
        position[members] = np.arange(len(members))
        destination_rows.append(int(len(members)))
        if sparse:
            lengths = row_nnz[members]
            offset[members] = np.cumsum(lengths) - lengths
            destination_nnz.append(int(lengths.sum()))
    store.write_arrays(files.split_arrays, {"destination": destination, "position": position, "offset": offset,
                                            "y": y})

    for target in range(n_workers + 1):
        if destination_rows[target]:
            _create_partial_files(files, target, n_workers, destination_rows[target],
                                  destination_nnz[target] if sparse else None, n_features, y.dtype)

    training_y = y[:n_train][destination[:n_train] < n_workers]
    class_counts = None if classes is None else np.bincount(training_y, minlength=len(classes)).tolist()
    # A regression model's output bias starts at the training targets' mean. With
    # data.standardize_target the model trains on the targets minus it, divided by their scale.
    target_mean = None if classes is not None or len(training_y) == 0 else float(np.mean(training_y))
    target_scale = _target_scale(training_y) if spec.data.standardize_target else None
    n_blocks = math.ceil(n_train / STATS_BLOCK_ROWS) if spec.data.standardize else 0
    store.write_json(files.split, {
        "n_features": n_features,
        "sparse": sparse,
        "classes": None if classes is None else classes.tolist(),
        "class_counts": class_counts,
        "target_mean": target_mean,
        "target_scale": target_scale,
        "destination_rows": destination_rows,
        "part_row_starts": np.concatenate(([0], np.cumsum(rows_per_part))).tolist(),
        "n_train_rows": n_train,
        "n_stats_blocks": n_blocks,
    })


def _check_target_magnitude(spec: JobSpec, y: np.ndarray, n_train: int) -> None:
    """Raise :class:`DataError` if a regression target is too large to train on or to report in its own units.

    Without ``data.standardize_target``, the output bias starts at the targets' mean and
    the weights grow to the targets' scale, and weights above :data:`MAX_WEIGHT_MAGNITUDE`
    count as divergence. With it, the model trains on standardised targets, but the losses
    are reported in the targets' squared units (:data:`MAX_SCALED_TARGET_MAGNITUDE`). Either
    way such a job would fail in round 1 as diverged, and a smaller learning rate would not help.
    ``y`` contains the training file's ``n_train`` rows, then the validation file's.
    """
    if len(y) == 0:
        return
    magnitudes = np.abs(y)
    row = int(np.argmax(magnitudes))
    largest = float(magnitudes[row])
    scaled = spec.data.standardize_target
    limit = MAX_SCALED_TARGET_MAGNITUDE if scaled else MAX_WEIGHT_MAGNITUDE
    if largest <= limit:
        return
    if row < n_train:
        where = f"data row {row + 1} of '{spec.data.path}'"
    else:
        where = f"data row {row - n_train + 1} of validation file '{spec.data.validation_path}'"
    divisor = f"1e{math.floor(math.log10(largest))}"
    if scaled:
        fix = (f"the losses and metrics are reported in the targets' squared units, which overflow float64 for "
               f"such targets, so divide the targets by a power of ten, such as {divisor}, before training")
    else:
        fix = (f"set data.standardize_target true, which trains on targets up to {MAX_SCALED_TARGET_MAGNITUDE:g} "
               f"in magnitude, or divide the targets by a power of ten, such as {divisor}")
    raise DataError(f"the regression targets are too large: the largest in magnitude is {largest:.4g}, in {where}, "
                    f"above the {limit:g} that Baton trains on "
                    f"{'with' if scaled else 'without'} data.standardize_target; {fix}")


def _target_scale(training_y: np.ndarray) -> float:
    """Return the standard deviation of the training targets, or 1.0 for a constant target.

    The constant rule is that of the features (:func:`shared.standardization.standardization_scale`),
    so a constant target is centred but not divided by a rounding error.
    """
    mean = np.mean(training_y)
    variance = np.mean((training_y - mean) ** 2)
    return float(standardization_scale(np.array([variance]), np.array([mean]), float(len(training_y)))[0])


def _check_widths(spec: JobSpec, parts: list[dict], metas: list[dict]) -> int:
    """Return the feature count and check every part fits it."""
    widths = [meta["width"] for meta, part in zip(metas, parts) if meta["n_rows"] > 0 or not meta["sparse"]]
    if metas[0]["sparse"]:
        highest = max(widths, default=0)
        n_features = spec.data.n_features or highest
        if highest > n_features:
            widest = next(part for meta, part in zip(metas, parts) if meta["width"] == highest)
            raise DataError(f"'{widest.get('source', widest['path'])}' uses feature index {highest} but "
                            f"data.n_features is {n_features}; raise data.n_features to at least {highest}")
        return max(n_features, 1)

    train_width = next(meta["width"] for meta, part in zip(metas, parts) if part["role"] == "train")
    for meta, part in zip(metas, parts):
        if meta["n_rows"] and meta["width"] != train_width:
            source = part.get("source", part["path"])
            raise DataError(f"'{source}' has {meta['width']} feature columns but the training file has "
                            f"{train_width}; check that training and validation files match")
    if spec.data.n_features is not None and spec.data.n_features != train_width:
        raise DataError(f"'{spec.data.path}' has {train_width} feature columns but data.n_features is "
                        f"{spec.data.n_features}; correct data.n_features or remove it")
    return train_width


def _partial_paths(files: PreparationFiles, target: int, n_workers: int) -> dict[str, Path]:
    folder = shard_folder(files.store, files.job_id, VALIDATION if target == n_workers else target)
    names = ("X-data", "X-indices", "X-indptr", "X", "y")
    return {name: folder / f"{name}.npy{PARTIAL_SUFFIX}" for name in names}


def _create_npy_once(path: Path, dtype, shape: tuple) -> None:
    """Create a zero-filled .npy file of ``shape`` unless it exists, through a temporary name."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape)
        if efs.FSYNC:
            array.flush()
        del array
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _create_partial_files(files, target, n_workers, n_rows, nnz, n_features, y_dtype) -> None:
    paths = _partial_paths(files, target, n_workers)
    if nnz is not None:
        _create_npy_once(paths["X-data"], np.float32, (nnz,))
        _create_npy_once(paths["X-indices"], np.int32, (nnz,))
        _create_npy_once(paths["X-indptr"], np.int64, (n_rows + 1,))
    else:
        _create_npy_once(paths["X"], np.float32, (n_rows, n_features))
    _create_npy_once(paths["y"], y_dtype, (n_rows,))


# Standardisation statistics -------------------------------------------------------------


def _training_rows(files: PreparationFiles, split: dict, start: int, stop: int):
    """Return training-source rows ``start:stop`` gathered from the parts, as float64."""
    starts = split["part_row_starts"]
    pieces = []
    for index in range(len(starts) - 1):
        low, high = max(start, starts[index]), min(stop, starts[index + 1])
        if low < high:
            X, _ = _load_part(files, index, split["n_features"])
            pieces.append(X[low - starts[index]:high - starts[index]])
    if split["sparse"]:
        return sp.vstack(pieces, format="csr").astype(np.float64)
    return np.concatenate(pieces).astype(np.float64)


def _stats(files: PreparationFiles, block: int) -> None:
    store = files.store
    split = store.read_json(files.split)
    start = block * STATS_BLOCK_ROWS
    stop = min(start + STATS_BLOCK_ROWS, split["n_train_rows"])
    X = _training_rows(files, split, start, stop)
    destination = store.read_arrays(files.split_arrays)["destination"][start:stop]
    X = X[destination < len(split["destination_rows"]) - 1]

    previous = _empty_stats(split["n_features"]) if block == 0 else store.read_arrays(files.stats(block - 1))
    store.write_arrays(files.stats(block), _combine_stats(previous, X))


def _empty_stats(n_features: int) -> dict[str, np.ndarray]:
    return {"count": np.float64(0.0), "mean": np.zeros(n_features), "m2": np.zeros(n_features)}


def _combine_stats(previous: dict[str, np.ndarray], X) -> dict[str, np.ndarray]:
    """Merge a block's mean and sum of squared deviations into the running ones (Chan et al., 1979)."""
    n_block = X.shape[0]
    if n_block == 0:
        return previous
    if sp.issparse(X):
        # The deviations of the stored values from the column means, plus those of the
        # implicit zeros. The shortcut sum(x²) - n·mean² cancels away the variance of a
        # column whose mean is large against its spread (a constant 0.1, or 1e9 ± 1e3).
        X = sp.csr_matrix(X)
        n_features = X.shape[1]
        mean_block = np.bincount(X.indices, weights=X.data, minlength=n_features) / n_block
        deviations = X.data - mean_block[X.indices]
        stored = np.bincount(X.indices, minlength=n_features)
        m2_block = (np.bincount(X.indices, weights=deviations * deviations, minlength=n_features)
                    + (n_block - stored) * mean_block ** 2)
    else:
        mean_block = X.mean(axis=0)
        m2_block = ((X - mean_block) ** 2).sum(axis=0)

    n_previous = float(previous["count"])
    n_total = n_previous + n_block
    delta = mean_block - previous["mean"]
    return {
        "count": np.float64(n_total),
        "mean": previous["mean"] + delta * (n_block / n_total),
        "m2": previous["m2"] + np.maximum(m2_block, 0.0) + delta ** 2 * (n_previous * n_block / n_total),
    }


def _scaling(files: PreparationFiles, split: dict) -> tuple[np.ndarray | None, np.ndarray] | None:
    """Return ``(mean, scale)`` for standardisation, ``mean`` None for sparse data; None if off."""
    if split["n_stats_blocks"] == 0:
        return None
    stats = files.store.read_arrays(files.stats(split["n_stats_blocks"] - 1))
    scale = standardization_scale(stats["m2"] / float(stats["count"]), stats["mean"], float(stats["count"]))
    return (None if split["sparse"] else stats["mean"]), scale


# Distribute and finalize ----------------------------------------------------------------


def _distribute(files: PreparationFiles, spec: JobSpec, index: int) -> None:
    store = files.store
    split = store.read_json(files.split)
    n_workers = len(split["destination_rows"]) - 1
    X, _ = _load_part(files, index, split["n_features"])
    low, high = split["part_row_starts"][index], split["part_row_starts"][index + 1]
    arrays = store.read_arrays(files.split_arrays)
    destination, position = arrays["destination"][low:high], arrays["position"][low:high]
    offset, y = arrays["offset"][low:high], arrays["y"][low:high]

    scaling = _scaling(files, split)
    if scaling is not None:
        X = _apply_scaling(X, *scaling)

    for target in np.unique(destination):
        rows = np.flatnonzero(destination == target)
        paths = _partial_paths(files, int(target), n_workers)
        # Rows of one destination are consecutive there, because parts are contiguous.
        first = int(position[rows[0]])
        count = len(rows)
        _write_slice(paths["y"], slice(first, first + count), y[rows])
        if sp.issparse(X):
            selected = X[rows]
            start = int(offset[rows[0]])
            _write_slice(paths["X-data"], slice(start, start + selected.nnz), selected.data.astype(np.float32))
            _write_slice(paths["X-indices"], slice(start, start + selected.nnz), selected.indices.astype(np.int32))
            _write_slice(paths["X-indptr"], slice(first + 1, first + 1 + count), start + selected.indptr[1:])
        else:
            _write_slice(paths["X"], slice(first, first + count), np.asarray(X[rows], dtype=np.float32))


def _apply_scaling(X, mean: np.ndarray | None, scale: np.ndarray):
    if sp.issparse(X):
        # Scale the stored values in place of X.multiply, which may drop explicit zeros
        # and so move the data offsets computed in the split step.
        data = X.data.astype(np.float64) / scale[X.indices]
        return sp.csr_matrix((data, X.indices, X.indptr), shape=X.shape)
    return standardize_rows(X, mean, scale)


def _write_slice(path: Path, where: slice, values: np.ndarray) -> None:
    array = np.load(path, mmap_mode="r+", allow_pickle=False)
    array[where] = values
    # The finalize step may run on another EFS client, so the pages are written back
    # here. Without fsync (the local runtime) every process shares one page cache.
    if efs.FSYNC:
        array.flush()
    del array


def _finalize(files: PreparationFiles, spec: JobSpec) -> None:
    store = files.store
    split = store.read_json(files.split)
    n_workers = len(split["destination_rows"]) - 1
    if files.manifest.exists():
        # A twin delivery finished first: its shard files are the ones the manifest
        # records, so this delivery's own partial files go.
        for target in range(n_workers + 1):
            for path in _partial_paths(files, target, n_workers).values():
                path.unlink(missing_ok=True)
        return
    for target in range(n_workers + 1):
        for path in _partial_paths(files, target, n_workers).values():
            final = path.with_name(path.name[:-len(PARTIAL_SUFFIX)])
            if path.exists():
                if efs.FSYNC:
                    with open(path, "rb+") as handle:
                        os.fsync(handle.fileno())
                os.replace(path, final)

    scaling = _scaling(files, split)
    if scaling is not None:
        mean, scale = scaling
        store.write_arrays(store.data_dir(spec.job_id) / "standardize.npz",
                           {"mean": np.zeros_like(scale) if mean is None else mean, "scale": scale,
                            "centered": np.bool_(mean is not None)})

    manifest = {
        "n_features": int(split["n_features"]),
        "classes": split["classes"],
        "class_counts": split["class_counts"],
        "target_mean": split.get("target_mean"),
        "target_scale": split.get("target_scale"),
        "sparse": bool(split["sparse"]),
        "shard_rows": split["destination_rows"][:n_workers],
        "validation_rows": int(split["destination_rows"][n_workers]),
        "standardized": scaling is not None,
    }
    # Each shard file's size, modification time and inode, which a worker compares with the
    # file it loads, so a shard replaced by another of the same shape is noticed.
    manifest["shard_files"] = record_shard_files(store, spec.job_id, manifest)
    store.write_json(files.manifest, manifest)
    logger.info("prepared data", extra={"job_id": spec.job_id, "n_rows": split["n_train_rows"],
                                        "n_features": manifest["n_features"]})


def layout_summary(store: EfsStore, job_id: str) -> dict:
    """Return the parts the preparation cut, for logs and tests."""
    return json.loads((PreparationFiles(store, job_id).layout).read_text())
