"""The files of a round and of the final model that the steps write and read back on EFS.

A round's folder contains its starting state (``state.npz``) and the progress files of
continued workers and aggregators. The ``*_problem`` functions are the ``problem_of``
checks of :func:`shared.efs.read_job_json` for the JSON files that the steps read back.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from shared.efs import EfsStore, not_an_object_problem, read_job_json
from shared.errors import DamagedRoundStateError
from shared.optim import Optimizer, state_arrays, state_from_arrays
from shared.services import Services, read_manifest
from shared.spec import parse_job_spec
from shared.training import build_model, build_optimizer
from shared.shards import STATISTICS, check_statistics_file, statistics_path
from shared.target_scaling import params_in_target_units


MISSING = "is missing"


def state_shapes(n_params: int, optimizer: Optimizer) -> dict[str, tuple[int, ...]]:
    """Return the shape of each array that a round state file of the job contains, by its name in the file.

    These are the parameters and the optimizer's slots, as the starter writes them for
    round 0 and every aggregation for the next round.
    """
    # Every optimizer's slots have the parameters' shape, so a one-parameter state names
    # them without allocating the model's size.
    slots = state_arrays(optimizer.init_state(np.zeros(1)))
    return {"params": (n_params,), **{name: (n_params,) for name in slots}}


def _stored_state_shapes(store: EfsStore, job_id: str) -> dict[str, tuple[int, ...]]:
    """Return :func:`state_shapes` for the job's model and optimizer, from its spec and data manifest on EFS."""
    spec = parse_job_spec(read_job_json(store, store.spec_path(job_id)))
    return state_shapes(build_model(spec, read_manifest(store, job_id)).n_params, build_optimizer(spec))


