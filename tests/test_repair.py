"""`baton resume` repairs a job whose shards or current round state were changed on EFS.

GIVEN a job on the in-process stack that has trained a few rounds.
WHEN a prepared shard file is deleted or replaced, or the current round's state file is
damaged, the job fails. Then it is resumed, once or more than once.
THEN the resume prepares the shards again, or goes back to the latest intact round state,
and the job ends with the weights of a run without the fault. A changed data source, or
no intact round state, makes the repair refuse with the reason, and nothing is lost.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared import control, preparation, repair, shards
from shared.control import JobControlError
from shared.efs import EfsStore
from shared.errors import DamagedShardError
from shared.preparation import PARTIAL_SUFFIX, PreparationFiles, data_identity, prepare_data
from shared.repair import RepairMessage
from shared.round_files import write_final_model
from shared.spec import parse_job_spec
from shared.state import CANCELLED, FAILED, PREPARING, RUNNING, SUCCEEDED
from shared.training import build_model, build_model_for_preparation, manifest_problem
from tests.baton_jobs import breast_cancer_spec, cold_start, final_params, run_job, run_to_round, use_services

N_ROUNDS = 8


def spec_for(job_id: str) -> dict:
    return breast_cancer_spec(job_id, training={"max_rounds": N_ROUNDS})


def resume(stack, job_id: str):
    return control.resume_job(stack.services.state, stack.services.queues, job_id)


def shard_dir(efs_root: Path, job_id: str, folder: str = "shard-1") -> Path:
    return efs_root / "jobs" / job_id / "data" / folder


def flip_labels_in_place(path: Path) -> None:
    """Rewrite a shard's class codes 0 and 1 swapped: the same shape and valid values, in the same file."""
    np.save(path, 1 - np.load(path))


def flip_labels_keeping_size_and_time(path: Path) -> None:
    """Put swapped class codes at ``path`` through os.replace, with the old file's size and modification time."""
    status = path.stat()
    replacement = path.with_name("y-new.npy")
    np.save(replacement, 1 - np.load(path))
    assert replacement.stat().st_size == status.st_size
    os.utime(replacement, ns=(status.st_atime_ns, status.st_mtime_ns))
    os.replace(replacement, path)


def rewrite_rows_reversed(path: Path) -> None:
    """Rewrite a shard file's rows in reverse order through ``numpy.save``: same inode and size, new mtime."""
    np.save(path, np.load(path)[::-1].copy())


def rewrite_through_memory_map(path: Path) -> None:
    """Reverse a shard file's rows through a read-write memory map of it, as a tool editing it in place would."""
    array = np.load(path, mmap_mode="r+")
    array[:] = array[::-1].copy()
    array.flush()
    del array


def rewrite_keeping_mtime(path: Path) -> None:
    """Rewrite a shard file's rows in place, then put its old modification time back, as ``touch -d`` does."""
    status = path.stat()
    rewrite_rows_reversed(path)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert path.stat().st_mtime_ns == status.st_mtime_ns


def fail_at_round(stack, efs_root: Path, job_id: str, round_index: int, damage, spec: dict | None = None) -> None:
    """Run the job to ``round_index``, apply ``damage(job_dir)`` with cold containers, and run until it fails."""
    stack.submit(spec_for(job_id) if spec is None else {**spec, "job_id": job_id})
    run_to_round(stack, job_id, round_index)
    damage(efs_root / "jobs" / job_id)
    cold_start(stack)
    stack.run()
    record = stack.services.state.get_job(job_id)
    assert record.status == FAILED, record.error
    assert record.round == round_index


def truncate_states(*round_indexes: int):
    def damage(job_dir: Path) -> None:
        for round_index in round_indexes:
            path = job_dir / "rounds" / str(round_index) / "state.npz"
            path.write_bytes(path.read_bytes()[:100])
    return damage


def delete_shard(job_dir: Path) -> None:
    shutil.rmtree(job_dir / "data" / "shard-1")


