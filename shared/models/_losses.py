"""Loss functions shared by several models, stable for scores of any finite size."""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax


def softmax_cross_entropy(scores: np.ndarray, y: np.ndarray,
                          with_grad: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Return the per-row cross-entropy of class scores and its gradient with respect to them.

    Parameters
    ----------
    scores : ndarray of shape (n_samples, n_classes)
        Unnormalised log-probabilities (logits).
    y : ndarray of shape (n_samples,)
        Class indices in ``0 .. n_classes - 1``.
    with_grad : bool, default=True
        Whether to compute ``scores_grad``. Without it no probability is exponentiated.

    Returns
    -------
    losses : ndarray of shape (n_samples,)
        ``-log softmax(scores)[i, y_i]``, finite and >= 0 for any finite scores.
    scores_grad : ndarray of shape (n_samples, n_classes) or None
        ``softmax(scores) - onehot(y)``, or None when ``with_grad`` is False.
    """
    # log_softmax subtracts the row maximum first, so no exp() can overflow and a
    # probability that underflows to 0 still has a finite log.
    log_probabilities = log_softmax(scores, axis=1)
    y = np.asarray(y).astype(np.int64, copy=False)
    rows = np.arange(len(y))
    losses = -log_probabilities[rows, y]
    if not with_grad:
        return losses, None

    scores_grad = np.exp(log_probabilities)
    scores_grad[rows, y] -= 1.0
    return losses, scores_grad


def logistic_loss(margins: np.ndarray, with_grad: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Return ``log(1 + exp(-m))`` of every margin ``m`` and its negated derivative ``sigmoid(-m)``.

    Both come from one ``exp(-|m|)``, so neither can overflow for any finite margin. The
    loss is ``max(-m, 0) + log1p(exp(-|m|))``, the formula of ``numpy.logaddexp(0, -m)``,
    and ``sigmoid(-m)`` is ``exp(-m) / (1 + exp(-m))`` for ``m > 0`` and
    ``1 / (1 + exp(m))`` otherwise, the two branches of ``scipy.special.expit``.

    Parameters
    ----------
    margins : ndarray of shape (n_samples,)
        Signed scores ``s * z`` with ``s`` in {-1, 1}.
    with_grad : bool, default=True
        Whether to compute ``sigmoid_of_negated``.

    Returns
    -------
    losses : ndarray of shape (n_samples,)
    sigmoid_of_negated : ndarray of shape (n_samples,) or None
        ``sigmoid(-m)``, so that ``d loss / d m = -sigmoid(-m)``, or None when
        ``with_grad`` is False.
    """
    # In-place steps: a chunk of a few thousand rows keeps its temporaries in cache, and a
    # batch of a hundred rows pays for each numpy call more than for its arithmetic.
    positive_part = np.negative(margins)
    # min(m, -m) is -|m|, with the same exp for either sign of a zero margin.
    decay = np.minimum(margins, positive_part)
    np.exp(decay, out=decay)
    losses = np.log1p(decay)
    np.maximum(positive_part, 0.0, out=positive_part)
    losses += positive_part
    if not with_grad:
        return losses, None
    sigmoid_of_negated = np.where(margins > 0.0, decay, 1.0)
    decay += 1.0
    sigmoid_of_negated /= decay
    return losses, sigmoid_of_negated


def squared_error(predictions: np.ndarray, y: np.ndarray,
                  with_grad: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Return the per-row loss ``(z - y)^2 / 2`` of predictions ``z`` and its derivative ``z - y``.

    Unlike the other losses here, it overflows to inf once ``|z - y|`` exceeds about 1.9e154.

    Parameters
    ----------
    predictions : ndarray of shape (n_samples,)
    y : ndarray of shape (n_samples,)
        Targets.
    with_grad : bool, default=True
        Whether to return the derivative.

    Returns
    -------
    losses : ndarray of shape (n_samples,)
    residuals : ndarray of shape (n_samples,) or None
        ``z - y``, or None when ``with_grad`` is False.
    """
    residuals = predictions - y
    losses = 0.5 * residuals * residuals
    if not with_grad:
        return losses, None
    return losses, residuals
