"""The FunAD estimator: training on planted outliers, determinism, persistence, resume."""

import numpy as np
import pytest
import torch

from funad import FunAD, preset
from funad.errors import ConfigError, DataError, NotFittedError

N, P, D = 24, 9, 8
OUTLIERS = [0, 5]  # images with one planted anomalous patch each
POSITION = 4


def planted(n=N, p=P, d=D, seed=0, position=POSITION):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, d, generator=g) * 0.3
    for i in OUTLIERS:
        x[i, position] += 4.0
    return x


def small(**overrides):
    settings = dict(epochs=6, batch_size=8, lr=1e-3, seed=0)
    settings.update(overrides)
    return preset("paper", **settings)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny problems run far faster on one thread than on a busy shared CPU's two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fitted(one_thread):
    records = []
    model = FunAD(small()).fit(planted(), callback=records.append)
    return model, records


def weights(model):
    return model.state_dict()["net"]


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_planted_outliers_score_higher(fitted):
    model, _ = fitted
    x = planted()
    image = model.score_images(x)
    inliers = np.setdiff1d(np.arange(N), OUTLIERS)
    assert image[OUTLIERS].min() > image[inliers].max()
    patch = model.score_patches(x)
    assert patch.shape == (N, P) and patch.dtype == np.float32
    assert patch[OUTLIERS, POSITION].min() > np.delete(patch[OUTLIERS], POSITION, axis=1).max()


def test_callback_record_per_epoch(fitted):
    _, records = fitted
    assert [r["epoch"] for r in records] == list(range(1, 7))
    keys = {"loss", "loss_bce", "loss_ms", "n_pseudo_anomalies", "n_ambiguous", "n_pairs", "bank_images",
            "bank_patches", "time_bank", "time_search", "time_step"}
    assert keys <= set(records[-1])
    r = records[-1]
    assert r["loss"] == pytest.approx(r["loss_bce"] + 2.5 * r["loss_ms"], rel=1e-5)
    assert r["bank_patches"] == r["bank_images"] * P
    assert "bank_purity" not in r


def test_diagnostics_are_reported():
    """Purity and pseudo-label precision/recall are computed from the given labels, exactly."""
    x, steps = planted(), N // 8

    def run(image_labels, patch_labels):
        records = []
        FunAD(small(epochs=2)).fit(x, callback=records.append,
                                   diagnostics={"image_labels": image_labels, "patch_labels": patch_labels})
        return records[-1]

    clean = run(np.zeros(N, int), np.zeros((N, P), int))
    assert clean["bank_purity"] == 1.0
    assert clean["pseudo_recall"] is None  # no true anomalous patch
    assert clean["pseudo_precision"] == (0.0 if clean["n_pseudo_anomalies"] > 0 else None)
    dirty = run(np.ones(N, int), np.ones((N, P), int))
    assert dirty["bank_purity"] == 0.0
    assert dirty["pseudo_precision"] == 1.0
    # every patch is truly anomalous: recall = pseudo-anomalies / patches seen in the epoch
    assert dirty["pseudo_recall"] == pytest.approx(dirty["n_pseudo_anomalies"] * steps / (steps * 8 * P))
    with pytest.raises(DataError, match=r"image_labels must have shape \(24,\)"):
        FunAD(small(epochs=1)).fit(planted(), diagnostics={"image_labels": np.zeros(3)})


def test_diagnostics_split_real_and_synthetic_images():
    """FUN-AD*: pseudo-label quality is also reported per group, and the groups add up to the pooled figures."""
    syn = np.arange(N) % 2 == 1
    patch_labels = np.repeat(syn[:, None], P, axis=1).astype(int)  # synthetic images wholly anomalous, real ones clean
    records = []
    FunAD(small(epochs=2)).fit(planted(), callback=records.append, synthetic=syn,
                               diagnostics={"image_labels": syn.astype(int), "patch_labels": patch_labels})
    r = records[-1]
    assert r["pseudo_recall_real"] is None  # no real anomalous patch
    assert r["pseudo_precision_synthetic"] in (1.0, None)
    assert r["pseudo_precision_real"] in (0.0, None)
    # every true positive is on a synthetic image, so the pooled precision is the synthetic share
    assert r["pseudo_share_synthetic"] == pytest.approx(r["pseudo_precision"])
    assert r["pseudo_recall_synthetic"] == pytest.approx(r["pseudo_recall"])
    plain = []
    FunAD(small(epochs=1)).fit(planted(), callback=plain.append,
                               diagnostics={"image_labels": np.zeros(N, int), "patch_labels": np.zeros((N, P), int)})
    assert "pseudo_share_synthetic" not in plain[-1]