@pytest.fixture
def reference(inprocess_stack, efs_root):
    """The weights of the fault-free run of :func:`spec_for`."""
    assert run_job(inprocess_stack, spec_for("fault-free")).status == SUCCEEDED
    return final_params(efs_root, "fault-free")


def assert_same_result(stack, efs_root: Path, job_id: str, reference: np.ndarray,
                       reference_job: str = "fault-free") -> None:
    """Assert the job succeeded with the reference's bytes, and its history has each round once."""
    record = stack.services.state.get_job(job_id)
    assert record.status == SUCCEEDED, record.error
    assert record.round == N_ROUNDS
    assert record.repair is None
    assert final_params(efs_root, job_id).tobytes() == reference.tobytes()
    rounds = stack.services.state.list_round_metrics(job_id)
    assert [entry["round"] for entry in rounds] == list(range(1, N_ROUNDS + 1))
    assert [entry["train_loss"] for entry in rounds] == [
        entry["train_loss"] for entry in stack.services.state.list_round_metrics(reference_job)]


# Shards ----------------------------------------------------------------------------------


def test_deleted_shard_rebuilt_on_resume(inprocess_stack, efs_root, reference):
    fail_at_round(inprocess_stack, efs_root, "deleted", 3, delete_shard)
    failed = inprocess_stack.services.state.get_job("deleted")
    assert "prepared shard file 'jobs/deleted/data/shard-1/y.npy' is missing" in failed.error
    assert failed.repair == "shards"

    resumed = resume(inprocess_stack, "deleted")
    assert resumed.status == PREPARING
    assert resumed.round == 3
    inprocess_stack.run()

    assert_same_result(inprocess_stack, efs_root, "deleted", reference)
    record = inprocess_stack.services.state.get_job("deleted")
    assert record.first_round == 0
    assert "rounds_rerun" not in record.attributes
    assert (shard_dir(efs_root, "deleted") / "y.npy").is_file()


@pytest.mark.parametrize("replace", [flip_labels_in_place, flip_labels_keeping_size_and_time],
                         ids=["rewritten-in-place", "replaced-same-size-and-time"])
def test_replaced_shard_detected_and_rebuilt(inprocess_stack, efs_root, reference, replace):
    fail_at_round(inprocess_stack, efs_root, "replaced", 3, lambda job_dir: replace(job_dir / "data/shard-1/y.npy"))
    failed = inprocess_stack.services.state.get_job("replaced")
    assert ("prepared shard file 'jobs/replaced/data/shard-1/y.npy' is not the file the preparation wrote"
            in failed.error)
    assert "run `baton resume replaced`" in failed.error
    assert failed.repair == "shards"
    assert not any(delivery.failed for delivery in inprocess_stack.deliveries), "a replaced shard is not retried"

    resume(inprocess_stack, "replaced")
    inprocess_stack.run()

    assert_same_result(inprocess_stack, efs_root, "replaced", reference)


def test_warm_worker_reloads_rebuilt_shards(inprocess_stack, efs_root, reference):
    # The warm services cache shard-1 memory-mapped. Rewritten in place, that mapping shows
    # the swapped labels, so after the rebuild a warm worker must map the new files.
    warm = inprocess_stack.services
    inprocess_stack.submit(spec_for("warm"))
    run_to_round(inprocess_stack, "warm", 3)
    flip_labels_in_place(shard_dir(efs_root, "warm") / "y.npy")
    cold_start(inprocess_stack)
    inprocess_stack.run()
    assert inprocess_stack.services.state.get_job("warm").status == FAILED

    resume(inprocess_stack, "warm")
    use_services(inprocess_stack, warm)
    inprocess_stack.run()

    assert_same_result(inprocess_stack, efs_root, "warm", reference)


