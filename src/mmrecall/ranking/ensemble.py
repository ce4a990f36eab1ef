"""The ensemble of members: a weighted sum of their probabilities, as the 1st place summed its models.

    ens = ensemble_scores({"mcan-seed1": logits1, "mcan-seed2": logits2}, weights={})   # missing weight = 1
    w = learn_weights(scores, labels)   # non-negative weights fitted on valid (a weak member gets ~0)

The 1st place summed its members with equal weights. With members of very different quality (on hard
data a weak model can drag the sum down), `learn_weights` fits the weights instead: a logistic regression
of the label on the members' probabilities, weights constrained to be >= 0 and lightly L2-penalised,
rescaled so that they sum to the number of members (equal weights = all 1).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


def ensemble_scores(scores: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted sum of member probabilities (1st place: equal weights)."""
    return sum(float(weights.get(m, 1.0)) * sigmoid(np.asarray(s, np.float64)) for m, s in scores.items())


def learn_weights(scores: dict[str, np.ndarray], labels: np.ndarray, l2: float = 1e-3) -> dict[str, float]:
    """Non-negative member weights from a logistic regression of `labels` on the member probabilities."""
    names = list(scores)
    P = np.stack([sigmoid(np.asarray(scores[m], np.float64)) for m in names], axis=1)  # (rows, members)
    y = np.asarray(labels, np.float64)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        z = P @ w + b
        p = sigmoid(z)
        nll = np.mean(np.logaddexp(0.0, z) - y * z)
        grad = np.append(P.T @ (p - y), (p - y).sum()) / len(y)
        return nll + l2 * w @ w, grad + np.append(2 * l2 * w, 0.0)

    start = np.append(np.ones(len(names)), -len(names) / 2)
    fit = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=[(0, None)] * len(names) + [(None, None)])
    w = fit.x[:-1]
    w = w * len(names) / w.sum() if w.sum() > 0 else np.ones(len(names))
    return {m: round(float(v), 4) for m, v in zip(names, w)}


def learn_weights_oof(scores: dict[str, np.ndarray], labels: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """The ensemble of every row with weights fitted on the other folds' rows (honest on valid)."""
    out = np.zeros(len(labels))
    for k in np.unique(fold):
        held = fold == k
        weights = learn_weights({m: s[~held] for m, s in scores.items()}, labels[~held])
        out[held] = ensemble_scores({m: s[held] for m, s in scores.items()}, weights)
    return out
