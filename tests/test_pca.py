"""The re-ranker's PCA: exact below `exact_max_dim`, randomized above, read in chunks of rows (bounded memory)."""

from __future__ import annotations

import numpy as np

from mmrecall.ranking import features
from mmrecall.ranking.features import fit_pca, project


def fused(rng, n: int, dim: int, rank: int = 24) -> np.ndarray:
    """ReLU'd low-rank vectors with a decaying spectrum, float16 like outputs/<member>/<split>_fused.npy."""
    basis = rng.normal(size=(rank, dim)) * np.geomspace(4, 0.1, rank)[:, None]
    return np.maximum(rng.normal(size=(n, rank)) @ basis + 0.1 * rng.normal(size=(n, dim)), 0).astype(np.float16)


def reference(blocks, dims):
    x = np.concatenate(blocks).astype(np.float64)
    vals, vecs = np.linalg.eigh(np.cov(x, rowvar=False))
    return x.mean(0), vecs[:, ::-1][:, :dims].T


def test_exact_path_is_the_covariance_eigenvectors_whatever_the_chunks(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    blocks = [fused(rng, 300, 48), fused(rng, 200, 48)]
    np.save(tmp_path / "valid_fused.npy", blocks[0])
    mean, comps = fit_pca(blocks, 5)
    ref_mean, ref = reference(blocks, 5)
    assert mean.dtype == comps.dtype == np.float32 and comps.shape == (5, 48)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.abs((comps * ref).sum(1)), 1.0, atol=1e-5)
    monkeypatch.setattr(features, "CHUNK_VALUES", 48 * 7)  # 7 rows at a time, from a memory-mapped file
    mapped = [np.load(tmp_path / "valid_fused.npy", mmap_mode="r"), blocks[1]]
    mean7, comps7 = fit_pca(mapped, 5)
    np.testing.assert_allclose(mean7, mean, atol=1e-6)
    np.testing.assert_allclose(comps7, comps, atol=1e-5)
    np.testing.assert_allclose(project(mapped[0], mean7, comps7), (blocks[0].astype(np.float32) - mean) @ comps.T,
                               rtol=1e-4, atol=1e-4)


def test_randomized_path_finds_the_same_components_deterministically():
    rng = np.random.default_rng(1)
    blocks = [fused(rng, 1500, 160), fused(rng, 500, 160)]
    exact = fit_pca(blocks, 6)
    randomized = fit_pca(blocks, 6, exact_max_dim=100)
    np.testing.assert_allclose(randomized[0], exact[0], atol=1e-6)
    np.testing.assert_allclose(np.abs((randomized[1] * exact[1]).sum(1)), 1.0, atol=1e-3)
    again = fit_pca(blocks, 6, exact_max_dim=100)
    assert np.array_equal(again[1], randomized[1])


def test_zero_dims_gives_the_mean_only():
    """`dims` 0 (consensus features without PCA): the mean of every row, no components."""
    rng = np.random.default_rng(3)
    blocks = [fused(rng, 50, 20), fused(rng, 30, 20)]
    mean, comps = fit_pca(blocks, 0)
    np.testing.assert_allclose(mean, reference(blocks, 1)[0], rtol=1e-5, atol=1e-6)
    assert comps.shape == (0, 20) and project(blocks[0], mean, comps).shape == (50, 0)
