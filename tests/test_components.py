"""FUN-AD components on small synthetic inputs with known answers."""

import numpy as np
import pytest
import torch

from funad.data import TensorSource
from funad.localnet import LocalNet
from funad.losses import balanced_bce, mutual_smoothness
from funad.memory_bank import (bank_candidates, draw_pool, sample_bank_images, sample_bank_patches,
                               score_images)
from funad.ops import minmax
from funad.pairs import batch_mutual_pairs
from funad.perturb import draw_noise, feature_sigma, perturb
from funad.pseudo_labels import (ambiguous, nn_distance, nn_distance_by_identity, normalise_distances,
                                 pseudo_labels)


def test_localnet_shapes_and_range():
    net = LocalNet(6, generator=torch.Generator().manual_seed(0))
    f = torch.randn(3, 5, 6)
    assert net.adapt(f).shape == (3, 5, 6)
    s = net(f)
    assert s.shape == (3, 5) and bool(((s > 0) & (s < 1)).all())
    assert torch.equal(s, net.discriminate(net.adapt(f)))


def test_localnet_init_is_seeded():
    a = LocalNet(4, generator=torch.Generator().manual_seed(3)).state_dict()
    b = LocalNet(4, generator=torch.Generator().manual_seed(3)).state_dict()
    c = LocalNet(4, generator=torch.Generator().manual_seed(4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["adaptor.0.weight"], c["adaptor.0.weight"])


def test_minmax_edge_cases():
    assert minmax(torch.tensor([2.0, 4.0, 3.0])).tolist() == [0.0, 1.0, 0.5]
    assert minmax(torch.tensor([7.0, 7.0, 7.0])).tolist() == [0.0, 0.0, 0.0]
    assert normalise_distances(torch.tensor([1.0])).tolist() == [0.0]


def test_bank_candidates_threshold_and_all_equal():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.5])  # Ŝ = 0, 1, 0.25, 0.5
    assert bank_candidates(scores, 0.5).tolist() == [0, 2]  # strict: Ŝ=0.5 is out
    assert bank_candidates(torch.full((4,), 0.3), 0.5).tolist() == [0, 1, 2, 3]
    assert bank_candidates(scores, 0.0).tolist() == [0]  # τ_b = 0 keeps the minimum


def test_bank_candidates_rank_rule_keeps_a_fixed_share():
    # Saturated scores: min-max keeps only the low outlier, the rank rule the lowest half.
    scores = torch.tensor([0.95, 0.2, 0.97, 0.96, 1.0, 0.94, 0.98, 0.99])
    assert bank_candidates(scores, 0.5).tolist() == [1]
    assert bank_candidates(scores, 0.5, rule="rank").tolist() == [0, 1, 3, 5]
    assert bank_candidates(torch.full((5,), 0.3), 0.5, rule="rank").tolist() == [0, 1]  # ties: by index
    assert bank_candidates(scores, 0.0, rule="rank").tolist() == [1]  # never empty


def test_sample_bank_images_size_and_determinism():
    cand = torch.arange(10, 17)  # |C| = 7
    a = sample_bank_images(cand, 0.5, torch.Generator().manual_seed(0))
    b = sample_bank_images(cand, 0.5, torch.Generator().manual_seed(0))
    assert a.numel() == 3 and torch.equal(a, b)  # ⌊0.5·7⌋
    assert len(set(a.tolist())) == 3 and set(a.tolist()) <= set(cand.tolist())
    assert sample_bank_images(cand[:1], 0.5, torch.Generator()).tolist() == [10]  # at least one


def test_sample_bank_patches():
    bank = torch.arange(20.0).view(10, 2)
    kept, rows = sample_bank_patches(bank, None, torch.Generator())
    assert kept is bank and rows is None
    sub, rows = sample_bank_patches(bank, 4, torch.Generator().manual_seed(0))
    assert sub.shape == (4, 2) and len({tuple(r) for r in sub.tolist()}) == 4
    assert torch.equal(sub, bank[rows]) and rows.tolist() == sorted(rows.tolist())


def test_draw_pool_scores_all_or_a_sorted_sample():
    assert draw_pool(5, None, torch.Generator()).tolist() == [0, 1, 2, 3, 4]
    assert draw_pool(5, 9, torch.Generator()).tolist() == [0, 1, 2, 3, 4]
    pool = draw_pool(100, 10, torch.Generator().manual_seed(0))
    assert pool.numel() == 10 and pool.tolist() == sorted(set(pool.tolist())) and pool.max() < 100


def test_score_images_on_a_pool_keeps_source_indices():
    net = LocalNet(3, generator=torch.Generator().manual_seed(0))
    f = torch.randn(6, 4, 3)
    pool = torch.tensor([1, 4])
    scored = score_images(net, TensorSource(f), torch.device("cpu"), keep_adapted=True, images=pool)
    with torch.no_grad():
        assert torch.equal(scored.images, pool)
        assert torch.allclose(scored.image_scores, net(f[pool]).amax(dim=1))


