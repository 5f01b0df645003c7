"""`bench/accuracy.py --stage-into` writes the files that the converted example specs read."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import sklearn

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SKLEARN_DATA = Path(sklearn.__file__).parent / "datasets" / "data"


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as gzip-compressed IDX: zero, zero, type 0x08, rank, sizes, bytes."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def stage(source: Path, efs_root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "bench" / "accuracy.py"), "--datasets", str(source),
                           "--only", "diabetes", "mnist_test10k", "--stage-into", str(efs_root)],
                          capture_output=True, text=True, timeout=120)


def test_stage_into_writes_example_files(tmp_path):
    source = tmp_path / "raw"
    (source / "diabetes").mkdir(parents=True)
    for name in ("diabetes_data_raw.csv.gz", "diabetes_target.csv.gz"):
        shutil.copyfile(SKLEARN_DATA / name, source / "diabetes" / name)
    (source / "mnist_test10k").mkdir()
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(source / "mnist_test10k" / "t10k-images-idx3-ubyte.gz", images)
    write_idx(source / "mnist_test10k" / "t10k-labels-idx1-ubyte.gz", np.array([7, 2, 1]))
    efs_root = tmp_path / "efs"

    first = stage(source, efs_root)
    again = stage(source, efs_root)

    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, "staging twice into one folder must work: " + again.stderr
    for spec_file in ("diabetes.json", "mnist_test10k.json"):
        data_path = json.loads((PROJECT_ROOT / "examples" / spec_file).read_text())["data"]["path"]
        assert (efs_root / data_path).is_file(), data_path
    diabetes = np.load(efs_root / "datasets" / "diabetes" / "diabetes.npz")
    assert diabetes["X"].shape == (442, 10)
    assert diabetes["y"].shape == (442,)
    mnist = np.load(efs_root / "datasets" / "mnist_test10k" / "mnist_test10k.npy")
    assert mnist.shape == (3, 785)
    assert mnist[:, -1].tolist() == [7, 2, 1]
    assert mnist[1, :784].tolist() == (images[1].ravel()).tolist()
