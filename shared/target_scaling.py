"""Standardised regression targets: training on ``(y - mean) / scale``, reporting in ``y``'s units.

With ``data.standardize_target`` the data preparation stores the mean and standard
deviation of the training shards' targets in the manifest, as ``target_mean`` and
``target_scale``. The shards keep the targets as they were read. Workers standardise
each batch's targets before the model's loss, so the optimizer steps through a problem
whose targets have unit variance, whatever units they were recorded in. The round
states on EFS hold that scaled problem's parameters.

The model is built with ``target_scale`` (:class:`shared.models.base.Model`), which
divides its penalty terms so that the scaled objective is the unscaled one divided by
``scale ** 2``. Everything a user sees is then in the targets' own units: the training
loss is multiplied by ``scale ** 2``, and the validation metrics, the final model and
the export use parameters mapped back with :func:`params_in_target_units`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.models import Model

# The losses and metrics of a job with scaled targets are reported in the targets' squared
# units, so a target's square must stay finite in float64, whose maximum is about 1.8e308.
# Targets up to 1e150 in magnitude have squares up to 1e300, so sums of them over up to 1e8
# rows stay finite too. The preparation rejects larger targets.
MAX_SCALED_TARGET_MAGNITUDE = 1e150


@dataclass(frozen=True)
class TargetScaling:
    """The training targets' mean and scale, which a job's regression targets are standardised with."""

    mean: float
    scale: float

    def standardize(self, y: np.ndarray) -> np.ndarray:
        """Return ``(y - mean) / scale`` in float64: the targets the model trains on."""
        return (np.asarray(y, dtype=np.float64) - self.mean) / self.scale


def target_scaling(manifest: dict) -> TargetScaling | None:
    """Return the scaling of a job's targets from its data manifest, or None when they are not scaled."""
    scale = manifest.get("target_scale")
    if scale is None:
        return None
    return TargetScaling(mean=float(manifest["target_mean"]), scale=float(scale))


def params_in_target_units(model: Model, manifest: dict, params: np.ndarray) -> np.ndarray:
    """Return the parameters of the model that predicts in the targets' units.

    For a job with scaled targets, the output layer of ``params`` is multiplied by the
    scale and its biases shifted by the mean (:meth:`Model.rescaled_output_params`). Any
    other job's ``params`` are returned as they are.
    """
    scaling = target_scaling(manifest)
    if scaling is None:
        return params
    return model.rescaled_output_params(params, scaling.scale, scaling.mean)


def loss_in_target_units(model: Model, loss: float) -> float:
    """Return a training loss of the scaled problem in the targets' squared units: ``loss * scale ** 2``.

    This is exact for the whole objective, penalty included, because the model's penalty
    is divided by ``scale ** 2`` as its squared error is. With scale 1.0 the value is
    returned unchanged, to the bit.
    """
    return loss * model.target_scale ** 2
