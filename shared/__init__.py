"""Baton: data-parallel training on AWS Lambda, chained through SQS, DynamoDB and EFS.

The package is laid out in layers. ``shared.models`` and ``shared.optim`` are pure numpy
and know nothing of AWS. ``shared.efs``, ``shared.state`` and ``shared.queues`` are small
adapters over the file system, DynamoDB and SQS. ``shared.services`` builds them for the
steps that the Lambda handlers run: start a job (``shared.starter``), run a worker task
(``shared.worker``), and reduce a slice or aggregate a round (``shared.aggregation``).

Each step is idempotent. A step either completes its effects in an order that a retry
can finish, or recognises that a message is stale and drops it:

start_job
    validate spec -> create job item (same spec: reuse) -> write spec.json -> prepare
    shards -> write round 0 state -> PREPARING to RUNNING -> send round 0 tasks
run_task
    check round is current -> read state and shard -> write the result file -> add worker to
    the round's done set -> if the set is complete, send the aggregate message (or, with
    training.reducers R > 1, the R reduce messages)
reduce_slice (R > 1 only)
    check round is current and complete -> sum slice k of every result in worker order ->
    write the reduced-<k> file -> add k to the round's reduced set -> if the set is complete, send
    the aggregate message
aggregate_round
    check round is current (and, with R > 1, its reduced set complete) -> sum the results
    in worker order, or concatenate the reduced slices -> write round r+1 state and the
    metrics file -> advance the round (conditional) -> send round r+1 tasks -> store the
    round's metrics in DynamoDB; or store the metrics and finish the job
repair (starter, after ``baton resume``; ``shared.repair``)
    check the pending repair -> prepare the shards again from unchanged sources, or clear
    the rounds from the latest intact round state on -> PREPARING to RUNNING at that round
    (conditional) -> send what the round is missing

Rounds here are 0-based indexes, as in messages, DynamoDB keys and EFS folders. What a
user reads (job errors, metrics records) carries ``round_number(index)``, which counts
from 1, as the CLI does.
"""

__version__ = "0.1.0"