def test_score_images_max_over_patches_and_keeps_adapted():
    net = LocalNet(3, generator=torch.Generator().manual_seed(0))
    f = torch.randn(5, 4, 3)
    scored = score_images(net, TensorSource(f), torch.device("cpu"), keep_adapted=True)
    with torch.no_grad():
        assert torch.allclose(scored.image_scores, net(f).amax(dim=1))
        assert torch.allclose(scored.adapted, net.adapt(f))
    assert score_images(net, TensorSource(f), torch.device("cpu"), keep_adapted=False).adapted is None


def test_nn_distance_self_exclusion():
    sqdist = torch.tensor([[0.005, 4.0],   # found itself (< 1e-2): use the second
                           [1.0, 4.0],     # nearest is another patch
                           [0.0, 0.001],   # both count as 0
                           [0.02, 3.0]])   # just above self_eps: kept
    assert nn_distance(sqdist, 1e-2).tolist() == pytest.approx([4.0, 1.0, 0.0, 0.02])


def test_nn_distance_by_identity_skips_only_the_own_entry():
    sqdist = torch.tensor([[0.2, 4.0],     # stale copy of itself at 0.2: skipped although > self_eps
                           [0.001, 3.0],   # another patch at 0.001: kept although < self_eps
                           [1.0, 2.0],     # itself is second: the nearest is kept
                           [0.5, 0.5]])    # its own entry is the only neighbour (k clipped): 0
    is_self = torch.tensor([[True, False], [False, True], [False, True], [True, True]])
    assert nn_distance_by_identity(sqdist, is_self).tolist() == pytest.approx([4.0, 0.001, 1.0, 0.0])


def test_pseudo_labels_and_ambiguous_thresholds():
    d_hat = torch.tensor([0.0, 0.5, 0.6, 0.9, 0.95, 1.0])
    assert pseudo_labels(d_hat, 0.5).tolist() == [0, 0, 1, 1, 1, 1]
    assert ambiguous(d_hat, 0.5, 0.9).tolist() == [False, False, True, False, False, False]


def test_feature_sigma_is_max_over_positions_of_std_across_images():
    f = torch.zeros(2, 3, 2)
    f[:, 0, 0] = torch.tensor([0.0, 2.0])  # std sqrt(2) at position 0, feature 0
    f[:, 2, 0] = torch.tensor([0.0, 1.0])
    f[:, 1, 1] = torch.tensor([1.0, 4.0])  # std 3/sqrt(2) at position 1, feature 1
    assert feature_sigma(f).tolist() == pytest.approx([2 ** 0.5, 3 / 2 ** 0.5])


def test_perturb_touches_only_masked_patches():
    f = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, 2] = mask[3, 0] = True
    out = perturb(f, mask, draw_noise(f, torch.Generator().manual_seed(1)))
    changed = (out != f).any(dim=-1)
    assert torch.equal(changed, mask)
    assert out.shape == f.shape and not torch.equal(out, f)
    # zero variance across images -> sigma 0 -> nothing moves
    flat = torch.ones(3, 2, 4)
    assert torch.equal(perturb(flat, torch.ones(3, 2, dtype=torch.bool), draw_noise(flat, torch.Generator())), flat)


def test_batch_mutual_pairs_index_the_flattened_batch():
    a = torch.tensor([[[0.0], [10.0]], [[0.5], [10.4]]])  # flat: 0, 10, 0.5, 10.4
    assert batch_mutual_pairs(a).tolist() == [[0, 2], [1, 3]]


def test_balanced_bce_known_values():
    p = torch.tensor([0.5, 0.5, 0.5, 0.9])
    y = torch.tensor([0.0, 0.0, 0.0, 1.0])
    expected = -np.log(0.9) - np.log(0.5)  # mean over y=1 + mean over y=0
    assert balanced_bce(p, y).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_bce_without_anomalies_drops_the_positive_term():
    p = torch.tensor([0.2, 0.4])
    y = torch.zeros(2)
    expected = -(np.log(0.8) + np.log(0.6)) / 2
    assert balanced_bce(p, y).item() == pytest.approx(expected, rel=1e-6)


def test_mutual_smoothness_known_value_and_no_pairs():
    p = torch.tensor([0.2, 0.6, 0.9, 0.1], requires_grad=True)
    pairs = torch.tensor([[0, 1], [2, 3]])
    # pair (0.2, 0.6): |p-m| = 0.2 each; pair (0.9, 0.1): 0.4 each -> mean 0.3
    assert mutual_smoothness(p, pairs).item() == pytest.approx(0.3)
    empty = mutual_smoothness(p, torch.zeros(0, 2, dtype=torch.long))
    assert empty.item() == 0.0 and empty.requires_grad