@pytest.mark.parametrize("target, rewrite, change", [
    ("shard-1/X.npy", rewrite_rows_reversed, "it was modified (its modification time changed)"),
    ("shard-1/X.npy", rewrite_through_memory_map, "it was modified (its modification time changed)"),
    ("shard-1/X.npy", rewrite_keeping_mtime, "it was modified or its mode changed (its inode change time changed"),
    ("validation/y.npy", flip_labels_in_place, "it was modified (its modification time changed)"),
], ids=["numpy-save", "memory-map", "mtime-restored", "validation"])
def test_warm_rewrite_detected_before_training(inprocess_stack, efs_root, reference, target, rewrite, change):
    # The warm services keep every shard mapped, and a read-only memory map shows a write
    # in place. Each task checks the files again, so no round trains on the new bytes.
    inprocess_stack.submit(spec_for("warm-rewrite"))
    run_to_round(inprocess_stack, "warm-rewrite", 3)
    context = inprocess_stack.services.job_context("warm-rewrite")
    assert 1 in context.shards
    assert context.validation is not None
    rewrite(efs_root / "jobs" / "warm-rewrite" / "data" / target)
    inprocess_stack.run()

    failed = inprocess_stack.services.state.get_job("warm-rewrite")
    assert failed.status == FAILED, failed.error
    assert failed.round == 3
    assert (f"prepared shard file 'jobs/warm-rewrite/data/{target}' is not the file the preparation wrote: {change}"
            in failed.error)
    assert failed.repair == "shards"
    if target.startswith("shard-1"):
        assert 1 not in context.shards, "the stale mapping is dropped"
    else:
        assert not context.validation_loaded, "the stale mapping is dropped"

    resume(inprocess_stack, "warm-rewrite")
    inprocess_stack.run()

    assert_same_result(inprocess_stack, efs_root, "warm-rewrite", reference)


def delete_statistics(job_dir: Path) -> None:
    (job_dir / "data" / "standardize.npz").unlink()


def double_statistics_scale(job_dir: Path) -> None:
    path = job_dir / "data" / "standardize.npz"
    arrays = dict(np.load(path))
    np.savez(path, **{**arrays, "scale": arrays["scale"] * 2})


@pytest.mark.parametrize("damage, problem", [
    (delete_statistics, "is missing"),
    (double_statistics_scale, "is not the file the preparation wrote"),
], ids=["deleted", "replaced"])
def test_statistics_file_rebuilt_on_resume(inprocess_stack, efs_root, reference, damage, problem):
    fail_at_round(inprocess_stack, efs_root, "statistics", 3, damage)
    failed = inprocess_stack.services.state.get_job("statistics")
    assert f"prepared statistics file 'jobs/statistics/data/standardize.npz' {problem}" in failed.error
    assert failed.repair == "shards"

    resume(inprocess_stack, "statistics")
    inprocess_stack.run()

    assert_same_result(inprocess_stack, efs_root, "statistics", reference)
    model_dir = efs_root / "jobs" / "statistics" / "model"
    assert json.loads((model_dir / "model.json").read_text())["standardized"] is True
    assert (model_dir / "standardize.npz").read_bytes() == \
        (efs_root / "jobs" / "fault-free" / "model" / "standardize.npz").read_bytes()


def test_final_model_requires_recorded_statistics(inprocess_stack, efs_root):
    assert run_job(inprocess_stack, spec_for("final")).status == SUCCEEDED
    services = inprocess_stack.services
    context = services.job_context("final")
    model = build_model(context.spec, context.manifest)
    (efs_root / "jobs" / "final" / "data" / "standardize.npz").unlink()
    (efs_root / "jobs" / "final" / "model" / "params.npy").unlink()

    with pytest.raises(DamagedShardError, match=r"prepared statistics file 'jobs/final/data/standardize.npz' is "
                                                r"missing.*run `baton resume final`"):
        write_final_model(services, "final", model, np.zeros(model.n_params), N_ROUNDS, {}, "max_rounds")
    assert not (efs_root / "jobs" / "final" / "model" / "params.npy").exists(), "nothing is written"


