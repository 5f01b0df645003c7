"""Feature standardisation: the scale of each feature, and rows scaled with it.

The preparation (:mod:`shared.preparation`) computes the training rows' mean and
variance and scales the shards with them. A trained model's predictions on new rows
(:mod:`shared.export`) scale those rows the same way.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def standardization_scale(variance: np.ndarray, mean: np.ndarray, count: float) -> np.ndarray:
    """Return the standard deviation of each feature, with 1 for constant features.

    A constant feature is left as it is instead of being divided by a rounding error, as
    scikit-learn's ``StandardScaler`` does. A feature counts as constant when its variance
    is no larger than the error that summing ``count`` rows in float64 can leave in it,
    ``count * eps * variance + (count * |mean| * eps) ** 2``, so a constant column of
    large values (1e6, say) stays unscaled too.

    Parameters
    ----------
    variance, mean : ndarray of shape (n_features,)
        Of the training rows.
    count : float
        The number of training rows.
    """
    variance = np.maximum(variance, 0.0)
    eps = np.finfo(np.float64).eps
    rounding = count * eps * variance + (count * np.abs(mean) * eps) ** 2
    scale = np.sqrt(variance)
    scale[(variance <= rounding) | (scale < 10 * eps)] = 1.0
    return scale


def standardize_rows(X, mean: np.ndarray | None, scale: np.ndarray):
    """Return ``(X - mean) / scale`` in float64, or ``X / scale`` when ``mean`` is None.

    ``mean`` is None for a job whose training data was sparse, which is scaled but not
    centred. Its rows may still come dense, as a user's array to predict on.
    """
    if sp.issparse(X):
        return sp.csr_matrix(X.astype(np.float64).multiply(1.0 / scale).tocsr())
    X = np.asarray(X, dtype=np.float64)
    return X / scale if mean is None else (X - mean) / scale