def test_diagnostics_split_real_defects_by_whether_the_batch_holds_a_synthetic_image():
    """FUN-AD*: the real defects' recall in batches with and without a synthetic image adds up to the real
    recall, and the share of such batches whose largest distance lies on a synthetic patch is reported."""
    syn = np.zeros(N, bool)
    syn[[3, 11, 19]] = True  # a few synthetic images, so some batches of 8 hold none
    x = planted()
    # synthetic patches scattered far from everything, each other included: the batch maximum should be theirs
    x[syn] += 5.0 * torch.randn(int(syn.sum()), P, D, generator=torch.Generator().manual_seed(1))
    patch_labels = np.zeros((N, P), int)
    patch_labels[syn] = 1
    patch_labels[OUTLIERS, POSITION] = 1  # the real defects
    records = []
    FunAD(small(epochs=3)).fit(x, callback=records.append, synthetic=syn,
                               diagnostics={"image_labels": (patch_labels.max(1) > 0).astype(int),
                                            "patch_labels": patch_labels})
    r = records[-1]
    assert r["batch_max_on_synthetic"] == 1.0
    parts = [(r[f"pseudo_recall_real_{w}_synthetic"], r[f"dhat_real_defects_{w}_synthetic"]) for w in ("with", "without")]
    seen = [(rec, dhat) for rec, dhat in parts if rec is not None]
    assert seen and all(0.0 <= rec <= 1.0 and 0.0 <= dhat <= 1.0 for rec, dhat in seen)
    if len(seen) == 1:  # every real defect fell in one kind of batch: its recall is the real recall
        assert seen[0][0] == pytest.approx(r["pseudo_recall_real"])
    else:
        assert min(rec for rec, _ in seen) - 1e-9 <= r["pseudo_recall_real"] <= max(rec for rec, _ in seen) + 1e-9


def test_same_seed_gives_identical_weights(fitted):
    model, _ = fitted
    again = FunAD(small()).fit(planted())
    assert same_weights(weights(model), weights(again))
    other = FunAD(small(seed=1)).fit(planted())
    assert not same_weights(weights(model), weights(other))


class WholeImagesOnly:
    """A feature source with nothing but ``get``, as a streaming source may be."""

    def __init__(self, x):
        self.x, (self.n_images, self.n_patches, self.dim) = x, x.shape

    def get(self, indices):
        return self.x[torch.as_tensor(np.asarray(indices))].float()


def test_sampled_patches_train_the_same_whether_or_not_the_source_gathers_them():
    # TensorSource copies only a step's sampled patches (get_patches); a source without it gives whole images
    config = small(epochs=2, bank_every=2, batch_patches=5, bank_patches=30)
    x = planted()
    direct = FunAD(config).fit(x)
    assert same_weights(weights(direct), weights(FunAD(config).fit(WholeImagesOnly(x))))
    from funad.data import SubsetSource, TensorSource, get_patches

    positions = torch.tensor([0, 3, 8])
    for source in (TensorSource(x), SubsetSource(TensorSource(x), np.arange(N)), WholeImagesOnly(x)):
        assert torch.equal(get_patches(source, np.array([5, 2]), positions), x[[5, 2]][:, positions])


def test_state_dict_round_trip_gives_identical_scores(fitted):
    model, _ = fitted
    x = planted(seed=3)
    loaded = FunAD.from_state_dict(model.state_dict())
    assert np.array_equal(loaded.score_patches(x), model.score_patches(x))
    assert loaded.config == model.config