def test_changed_source_refuses_rebuild(inprocess_stack, efs_root):
    fail_at_round(inprocess_stack, efs_root, "source-changed", 3, delete_shard)
    source = efs_root / "datasets" / "breast_cancer.csv"
    source.write_text("".join(source.read_text().splitlines(keepends=True)[:-10]))
    state_file = efs_root / "jobs" / "source-changed" / "rounds" / "3" / "state.npz"
    kept_state = state_file.read_bytes()

    for attempt in (1, 2):
        resume(inprocess_stack, "source-changed")
        inprocess_stack.run()

        record = inprocess_stack.services.state.get_job("source-changed")
        assert record.status == FAILED
        assert ("job 'source-changed' cannot prepare its shards again: data file 'datasets/breast_cancer.csv' "
                "(data.path) changed after the job prepared its shards from it (its size changed from") in record.error
        assert "Nothing was deleted" in record.error
        assert "re-submit the spec under a new job_id" in record.error
        assert record.repair == "shards"
        assert record.repair_attempt == attempt
        assert record.round == 3
        assert state_file.read_bytes() == kept_state
        assert (shard_dir(efs_root, "source-changed", "shard-0") / "y.npy").is_file()
        assert not shard_dir(efs_root, "source-changed").exists()


def test_repeated_resume_rebuilds_once(inprocess_stack, efs_root, reference):
    fail_at_round(inprocess_stack, efs_root, "twice", 3, delete_shard)

    first = resume(inprocess_stack, "twice")
    again = resume(inprocess_stack, "twice")
    # The job message sent again meanwhile, as a redelivery would bring it, does not prepare.
    inprocess_stack.submit(spec_for("twice"))

    assert first.status == again.status == PREPARING
    assert again.repair_attempt == first.repair_attempt == 1
    assert inprocess_stack.step("JobsQueue").body["repair"] == {"kind": "shards", "attempt": 1}
    assert inprocess_stack.services.state.get_job("twice").status == RUNNING
    rebuilt = (shard_dir(efs_root, "twice") / "y.npy").stat().st_ino
    inprocess_stack.run()

    assert_same_result(inprocess_stack, efs_root, "twice", reference)
    assert (shard_dir(efs_root, "twice") / "y.npy").stat().st_ino == rebuilt
    with pytest.raises(JobControlError, match="job 'twice' is SUCCEEDED; only a PAUSED or FAILED job can be resumed"):
        resume(inprocess_stack, "twice")


def test_cancel_during_repair_drops_it(inprocess_stack, efs_root):
    fail_at_round(inprocess_stack, efs_root, "cancelled", 3, delete_shard)
    resume(inprocess_stack, "cancelled")
    control.cancel_job(inprocess_stack.services.state, "cancelled")

    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("cancelled")
    assert record.status == CANCELLED
    assert record.round == 3
    assert not shard_dir(efs_root, "cancelled").exists()


def test_malformed_repair_message_dropped(inprocess_stack, efs_root):
    fail_at_round(inprocess_stack, efs_root, "malformed", 3, delete_shard)
    inprocess_stack.send("JobsQueue", {"job_id": "malformed", "repair": {"kind": "everything", "attempt": 1}})

    delivery = inprocess_stack.step("JobsQueue")

    assert not delivery.failed
    record = inprocess_stack.services.state.get_job("malformed")
    assert record.status == FAILED
    assert record.repair == "shards"


def test_manifest_without_identities_loads(tmp_path):
    store = EfsStore(tmp_path)
    folder = tmp_path / "jobs" / "old" / "data" / "shard-0"
    folder.mkdir(parents=True)
    np.save(folder / "y.npy", np.array([0, 1, 0]))
    np.save(folder / "X.npy", np.ones((3, 2), dtype=np.float32))
    manifest = {"sparse": False, "n_features": 2, "classes": [0, 1], "shard_rows": [3], "validation_rows": 0}
    recorded = {**manifest, "shard_files": shards.record_shard_files(store, "old", manifest)}
    np.save(folder / "y.npy", np.array([1, 0, 1]))

    # Data prepared before the identities were recorded loads as it is.
    assert shards.load_shard(store, "old", manifest, 0).y.tolist() == [1, 0, 1]
    with pytest.raises(DamagedShardError, match=r"prepared shard file 'jobs/old/data/shard-0/y.npy' is not the file "
                                                r"the preparation wrote: it was modified"):
        shards.load_shard(store, "old", recorded, 0)


