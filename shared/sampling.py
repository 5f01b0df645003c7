"""Which rows each worker's shard contains, which of them it trains on in a round, and how many rounds run.

:func:`split_rows` deals a job's rows out to the workers' shards and the validation rows,
in an order drawn from the spec's seed. Within its shard, worker ``w`` then walks through
the rows one epoch at a time, in an order drawn from ``(seed, worker, epoch)``. Round
``r`` falls in epoch ``r // rounds_per_epoch`` and takes the slice of that epoch's order
at position ``r % rounds_per_epoch``. The batch therefore depends only on the seed, the
round and the worker, so a retried or duplicated task draws exactly the same rows.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.sparse as sp

# A batch larger than this share of the shard is sorted through a boolean mask of the
# shard's rows, which takes linear time, instead of by a comparison sort.
_MASK_SORT_SHARE = 1 / 16

# The job's other random draws use seed sequences of two words, the spec's seed and one of
# these. Each seed sequence differs from the others and from a worker's three-word
# (seed, worker, epoch) batch order, so each draw has its own stream. Changing a value
# changes every job's results.
INITIAL_PARAMS_STREAM = 0x1417
DATA_SPLIT_STREAM = 0x5EED


def initial_params_rng(seed: int) -> np.random.Generator:
    """Return the random generator that draws a job's round-0 parameters."""
    return np.random.default_rng([seed, INITIAL_PARAMS_STREAM])


def data_split_rng(seed: int) -> np.random.Generator:
    """Return the random generator that orders the rows before they are split into shards and validation."""
    return np.random.default_rng([seed, DATA_SPLIT_STREAM])