@pytest.mark.parametrize("overrides", [{}, {"bank_every": 2, "batch_patches": 5, "bank_patches": 30},
                                       {"ema": 0.9}])
def test_resume_equals_uninterrupted(overrides):
    states = []
    full_records = []
    full = FunAD(small(epochs=4, **overrides)).fit(planted(), callback=full_records.append)
    FunAD(small(epochs=2, **overrides)).fit(planted(), on_checkpoint=states.append)
    assert [s["epoch"] for s in states] == [1, 2]
    resumed_records = []
    resumed = FunAD(small(epochs=4, **overrides)).fit(planted(), checkpoint=states[-1],
                                                      callback=resumed_records.append)
    assert same_weights(weights(full), weights(resumed))
    assert [r["loss"] for r in resumed_records] == [r["loss"] for r in full_records[2:]]


def test_resume_with_other_config_is_refused():
    states = []
    FunAD(small(epochs=1)).fit(planted(), on_checkpoint=states.append)
    with pytest.raises(ConfigError, match="tau_n=0.5 \\(now 0.6\\)"):
        FunAD(small(epochs=2, tau_n=0.6)).fit(planted(), checkpoint=states[0])


def test_checkpoint_from_before_a_setting_existed_resumes_exactly():
    states = []
    whole = FunAD(small(epochs=2)).fit(planted(), on_checkpoint=states.append)
    old = {**states[0], "config": {k: v for k, v in states[0]["config"].items() if k != "score_space"}}
    resumed = FunAD(small(epochs=2)).fit(planted(), checkpoint=old)
    assert same_weights(weights(whole), weights(resumed))
    with pytest.raises(ConfigError, match="score_space"):
        FunAD(small(epochs=2, score_space="logit")).fit(planted(), checkpoint=old)


def test_image_level_variant_p1():
    x = planted(n=20, p=1, position=0)
    model = FunAD(small(epochs=6)).fit(x)
    assert model.score_patches(x).shape == (20, 1)
    image = model.score_images(x)
    assert image.shape == (20,)
    assert image[OUTLIERS].min() > np.delete(image, OUTLIERS).max()


def test_speed_options_and_paper_reading_run():
    records = []
    cfg = small(epochs=2, bank_every=2, bank_patches=40, batch_patches=4, bf16=True, ms_on_clean=True)
    model = FunAD(cfg).fit(planted().numpy(), callback=records.append)
    assert records[-1]["bank_patches"] == 40
    assert np.isfinite(records[-1]["loss"])
    assert model.score_images(planted()).shape == (N,)
    # ms_on_clean is a different update (the exact difference is pinned in test_train_step.py)
    reference = FunAD(cfg.replace(ms_on_clean=False)).fit(planted().numpy())
    assert not same_weights(weights(model), weights(reference))


def test_bad_input_errors():
    with pytest.raises(DataError, match="10 training images are fewer than batch_size=32"):
        FunAD(preset("paper")).fit(torch.zeros(10, 2, 3))
    with pytest.raises(NotFittedError):
        FunAD().score_images(torch.zeros(1, 2, 3))
    with pytest.raises(DataError, match="shape \\(n_images, n_patches, dim\\)"):
        FunAD(small()).fit(torch.zeros(10, 3))


def test_dim_mismatch_names_both_numbers(fitted):
    model, _ = fitted
    with pytest.raises(DataError, match="fitted on D=8 features, input has D=5"):
        model.score_patches(torch.zeros(2, P, 5))


def test_image_level_variant_with_a_single_feature_bank():
    """P = 1 (class tokens only) and a bank of one image, hence one feature: k = 2 must not fail."""
    x = torch.randn(12, 1, D, generator=torch.Generator().manual_seed(0))
    records = []
    model = FunAD(small(epochs=2, batch_size=4, r=0.01)).fit(x, callback=records.append)
    assert all(r["bank_patches"] == 1 for r in records)
    assert model.score_patches(x).shape == (12, 1)


def test_nan_features_stop_the_fit_with_a_clear_error():
    from funad.errors import DivergedError

    x = planted()
    x[3, 2, 0] = float("nan")
    with pytest.raises(DivergedError, match="NaN or inf"):
        FunAD(small(epochs=1)).fit(x)


