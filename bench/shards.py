"""Worker shards of a chosen size, built from real data sets, for the kernel and memory benchmarks.

A small real data set is prepared by Baton's own preparation (:func:`shared.preparation.prepare_data`)
into a one-worker job. Its shard's rows are then repeated until the shard reaches the
requested row count, and written to a new job in the same on-EFS layout: ``X.npy``
(float32) or the CSR triplet ``X-data.npy``, ``X-indices.npy``, ``X-indptr.npy``, plus
``y.npy``, the manifest, the spec and the round 0 state. Workers then load the new shard
with :func:`shared.shards.load_shard`, memory-mapped, as they load any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import DATASETS, stage_file
from shared.efs import EfsStore
from shared.preparation import prepare_data
from shared.sampling import initial_params_rng
from shared.round_files import write_round_state
from shared.shards import shard_folder
from shared.spec import parse_job_spec
from shared.training import build_model, build_optimizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@dataclass(frozen=True)
class SourceSet:
    """A real data set under the shared data sets folder, and the example spec that reads it."""

    name: str
    example: str
    files: tuple[str, ...]


# higgs_7k: 7,000 dense rows of 28 features; a9a: 32,561 sparse rows of 123 features.
HIGGS = SourceSet("higgs_7k", "higgs_7k.json", ("binary.train", "binary.test"))
A9A = SourceSet("a9a", "a9a.json", ("a9a", "a9a.t"))


def _stage_source(efs_root: Path, source: SourceSet) -> None:
    target = efs_root / "datasets" / source.name
    target.mkdir(parents=True, exist_ok=True)
    for name in source.files:
        stage_file(DATASETS / source.name / name, target / name)


def prepare_source(efs_root: Path, source: SourceSet) -> str:
    """Prepare ``source`` as a one-worker job with Baton's preparation; return the job id."""
    _stage_source(efs_root, source)
    raw = json.loads((EXAMPLES / source.example).read_text())
    job_id = f"source-{source.name}"
    raw["job_id"] = job_id
    raw["training"]["n_workers"] = 1
    spec = parse_job_spec(raw)
    store = EfsStore(efs_root)
    manifest_path = store.data_dir(job_id) / "manifest.json"
    if not manifest_path.exists():
        store.write_json(store.spec_path(job_id), raw)
        prepare_data(store, spec, build_model(spec, {"n_features": 1, "classes": None}))
    return job_id


def _write_npy(path: Path, parts: list[np.ndarray]) -> None:
    total = sum(len(part) for part in parts)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=parts[0].dtype, shape=(total, *parts[0].shape[1:]))
    start = 0
    for part in parts:
        out[start:start + len(part)] = part
        start += len(part)
    out.flush()
    del out


def tile_job(efs_root: Path, source_job: str, job_id: str, n_rows: int, batch_size: int) -> None:
    """Write job ``job_id``: one shard of ``n_rows`` rows repeating ``source_job``'s shard.

    The spec is the source job's with ``training.batch_size`` set to ``batch_size``; the
    round 0 state is the model's initial parameters.
    """
    store = EfsStore(efs_root)
    raw = store.read_json(store.spec_path(source_job))
    raw["job_id"] = job_id
    raw["training"]["batch_size"] = batch_size
    spec = parse_job_spec(raw)
    manifest = store.read_json(store.data_dir(source_job) / "manifest.json")
    source_folder = shard_folder(store, source_job, 0)
    folder = shard_folder(store, job_id, 0)
    folder.mkdir(parents=True, exist_ok=True)

    # The source files are read as stored, so the tiled ones keep their dtypes.
    y = np.load(source_folder / "y.npy")
    whole, rest = divmod(n_rows, len(y))
    _write_npy(folder / "y.npy", [y] * whole + [y[:rest]])
    if manifest["sparse"]:
        data, indices, indptr = (np.load(source_folder / f"X-{name}.npy") for name in ("data", "indices", "indptr"))
        nnz, head = indptr[-1], indptr[rest]
        _write_npy(folder / "X-data.npy", [data] * whole + [data[:head]])
        _write_npy(folder / "X-indices.npy", [indices] * whole + [indices[:head]])
        _write_npy(folder / "X-indptr.npy", [indptr[:-1] + copy * nnz for copy in range(whole)]
                   + [indptr[:rest + 1] + whole * nnz])
    else:
        X = np.load(source_folder / "X.npy")
        _write_npy(folder / "X.npy", [X] * whole + [X[:rest]])

    tiled_manifest = {**manifest, "shard_rows": [n_rows], "validation_rows": 0}
    if manifest.get("class_counts"):
        counts = np.bincount(np.asarray(np.load(folder / "y.npy", mmap_mode="r"), dtype=np.int64),
                             minlength=len(manifest["classes"]))
        tiled_manifest["class_counts"] = counts.tolist()
    store.write_json(store.data_dir(job_id) / "manifest.json", tiled_manifest)
    store.write_json(store.spec_path(job_id), raw)

    model = build_model(spec, tiled_manifest)
    params = model.init_params(initial_params_rng(spec.training.seed))
    write_round_state(store, job_id, 0, params, build_optimizer(spec).init_state(params))


def shard_bytes(store: EfsStore, job_id: str) -> int:
    """Return the bytes of the ``.npy`` files of ``job_id``'s shard 0 on disk."""
    return sum(path.stat().st_size for path in shard_folder(store, job_id, 0).glob("*.npy"))
