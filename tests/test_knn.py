"""The PatchCore-style kNN baseline: exact distances, coreset, persistence, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from funad.errors import ConfigError, DataError, NotFittedError
from funad.knn import KNNScorer, greedy_coreset
from funad.nn import faiss_available


class _Source:  # duck-typed like funad.data.FeatureSource
    """A minimal FeatureSource over an in-memory tensor that records its reads."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.n_images, self.n_patches, self.dim = x.shape
        self.reads = 0

    def get(self, indices: np.ndarray) -> torch.Tensor:
        self.reads += 1
        return self.x[torch.as_tensor(indices)]


def _data(seed: int = 0, n_train: int = 12, n_test: int = 6, p: int = 9, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, p, d, generator=g)
    test = torch.randn(n_test, p, d, generator=g)
    test[n_test // 2:, 4] += 6.0  # one planted outlier patch in the last half of the test images
    return train, test


def test_scores_are_exact_nearest_distances():
    train, test = _data()
    knn = KNNScorer().fit(train)
    expected = torch.cdist(test.reshape(-1, 16).double(), train.reshape(-1, 16).double()).min(dim=1).values
    got = knn.score_patches(test)
    assert got.shape == (6, 9) and got.dtype == np.float32
    np.testing.assert_allclose(got.ravel(), expected.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(knn.score_images(test), got.max(axis=1))
    assert knn.bank_.shape == (12 * 9, 16)


def test_planted_outliers_score_highest():
    train, test = _data()
    scores = KNNScorer().fit(train).score_images(test)
    assert scores[3:].min() > scores[:3].max()
    # A training patch is its own nearest neighbour.
    assert np.allclose(KNNScorer().fit(train).score_patches(train), 0.0, atol=1e-3)


def test_feature_source_and_numpy_inputs_match_tensor():
    train, test = _data()
    source = _Source(train)
    from_source = KNNScorer().fit(source)
    assert source.reads >= 1
    a = from_source.score_patches(_Source(test))
    b = KNNScorer().fit(train.numpy()).score_patches(test.numpy())
    np.testing.assert_array_equal(a, b)


def _naive_greedy(x: torch.Tensor, first: int, n: int) -> list[int]:
    chosen = [first]
    while len(chosen) < n:
        d = torch.cdist(x.double(), x[chosen].double()).min(dim=1).values
        chosen.append(int(d.argmax()))
    return chosen


def test_greedy_coreset_matches_naive_k_center():
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(1))
    sel = greedy_coreset(x, 10, seed=3, projection_dim=None)
    assert sel.tolist() == _naive_greedy(x, int(sel[0]), 10)
    assert len(set(sel.tolist())) == 10


def test_greedy_coreset_picks_the_far_points_first():
    x = torch.zeros(50, 4)
    x[:, 0] = torch.linspace(0, 1, 50)
    x[7] = torch.tensor([100.0, 0, 0, 0])
    x[21] = torch.tensor([0.0, -100.0, 0, 0])
    sel = greedy_coreset(x, 3, seed=0, projection_dim=None).tolist()
    assert {7, 21} <= set(sel)


def test_coreset_ratio_is_deterministic_and_sized():
    train, test = _data(d=200)
    a = KNNScorer(coreset_ratio=0.25, seed=4).fit(train)
    b = KNNScorer(coreset_ratio=0.25, seed=4).fit(train)
    assert a.bank_.shape == (round(0.25 * 12 * 9), 200)
    assert torch.equal(a.bank_, b.bank_)
    # A smaller bank can only increase each patch's nearest distance.
    full = KNNScorer().fit(train).score_patches(test)
    assert np.all(a.score_patches(test) >= full - 1e-4)


def test_state_dict_round_trip_gives_identical_scores():
    train, test = _data()
    knn = KNNScorer(coreset_ratio=0.5).fit(train)
    state = knn.state_dict()
    assert set(state) == {"bank"} and state["bank"].device.type == "cpu"
    loaded = KNNScorer().load_state_dict({"bank": state["bank"].clone()})
    np.testing.assert_array_equal(loaded.score_patches(test), knn.score_patches(test))


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_faiss_backend_agrees_with_torch():
    train, test = _data()
    a = KNNScorer(backend="torch").fit(train).score_patches(test)
    b = KNNScorer(backend="faiss").fit(train).score_patches(test)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_errors_are_specific():
    train, test = _data()
    with pytest.raises(NotFittedError, match="fit"):
        KNNScorer().score_patches(test)
    with pytest.raises(NotFittedError):
        KNNScorer().state_dict()
    knn = KNNScorer().fit(train)
    with pytest.raises(DataError, match="D=16.*D=8"):
        knn.score_patches(test[..., :8])
    with pytest.raises(ConfigError, match="coreset_ratio"):
        KNNScorer(coreset_ratio=0.0).fit(train)
    with pytest.raises(ConfigError, match="backend"):
        KNNScorer(backend="annoy").fit(train)
    with pytest.raises(DataError, match="no training images"):
        KNNScorer().fit(train[:0])
    with pytest.raises(DataError, match=r"\(n_images, n_patches, dim\)"):
        KNNScorer().fit(train[0])
    with pytest.raises(DataError, match="'bank'"):
        KNNScorer().load_state_dict({"weight": train[0]})
