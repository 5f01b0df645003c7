"""Baton: data-parallel training on AWS Lambda, chained through SQS, DynamoDB and EFS.

The package is laid out in layers. ``shared.models`` and ``shared.optim`` are pure numpy
and know nothing of AWS. ``shared.efs``, ``shared.state`` and ``shared.queues`` are small
adapters over the file system, DynamoDB and SQS. ``shared.service`` composes them into the
three steps a Lambda handler runs: start a job, run a worker task, aggregate a round.
"""

__version__ = "0.1.0"