def test_identities_without_ctime_load(tmp_path):
    store = EfsStore(tmp_path)
    folder = tmp_path / "jobs" / "old" / "data" / "shard-0"
    folder.mkdir(parents=True)
    np.save(folder / "y.npy", np.array([0, 1, 0]))
    np.save(folder / "X.npy", np.ones((3, 2), dtype=np.float32))
    manifest = {"sparse": False, "n_features": 2, "classes": [0, 1], "class_counts": [2, 1], "shard_rows": [3],
                "validation_rows": 0, "standardized": False}
    identities = shards.record_shard_files(store, "old", manifest)
    assert all("ctime_ns" in identity for identity in identities.values())
    without_ctime = {key: {field: value for field, value in identity.items() if field != "ctime_ns"}
                     for key, identity in identities.items()}
    rewrite_keeping_mtime(folder / "y.npy")

    # A manifest of an earlier release, without ctime_ns, is valid and loads as it did.
    assert manifest_problem({**manifest, "shard_files": without_ctime}) is None
    assert shards.load_shard(store, "old", {**manifest, "shard_files": without_ctime}, 0).y.tolist() == [0, 1, 0]
    with pytest.raises(DamagedShardError, match=r"'jobs/old/data/shard-0/y.npy' is not the file the preparation "
                                                r"wrote: it was modified or its mode changed"):
        shards.load_shard(store, "old", {**manifest, "shard_files": identities}, 0)


def test_identities_left_out_of_data_identity(inprocess_stack, efs_root):
    assert run_job(inprocess_stack, spec_for("identity")).status == SUCCEEDED
    store = inprocess_stack.services.store
    manifest_path = efs_root / "jobs" / "identity" / "data" / "manifest.json"
    manifest = store.read_json(manifest_path)
    before = data_identity(store, "identity")

    store.write_json(manifest_path, {**manifest, "shard_files": {}})
    assert data_identity(store, "identity") == before
    del manifest["shard_files"]
    store.write_json(manifest_path, manifest)
    assert data_identity(store, "identity") == before


def delete_data(job_dir: Path) -> None:
    shutil.rmtree(job_dir / "data")


def truncate_manifest(job_dir: Path) -> None:
    path = job_dir / "data" / "manifest.json"
    path.write_bytes(path.read_bytes()[:20])


@pytest.mark.parametrize("damage, problem", [
    (delete_data, "is missing: the preparation writes it whole"),
    (truncate_manifest, "is damaged (JSONDecodeError"),
], ids=["deleted-data", "truncated-manifest"])
def test_lost_manifest_rebuilt_on_resume(inprocess_stack, efs_root, reference, damage, problem):
    fail_at_round(inprocess_stack, efs_root, "no-data", 3, damage)
    failed = inprocess_stack.services.state.get_job("no-data")
    assert f"data manifest 'jobs/no-data/data/manifest.json' {problem}" in failed.error
    assert failed.repair == "shards"

    resumed = resume(inprocess_stack, "no-data")
    assert resumed.status == PREPARING
    inprocess_stack.run()

    assert_same_result(inprocess_stack, efs_root, "no-data", reference)
    assert inprocess_stack.services.state.get_job("no-data").attributes.get("rounds_rerun", 0) == 0


# Round state -----------------------------------------------------------------------------


