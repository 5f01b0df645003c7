"""A one-process reference of Baton's gradient-averaging training, for tests and benchmarks.

It runs the same algorithm as the distributed pipeline (same shards, same batches, same
order of summation over workers, same optimizer) as a plain loop with no queues, tables or
messages, so any difference from a distributed run points at the message flow. It reads
the shards the starter prepared for the job on EFS, so data preparation is shared and
tested on its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.efs import EfsStore
from shared.sampling import batch_indices, rounds_per_epoch, total_rounds
from shared.shards import load_shard, load_training_sample
from shared.spec import JobSpec
from shared.target_scaling import loss_in_target_units, params_in_target_units, target_scaling
from shared.training import GRADIENT_CHUNK_ROWS, build_model, build_optimizer, get_training_mode


def train_reference(spec: JobSpec, efs_root: str | Path) -> tuple[np.ndarray, list[float]]:
    """Train ``spec`` in one process on the shards prepared for it under ``efs_root``.

    Returns
    -------
    params : ndarray of shape (n_params,)
        The final parameters, in the targets' own units as the job stores them.
    train_losses : list of float
        The training loss of every round, in the targets' squared units.
    """
    store = EfsStore(efs_root)
    manifest = store.read_json(store.data_dir(spec.job_id) / "manifest.json")
    shards = [load_shard(store, spec.job_id, manifest, worker) for worker in range(spec.training.n_workers)]
    shard_rows = [shard.n_rows for shard in shards]

    model = build_model(spec, manifest)
    optimizer = build_optimizer(spec)
    scaling = target_scaling(manifest)
    # The same start as the distributed job: this reference checks the rounds, not the start.
    params = get_training_mode(spec, model).initial_params(
        spec, manifest, model, lambda max_rows: load_training_sample(store, spec.job_id, manifest, max_rows))
    state = optimizer.init_state(params)

    batch_size = spec.training.batch_size
    per_epoch = rounds_per_epoch(shard_rows, batch_size)
    losses = []
    for round_index in range(total_rounds(shard_rows, batch_size, spec.training.max_epochs, spec.training.max_rounds)):
        grad_sum = np.zeros_like(params)
        loss_sum = 0.0
        n_samples = 0
        for worker, shard in enumerate(shards):
            rows = batch_indices(spec.training.seed, round_index, worker, shard.n_rows, per_epoch, batch_size)
            if len(rows) == 0:
                continue
            # A worker sums its batch in chunks, and float addition is not associative, so
            # the reference adds the same chunks in the same order.
            worker_grad, worker_loss = np.zeros_like(params), 0.0
            for start in range(0, len(rows), GRADIENT_CHUNK_ROWS):
                chunk = rows[start:start + GRADIENT_CHUNK_ROWS]
                y = np.asarray(shard.y[chunk])
                loss, grad = model.loss_grad(params, shard.X[chunk], y if scaling is None else scaling.standardize(y))
                worker_grad = worker_grad + grad
                worker_loss += loss
            grad_sum += worker_grad
            loss_sum += worker_loss
            n_samples += len(rows)

        penalty, penalty_grad = model.penalty_grad(params)
        losses.append(loss_in_target_units(model, loss_sum / n_samples + penalty))
        params, state = optimizer.step(params, grad_sum / n_samples + penalty_grad, state, round_index)
        # Soft-thresholding of an L1 term with l1_method "proximal"; the identity otherwise.
        params = model.proximal(params, optimizer.learning_rate_at(round_index))
    return params_in_target_units(model, manifest, params), losses