def test_nan_loss_stops_the_fit(monkeypatch):
    import funad.train_step
    from funad.errors import DivergedError

    real = funad.train_step.losses.balanced_bce
    monkeypatch.setattr(funad.train_step.losses, "balanced_bce", lambda pred, y: real(pred, y) * float("nan"))
    with pytest.raises(DivergedError, match="became (nan|NaN).* in epoch 1"):
        FunAD(small(epochs=3)).fit(planted())


def test_max_iterations_caps_epochs_on_large_training_sets():
    cfg = small(epochs=10, batch_size=8, max_iterations=6)
    assert cfg.epochs_for(24) == 2  # 3 steps per epoch
    assert cfg.epochs_for(8) == 6
    assert cfg.epochs_for(400) == 1
    records = []
    FunAD(cfg).fit(planted(), callback=records.append)
    assert len(records) == 2


def test_bank_pool_scores_a_sample_of_images():
    records = []
    FunAD(small(epochs=2, bank_pool=10, r=1.0, tau_b=1.0)).fit(planted(), callback=records.append)
    # every pooled image but the top scorer is a candidate; never more than the pool
    assert all(1 <= r["bank_images"] <= 10 for r in records)


def test_weight_average_leaves_training_alone_and_averages_the_steps():
    """ema keeps a moving average for inference only: the trained weights (in the checkpoint) are those
    of a fit without it, decay 0 is the last weights, and the average is the EMA of every step's weights."""
    plain_states, ema_states, zero_states = [], [], []
    plain = FunAD(small(epochs=2)).fit(planted(), on_checkpoint=plain_states.append)
    FunAD(small(epochs=2, ema=0.8)).fit(planted(), on_checkpoint=ema_states.append)
    zero = FunAD(small(epochs=2, ema=0.0)).fit(planted(), on_checkpoint=zero_states.append)
    assert same_weights(plain_states[-1]["net"], ema_states[-1]["net"])
    assert same_weights(weights(plain), weights(zero))
    assert not same_weights(ema_states[-1]["net"], ema_states[-1]["ema_net"])

    # the same average by hand, from the weights after every step (a spy on the optimiser's step)
    from funad import train_step

    seen = []
    real = train_step.optimise

    def spy(net, *args, **kwargs):
        out = real(net, *args, **kwargs)
        seen.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return out

    import funad.model as model_module
    model_module.optimise = spy
    try:
        averaged = FunAD(small(epochs=2, ema=0.8)).fit(planted())
    finally:
        model_module.optimise = real
    from funad.localnet import LocalNet
    expected = LocalNet(D, generator=torch.Generator().manual_seed(0)).state_dict()
    for step in seen:
        expected = {k: 0.8 * expected[k] + 0.2 * step[k] for k in expected}
    for k, v in weights(averaged).items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="ema must lie in"):
        small(ema=1.0)


def test_logit_scores_order_patches_like_probabilities_without_saturating(fitted):
    """score_space="logit" is inference only: σ(logit) is the probability score, and where the sigmoid
    saturates to 1.0 in float32 the logits still tell patches apart."""
    model = fitted[0]
    x = planted(seed=3)
    prob = model.score_patches(x)
    as_logit = FunAD.from_state_dict({**model.state_dict(), "config": {**model.config.to_dict(), "score_space": "logit"}})
    logit = as_logit.score_patches(x)
    np.testing.assert_allclose(torch.sigmoid(torch.from_numpy(logit)).numpy(), prob, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(logit.argmax(axis=1), prob.argmax(axis=1))

    with torch.no_grad():  # push every score past float32's sigmoid range
        as_logit.net_.discriminator[-2].bias += 60.0
    saturated = FunAD.from_state_dict({**as_logit.state_dict(), "config": model.config.to_dict()})
    assert np.all(saturated.score_patches(x) == 1.0)
    assert len(np.unique(as_logit.score_patches(x))) == x.shape[0] * x.shape[1]


def test_unknown_score_space_is_refused():
    with pytest.raises(ConfigError, match="score_space"):
        small(score_space="rank")