@pytest.mark.parametrize("damaged, back_to", [((4,), 3), ((4, 3), 2)], ids=["current", "current-and-previous"])
def test_damaged_state_rewinds_to_intact_round(inprocess_stack, efs_root, reference, damaged, back_to):
    fail_at_round(inprocess_stack, efs_root, "rewound", 4, truncate_states(*damaged))
    failed = inprocess_stack.services.state.get_job("rewound")
    assert "round state file 'jobs/rewound/rounds/4/state.npz' is damaged" in failed.error
    assert failed.repair == "round_state"
    cost_before = failed.attributes["cost_usd"]

    resume(inprocess_stack, "rewound")
    assert inprocess_stack.step("JobsQueue").body["repair"]["kind"] == "round_state"
    rewound = inprocess_stack.services.state.get_job("rewound")
    assert rewound.status == RUNNING
    assert rewound.round == back_to
    assert rewound.attributes["rounds_rerun"] == 4 - back_to
    assert rewound.attributes["epoch"] == inprocess_stack.services.store.read_json(
        efs_root / "jobs" / "rewound" / "metrics" / f"{back_to}.json")["epoch"]
    assert not (efs_root / "jobs" / "rewound" / "metrics" / f"{back_to + 1}.json").exists()
    assert [entry["round"] for entry in inprocess_stack.services.state.list_round_metrics("rewound")] == \
        list(range(1, back_to + 1))
    inprocess_stack.run()

    assert_same_result(inprocess_stack, efs_root, "rewound", reference)
    record = inprocess_stack.services.state.get_job("rewound")
    # The job's cost keeps the first runs of the rounds trained again; the history has their last runs.
    history = inprocess_stack.services.state.list_round_metrics("rewound")
    assert record.attributes["cost_usd"] > cost_before
    assert record.attributes["cost_usd"] > sum(entry["cost_usd"] for entry in history)
    assert record.attributes["cost_usd"] == history[-1]["total_cost_usd"]


def remove_state(job_dir: Path) -> None:
    (job_dir / "rounds" / "4" / "state.npz").unlink()


def rewrite_state(change):
    """Return a damage that rewrites round 4's state file with ``change(arrays)``, as a whole archive."""
    def damage(job_dir: Path) -> None:
        path = job_dir / "rounds" / "4" / "state.npz"
        with np.load(path) as archive:
            arrays = change({name: archive[name] for name in archive.files})
        np.savez(path, **arrays)
    return damage


def break_stopping_state(job_dir: Path) -> None:
    (job_dir / "rounds" / "4" / "stopping.json").write_text('{"best_loss": ')


@pytest.mark.parametrize("damage, problem", [
    (remove_state, "state.npz' is missing"),
    (rewrite_state(lambda arrays: {**arrays, "params": arrays["params"][:-1]}),
     "state.npz' is damaged (its array 'params' has shape (30,), not the model's (31,))"),
    (rewrite_state(lambda arrays: {**arrays, "params": arrays["params"].astype(np.int64)}),
     "state.npz' is damaged (its array 'params' has type int64, not a float type)"),
    (break_stopping_state, "stopping.json' is damaged (JSONDecodeError"),
], ids=["missing-state", "short-params", "integer-params", "damaged-stopping"])
def test_damaged_round_file_rewinds(inprocess_stack, efs_root, reference, damage, problem):
    # Each of these failed the job with a plain error and no repair, so every resume failed again.
    fail_at_round(inprocess_stack, efs_root, "rewound", 4, damage)
    failed = inprocess_stack.services.state.get_job("rewound")
    assert f"round state file 'jobs/rewound/rounds/4/{problem}" in failed.error
    assert "run `baton resume rewound`" in failed.error
    assert failed.repair == "round_state"

    resume(inprocess_stack, "rewound")
    inprocess_stack.run()

    assert_same_result(inprocess_stack, efs_root, "rewound", reference)
    assert inprocess_stack.services.state.get_job("rewound").attributes["rounds_rerun"] == 1


def test_state_without_optimizer_slot_rewinds(inprocess_stack, efs_root):
    spec = breast_cancer_spec("momentum-ref", optimizer={"name": "momentum", "learning_rate": 0.1, "momentum": 0.9},
                              training={"max_rounds": N_ROUNDS})
    assert run_job(inprocess_stack, spec).status == SUCCEEDED
    fail_at_round(inprocess_stack, efs_root, "no-slot", 4, rewrite_state(lambda arrays: {"params": arrays["params"]}),
                  spec=spec)
    failed = inprocess_stack.services.state.get_job("no-slot")
    assert ("round state file 'jobs/no-slot/rounds/4/state.npz' is damaged (it has no array 'optimizer.velocity')"
            in failed.error)
    assert failed.repair == "round_state"

    resume(inprocess_stack, "no-slot")
    inprocess_stack.run()

    assert_same_result(inprocess_stack, efs_root, "no-slot", final_params(efs_root, "momentum-ref"), "momentum-ref")