def split_rows(n_rows: int, n_workers: int, validation_rows: int, seed: int,
               labels: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Split row indices, shuffled with ``seed``, into worker shards and a held-out part.

    Returns the sorted row indices of each shard (sizes differ by at most one) and of the
    validation part, which is empty when ``validation_rows`` is 0.

    Without ``labels`` the first ``validation_rows`` of a seeded permutation are held out
    and the rest is cut into ``n_workers`` contiguous pieces. With ``labels`` (encoded
    classes) the split is stratified. Rows are ordered by their rank within their class
    divided by the class size, so every prefix of that order contains each class in
    proportion, and the held-out part is such a prefix. The remaining rows are dealt out
    class by class, round-robin over the workers. Each class starts at the worker where
    the previous one stopped. So each shard's count of a class is within one of every
    other shard's, and so are the shard sizes.
    """
    order = data_split_rng(seed).permutation(n_rows)
    if labels is None:
        validation = np.sort(order[:validation_rows])
        shards = [np.sort(part) for part in np.array_split(order[validation_rows:], n_workers)]
        return shards, validation

    labels = np.asarray(labels, dtype=np.int64)[order]
    counts = np.bincount(labels)
    # Rank of each row among the rows of its class, in permutation order.
    by_class = np.argsort(labels, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    ranks = np.empty(n_rows, dtype=np.int64)
    ranks[by_class] = np.arange(n_rows) - np.repeat(starts, counts)
    spread = (ranks + 0.5) / counts[labels]
    stratified = order[np.argsort(spread, kind="stable")]

    validation = np.sort(stratified[:validation_rows])
    rest = stratified[validation_rows:]
    # A stable sort by class keeps each class's rows in permutation order.
    row_labels = np.empty_like(labels)
    row_labels[order] = labels
    rest = rest[np.argsort(row_labels[rest], kind="stable")]
    shards = [np.sort(rest[worker::n_workers]) for worker in range(n_workers)]
    return shards, validation


def rounds_per_epoch(shard_rows: list[int], batch_size: int) -> int:
    """Return how many rounds it takes the largest shard to be seen once."""
    return max(1, math.ceil(max(shard_rows) / batch_size))


def total_rounds(shard_rows: list[int], batch_size: int, max_epochs: float, max_rounds: int | None) -> int:
    """Return the number of rounds after which the job stops, at most ``max_rounds``."""
    by_epochs = max(1, math.ceil(max_epochs * rounds_per_epoch(shard_rows, batch_size)))
    return by_epochs if max_rounds is None else min(by_epochs, max_rounds)


# A worker draws the same epoch order in every round of the epoch, and its training mode
# requests the same batch once per chunk of rows, so both are kept for a few calls. Two
# entries hold at most two arrays of n_rows int64 each.
@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, worker: int, epoch: int, n_rows: int) -> np.ndarray:
    order = np.random.default_rng([seed, worker, epoch]).permutation(n_rows)
    order.flags.writeable = False
    return order


def _sorted_rows(rows: np.ndarray, n_rows: int) -> np.ndarray:
    """Return the distinct row indices ``rows`` in increasing order."""
    if len(rows) <= n_rows * _MASK_SORT_SHARE:
        # Sorting a copy in place skips np.sort's wrapper, a fixed cost as large as the
        # sort of a 128-row batch.
        rows = rows.copy()
        rows.sort()
        return rows
    selected = np.zeros(n_rows, dtype=bool)
    selected[rows] = True
    return np.flatnonzero(selected)


@functools.lru_cache(maxsize=2)
def batch_indices(seed: int, round_index: int, worker: int, n_rows: int, per_epoch: int, batch_size: int) -> np.ndarray:
    """Return the sorted row indices of worker ``worker``'s batch in round ``round_index``.

    NOTE: the rows are spread over the shard, so on EFS a batch costs one page read per
    row that is not cached (see docs/planner.md); contiguous batches would cost one read.

    The last batch of an epoch may be shorter, or empty for a shard one row smaller than
    the largest. The returned array is read-only, because repeated calls with the same
    arguments return the same array.
    """
    epoch, position = divmod(round_index, per_epoch)
    start = min(position * batch_size, n_rows)
    stop = min(start + batch_size, n_rows)
    if start == 0 and stop == n_rows:
        # The sorted whole of any permutation is every row in order.
        rows = np.arange(n_rows, dtype=np.int64)
    else:
        rows = _sorted_rows(_epoch_order(seed, worker, epoch, n_rows)[start:stop], n_rows)
    rows.setflags(write=False)
    return rows


def take_rows(X, rows: np.ndarray, dtype=None):
    """Return the rows ``rows`` (sorted and distinct) of ``X``, as a slice when they are contiguous.

    A slice of a dense memory-mapped array is a view, so a chunk of a batch that covers a
    contiguous run of the shard, such as every chunk of a whole-shard batch, is read in
    place instead of copied by fancy indexing. The values are the same either way.

    Parameters
    ----------
    X : ndarray or scipy.sparse.csr_matrix
    rows : ndarray of int
        Sorted, distinct row indices.
    dtype : numpy dtype, optional
        The dtype of the returned values, converted as the rows are gathered. For CSR
        input only the values change type: the column indices and row pointers are the
        gathered ones, so a converted CSR chunk costs one matrix construction, not two.
    """
    if not isinstance(X, np.ndarray):
        # A sparse matrix; isinstance is the cheaper test for the common dense case.
        return _take_csr_rows(X, rows, dtype)
    if len(rows) and int(rows[-1]) - int(rows[0]) == len(rows) - 1:
        chunk = X[int(rows[0]):int(rows[-1]) + 1]
    elif X.ndim == 1:
        chunk = X[rows]
    else:
        # ndarray.take copies whole rows. Fancy indexing copies a 2-D array's rows value
        # by value, which took 2.5 to 3 times as long for 16 to 4096 rows of 28 float32
        # (measured with numpy 2.4 on a 2-core AMD EPYC).
        chunk = X.take(rows, axis=0)
    return chunk if dtype is None else chunk.astype(dtype, copy=False)


def _take_csr_rows(X, rows: np.ndarray, dtype) -> sp.csr_matrix:
    if X.format != "csr":
        X = X.tocsr()
    indptr = X.indptr
    n_taken = len(rows)
    if n_taken and int(rows[-1]) - int(rows[0]) == n_taken - 1:
        # Built from slices of the shard's arrays, which is faster than scipy's row slicing.
        # NOTE: scipy (checked with 1.17) still copies the two slices, because its
        # constructor copies a view that is less than half of its base array.
        first, stop = int(rows[0]), int(rows[-1]) + 1
        begin, end = int(indptr[first]), int(indptr[stop])
        data, indices = X.data[begin:end], X.indices[begin:end]
        taken_indptr = indptr[first:stop + 1] - begin
    else:
        # Gathered here instead of by scipy's fancy indexing, whose checks and dtype
        # choices cost more than the gather of a small batch. The stored order of every
        # row is kept, so products over the chunk add the same terms in the same order.
        starts = indptr[rows]
        lengths = indptr[rows + 1] - starts
        taken_indptr = np.zeros(n_taken + 1, dtype=indptr.dtype)
        np.cumsum(lengths, out=taken_indptr[1:])
        # Position k of the chunk's values comes from position k + (start - new start) of its row.
        positions = np.repeat(starts - taken_indptr[:-1], lengths)
        positions += np.arange(len(positions), dtype=positions.dtype)
        data, indices = X.data[positions], X.indices[positions]
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return sp.csr_matrix((data, indices, taken_indptr), shape=(n_taken, X.shape[1]), copy=False)
