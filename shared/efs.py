"""Files on the shared file system: the job folder layout, atomic writes and checked JSON reads.

Every write goes to a temporary name in the destination folder, is flushed and fsynced,
then renamed over the final name. A reader therefore sees either the old file or the whole
new one, never a half-written file, even over NFS, where a rename inside one folder is
atomic. Writers of the same path always produce the same bytes (the training is
deterministic), so two duplicate invocations racing on one file are harmless.

Layout of one job, under ``<efs_root>/jobs/<job_id>/``. ``r`` is the 0-based round index
that messages and DynamoDB keys use. Metrics files are named by the round number
``r + 1`` that the CLI and the job's errors show::

    spec.json                      the validated job spec
    data/manifest.json             shapes, classes, shard sizes and shard file identities; written last
    data/shard-<w>/X*.npy, y.npy   one memory-mappable shard per worker
    data/validation/X*.npy, y.npy  held-out rows
    rounds/<r>/state.npz           parameters and optimizer state at the start of round r
    rounds/<r>/result-<w>.npy      worker w's result: its parameter-sized vector (the gradient sum),
                                   then a trailer with its small arrays (shared/reduction.py)
    rounds/<r>/reduced-<k>.npy     slice k of the round's summed vectors and the round's sums of
                                   the small arrays, when training.reducers > 1
    metrics/<r + 1>.json           metrics of round r, never pruned
    run.json                       the spec and data identity the round folders were trained on
    model/params.npy, model.json   the final model
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from shared.config import efs_fsync_enabled
from shared.errors import BatonError, DamagedFileError, DataError, EfsNotWritableError, StaleMessageError
from shared.source_files import FIX

# The folder under the root where Baton keeps every job's state; never read as data.
JOBS_FOLDER = "jobs"
# Message text for a data path in JOBS_FOLDER, with the fix. The spec check uses it for a
# path written there, and resolve_data_path for one that a symbolic link leads there.
JOBS_FOLDER_DATA_PROBLEM = (f"names a file in {JOBS_FOLDER}/, where Baton keeps the state of every job; copy the "
                            f"data to a folder outside {JOBS_FOLDER}/ (such as datasets/) and name the copy in the "
                            "spec")

# The first bytes of every .npy file, and of every zip archive such as an .npz file.
NPY_SIGNATURE = b"\x93NUMPY"
ZIP_SIGNATURE = b"PK"

# A fixed timestamp makes .npz archives byte-identical for identical arrays.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

# fsync makes a write survive a crash of the machine. The local runtime's folder standing
# in for EFS does not need that, so shared/local/session.py sets BATON_EFS_FSYNC=false for
# its functions. A killed handler loses no written data either way. Read once, at import.
# An invalid value leaves fsync on here, so importing this module never fails. Building
# Settings rejects the value, with its name and the fix.
try:
    FSYNC = efs_fsync_enabled()
except BatonError:
    FSYNC = True


def write_bytes_atomic(path: Path, payload: bytes, create_folder: bool = True) -> None:
    """Write ``payload`` to ``path`` through a temporary file and a rename."""
    write_buffers_atomic(path, [payload], create_folder)


@contextmanager
def stale_if_round_pruned(round_dir: Path, round_label: str) -> Iterator[None]:
    """Turn a write into ``round_dir`` that fails because the folder is gone into a StaleMessageError.

    Workers, reducers and continuations write into their round's folder without creating
    it (``create_folder=False``). The aggregator wrote the round's state there before it
    sent their messages, so a missing folder was pruned and the round is over. Creating
    it again would leave it behind for good once the job has finished. ``round_label``
    names the round in the message, such as "round 3 of job a9a".
    """
    try:
        yield
    except FileNotFoundError:
        if round_dir.is_dir():
            raise
        raise StaleMessageError(f"{round_label} is over: its folder '{round_dir}' was pruned; nothing is "
                                "written") from None


def write_buffers_atomic(path: Path, buffers: Sequence[bytes | memoryview], create_folder: bool = True) -> None:
    """Write the concatenation of ``buffers`` to ``path`` through a temporary file and a rename.

    The buffers are written one after the other, so a large array need not be copied into
    one ``bytes`` object first. With ``create_folder`` False a missing folder raises
    FileNotFoundError instead of being created.
    """
    if create_folder:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temporary, "wb") as handle:
            for buffer in buffers:
                handle.write(buffer)
            handle.flush()
            if FSYNC:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def encode_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Return a deterministic uncompressed .npz archive of ``arrays``, keys in sorted order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            member = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            with archive.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asarray(arrays[name]), allow_pickle=False)
    return buffer.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """Return ``array`` in .npy format."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def json_preview(value: Any, max_chars: int = 60) -> str:
    """Return ``value`` as JSON for a message, cut after ``max_chars`` characters with "..." added."""
    text = json.dumps(value)
    return text if len(text) <= max_chars else text[:max_chars] + "..."