def test_no_intact_state_refuses_rewind(inprocess_stack, efs_root):
    fail_at_round(inprocess_stack, efs_root, "all-damaged", 4, truncate_states(4, 3, 2))

    resume(inprocess_stack, "all-damaged")
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("all-damaged")
    assert record.status == FAILED
    assert ("job 'all-damaged' has no intact round state to go back to ('rounds/4': its state.npz is damaged "
            "(BadZipFile: File is not a zip file); 'rounds/3': its state.npz is damaged (BadZipFile: File is not a zip "
            "file); 'rounds/2': its state.npz is damaged (BadZipFile: File is not a zip file))") in record.error
    assert "Baton keeps the folders of the last 3 rounds (KEEP_CHECKPOINTS)" in record.error
    assert record.repair == "round_state"
    assert record.round == 4


def test_cancel_during_rewind_sets_round_back(inprocess_stack, efs_root, monkeypatch):
    fail_at_round(inprocess_stack, efs_root, "cancel-rewind", 4, truncate_states(4, 3))
    resume(inprocess_stack, "cancel-rewind")
    clear_rounds_from = repair.clear_rounds_from

    def clear_then_cancel(store, job_id, first_round):
        # The cancel lands after the rewind removed the metrics of rounds 2 and later.
        clear_rounds_from(store, job_id, first_round)
        control.cancel_job(inprocess_stack.services.state, job_id)

    monkeypatch.setattr(repair, "clear_rounds_from", clear_then_cancel)
    inprocess_stack.run()

    record = inprocess_stack.services.state.get_job("cancel-rewind")
    assert record.status == CANCELLED
    assert record.round == 2
    assert "rounds_rerun" not in record.attributes
    assert [entry["round"] for entry in inprocess_stack.services.state.list_round_metrics("cancel-rewind")] == [1, 2]
    assert sorted(path.name for path in (efs_root / "jobs" / "cancel-rewind" / "metrics").iterdir()) == \
        ["1.json", "2.json"]


def test_repeated_rewind_rewinds_once(inprocess_stack, efs_root, reference):
    fail_at_round(inprocess_stack, efs_root, "rewound-once", 4, truncate_states(4))

    resume(inprocess_stack, "rewound-once")
    resume(inprocess_stack, "rewound-once")
    inprocess_stack.step("JobsQueue")
    # The second message finds the repair ended, and only re-sends the round's missing tasks.
    inprocess_stack.step("JobsQueue")
    assert inprocess_stack.services.state.get_job("rewound-once").round == 3
    run_to_round(inprocess_stack, "rewound-once", 5)
    # A copy delivered long after, with the job rounds past its rewind.
    inprocess_stack.send("JobsQueue", RepairMessage("rewound-once", "round_state", 1).to_body())
    inprocess_stack.run()

    assert_same_result(inprocess_stack, efs_root, "rewound-once", reference)
    assert inprocess_stack.services.state.get_job("rewound-once").attributes["rounds_rerun"] == 1


def test_twin_preparation_keeps_recorded_shards(efs_root):
    # A twin delivery of the job message that reaches the last step after the first
    # delivery finished removes its own partial files, rather than renaming them over the
    # shard files that the manifest records.
    store = EfsStore(efs_root)
    spec = parse_job_spec(spec_for("twin"))
    prepare_data(store, spec, build_model_for_preparation(spec))
    labels = shard_dir(efs_root, "twin", "shard-0") / "y.npy"
    partial = labels.with_name(f"y.npy{PARTIAL_SUFFIX}")
    shutil.copyfile(labels, partial)
    inode = labels.stat().st_ino

    preparation._finalize(PreparationFiles(store, "twin"), spec)

    assert not partial.exists()
    assert labels.stat().st_ino == inode
    shards.check_shards_intact(store, "twin", store.read_json(efs_root / "jobs" / "twin" / "data" / "manifest.json"))
