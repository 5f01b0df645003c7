"""The package platform check: compiled libraries must match the functions' architecture."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_package_platform.py"
HOST_ARCHITECTURE = {"x86_64": "x86_64", "aarch64": "arm64"}.get(platform.machine())


def write_template(path: Path, architecture: str) -> Path:
    template = {"Resources": {"WorkerLambdaFunction": {"Type": "AWS::Lambda::Function",
                                                        "Properties": {"Architectures": [architecture]}}}}
    path.write_text(json.dumps(template))
    return path


def package_with_numpy_library(path: Path) -> Path:
    """Zip one of this machine's numpy extension modules, as a package would hold it."""
    library = next(Path(np.__file__).parent.rglob("_multiarray_umath*.so"))
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(library, f"numpy/_core/{library.name}")
        archive.writestr("shared/__init__.py", "")
    return path


def run_check(*arguments: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, arguments)], capture_output=True, text=True)


@pytest.mark.skipif(HOST_ARCHITECTURE is None, reason=f"no Lambda architecture matches {platform.machine()}")
def test_matching_architecture_passes(tmp_path):
    result = run_check(write_template(tmp_path / "t.json", HOST_ARCHITECTURE),
                       package_with_numpy_library(tmp_path / "p.zip"))

    assert result.returncode == 0, result.stderr
    assert f"all {HOST_ARCHITECTURE}" in result.stdout


@pytest.mark.skipif(HOST_ARCHITECTURE is None, reason=f"no Lambda architecture matches {platform.machine()}")
def test_wrong_architecture_fails(tmp_path):
    other = "arm64" if HOST_ARCHITECTURE == "x86_64" else "x86_64"
    result = run_check(write_template(tmp_path / "t.json", other), package_with_numpy_library(tmp_path / "p.zip"))

    assert result.returncode == 1
    assert f"is {HOST_ARCHITECTURE}, expected {other}" in result.stderr
    assert "--platform" in result.stderr


def test_package_without_libraries_fails(tmp_path):
    package = tmp_path / "p.zip"
    with zipfile.ZipFile(package, "w") as archive:
        archive.writestr("shared/__init__.py", "")

    result = run_check(write_template(tmp_path / "t.json", "x86_64"), package)

    assert result.returncode == 1
    assert "no shared libraries" in result.stderr
