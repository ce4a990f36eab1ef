"""The ensemble of members: a weighted sum of their probabilities, as the 1st place summed its models.

    ens = ensemble_scores({"mcan-seed1": logits1, "mcan-seed2": logits2}, weights={})   # missing weight = 1
"""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


def ensemble_scores(scores: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted sum of member probabilities (1st place: equal weights)."""
    return sum(float(weights.get(m, 1.0)) * sigmoid(np.asarray(s, np.float64)) for m, s in scores.items())