class EfsStore:
    """Reads and writes one Baton file tree.

    Parameters
    ----------
    root : str or Path
        Mount point of the file system (``/mnt/efs`` on Lambda, a folder locally).
    data_roots : tuple of str, default=()
        Folders under ``root`` that job specs may read data from; empty allows any folder
        but ``jobs/``. See :meth:`resolve_data_path`.
    """

    def __init__(self, root: str | os.PathLike, data_roots: tuple[str, ...] = ()):
        self.root = Path(root)
        self.data_roots = tuple(data_roots)

    # Paths -------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.root.joinpath(JOBS_FOLDER, job_id)

    def spec_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "spec.json"

    def data_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "data"

    def round_dir(self, job_id: str, round_index: int) -> Path:
        # One joinpath, not four "/" joins: a reduction builds two paths per worker.
        return self.root.joinpath(JOBS_FOLDER, job_id, "rounds", str(round_index))

    def state_path(self, job_id: str, round_index: int) -> Path:
        return self.round_dir(job_id, round_index) / "state.npz"

    def result_path(self, job_id: str, round_index: int, worker: int) -> Path:
        """Return the path of worker ``worker``'s result file (shared/reduction.py describes its layout)."""
        return self.round_dir(job_id, round_index) / f"result-{worker}.npy"

    def result_paths(self, job_id: str, round_index: int, n_workers: int) -> list[str]:
        """Return the paths of every worker's result file of a round, in worker order, as strings.

        Strings, because pathlib's joins cost more than the read of a small result file.
        """
        round_dir = os.path.join(os.fspath(self.root), JOBS_FOLDER, job_id, "rounds", str(round_index))
        return [os.path.join(round_dir, f"result-{worker}.npy") for worker in range(n_workers)]

    def reduced_path(self, job_id: str, round_index: int, slice_index: int) -> Path:
        """Return the path of reducer ``slice_index``'s file: its slice of the summed vectors and the small sums."""
        return self.round_dir(job_id, round_index) / f"reduced-{slice_index}.npy"

    def metrics_path(self, job_id: str, round_index: int) -> Path:
        """Return the metrics file of the round at 0-based ``round_index``, named by its round number from 1."""
        return self.job_dir(job_id) / "metrics" / f"{round_index + 1}.json"

    def model_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "model"

    def resolve_data_path(self, relative: str, field: str = "data.path") -> Path:
        """Return the path of the data file that spec field ``field`` names relative to the root.

        Raises
        ------
        DataError
            If the file, with its symbolic links resolved, lies outside the root, so a spec
            cannot make a function read (and quote in its errors) a file of its own file
            system. Also if it lies in ``jobs/``, the jobs' own state, or outside every
            folder of ``data_roots`` when that is set.
        """
        path = self.root / relative
        if not self.is_under_root(path):
            raise DataError(
                f"{field} '{relative}' leads outside the EFS root through a symbolic link; Baton reads only files "
                "under the EFS root, so copy the file under the EFS root and name the copy in the spec")
        # NOTE: the check and the later reads are separate system calls, so a link swapped
        # in between by someone who can write to the file system is not caught.
        parts = self.parts_under_root(path)
        # A path that a link sends elsewhere is named with where it leads.
        named = f"{field} '{relative}'"
        if parts != Path(relative).parts:
            named += f" (a symbolic link on the way leads to '{'/'.join(parts)}')"
        if parts[:1] == (JOBS_FOLDER,):
            raise DataError(f"{named} {JOBS_FOLDER_DATA_PROBLEM}")
        if self.data_roots and not any(parts[:len(Path(root).parts)] == Path(root).parts for root in self.data_roots):
            raise DataError(
                f"{named} is outside the folders this stack reads data from "
                f"({', '.join(self.data_roots)}, set by ALLOWED_DATA_ROOTS); move the file into one of them, "
                "or have the stack's owner add its folder to the allowedDataRoots stage parameter")
        return path

    def parts_under_root(self, path: Path) -> tuple[str, ...]:
        """Return the parts of ``path`` below the root, with every symbolic link resolved.

        ``path`` must be under the root (:meth:`is_under_root`). A path that does not exist
        yet is resolved as far as it exists.
        """
        return Path(os.path.realpath(path)).relative_to(os.path.realpath(self.root)).parts

    def is_under_root(self, path: Path) -> bool:
        """Return whether ``path``, with every symbolic link resolved, is inside the root's real path.

        A path that does not exist yet is resolved as far as it exists.
        """
        real_root = os.path.realpath(self.root)
        real_path = os.path.realpath(path)
        return os.path.commonpath([real_root, real_path]) == real_root

    # Reads and writes --------------------------------------------------------------------

    def write_json(self, path: Path, value: Any, create_folder: bool = True) -> None:
        write_bytes_atomic(path, json.dumps(value, sort_keys=True, indent=1).encode(), create_folder)

    def read_json(self, path: Path) -> Any:
        with open(path, "rb") as handle:
            return json.loads(handle.read())

    def read_json_object(self, path: Path, remedy: str) -> dict[str, Any]:
        """Read a JSON object that Baton wrote, for a command that a person runs.

        Raises :class:`DamagedFileError`, naming the file relative to the root and
        ``remedy``, when the file cannot be read, is not valid UTF-8 JSON or contains no
        JSON object.
        """
        try:
            value = self.read_json(path)
        except OSError as error:
            raise self.damaged_file_error(path, f"cannot be read ({error.strerror or error})", remedy) from None
        except ValueError as error:
            # json.JSONDecodeError and UnicodeDecodeError both derive from ValueError.
            raise self.damaged_file_error(path, f"is not valid JSON ({error})", remedy) from None
        if not isinstance(value, dict):
            raise self.damaged_file_error(path, "does not contain a JSON object", remedy)
        return value

    def damaged_file_error(self, path: Path, problem: str, remedy: str) -> DamagedFileError:
        """Return the error for a file under the root that a command cannot use: which file, what is wrong, what to do."""
        try:
            name = path.relative_to(self.root)
        except ValueError:
            name = path
        return DamagedFileError(f"{name} in the EFS folder {self.root} {problem}; {remedy}")

    def read_npy_checked(self, path: Path, remedy: str) -> np.ndarray:
        """Read a whole .npy array that Baton wrote, for a command that a person runs.

        Raises :class:`DamagedFileError`, naming the file relative to the root and
        ``remedy``, when the file cannot be read or is not a valid .npy array.
        """
        return self._read_numpy_checked(path, NPY_SIGNATURE, ".npy array", remedy,
                                        lambda: self.read_npy(path, mmap=False))

    def read_arrays_checked(self, path: Path, remedy: str) -> dict[str, np.ndarray]:
        """Read an .npz archive that Baton wrote, for a command that a person runs.

        Raises :class:`DamagedFileError` as :meth:`read_npy_checked` does.
        """
        return self._read_numpy_checked(path, ZIP_SIGNATURE, ".npz archive", remedy, lambda: self.read_arrays(path))

    def _read_numpy_checked(self, path: Path, signature: bytes, kind: str, remedy: str, read: Callable[[], Any]):
        try:
            with open(path, "rb") as handle:
                start = handle.read(len(signature))
            # Checked first because numpy takes any file without a known signature for a
            # pickle, and its error then advises loading the file with allow_pickle.
            if start != signature:
                problem = "is empty" if not start else f"is not an {kind}: it does not start with {signature!r}"
                raise self.damaged_file_error(path, problem, remedy)
            return read()
        except OSError as error:
            raise self.damaged_file_error(path, f"cannot be read ({error.strerror or error})", remedy) from None
        except (ValueError, EOFError, zipfile.BadZipFile) as error:
            raise self.damaged_file_error(path, f"is not a valid {kind} ({type(error).__name__}: {error})",
                                          remedy) from None

    def write_arrays(self, path: Path, arrays: dict[str, np.ndarray], create_folder: bool = True) -> None:
        write_bytes_atomic(path, encode_arrays(arrays), create_folder)

    def read_arrays(self, path: Path) -> dict[str, np.ndarray]:
        # Read the whole file first so no descriptor stays open behind a lazy NpzFile.
        with open(path, "rb") as handle:
            payload = handle.read()
        with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}

    def write_npy(self, path: Path, array: np.ndarray) -> None:
        write_bytes_atomic(path, encode_npy(array))

    def read_npy(self, path: Path, mmap: bool = True) -> np.ndarray:
        """Load a .npy file, memory-mapped read-only by default."""
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)

    # Housekeeping ------------------------------------------------------------------------

    def prune_rounds(self, job_id: str, current_round: int, keep: int) -> list[int]:
        """Delete the round folders before the last ``keep``, counting ``current_round``'s.

        Rounds ``current_round - keep + 1`` to ``current_round`` stay, so ``keep`` folders
        are left once the job has run that many rounds. Returns the pruned round numbers.
        Missing folders are skipped, so a repeated call is harmless.
        """
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (the current round's folder), got {keep}")
        rounds_dir = self.job_dir(job_id) / "rounds"
        if not rounds_dir.is_dir():
            return []
        pruned = []
        for entry in rounds_dir.iterdir():
            if entry.name.isdigit() and int(entry.name) <= current_round - keep:
                shutil.rmtree(entry, ignore_errors=True)
                pruned.append(int(entry.name))
        return sorted(pruned)


def relative_efs_path(store: EfsStore, path: Path) -> Path:
    """Return the name of ``path`` in messages: relative to the EFS root when under it, else ``path`` itself."""
    return path.relative_to(store.root) if store.is_under_root(path) else path


def read_job_json(store: EfsStore, path: Path, problem_of: Callable[[Any], str | None] | None = None) -> Any:
    """Read a JSON file that Baton wrote for a job (its spec or data manifest).

    Parameters
    ----------
    store : EfsStore
    path : Path
    problem_of : callable, optional
        Returns what makes the parsed value unusable, as text that follows the file's name
        (such as 'has no "n_features" field'), or None when it is usable.

    Raises
    ------
    DataError
        If the file is not valid JSON, or ``problem_of`` finds a problem. Baton writes
        these files whole, so a retry would read the same bytes.
    """
    try:
        value = store.read_json(path)
    except ValueError as error:
        raise changed_job_file_error(store, path, f"is damaged ({type(error).__name__}: {error})") from None
    problem = None if problem_of is None else problem_of(value)
    if problem is not None:
        raise changed_job_file_error(store, path, problem)
    return value


def not_an_object_problem(value: Any, expected: str = "an object") -> str | None:
    """Return the problem of a JSON value that should be an object, for :func:`read_job_json`, or None.

    ``expected`` names the object in the text, such as "the object a metrics file is".
    """
    return None if isinstance(value, dict) else f"contains a JSON {type(value).__name__}, not {expected}"


def changed_job_file_error(store: EfsStore, path: Path, problem: str) -> DataError:
    """Return the error for a file that Baton wrote whole for a job and something else changed since.

    ``problem`` follows the file's name, such as "is missing" or "is damaged (...)".
    """
    return DataError(f"file '{relative_efs_path(store, path)}' {problem}: Baton writes it whole, so it was changed "
                     f"after it was written, and the job cannot go on from it; {FIX}")


def check_efs_writable(root: Path) -> None:
    """Write and delete a probe file under ``root``, so a bad mount fails on first use.

    Raises
    ------
    EfsNotWritableError
        If the folder is missing or this process cannot create a file in it.
    """
    probe = root / f".write-check-{uuid.uuid4().hex}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"ok")
        probe.unlink()
    except OSError as error:
        raise EfsNotWritableError(
            f"EFS root '{root}' is not writable by uid {os.getuid()} gid {os.getgid()} ({error.strerror}); "
            "the access point's RootDirectory.CreationInfo OwnerUid/OwnerGid must equal its PosixUser Uid/Gid "
            "(EfsAccessPoint in serverless.yml), or chown the folder to that user; locally, check EFS_ROOT") from error
