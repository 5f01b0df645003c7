"""Lambda handler for the jobs queue: validate a job, prepare its data, start round 0."""

from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from shared.handlers import sqs_handler
from shared.services import Services
from shared.spec import derive_job_id
from shared.starter import start_job, starter_failure_job_id


def _failure_job_id(services: Services, record: SQSRecord, job_id: str) -> str:
    # When the message's job_id belongs to a job of another spec, its errors go under the
    # message's own id, so that job stays untouched.
    return starter_failure_job_id(services, record.body, record.message_id, job_id)


handler = sqs_handler(
    "starter",
    lambda services, record, invocation: start_job(services, record.body, record.message_id),
    # start_job names the job of a message without a usable job_id after the message id.
    unnamed_job_id=derive_job_id,
    failure_job_id=_failure_job_id)
