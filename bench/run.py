"""Measure Baton's speed and memory on this machine and write docs/benchmarks.md.

Usage: ``make bench`` (or ``.venv/bin/python bench/run.py``). Takes about a minute.

What is measured:

1. Round latency through the local runtime: a9a, logistic regression, 4 workers, with
   moto's server and the handlers in their own processes, as ``make demo`` runs them.
2. The worker's maths alone: one mini-batch loss and gradient on a9a's sparse shards.
3. EFS store writes and reads of a round state, on the local disk.
4. The peak memory of a process that loads a shard and computes one gradient.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from shared.data import read_libsvm  # noqa: E402
from shared.efs import EfsStore  # noqa: E402
from shared.models import LogisticRegression  # noqa: E402

A9A = PROJECT_ROOT / "examples" / "data" / "a9a"
OUTPUT = PROJECT_ROOT / "docs" / "benchmarks.md"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {memory_gib:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}")


def bench_local_runtime(rounds: int = 60) -> dict:
    """Run a9a through the local runtime and time each round from its metrics files."""
    from shared.local.session import LocalStack

    spec = json.loads((PROJECT_ROOT / "examples" / "a9a.json").read_text())
    spec["job_id"] = "bench-a9a"
    spec["training"]["max_rounds"] = rounds
    workdir = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    try:
        with LocalStack(workdir / "efs") as stack:
            stack.import_data(A9A, "datasets/a9a")
            started = time.monotonic()
            stack.submit(spec)
            arrivals = []
            record = stack.wait(spec["job_id"], timeout_seconds=600,
                                on_round=lambda metrics: arrivals.append(time.monotonic()))
            total = time.monotonic() - started
        if record.status != "SUCCEEDED":
            raise RuntimeError(f"benchmark job {record.status}: {record.error}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    gaps = np.diff(arrivals)
    return {
        "rounds": rounds,
        "total_seconds": total,
        "first_round_seconds": arrivals[0] - started,
        "median_round_seconds": float(np.median(gaps)),
        "p90_round_seconds": float(np.percentile(gaps, 90)),
    }


def bench_gradient(repeats: int = 20) -> list[dict]:
    """Time one logistic-regression loss and gradient on a9a rows, sparse, float32 storage."""
    X, y = read_libsvm(A9A / "a9a", 123)
    y = (y > 0).astype(np.int64)
    model = LogisticRegression(n_features=123, alpha=1e-5)
    params = np.random.default_rng(0).normal(size=model.n_params)
    rows_per_worker = X.shape[0] // 4
    results = []
    for batch_size in (256, 4096, rows_per_worker):
        rows = np.sort(np.random.default_rng(1).choice(rows_per_worker, size=batch_size, replace=False))
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            model.loss_grad(params, X[rows], y[rows])
            timings.append(time.perf_counter() - started)
        results.append({"batch_size": batch_size, "median_ms": 1000 * statistics.median(timings)})
    return results


def bench_store(n_params: int = 1_000_000, repeats: int = 10) -> dict:
    """Time an atomic write and a read of a round state with ``n_params`` float64 values."""
    workdir = Path(tempfile.mkdtemp(prefix="baton-bench-store-"))
    try:
        store = EfsStore(workdir)
        arrays = {"params": np.random.default_rng(0).normal(size=n_params),
                  "optimizer.velocity": np.zeros(n_params)}
        path = store.state_path("bench", 0)
        writes, reads = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            store.write_arrays(path, arrays)
            writes.append(time.perf_counter() - started)
            started = time.perf_counter()
            store.read_arrays(path)
            reads.append(time.perf_counter() - started)
        size_mib = path.stat().st_size / 2**20
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"n_params": n_params, "size_mib": size_mib,
            "write_ms": 1000 * statistics.median(writes), "read_ms": 1000 * statistics.median(reads)}


def bench_worker_memory() -> float:
    """Return the peak RSS in MiB of a process that reads a9a, shards it and computes a gradient."""
    code = (
        "import resource, numpy as np\n"
        "from shared.data import read_libsvm\n"
        "from shared.models import LogisticRegression\n"
        f"X, y = read_libsvm(__import__('pathlib').Path({str(A9A / 'a9a')!r}), 123)\n"
        "y = (y > 0).astype(np.int64)\n"
        "model = LogisticRegression(n_features=123)\n"
        "model.loss_grad(np.zeros(model.n_params), X[:8140], y[:8140])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    return int(output.stdout.strip()) / 1024


def main() -> None:
    print("local runtime ...", flush=True)
    runtime = bench_local_runtime()
    print("gradient ...", flush=True)
    gradients = bench_gradient()
    print("store ...", flush=True)
    store = bench_store()
    print("memory ...", flush=True)
    memory_mib = bench_worker_memory()

    lines = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (`bench/run.py`), which rewrites this page. Figures are from one run on",
        f"the machine below, so treat them as indications, not guarantees. Machine: {machine_description()}.",
        f"Measured on {time.strftime('%Y-%m-%d')}.",
        "",
        "## Round latency through the local runtime",
        "",
        f"a9a, logistic regression, 4 workers, batch 256 per worker, {runtime['rounds']} rounds. moto's server on",
        "127.0.0.1 serves SQS and DynamoDB, and each function runs in its own warm processes, as in `make demo`.",
        "A round is the time between two consecutive rounds' metrics appearing: four task messages, four",
        "gradients, four DynamoDB updates, one aggregate message, one optimizer step with a validation pass",
        "over a9a's 16,281 test rows.",
        "",
        "| measure | seconds |",
        "| --- | --- |",
        f"| whole job, from sending the spec | {runtime['total_seconds']:.2f} |",
        f"| first round (includes data preparation and cold starts) | {runtime['first_round_seconds']:.2f} |",
        f"| median round | {runtime['median_round_seconds']:.3f} |",
        f"| 90th percentile round | {runtime['p90_round_seconds']:.3f} |",
        "",
        "These figures do not carry over to AWS, where SQS delivery and Lambda invocation latency add to",
        "each round; no AWS run has been measured yet.",
        "",
        "## Worker maths",
        "",
        "One loss and gradient of logistic regression on a9a rows (sparse CSR, float32 storage, float64",
        "accumulation), median of 20 runs.",
        "",
        "| rows in the batch | milliseconds |",
        "| --- | --- |",
        *[f"| {entry['batch_size']:,} | {entry['median_ms']:.2f} |" for entry in gradients],
        "",
        "## Round state on the file system",
        "",
        f"An atomic write (temporary file, fsync, rename) and a read of a round state with {store['n_params']:,}",
        f"parameters and a momentum buffer ({store['size_mib']:.1f} MiB), on the local disk, median of 10. EFS adds",
        "network latency and its own throughput limits on top.",
        "",
        "| operation | milliseconds |",
        "| --- | --- |",
        f"| write | {store['write_ms']:.1f} |",
        f"| read | {store['read_ms']:.1f} |",
        "",
        "## Worker memory",
        "",
        f"Peak resident memory of a Python process that parses all of a9a and computes one gradient on a",
        f"quarter of it: {memory_mib:.0f} MiB. A Lambda worker reads only its memory-mapped shard, so it needs",
        "less than this. The stack's default worker memory, 1,769 MB, is the setting at which AWS's Lambda",
        "documentation states a function gets the equivalent of one full vCPU.",
        "",
    ]
    OUTPUT.write_text("\n".join(lines))
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
