"""The PatchCore baseline: exact distances, coreset bank, the re-weighted image score, persistence, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from funad.errors import ConfigError, DataError, NotFittedError
from funad.knn import KNNScorer
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
    knn = KNNScorer(coreset_ratio=1.0).fit(train)
    expected = torch.cdist(test.reshape(-1, 16).double(), train.reshape(-1, 16).double()).min(dim=1).values
    got = knn.score_patches(test)
    assert got.shape == (6, 9) and got.dtype == np.float32
    np.testing.assert_allclose(got.ravel(), expected.numpy(), rtol=1e-4, atol=1e-4)
    assert knn.bank_.shape == (12 * 9, 16)


def test_planted_outliers_score_highest():
    train, test = _data()
    scores = KNNScorer(coreset_ratio=1.0).fit(train).score_images(test)
    assert scores[3:].min() > scores[:3].max()
    # A training patch is its own nearest neighbour: its distance is 0 up to the rounding of the float32
    # expansion ||q||^2 - 2 q.b + ||b||^2 that the torch search uses (~1e-6 of ||q||^2 = 16 here, so ~0.002
    # after the square root), far below the ~1 between distinct patches.
    own = KNNScorer(coreset_ratio=1.0).fit(train).score_patches(train)
    assert own.max() < 1e-2
    others = torch.cdist(train.reshape(-1, 16), train.reshape(-1, 16)).fill_diagonal_(float("inf")).min(dim=1).values
    assert float(others.min()) > 0.5


def test_feature_source_and_numpy_inputs_match_tensor():
    train, test = _data()
    source = _Source(train)
    from_source = KNNScorer().fit(source)
    assert source.reads >= 1
    a = from_source.score(_Source(test))
    b = KNNScorer().fit(train.numpy()).score(test.numpy())
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def _reference_image_score(test: torch.Tensor, bank: torch.Tensor, b: int) -> np.ndarray:
    """PatchCore Eq. 7 written out directly, one image at a time, in float64."""
    bank = bank.double()
    out = []
    for x in test.double():
        d = torch.cdist(x, bank)  # (P, n_bank)
        nn_dist, nn_idx = d.min(dim=1)
        j = int(nn_dist.argmax())
        m_star = bank[nn_idx[j]]
        hood = torch.cdist(m_star[None], bank)[0].argsort()[:b]  # N_b(m*), m* itself first
        dist = (bank[hood] - x[j]).norm(dim=1)
        out.append(float((1 - torch.exp(nn_dist[j]) / torch.exp(dist).sum()) * nn_dist[j]))
    return np.array(out)


def test_image_score_is_patchcores_reweighted_max():
    train, test = _data()
    test = test * 0.3  # distances of a few units, so that the softmax is not saturated
    knn = KNNScorer(coreset_ratio=1.0, reweight_neighbours=4).fit(train * 0.3)
    patches, images = knn.score(test)
    np.testing.assert_allclose(images, _reference_image_score(test, knn.bank_, 4), rtol=1e-4)
    assert np.all(images < patches.max(axis=1)) and np.all(images > 0)
    plain = KNNScorer(coreset_ratio=1.0, reweight_neighbours=1).fit(train * 0.3)
    np.testing.assert_array_equal(plain.score_images(test), plain.score_patches(test).max(axis=1))


def test_reweighting_raises_matches_to_an_isolated_bank_feature():
    # Bank: a tight blob plus one isolated feature. A test patch equally far from its nearest bank feature
    # scores higher when that feature is the isolated one (its neighbourhood lies far from the patch).
    g = torch.Generator().manual_seed(0)
    blob = 0.05 * torch.randn(1, 40, 8, generator=g)
    lone = torch.zeros(1, 1, 8)
    lone[0, 0, 0] = 10.0
    knn = KNNScorer(coreset_ratio=1.0, reweight_neighbours=5).fit(torch.cat([blob, lone], dim=1))
    near_lone, near_blob = torch.zeros(1, 1, 8), torch.zeros(1, 1, 8)
    near_lone[0, 0, 0], near_blob[0, 0, 0] = 11.0, -1.0
    assert knn.score_images(near_lone)[0] > 1.2 * knn.score_images(near_blob)[0]


def test_coreset_ratio_is_deterministic_and_sized():
    train, test = _data(d=200)
    a = KNNScorer(coreset_ratio=0.25, seed=4).fit(train)
    b = KNNScorer(coreset_ratio=0.25, seed=4).fit(train)
    assert a.bank_.shape == (round(0.25 * 12 * 9), 200)
    assert torch.equal(a.bank_, b.bank_)
    # A smaller bank can only increase each patch's nearest distance.
    full = KNNScorer(coreset_ratio=1.0).fit(train).score_patches(test)
    assert np.all(a.score_patches(test) >= full - 1e-4)


def test_state_dict_round_trip_gives_identical_scores():
    train, test = _data()
    knn = KNNScorer(coreset_ratio=0.5).fit(train)
    state = knn.state_dict()
    assert set(state) == {"bank"} and state["bank"].device.type == "cpu"
    loaded = KNNScorer().load_state_dict({"bank": state["bank"].clone()})
    np.testing.assert_array_equal(loaded.score(test)[0], knn.score(test)[0])
    np.testing.assert_array_equal(loaded.score(test)[1], knn.score(test)[1])


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
    for bad in (0.0, 1.5, None):
        with pytest.raises(ConfigError, match=r"coreset_ratio must lie in \(0, 1\]"):
            KNNScorer(coreset_ratio=bad).fit(train)
    with pytest.raises(DataError, match="keeps no patch"):
        KNNScorer(coreset_ratio=0.001).fit(train)  # 108 patches
    with pytest.raises(ConfigError, match="reweight_neighbours"):
        KNNScorer(reweight_neighbours=0).fit(train)
    with pytest.raises(ConfigError, match="backend"):
        KNNScorer(backend="annoy").fit(train)
    with pytest.raises(DataError, match="no training images"):
        KNNScorer().fit(train[:0])
    with pytest.raises(DataError, match=r"\(n_images, n_patches, dim\)"):
        KNNScorer().fit(train[0])
    with pytest.raises(DataError, match="'bank'"):
        KNNScorer().load_state_dict({"weight": train[0]})
