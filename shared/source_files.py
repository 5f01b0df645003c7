"""Identities of a job's data files, so that preparation notices a file that changes under it.

The layout step records each source's identity before it reads the file. Every later
preparation step, and a start that finds the shards already prepared, compares the file
with that record and fails the job if it changed. Parts of a changed file would otherwise
mix rows of both versions, and reused shards would come from a file that is gone.

A local file's identity is its size, its modification time in nanoseconds and its inode
number, read with one ``stat`` call, so checking costs no read of the data. Writing to a
file sets its modification time, and ``os.replace`` (or a copy through a temporary name,
as ``rsync`` makes by default) puts a new inode at the path. A copy onto EFS of an
``s3://`` object is identified the same way, and the object itself by its ETag, which
S3 changes whenever the content changes.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.errors import DataError

FIELDS = {"train": "data.path", "validation": "data.validation_path"}

FIX = "re-submit the spec under a new job_id, or for a local job run `baton run --fresh`"


def file_identity(path: Path, include_ctime: bool = False) -> dict | None:
    """Return the size, ``mtime_ns`` and inode of ``path``, or None if it does not exist.

    ``include_ctime`` adds the inode change time (``ctime_ns``). No system call sets it to
    a chosen time, so it changes with every write, also when ``touch`` or ``os.utime``
    then restores the modification time. A ``chmod`` or a new hard link changes it too, so
    only files that Baton alone writes (the prepared shards and statistics) record it.
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    identity = {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "inode": status.st_ino}
    if include_ctime:
        identity["ctime_ns"] = status.st_ctime_ns
    return identity


def source_record(role: str, source: str, path: Path, etag: str | None = None) -> dict:
    """Return the record of one source: its role, its name in the spec, its path on EFS and its identity.

    Parameters
    ----------
    role : {"train", "validation"}
    source : str
        The path or ``s3://`` URI as the spec gives it.
    path : Path
        The file the preparation reads: the source itself, or its copy on EFS.
    etag : str, optional
        The ETag of the ``s3://`` object that ``path`` was copied from.
    """
    record = {"role": role, "source": source, "path": str(path), **(file_identity(path) or {})}
    if etag is not None:
        record["etag"] = etag
    return record


def describe_file_change(record: dict) -> str | None:
    """Return what changed in the file of ``record`` since it was recorded, or None."""
    return describe_identity_change(record, file_identity(Path(record["path"])))


def describe_identity_change(recorded: dict, current: dict | None) -> str | None:
    """Return how ``current``, a file's identity now (None: the file is missing), differs from ``recorded``, or None.

    Both are identities as :func:`file_identity` returns them. The change times are
    compared only when ``recorded`` has one, so records written without it still pass.
    """
    # NOTE: without a recorded ctime_ns, a file rewritten in place at the same size, with
    # its old modification time put back (cp -p onto it, touch -r), passes this check.
    if current is None:
        return "it is missing now"
    if current["inode"] != recorded["inode"]:
        return f"another file replaced it (inode {recorded['inode']}, now {current['inode']})"
    if current["size"] != recorded["size"]:
        return f"its size changed from {recorded['size']:,} to {current['size']:,} bytes"
    if current["mtime_ns"] != recorded["mtime_ns"]:
        return "it was modified (its modification time changed)"
    if "ctime_ns" in recorded and current.get("ctime_ns") != recorded["ctime_ns"]:
        return ("it was modified or its mode changed (its inode change time changed, although its modification "
                "time is the recorded one)")
    return None


def check_unchanged(records: list[dict], job_id: str) -> None:
    """Raise if a source file changed since the layout step recorded it.

    Raises
    ------
    DataError
        Naming the file, the spec field, the change and the fix.
    """
    for record in records:
        change = describe_file_change(record)
        if change is not None:
            raise DataError(f"data file '{record['source']}' ({FIELDS[record['role']]}) changed while job "
                            f"'{job_id}' was preparing its data: {change}. Its shards would mix rows of both "
                            f"versions, so {FIX}")


def check_reusable(records: list[dict], job_id: str, s3_etag=None) -> None:
    """Raise if a source changed after its shards were prepared, before a new start reuses them.

    Parameters
    ----------
    records : list of dict
        The manifest's ``sources``.
    job_id : str
    s3_etag : callable, optional
        ``s3_etag(uri)`` returns the current ETag of an ``s3://`` object, or None if it
        is missing. Needed only when a record has an ``etag``.

    Raises
    ------
    DataError
        Naming the file, the spec field, the change and the fix.
    """
    changed = find_source_change(records, s3_etag)
    if changed is not None:
        record, change = changed
        raise DataError(f"{describe_source(record)} changed after job '{job_id}' prepared its shards from it: "
                        f"{change}. The shards no longer match the file, so {FIX}, to prepare the data again")


def find_source_change(records: list[dict], s3_etag=None) -> tuple[dict, str] | None:
    """Return the first source of ``records`` that changed since it was recorded, with what changed; None if none did.

    ``records`` and ``s3_etag`` are those of :func:`check_reusable`.
    """
    for record in records:
        change = _describe_object_change(record, s3_etag) if "etag" in record else describe_file_change(record)
        if change is not None:
            return record, change
    return None


def describe_source(record: dict) -> str:
    """Return how messages name the source of ``record``: its path in the spec and its spec field."""
    return f"data file '{record['source']}' ({FIELDS[record['role']]})"


def _describe_object_change(record: dict, s3_etag) -> str | None:
    current = s3_etag(record["source"])
    if current is None:
        return "the object is missing now"
    if current != record["etag"]:
        return f"its ETag changed from {record['etag']} to {current}"
    return None
