"""Exceptions raised by Baton, and the helpers that quote data values in their messages.

Every error derives from :class:`BatonError`. The split that matters to a handler is
whether a retry can help: :class:`PermanentError` and its subclasses mean the input is
wrong, so the job is marked failed and the message is dropped; anything else is treated as
transient and the message goes back to its queue.
"""

from collections.abc import Callable, Sequence
from typing import Any

# The start of the error of a data file that does not exist. ``baton run`` looks for it in
# its own job's error, to name the file's place in the local EFS folder.
DATA_FILE_NOT_FOUND = "data file not found"

# Characters of one value from a data file, such as a token or a header name, that a message
# quotes. The rest is counted instead, so that a long value keeps its message short enough to
# store in the job's item.
MAX_QUOTED_CHARS = 40


def quote_value(text: str, max_chars: int = MAX_QUOTED_CHARS) -> str:
    """Return ``text`` quoted as ``repr`` quotes it, cut after ``max_chars`` characters with its length added."""
    if len(text) <= max_chars:
        return repr(text)
    return f"{text[:max_chars]!r}... ({len(text):,} characters)"


def preview_list(items: Sequence[Any], max_items: int, format_item: Callable[[Any], str] = repr) -> str:
    """Return the first ``max_items`` of ``items`` as a Python list for a message, with the count of the others."""
    listed = ", ".join(format_item(item) for item in items[:max_items])
    if len(items) <= max_items:
        return f"[{listed}]"
    return f"[{listed}, ... and {len(items) - max_items:,} more]"


class BatonError(Exception):
    """Base class of every error Baton raises on purpose."""


class PermanentError(BatonError):
    """An error that a retry cannot fix: the job fails and the message is not retried."""


class JobSpecError(PermanentError):
    """A job spec is malformed: a field is missing, unknown, of the wrong type or out of range.

    Parameters
    ----------
    field : str
        Dotted path of the offending field, for example ``"optimizer.learning_rate"``.
    problem : str
        What is wrong with it and how to fix it.
    """

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"invalid job spec field '{field}': {problem}")


class InvalidMessageError(PermanentError):
    """A task or aggregate message is malformed.

    Baton's own functions never send such a message, so it is dropped and logged, and the
    job it names is left alone: a stray message must not fail a running job.
    """


class DataError(PermanentError):
    """A data set is missing, empty, malformed or does not fit the model."""


class RepairableDataError(DataError):
    """A file of a started job was changed on EFS in a way that ``baton resume`` repairs.

    The handler stores :attr:`repair` on the failed job's item, and a resume of the job
    sends the starter a repair message of that kind (:mod:`shared.repair`).
    """

    repair: str = ""


class DamagedShardError(RepairableDataError):
    """A prepared shard file, or the training statistics file, is missing, damaged or replaced since the preparation.

    ``baton resume`` prepares the job's shards again from its data source, if that source
    is unchanged, and goes on from the job's current round.
    """

    repair = "shards"


class DamagedRoundStateError(RepairableDataError):
    """A round's state file (``rounds/<r>/state.npz``) was changed after the aggregator wrote it.

    ``baton resume`` goes back to the latest round whose state file is intact and trains
    the rounds from there again.
    """

    repair = "round_state"


# The start of every DivergenceError message, before the round number. Commands look for it
# in a failed job's error.
DIVERGED_WORDS = "training diverged in round"


class DivergenceError(PermanentError):
    """Training produced a NaN or infinite loss or weight."""


class JobConflictError(PermanentError):
    """A job id is already taken by a job with a different spec."""


class ResultFileError(PermanentError):
    """A worker's or reducer's result file on EFS does not belong to the round that reads it.

    Its header, length or trailer does not match the job, round and worker or slice
    expected. Result files are written atomically and the round already records the file's
    writer as done, so no retry rewrites the file: the job fails on the first delivery.
    """


class EfsNotWritableError(BatonError):
    """The EFS mount is missing or not writable by this function's user.

    Not permanent: the message is retried, so jobs continue once the mount is fixed. A
    message that keeps failing is dead-lettered and its job marked failed with this text.
    """


class DamagedFileError(BatonError):
    """A JSON file that Baton wrote on EFS is missing, unreadable or no longer a JSON object.

    Raised by the commands a person runs on a job's files, so that they end in one line
    naming the file and what to do.
    """


class StaleMessageError(BatonError):
    """A message refers to a round or job state that has already moved on.

    Handlers drop such messages after logging them; they are not failures.
    """


class InjectedFault(BatonError):
    """A fault raised on purpose by the fault injector in tests."""
