"""Lambda handler for the jobs queue: validate a job, prepare its data, start round 0."""

from shared.handlers import sqs_handler
from shared.service import start_job

handler = sqs_handler("starter", lambda services, record, invocation: start_job(services, record.body, record.message_id))
