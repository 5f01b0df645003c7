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

from shared.efs import EfsStore, not_an_object_problem
from shared.errors import DamagedRoundStateError
from shared.optim import state_arrays, state_from_arrays
from shared.services import Services
from shared.shards import STATISTICS, check_statistics_file, statistics_path
from shared.target_scaling import params_in_target_units


def read_round_state(store: EfsStore, job_id: str, round_index: int) -> tuple[np.ndarray, dict]:
    """Return the parameters and optimizer state stored for the start of ``round_index``.

    Raises
    ------
    DamagedRoundStateError
        If the state file is not a whole ``.npz`` archive with the parameters, or if a
        parameter or an optimizer slot is NaN or infinite. Baton writes it atomically, and only after checking
        that every parameter is finite, so only a change by something else leaves it so,
        and a retry cannot help. ``baton resume`` goes back to an earlier round.
    """
    path = store.state_path(job_id, round_index)
    try:
        arrays = store.read_arrays(path)
        params = arrays["params"]
    except (ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise _damaged_state_error(store, path, f"{type(error).__name__}: {error}", job_id) from None
    for name, values in arrays.items():
        # Diverged weights stop the job before they are written, so these were changed on EFS.
        bad = np.count_nonzero(~np.isfinite(values)) if values.dtype.kind == "f" else 0
        if bad:
            raise _damaged_state_error(store, path, f"{bad:,} of the {values.size:,} values of its array '{name}' "
                                                    f"{'is' if bad == 1 else 'are'} NaN or infinite", job_id)
    return params, state_from_arrays(arrays)


def _damaged_state_error(store: EfsStore, path: Path, reason: str, job_id: str) -> DamagedRoundStateError:
    return DamagedRoundStateError(
        f"round state file '{path.relative_to(store.root)}' is damaged ({reason}): Baton writes it whole, so it was "
        f"changed after it was written, and the job cannot go on from it; run `baton resume {job_id}`: it goes back "
        "to the latest earlier round whose state file is intact and trains from there again, to the same weights")


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
