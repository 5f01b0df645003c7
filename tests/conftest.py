"""Shared fixtures: dummy AWS settings, real data sets, a moto server and an in-process stack."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
A9A_DIR = PROJECT_ROOT / "examples" / "data" / "a9a"
BREAST_CANCER_CSV = PROJECT_ROOT / "tests" / "data" / "breast_cancer.csv"

# Nothing in the tests may reach a real AWS endpoint or the instance metadata service.
for name, value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ[name] = value
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture
def efs_root(tmp_path: Path) -> Path:
    """A folder standing in for EFS, holding a9a and breast_cancer under datasets/."""
    root = tmp_path / "efs"
    (root / "datasets" / "a9a").mkdir(parents=True)
    shutil.copyfile(A9A_DIR / "a9a", root / "datasets" / "a9a" / "a9a")
    shutil.copyfile(A9A_DIR / "a9a.t", root / "datasets" / "a9a" / "a9a.t")
    shutil.copyfile(BREAST_CANCER_CSV, root / "datasets" / "breast_cancer.csv")
    return root


@pytest.fixture
def moto_endpoint():
    """URL of a moto server on 127.0.0.1, in a thread of this process, stopped after the test.

    moto keeps its state per process, not per server, so resources a test creates
    carry a unique name.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def inprocess_stack(efs_root: Path):
    """The stack on moto's in-process mock, with the handlers called directly."""
    from moto import mock_aws

    from tests.inprocess import InProcessStack

    with mock_aws():
        stack = InProcessStack(efs_root)
        try:
            yield stack
        finally:
            stack.close()