def read_round_state(store: EfsStore, job_id: str, round_index: int,
                     shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[np.ndarray, dict]:
    """Return the parameters and optimizer state stored for the start of ``round_index``.

    ``shapes`` is the job's :func:`state_shapes`. Without it they are worked out from the
    job's spec and data manifest on EFS, which costs two small reads.

    Raises
    ------
    DamagedRoundStateError
        If the state file is missing, is not a whole ``.npz`` archive, lacks the parameters
        or an optimizer slot, or holds one of another shape, of a non-float type, or with
        a NaN or infinite value. Baton writes it atomically, and only after checking that
        every parameter is finite, so only a change by something else leaves it so, and a
        retry cannot help. ``baton resume`` goes back to an earlier round.
    """
    path = store.state_path(job_id, round_index)
    arrays, problem = _load_state(store, path, _stored_state_shapes(store, job_id) if shapes is None else shapes)
    if problem is not None:
        raise _damaged_round_error(store, path, problem, job_id)
    return arrays["params"], state_from_arrays(arrays)


def _load_state(store: EfsStore, path: Path, shapes: dict[str, tuple[int, ...]]) -> tuple[dict, str | None]:
    """Return a state file's arrays and what makes them unusable (text after the file's name), or None."""
    try:
        arrays = store.read_arrays(path)
    except FileNotFoundError:
        return {}, MISSING
    except (ValueError, EOFError, zipfile.BadZipFile) as error:
        return {}, f"is damaged ({type(error).__name__}: {error})"
    for name, shape in shapes.items():
        if name not in arrays:
            return arrays, f"is damaged (it has no array '{name}')"
        values = arrays[name]
        if values.shape != shape:
            return arrays, f"is damaged (its array '{name}' has shape {values.shape}, not the model's {shape})"
        if values.dtype.kind != "f":
            return arrays, f"is damaged (its array '{name}' has type {values.dtype}, not a float type)"
        # Diverged weights stop the job before they are written, so these were changed on EFS.
        bad = np.count_nonzero(~np.isfinite(values))
        if bad:
            return arrays, (f"is damaged ({bad:,} of the {values.size:,} values of its array '{name}' "
                            f"{'is' if bad == 1 else 'are'} NaN or infinite)")
    return arrays, None


def read_stopping_history(store: EfsStore, job_id: str, round_index: int) -> dict | None:
    """Return the stopping state stored for the start of ``round_index``, or None for round 0 without one.

    Raises
    ------
    DamagedRoundStateError
        If the file is missing after round 0, is not valid JSON or is not an object.
        Every aggregation writes the next round's file whole, so something else changed
        or removed it. Read as no history, a deleted file would restart early stopping's
        count. ``baton resume`` goes back to an earlier round.
    """
    path = store.round_dir(job_id, round_index) / "stopping.json"
    history, problem = _load_stopping(store, path)
    if problem == MISSING and round_index == 0:
        return None
    if problem is not None:
        raise _damaged_round_error(store, path, problem, job_id)
    return history


def _load_stopping(store: EfsStore, path: Path) -> tuple[dict | None, str | None]:
    """Return a stopping file's object and what makes it unusable (text after the file's name), or None."""
    try:
        history = store.read_json(path)
    except FileNotFoundError:
        return None, MISSING
    except ValueError as error:
        return None, f"is damaged ({type(error).__name__}: {error})"
    problem = not_an_object_problem(history)
    return (None, f"is damaged (it {problem})") if problem is not None else (history, None)


def round_start_problem(store: EfsStore, job_id: str, round_index: int,
                        shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Return why round ``round_index`` cannot start again from its folder, or None if it can.

    These are the checks of :func:`read_round_state` and, after round 0, of
    :func:`read_stopping_history`, which the round's workers and aggregator make.
    """
    _, problem = _load_state(store, store.state_path(job_id, round_index), shapes)
    if problem is not None:
        return f"its state.npz {problem}"
    if round_index == 0:
        return None
    _, problem = _load_stopping(store, store.round_dir(job_id, round_index) / "stopping.json")
    return None if problem is None else f"its stopping.json {problem}"


def _damaged_round_error(store: EfsStore, path: Path, problem: str, job_id: str) -> DamagedRoundStateError:
    return DamagedRoundStateError(
        f"round state file '{path.relative_to(store.root)}' {problem}. Baton writes it whole and keeps it while the job "
        "can go on from it, so something else changed or removed it, and the job cannot go on from it; run "
        f"`baton resume {job_id}`: it goes back to the latest earlier round whose files are intact and trains from "
        "there again, to the same weights")


def write_round_state(store: EfsStore, job_id: str, round_index: int, params: np.ndarray, optimizer_state: dict) -> None:
    """Store the parameters and optimizer state for the start of ``round_index``."""
    arrays = {"params": params, **state_arrays(optimizer_state)}
    store.write_arrays(store.state_path(job_id, round_index), arrays)


def round_progress_path(store: EfsStore, job_id: str, round_index: int, worker: int | None) -> Path:
    """Return the path of a worker's progress file in a round, or the aggregator's when ``worker`` is None."""
    name = "aggregate-progress.json" if worker is None else f"progress-{worker}.npz"
    return store.round_dir(job_id, round_index) / name


def write_final_model(services: Services, job_id: str, model, params: np.ndarray, rounds_done: int, metrics: dict,
                      stop_reason: str) -> None:
    """Store the final parameters and a JSON description of the model on EFS.

    The parameters are stored in the targets' own units, also when the job trained on
    standardised targets (:func:`~shared.target_scaling.params_in_target_units`). When the
    data was standardised, the training statistics are copied beside the
    parameters (``model/standardize.npz``), so the model folder alone predicts from raw
    features: ``(x - mean) / scale``, without ``- mean`` when ``centered`` is false.

    Parameters
    ----------
    services : Services
    job_id : str
    model : Model
        The job's model, which describes itself in ``model.json``.
    params : ndarray of shape (n_params,)
        The parameters after the last round, in the units the job trained in.
    rounds_done : int
        The rounds aggregated, the last one included.
    metrics : dict
        The last round's metrics, stored as ``final_metrics``.
    stop_reason : str
        The stopping rule that ended the job, such as ``max_epochs``.

    Raises
    ------
    DamagedShardError
        If the manifest records standardised data and ``data/standardize.npz`` is missing
        or not the file the preparation wrote.
    """
    store = services.store
    context = services.job_context(job_id)
    model_dir = store.model_dir(job_id)
    # The manifest, not the file's presence, decides whether the model needs the statistics:
    # a statistics file deleted or replaced since the preparation fails the job before
    # anything is written, and `baton resume` prepares it again.
    standardized = bool(context.manifest["standardized"])
    if standardized:
        check_statistics_file(store, job_id, context.manifest)
    store.write_npy(model_dir / "params.npy", params_in_target_units(model, context.manifest, params))
    if standardized:
        store.write_arrays(model_dir / STATISTICS, store.read_arrays(statistics_path(store, job_id)))
    store.write_json(model_dir / "model.json", {
        "job_id": job_id,
        "model": context.spec.to_dict()["model"],
        "n_features": model.n_features,
        "classes": context.manifest["classes"],
        "standardized": standardized,
        "rounds": rounds_done,
        "stop_reason": stop_reason,
        "final_metrics": metrics,
    })


def model_info_problem(model_info: Any) -> str | None:
    if not isinstance(model_info, dict):
        return not_an_object_problem(model_info, "the object a model description is")
    if not isinstance(model_info.get("rounds"), int) or model_info["rounds"] < 1:
        return "has no positive whole number of rounds"
    if not isinstance(model_info.get("final_metrics"), dict):
        return "has no final_metrics object"
    return None if isinstance(model_info.get("stop_reason"), str) else "has no stop_reason"


def metrics_problem(metrics: Any) -> str | None:
    if not isinstance(metrics, dict):
        return not_an_object_problem(metrics, "the object a metrics file is")
    missing = [name for name in ("epoch", "train_loss", "total_cost_usd") if name not in metrics]
    return f"has no {', '.join(missing)}" if missing else None
