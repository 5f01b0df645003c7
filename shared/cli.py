"""The ``baton`` command line: run a job locally, or send one to a deployed stack."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from shared.spec import load_job_message

DEFAULT_LOCAL_DIR = Path(".baton")


def _read_spec(spec_file: Path) -> dict:
    """Read and validate a job spec file, exiting with the validation message if it is invalid."""
    body = spec_file.read_text(encoding="utf-8")
    try:
        load_job_message(body)
    except Exception as error:  # the CLI shows any validation error and exits
        raise click.ClickException(f"{spec_file}: {error}") from None
    return json.loads(body)


def _format_round(metrics: dict) -> str:
    parts = [f"round {metrics['round']:>5}", f"epoch {metrics['epoch']:7.3f}", f"train loss {metrics['train_loss']:.5f}"]
    if "validation_loss" in metrics:
        parts.append(f"val loss {metrics['validation_loss']:.5f}")
    if "validation_accuracy" in metrics:
        parts.append(f"val acc {metrics['validation_accuracy']:.4f}")
    if "validation_r2" in metrics:
        parts.append(f"val r2 {metrics['validation_r2']:.4f}")
    return "  ".join(parts)


@click.group()
@click.version_option(package_name="baton")
def main() -> None:
    """Baton: data-parallel training on AWS Lambda, chained through SQS and EFS."""


@main.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--local-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_LOCAL_DIR,
              show_default=True, help="Folder for the local EFS root (efs/) and the handlers' logs (logs/).")
@click.option("--import", "imports", multiple=True, metavar="SOURCE:DEST",
              help="Copy a local file or folder to DEST under the EFS root before the job starts. Repeatable.")
@click.option("--workers", "worker_lanes", type=click.IntRange(1, 64), default=None,
              help="Worker containers run at once; defaults to the job's n_workers.")
@click.option("--timeout", "timeout_seconds", type=click.FloatRange(min=1), default=3600, show_default=True,
              help="Give up waiting after this many seconds.")
@click.option("--fresh", is_flag=True, help="Delete this job's previous local files first.")
def run(spec_file: Path, local_dir: Path, imports: tuple[str, ...], worker_lanes: int | None,
        timeout_seconds: float, fresh: bool) -> None:
    """Run the job in SPEC_FILE on this machine, through the same handlers Lambda runs.

    SQS and DynamoDB are served by moto on 127.0.0.1 and EFS is a local folder.
    """
    from shared.local.session import LocalStack

    spec = _read_spec(spec_file)
    spec.setdefault("job_id", f"{spec_file.stem}-{int(time.time())}")
    job_id = spec["job_id"]
    efs_root = local_dir / "efs"
    if fresh:
        import shutil

        shutil.rmtree(efs_root / "jobs" / job_id, ignore_errors=True)

    n_workers = spec.get("training", {}).get("n_workers", 4)
    lanes = worker_lanes or min(int(n_workers), 16)
    with LocalStack(efs_root, concurrency={"worker": lanes}) as stack:
        for mapping in imports:
            source, separator, destination = mapping.partition(":")
            if not separator or not destination:
                raise click.BadParameter(f"expected SOURCE:DEST, got {mapping!r}", param_hint="--import")
            stack.import_data(source, destination)

        click.echo(f"local stack on {stack.endpoint_url}; EFS root {efs_root}; logs in {local_dir / 'logs'}")
        stack.submit(spec)
        click.echo(f"job {job_id} sent with {n_workers} workers")

        started = time.monotonic()
        record = stack.wait(job_id, timeout_seconds=timeout_seconds, on_round=lambda m: click.echo(_format_round(m)))
        elapsed = time.monotonic() - started

    click.echo("")
    if record.status != "SUCCEEDED":
        raise click.ClickException(f"job {job_id} {record.status}: {record.error}")
    summary = record.attributes
    click.echo(f"job {job_id} SUCCEEDED after {record.round} rounds in {elapsed:.1f} s")
    for name in ("train_loss", "validation_loss", "validation_accuracy"):
        if name in summary:
            click.echo(f"  {name:<20} {summary[name]:.5f}")
    click.echo(f"  model                {efs_root / 'jobs' / job_id / 'model'}")


@main.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--stage", default="dev", show_default=True, help="Stage the stack was deployed with.")
@click.option("--queue-url", default=None, help="Jobs queue URL; looked up from the stage when omitted.")
def submit(spec_file: Path, stage: str, queue_url: str | None) -> None:
    """Send the job in SPEC_FILE to a deployed stack's jobs queue.

    Uses the standard AWS credential chain and region settings.
    """
    import boto3

    spec = _read_spec(spec_file)
    spec.setdefault("job_id", f"{spec_file.stem}-{int(time.time())}")
    sqs = boto3.client("sqs")
    if queue_url is None:
        queue_url = sqs.get_queue_url(QueueName=f"baton-{stage}-jobs")["QueueUrl"]
    message_id = sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(spec))["MessageId"]
    click.echo(f"job {spec['job_id']} sent to {queue_url} (message {message_id})")


@main.command()
@click.argument("job_id")
@click.option("--stage", default="dev", show_default=True, help="Stage the stack was deployed with.")
def status(job_id: str, stage: str) -> None:
    """Show the state of JOB_ID in a deployed stack."""
    import boto3

    from shared.state import StateStore

    record = StateStore(boto3.client("dynamodb"), f"baton-{stage}-state").get_job(job_id)
    if record is None:
        raise click.ClickException(f"no job {job_id!r} in table baton-{stage}-state")
    click.echo(json.dumps({key: value for key, value in record.attributes.items() if key not in ("pk", "sk", "spec")},
                          indent=2, sort_keys=True, default=str))


# NOTE: imported here so that the export command is registered; sklearn loads only when it runs.
from shared.export import export_command  # noqa: E402

main.add_command(export_command)

if __name__ == "__main__":
    sys.exit(main())
