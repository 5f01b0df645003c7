"""K-means clustering, trained by distributed Lloyd steps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from shared.errors import DataError, JobSpecError
from shared.models.base import Model


class KMeans(Model):
    """K-means clustering with centroids as parameters.

    The parameter vector is the ``(n_clusters, n_features)`` centroid matrix flattened in
    C order. Each round, every worker returns :meth:`partial_statistics` of its rows (the
    per-cluster sums and counts of the rows nearest to each centroid) and the aggregator
    calls :meth:`combine_statistics`, which moves every centroid to the mean of its rows.
    That is one Lloyd iteration over all the rows the workers saw.

    :meth:`loss_grad` is also provided: the loss is the inertia (the sum of squared
    distances from each row to its nearest centroid) and its gradient with respect to
    centroid ``k`` is ``2 * (count_k * c_k - sum_k)``. A gradient step of size
    ``1 / (2 * count_k)`` on centroid ``k`` is the Lloyd update.

    Parameters
    ----------
    n_features : int
        Number of input columns, >= 1.
    n_classes : int, default=2
        Ignored, because clustering uses no labels.
    alpha : float, default=0.0
        Ignored, because k-means has no penalty.
    n_clusters : int, default=8
        Number of centroids, >= 1.

    Notes
    -----
    Start from :meth:`init_params_from_data`, which runs k-means++ on a sample of rows.
    :meth:`init_params` has no data and draws standard-normal centroids, which suits
    standardised features only.
    """

    name = "kmeans"
    task = "clustering"
    training_mode = "statistics"
    ignored_arguments = ("alpha",)

    def __init__(self, n_features: int, n_classes: int = 2, alpha: float = 0.0, n_clusters: int = 8,
                 **hyperparameters):
        super().__init__(n_features, n_classes, alpha, **hyperparameters)
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
            raise JobSpecError("model.n_clusters", f"got {n_clusters!r}; expected an integer >= 1")
        self.n_clusters = int(n_clusters)

    @property
    def n_params(self) -> int:
        return self.n_clusters * self.n_features

    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(self.n_params)

    def init_params_from_data(self, X, rng: np.random.Generator) -> np.ndarray:
        """Return centroids chosen from the rows of ``X`` by :meth:`kmeans_plus_plus_init`."""
        return self.kmeans_plus_plus_init(X, rng)

    def kmeans_plus_plus_init(self, X, rng: np.random.Generator, n_local_trials: int | None = None) -> np.ndarray:
        """Choose initial centroids among the rows of ``X`` by greedy k-means++.

        The first centroid is a uniformly random row. For each further centroid,
        ``n_local_trials`` candidate rows are drawn with probability proportional to their
        squared distance to the nearest centroid so far. The candidate that lowers the
        inertia most is kept. This is k-means++ (Arthur and Vassilvitskii, 2007) in the
        greedy variant of scikit-learn 1.9.1, which uses the same default trial count.

        Parameters
        ----------
        X : ndarray or scipy.sparse.csr_matrix of shape (n_samples, n_features)
            A sample of training rows, n_samples >= n_clusters. The cost is
            ``O(n_samples * n_clusters * n_local_trials)`` distance evaluations, so pass
            a sample, not a whole large data set.
        rng : numpy.random.Generator
        n_local_trials : int, default=None
            Candidates per centroid, >= 1. None means ``2 + floor(ln(n_clusters))``.

        Returns
        -------
        params : ndarray of shape (n_clusters * n_features,)

        Raises
        ------
        DataError
            If ``X`` has fewer rows than ``n_clusters``.
        """
        X = self._check_X(X)
        n_samples = X.shape[0]
        if n_samples < self.n_clusters:
            raise DataError(
                f"k-means++ needs at least n_clusters={self.n_clusters} rows, got {n_samples}; "
                f"lower model.n_clusters to at most {n_samples}, or give the job more training rows")
        if n_local_trials is None:
            n_local_trials = 2 + int(math.log(self.n_clusters))

        row_norms = _squared_row_norms(X)
        chosen = [int(rng.integers(n_samples))]
        closest = _squared_distances(X, row_norms, _dense_rows(X, chosen))[:, 0]

        for _ in range(1, self.n_clusters):
            potential = closest.sum()
            if potential > 0.0:
                candidates = rng.choice(n_samples, size=n_local_trials, p=closest / potential)
            else:
                # Every row coincides with a chosen centroid, so any row is as good.
                candidates = rng.integers(n_samples, size=n_local_trials)

            candidate_distances = _squared_distances(X, row_norms, _dense_rows(X, candidates))
            new_closest = np.minimum(closest[:, np.newaxis], candidate_distances)
            best = int(np.argmin(new_closest.sum(axis=0)))
            chosen.append(int(candidates[best]))
            closest = new_closest[:, best]

        return _dense_rows(X, chosen).ravel()

    def centroids(self, params: np.ndarray) -> np.ndarray:
        """Return a view of ``params`` as the centroid matrix, shape ``(n_clusters, n_features)``."""
        return params.reshape(self.n_clusters, self.n_features)

    def decision_function(self, params: np.ndarray, X) -> np.ndarray:
        """Return minus the squared distance of each row to each centroid, shape ``(n_samples, n_clusters)``.

        The largest score of a row is its nearest centroid, as :meth:`predict` returns.
        """
        params = self._check_params(params)
        X = self._check_X(X)
        return -_squared_distances(X, _squared_row_norms(X), self.centroids(params))

    def predict(self, params: np.ndarray, X) -> np.ndarray:
        """Return the index of the nearest centroid of each row, int64."""
        return np.argmax(self.decision_function(params, X), axis=1).astype(np.int64)

    def partial_statistics(self, params: np.ndarray, X,
                           sample_weight: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Return the Lloyd statistics of the rows of ``X`` under the centroids ``params``.

        Returns
        -------
        statistics : dict
            ``"sums"``, ndarray of shape (n_clusters, n_features): weighted sum of the
            rows nearest to each centroid. ``"counts"``, ndarray of shape (n_clusters,):
            their total weight. ``"inertia"``, ndarray of shape (1,): the weighted sum of
            squared distances of all rows to their nearest centroid.
        """
        params = self._check_params(params)
        X = self._check_X(X)
        sample_weight = self._check_sample_weight(sample_weight, X.shape[0])
        weights = np.ones(X.shape[0]) if sample_weight is None else sample_weight
        labels, nearest = self._nearest_centroids(params, X)

        # A sparse (n_clusters, n_samples) assignment matrix sums rows per cluster without
        # densifying a sparse X.
        assignment = sp.csr_matrix((weights, (labels, np.arange(X.shape[0]))),
                                   shape=(self.n_clusters, X.shape[0]))
        sums = assignment @ X
        sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
        return {
            "sums": sums.astype(np.float64),
            "counts": np.bincount(labels, weights=weights, minlength=self.n_clusters).astype(np.float64),
            "inertia": np.array([float(weights @ nearest)]),
        }

    def combine_statistics(self, statistics: Sequence[Mapping[str, np.ndarray]], params: np.ndarray) -> np.ndarray:
        """Return the Lloyd update: each centroid moves to the mean of its rows.

        A centroid that no row chose (an empty cluster) keeps its old position.
        """
        params = self._check_params(params)
        if not statistics:
            raise ValueError("combine_statistics needs the statistics of at least one worker")
        sums = np.sum([np.asarray(part["sums"], dtype=np.float64) for part in statistics], axis=0)
        counts = np.sum([np.asarray(part["counts"], dtype=np.float64) for part in statistics], axis=0)

        centroids = self.centroids(params).copy()
        filled = counts > 0.0
        centroids[filled] = sums[filled] / counts[filled, np.newaxis]
        return centroids.ravel()

    def loss_grad(self, params: np.ndarray, X, y: np.ndarray | None = None,
                  sample_weight: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """Return the inertia of the rows of ``X`` and its gradient, ignoring ``y``."""
        statistics = self.partial_statistics(params, X, sample_weight)
        centroids = self.centroids(self._check_params(params))
        grad = 2.0 * (statistics["counts"][:, np.newaxis] * centroids - statistics["sums"])
        return float(statistics["inertia"][0]), grad.ravel()

    def metrics(self, params: np.ndarray, X, y: np.ndarray | None = None) -> dict[str, float]:
        """Return ``loss`` (the mean squared distance to the nearest centroid) and ``inertia``."""
        _, nearest = self._nearest_centroids(self._check_params(params), self._check_X(X))
        # partial_statistics sums the inertia as a dot product with the row weights, so a
        # dot product with unit weights gives the same bits.
        inertia = float(np.ones(X.shape[0]) @ nearest)
        return {"loss": inertia / X.shape[0], "inertia": inertia}

    def _nearest_centroids(self, params: np.ndarray, X) -> tuple[np.ndarray, np.ndarray]:
        """Return the index of each row's nearest centroid and the squared distance to it."""
        distances = _squared_distances(X, _squared_row_norms(X), self.centroids(params))
        labels = np.argmin(distances, axis=1)
        return labels, distances[np.arange(X.shape[0]), labels]


def _squared_row_norms(X) -> np.ndarray:
    if sp.issparse(X):
        return np.asarray(X.multiply(X).sum(axis=1)).ravel()
    return np.einsum("ij,ij->i", X, X)


def _squared_distances(X, row_norms: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Return ``||x_i - c_k||^2`` of shape (n_samples, n_centroids) from the expanded square."""
    cross = np.asarray(X @ centroids.T)
    distances = row_norms[:, np.newaxis] - 2.0 * cross + np.einsum("ij,ij->i", centroids, centroids)
    # Cancellation in the expanded form can leave tiny negative values.
    return np.maximum(distances, 0.0)


def _dense_rows(X, indices) -> np.ndarray:
    rows = X[np.asarray(indices)]
    return rows.toarray() if sp.issparse(rows) else np.array(rows, dtype=np.float64)
