"""CloudWatch metrics of each round, written as embedded metric format (EMF) log lines.

Lambda sends a function's stdout to CloudWatch Logs, and CloudWatch turns each EMF line
into metrics with no API call from the function. The namespace comes from
``POWERTOOLS_METRICS_NAMESPACE`` (``Baton`` in serverless.yml) and the only dimension is
the service, so a stage has a fixed set of metrics. Job id and round go into the line as
metadata: as dimensions they would create, and bill, a new metric per job. Find a job's
values with CloudWatch Logs Insights on those fields (docs/operations.md).

Set ``POWERTOOLS_METRICS_DISABLED=true`` to skip the output, for example in tests.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "Baton"

# Round metric key -> (CloudWatch metric name, unit).
ROUND_METRICS: dict[str, tuple[str, MetricUnit]] = {
    "round_seconds": ("RoundDuration", MetricUnit.Seconds),
    "worker_seconds": ("WorkerComputeTime", MetricUnit.Seconds),
    "aggregate_seconds": ("AggregateDuration", MetricUnit.Seconds),
    "lambda_invocations": ("LambdaInvocations", MetricUnit.Count),
    "train_loss": ("TrainLoss", MetricUnit.NoUnit),
    "validation_loss": ("ValidationLoss", MetricUnit.NoUnit),
    "validation_accuracy": ("ValidationAccuracy", MetricUnit.NoUnit),
    "validation_r2": ("ValidationR2", MetricUnit.NoUnit),
    "efs_bytes_read": ("EfsBytesRead", MetricUnit.Bytes),
    "efs_bytes_written": ("EfsBytesWritten", MetricUnit.Bytes),
    "cost_usd": ("RoundCostUSD", MetricUnit.NoUnit),
}


def publish_round_metrics(job_id: str, round_index: int, metrics: dict[str, Any]) -> None:
    """Write one EMF line with the round's metrics that :data:`ROUND_METRICS` names.

    Values that are missing or not finite numbers are left out. An error while building
    or writing the line is logged and not raised, so that metrics cannot fail a round.
    """
    emitter = None
    try:
        emitter = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", DEFAULT_NAMESPACE))
        for key, (name, unit) in ROUND_METRICS.items():
            value = metrics.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                emitter.add_metric(name=name, unit=unit, value=float(value))
        emitter.add_metadata(key="job_id", value=job_id)
        emitter.add_metadata(key="round", value=round_index)
        emitter.flush_metrics()
    except Exception as error:  # noqa: BLE001 - metrics are best effort, see the docstring
        if emitter is not None:
            emitter.clear_metrics()
        logger.warning("round metrics not published", extra={"job_id": job_id, "round": round_index,
                                                              "error": f"{type(error).__name__}: {error}"})
