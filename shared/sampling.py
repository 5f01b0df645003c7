"""Which rows a worker trains on in a given round, and how many rounds a job runs.

Worker ``w`` walks through its shard one epoch at a time, in an order drawn from
``(seed, worker, epoch)``. Round ``r`` falls in epoch ``r // rounds_per_epoch`` and takes the
slice of that epoch's order at position ``r % rounds_per_epoch``. The batch therefore
depends only on the seed, the round and the worker, so a retried or duplicated task draws
exactly the same rows.
"""

from __future__ import annotations

import math

import numpy as np


def rounds_per_epoch(shard_rows: list[int], batch_size: int) -> int:
    """Return how many rounds it takes the largest shard to be seen once."""
    return max(1, math.ceil(max(shard_rows) / batch_size))


def total_rounds(shard_rows: list[int], batch_size: int, max_epochs: float, max_rounds: int | None) -> int:
    """Return the number of rounds after which the job stops, at most ``max_rounds``."""
    by_epochs = max(1, math.ceil(max_epochs * rounds_per_epoch(shard_rows, batch_size)))
    return by_epochs if max_rounds is None else min(by_epochs, max_rounds)


def epoch_of_round(round_index: int, shard_rows: list[int], batch_size: int) -> float:
    """Return the number of epochs completed once round ``round_index`` is done."""
    return (round_index + 1) / rounds_per_epoch(shard_rows, batch_size)


def batch_indices(seed: int, round_index: int, worker: int, n_rows: int, per_epoch: int, batch_size: int) -> np.ndarray:
    """Return the sorted row indices of worker ``worker``'s batch in round ``round_index``.

    The last batch of an epoch may be shorter, or empty for a shard one row smaller than
    the largest.
    """
    epoch, position = divmod(round_index, per_epoch)
    order = np.random.default_rng([seed, worker, epoch]).permutation(n_rows)
    return np.sort(order[position * batch_size:(position + 1) * batch_size])
