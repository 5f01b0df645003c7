"""Reuse of an earlier run's files, when a job is sent again after its job item was lost.

A job item is lost with its table (a new local stack, a redeployed stack), while EFS keeps
the job's folder. The starter then reuses the earlier run's model if that run finished on
this spec and data, goes on from its committed rounds if it did not, and otherwise moves
its files into ``earlier-runs/<n>/`` and starts at round 0. ``run.json`` records the spec
and data that the folder's rounds were trained on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from shared.efs import EfsStore
from shared.errors import DataError
from shared.preparation import data_identity
from shared.round_files import model_info_problem, read_round_state
from shared.spec import JobSpec

logger = logging.getLogger(__name__)


# The file in a job's folder that ties its round folders and model to the spec and the
# data they were trained on.
RUN_RECORD = "run.json"


def run_identity(store: EfsStore, spec: JobSpec) -> dict[str, str]:
    """Return what ``run.json`` records of a run: the spec's fingerprint and the prepared data's identity."""
    return {"data_sha256": data_identity(store, spec.job_id), "spec_fingerprint": spec.fingerprint()}


def continuation_round(store: EfsStore, job_id: str, total_rounds: int, identity: dict[str, str]) -> int:
    """Return the round from which the job goes on with an earlier, unfinished run's files.

    An unfinished run's files stay on EFS when its job item is gone, as after a local
    stack that stopped or a redeployed table. The same spec sent again then goes on from
    them, so no trained round is lost. A round ``r`` qualifies when its folder contains the
    state (``state.npz``) and the stopping state (``stopping.json``), and the metrics file
    of round ``r - 1`` exists. The aggregator writes the state, then the metrics file, then
    the stopping state, all before it advances, so together they show that round ``r - 1``
    was committed on EFS.

    The job goes on from the committed round before the last one, so the last committed
    round is aggregated again. Its aggregation may have decided to stop the job and then
    crashed before the model was written, and only the model records that decision. A
    round whose files do not load is passed over for the one before it.

    Parameters
    ----------
    store : EfsStore
    job_id : str
    total_rounds : int
        The job's round limit; round folders beyond it do not count.
    identity : dict
        The spec's fingerprint and the data's identity now (:func:`run_identity`). The
        earlier run's rounds count only if its run record (``run.json``) is the same.

    Returns
    -------
    int
        The 0-based round to go on from, or 0 for a fresh start: no files, a run of
        another spec or on other data, or only round 0 committed. A finished run whose
        model is whole is reused before this is asked. A finished run whose model is
        damaged goes on from its rounds like an unfinished run, and writes the model again.
    """
    rounds_dir = store.job_dir(job_id) / "rounds"
    if not rounds_dir.is_dir():
        return 0
    if not _same_run(store, job_id, identity):
        return 0

    def committed(round_index: int) -> bool:
        return (store.state_path(job_id, round_index).is_file()
                and (store.round_dir(job_id, round_index) / "stopping.json").is_file()
                and store.metrics_path(job_id, round_index - 1).is_file())

    indexes = [int(path.name) for path in rounds_dir.iterdir() if path.name.isdigit()]
    committed_rounds = sorted(index for index in indexes if 1 <= index <= total_rounds and committed(index))
    # Any committed round before the last will do: the rounds from there are aggregated
    # again, and each takes the same decisions as before.
    for round_index in reversed(committed_rounds[:-1]):
        if _round_files_load(store, job_id, round_index):
            return round_index
    return 0


def _round_files_load(store: EfsStore, job_id: str, round_index: int) -> bool:
    """Return whether a committed round's state, stopping state and previous metrics can be read."""
    try:
        read_round_state(store, job_id, round_index)
        for path in (store.round_dir(job_id, round_index) / "stopping.json", store.metrics_path(job_id, round_index - 1)):
            if not isinstance(store.read_json(path), dict):
                return False
    except (DataError, OSError, ValueError):
        return False
    return True


def _same_run(store: EfsStore, job_id: str, identity: dict[str, str]) -> bool:
    """Return whether the job's round folders and model were trained on this spec and data."""
    try:
        run = store.read_json(store.job_dir(job_id) / RUN_RECORD)
    except (OSError, ValueError):
        return False
    return run == identity


def finished_on_efs(store: EfsStore, job_id: str, identity: dict[str, str], n_params: int) -> bool:
    """Return whether an earlier run of the job finished on this spec and data, leaving its whole model.

    The model's parameters must load as ``n_params`` finite values, and its description
    must name as many rounds as its final metrics.
    """
    model_dir = store.model_dir(job_id)
    if not ((model_dir / "model.json").is_file() and _same_run(store, job_id, identity)):
        return False
    try:
        params = store.read_npy(model_dir / "params.npy")
        model_info = store.read_json(model_dir / "model.json")
    except (OSError, ValueError, EOFError):
        return False
    return (params.shape == (n_params,) and bool(np.isfinite(params).all())
            and model_info_problem(model_info) is None
            and model_info["final_metrics"].get("round") == model_info["rounds"])


EARLIER_RUNS_FOLDER = "earlier-runs"


def set_aside_earlier_run(store: EfsStore, job_id: str) -> Path | None:
    """Move the rounds, metrics and model of an earlier run of the job into ``earlier-runs/<n>/``.

    A job that starts round 0 has aggregated no round yet. So metrics, a model or round
    folders after round 0 on EFS belong to an earlier run of the same spec whose job item
    is gone, as after a new local stack or a redeployed table. Left in place, its metrics would
    mix with the new run's in ``fetch`` and ``plot``. Nothing is deleted, since they may
    hold a trained model. Returns the folder they were moved to, or None if there were none.

    Round 0's progress files go too, or a worker or the aggregator of the new round 0
    would take the earlier run's saved progress for its own. The rest of round 0 stays,
    because a twin delivery of this message may already have started it. Its results
    are harmless, since each worker writes its own before it is recorded as done, and a
    progress file moved from under a twin only makes its writer compute again.
    """
    job_dir = store.job_dir(job_id)
    rounds_dir = job_dir / "rounds"
    earlier = [job_dir / name for name in ("metrics", "model") if (job_dir / name).exists()]
    if rounds_dir.is_dir():
        earlier += [path for path in rounds_dir.iterdir() if not (path.name.isdigit() and int(path.name) == 0)]
    round_zero = store.round_dir(job_id, 0)
    if round_zero.is_dir():
        earlier += [path for path in round_zero.iterdir()
                    if path.name == "aggregate-progress.json" or path.name.startswith("progress-")]
    if not earlier:
        return None
    runs_dir = job_dir / EARLIER_RUNS_FOLDER
    if runs_dir.is_symlink() or (runs_dir.exists() and not runs_dir.is_dir()):
        raise DataError(f"'{runs_dir.relative_to(store.root)}' is a file or a link, but Baton moves the files of an "
                        f"earlier run of job '{job_id}' into a folder of that name; move it elsewhere, then run "
                        f"`baton resume {job_id}`")
    runs_dir.mkdir(exist_ok=True)
    number = 1 + sum(1 for path in runs_dir.iterdir() if path.name.isdigit())
    while True:
        destination = runs_dir / str(number)
        try:
            destination.mkdir()
            break
        except FileExistsError:
            # A twin delivery of this message took that number.
            number += 1
    (destination / "rounds").mkdir()
    for path in earlier:
        target = destination / path.relative_to(job_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            # One rename per folder (or progress file), within one file system.
            os.replace(path, target)
        except FileNotFoundError:
            # A twin delivery moved it first.
            continue
    logger.warning("moved the files of an earlier run of this job aside", extra={
        "job_id": job_id, "path": str(destination.relative_to(store.root))})
    return destination
